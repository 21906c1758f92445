"""ResNetFCN: the 2D image teacher (a ResNet encoder with an FPN decoder, no torchvision).

2DPASS's image branch is a ResNet34 FCN; this is the same encoder layout (BasicBlocks,
depths ``(3, 4, 6, 3)``, widths ``(64, 128, 256, 512)``, strides 4-8-16-32) with a light
top-down decoder (1×1 laterals, upsample-and-add) whose finest map, at stride
``out_stride`` (4 by default), is sampled bilinearly at each in-view point's pixel.

``pretrained: PATH`` starts the encoder from a torchvision-format ResNet ``state_dict`` (an
ImageNet ``resnet34`` as the authors' image teacher does: the same parameter names, ``fc.*``
dropped; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``module.`` prefixes are
accepted). Nothing is ever downloaded: the file must be on disk; any missing, unexpected or
mis-shaped key is an error naming the file.

Batch contract (keys of :func:`pcseg_kd.data.kitti.collate_kitti`): reads ``images
[B, 3, H, W]``, ``img_batch_idx [K]``, ``img_pixel_vu [K, 2]``; returns

``logits``  ``[K, num_classes]`` for the in-view points, in ``img_point_idx`` order
``feats``   ``[K, decoder_channels]`` their sampled decoder features
``fmap``    ``[B, decoder_channels, H / out_stride, W / out_stride]``
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import MODELS
from .sampling import sample_at_pixels


class BasicBlock2d(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetEncoder(nn.Module):
    """torchvision-compatible parameter names (conv1, bn1, layer1..4) for weight loading."""

    def __init__(self, in_channels: int, widths: Sequence[int], depths: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages, prev = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock2d(prev, width, 1 if i == 0 else 2)]
            blocks += [BasicBlock2d(width, width) for _ in range(depth - 1)]
            self.stages.append(f"layer{i + 1}")
            setattr(self, self.stages[-1], nn.Sequential(*blocks))
            prev = width

    def forward(self, x: Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for name in self.stages:
            x = getattr(self, name)(x)
            feats.append(x)
        return feats  # strides 4, 8, 16, 32


@MODELS.register_module("resnet_fcn")
class ResNetFCN(nn.Module):
    rows = "in_view"  # what the rows of ``logits`` are (the engine pairs student and teacher rows by it)
    reads_images = True  # batch["images"] (a dataset read without_pixels() has none)

    def __init__(self, num_classes: int = 19, in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 decoder_channels: int = 128, out_stride: int = 4, pretrained: Optional[str] = None):
        super().__init__()
        widths, depths = list(widths), list(depths)
        if not 1 <= len(widths) <= 4 or len(widths) != len(depths):
            raise ValueError(f"resnet_fcn: widths ({len(widths)}) and depths ({len(depths)}) must have the "
                             "same length, 1 to 4 stages")
        if min(widths) < 1 or min(depths) < 1 or decoder_channels < 1 or num_classes < 2:
            raise ValueError(f"resnet_fcn: widths, depths, decoder_channels must be >= 1 and num_classes >= 2, "
                             f"got widths={widths}, depths={depths}, decoder_channels={decoder_channels}, "
                             f"num_classes={num_classes}")
        if out_stride not in (1, 2, 4):
            raise ValueError(f"resnet_fcn: out_stride must be 1, 2 or 4, got {out_stride}")
        self.num_classes, self.out_channels, self.out_stride = num_classes, decoder_channels, out_stride
        self.encoder = ResNetEncoder(in_channels, widths, depths)
        self.laterals = nn.ModuleList([nn.Conv2d(w, decoder_channels, 1) for w in widths])
        self.smooth = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True))
        self.head = nn.Linear(decoder_channels, num_classes)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str) -> None:
        """The encoder from a torchvision-format ResNet ``state_dict`` at ``path`` (strict)."""
        from pathlib import Path

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"resnet_fcn.pretrained: {path} does not exist (weights are never downloaded: "
                                    "save torchvision's resnet34 state_dict there first)")
        if next(self.encoder.parameters()).is_meta:
            return  # a config check builds the model on the meta device: the file exists, nothing to load
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or not plain tensors
            raise ValueError(f"resnet_fcn.pretrained: {path} is not a readable state_dict "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"resnet_fcn.pretrained: {path} holds no state_dict of tensors")
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        own = self.encoder.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                     (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
            raise ValueError(f"resnet_fcn.pretrained: {path} does not fit this encoder (widths and depths "
                             f"must be the checkpoint's, e.g. resnet34: [64, 128, 256, 512] x [3, 4, 6, 3]): "
                             f"keys {'; '.join(parts)}")
        self.encoder.load_state_dict(state, strict=True)

    def feature_map(self, images: Tensor) -> Tensor:
        """``[B, decoder_channels, ceil(H / out_stride), ceil(W / out_stride)]``."""
        if images.dim() != 4:
            raise ValueError(f"resnet_fcn: images must be [B, C, H, W], got {tuple(images.shape)}")
        feats = self.encoder(images)
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            # sizes of odd-sized maps do not halve exactly: upsample to the finer map's size
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
        x = self.smooth(x)
        if self.out_stride < 4:
            size = [-(-s // self.out_stride) for s in images.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Tensor]:
        images = batch["images"]
        fmap = self.feature_map(images)
        # the map has ceil(H / s) cells of s pixels: sample in that (possibly padded) pixel grid,
        # cell j covering pixels [s·j, s·j + s) -- the half-pixel convention of the decoder's
        # bilinear upsampling (the strided convs centre cell j at pixel s·j, a fixed
        # (s - 1) / 2-pixel offset that the trained network absorbs)
        s = self.out_stride
        grid_hw = (fmap.shape[-2] * s, fmap.shape[-1] * s)
        feats = sample_at_pixels(fmap, batch["img_batch_idx"], batch["img_pixel_vu"], grid_hw)
        return {"logits": self.head(feats), "feats": feats, "fmap": fmap}

    def load_encoder_state_dict(self, state: Mapping[str, Tensor], strict: bool = False):
        """Load a torchvision-style ResNet ``state_dict`` (``fc.*`` ignored) into the encoder."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        return self.encoder.load_state_dict(state, strict=strict)
