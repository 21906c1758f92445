"""SpUNet: the sparse-voxel U-Net student (Pointcept's SpUNet-v1m1 layout, spconv 2.x).

Stem ``SubMConv3d`` (k5) -> four encoder stages (``SparseConv3d`` k2 s2 down, then residual
``SubMConv3d`` k3 blocks) -> four decoder stages (``SparseInverseConv3d`` k2 up, sharing the
down conv's ``indice_key`` so it lands exactly on the finer sites, concatenated with the skip,
then residual blocks) -> a per-voxel linear head. Defaults are Pointcept's SemanticKITTI widths
``channels = (32, 64, 128, 256, 256, 128, 96, 96)`` and depths ``layers = (2, 3, 4, 6, 2, 2, 2, 2)``.

Batch contract (keys of :func:`pcseg_kd.data.kitti.collate_kitti`): reads
``voxel_features [V, F]``, ``voxel_coords [V, 4]`` int (batch, z, y, x), ``spatial_shape
[Z, Y, X]``, ``batch_size`` and ``point2voxel [P]`` (-1: point has no voxel); returns

``logits``        ``[P, num_classes]`` per point (the voxel's logits; 0 where ``point2voxel`` = -1)
``feats``         ``[P, channels[-1]]`` per-point decoder features (for feature distillers)
``voxel_logits``  ``[V, num_classes]``
``point_valid``   ``[P]`` bool, ``point2voxel >= 0``

``backend`` picks the sparse-convolution package (:mod:`.backend`: ``spconv``, ``spconv_triton``
or ``auto``); parameter names and shapes are the same under each. On CPU, spconv needs the guards
of :mod:`.spconv_compat` (one intra-op thread, a stream-free backward): the constructor installs
them when the backend is spconv.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Literal, Sequence

import torch
from torch import Tensor, nn

from ...registry import MODELS
from .backend import check_input_device, resolve_backend, sparse_backend
from .spconv_compat import install_cpu_guards

BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # Pointcept's sparse-net batch norm settings


def _bn_relu(channels: int) -> list:
    return [nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU()]


class BasicBlock(nn.Module):
    """Two submanifold k3 convs with a residual; a k1 projection when the width changes.

    A plain ``nn.Module`` taking the sparse tensor, chained with ``nn.Sequential``: a
    ``SparseSequential`` would hand it the tensor only as a subclass of *its* package's
    ``SparseModule``, which would tie the class to one backend."""

    def __init__(self, spconv: ModuleType, in_channels: int, channels: int, indice_key: str):
        super().__init__()
        self.proj = None
        if in_channels != channels:
            self.proj = spconv.SparseSequential(
                spconv.SubMConv3d(in_channels, channels, 1, bias=False),
                nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM))
        self.conv1 = spconv.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU()

    def forward(self, x):  # the backend package's SparseConvTensor in and out
        identity = x.features if self.proj is None else self.proj(x).features
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + identity))


@MODELS.register_module("spunet")
class SpUNet(nn.Module):
    """Sparse U-Net over voxels; see the module docstring for the batch contract."""
    rows = "points"  # what the rows of ``logits`` are (the engine pairs student and teacher rows by it)


    def __init__(self, in_channels: int = 7, num_classes: int = 19, base_channels: int = 32,
                 channels: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2), stem_kernel: int = 5,
                 backend: Literal["spconv", "spconv_triton", "auto"] = "spconv"):
        super().__init__()
        self.backend = resolve_backend(backend, key="spunet.backend")  # "spconv" or "spconv_triton"
        spconv = sparse_backend(self.backend)
        if self.backend == "spconv":
            install_cpu_guards()
        channels, layers = list(channels), list(layers)
        if len(channels) != len(layers) or len(channels) % 2:
            raise ValueError(f"spunet: channels ({len(channels)}) and layers ({len(layers)}) must have "
                             "the same even length (encoder stages, then as many decoder stages)")
        if min(channels) < 1 or min(layers) < 1 or in_channels < 1 or num_classes < 2:
            raise ValueError(f"spunet: widths, depths and in_channels must be >= 1 and num_classes >= 2, "
                             f"got channels={channels}, layers={layers}, in_channels={in_channels}, "
                             f"num_classes={num_classes}")
        if stem_kernel % 2 == 0:
            raise ValueError(f"spunet: stem_kernel must be odd (a centred submanifold conv), got {stem_kernel}")
        self.num_stages = len(channels) // 2
        self.num_classes = num_classes
        self.out_channels = channels[-1]
        self.stem = spconv.SparseSequential(
            spconv.SubMConv3d(in_channels, base_channels, stem_kernel, padding=stem_kernel // 2, bias=False,
                              indice_key="stem"),
            *_bn_relu(base_channels))

        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        enc_channels = base_channels
        skip_channels = []
        for s in range(self.num_stages):
            skip_channels.append(enc_channels)
            self.down.append(spconv.SparseSequential(
                spconv.SparseConv3d(enc_channels, channels[s], 2, stride=2, bias=False, indice_key=f"spconv{s + 1}"),
                *_bn_relu(channels[s])))
            self.enc.append(nn.Sequential(*[
                BasicBlock(spconv, channels[s], channels[s], indice_key=f"subm{s + 1}") for _ in range(layers[s])]))
            enc_channels = channels[s]
        dec_channels = enc_channels
        for i in range(self.num_stages):
            s = self.num_stages - 1 - i  # the encoder stage this decoder stage undoes
            width = channels[self.num_stages + i]
            self.up.append(spconv.SparseSequential(
                spconv.SparseInverseConv3d(dec_channels, width, 2, bias=False, indice_key=f"spconv{s + 1}"),
                *_bn_relu(width)))
            key = f"subm{s}"  # encoder stage s's input resolution ("subm0": the stem's, new pairs for k3)
            blocks = [BasicBlock(spconv, width + skip_channels[s], width, indice_key=key)]
            blocks += [BasicBlock(spconv, width, width, indice_key=key)
                       for _ in range(layers[self.num_stages + i] - 1)]
            self.dec.append(nn.Sequential(*blocks))
            dec_channels = width
        self.head = nn.Linear(dec_channels, num_classes)

    def forward_voxels(self, features: Tensor, coords: Tensor, spatial_shape: Sequence[int],
                       batch_size: int) -> Dict[str, Tensor]:
        """Per-voxel decoder features and logits for a ``SparseConvTensor``'s inputs."""
        check_input_device(self.backend, features)
        if self.backend == "spconv":
            install_cpu_guards()  # idempotent flag check: guards hold even if someone removed them
        x = sparse_backend(self.backend).SparseConvTensor(features, coords.int(), list(spatial_shape), int(batch_size))
        x = self.stem(x)
        skips = []
        for down, enc in zip(self.down, self.enc):
            skips.append(x)
            x = enc(down(x))
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(x)
            # the inverse conv reproduces the skip's sites in the skip's order
            x = dec(x.replace_feature(torch.cat([x.features, skip.features], dim=1)))
        return {"voxel_feats": x.features, "voxel_logits": self.head(x.features)}

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Tensor]:
        out = self.forward_voxels(batch["voxel_features"], batch["voxel_coords"], batch["spatial_shape"],
                                  batch["batch_size"])
        p2v = batch["point2voxel"]
        valid = p2v >= 0
        idx = p2v.clamp_min(0)
        keep = valid.unsqueeze(1)
        zero = torch.zeros((), dtype=out["voxel_logits"].dtype, device=idx.device)
        return {"logits": torch.where(keep, out["voxel_logits"][idx], zero),
                "feats": torch.where(keep, out["voxel_feats"][idx], zero),
                "voxel_logits": out["voxel_logits"], "point_valid": valid}
