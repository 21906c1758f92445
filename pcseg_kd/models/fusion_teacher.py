"""FusionTeacher: an image+point teacher (2DPASS-style gated fusion at the in-view points).

A point branch (:class:`~pcseg_kd.models.sparse.spunet.SpUNet`) and an image branch
(:class:`~pcseg_kd.models.image.resnet_fcn.ResNetFCN`) run side by side; at every in-view
point the image feature is enhanced with a gated, learned projection of the point feature,
as 2DPASS's fusion does (``f = f_2d + σ(MLP([f_2d, g])) ⊙ g`` with ``g = MLP(f_3d)``), and
a linear head gives the fused prediction, the teacher's output for distillation.
Simplification: one fusion at the final decoder scale, not one per scale.

Batch contract: what both branches read (see their modules) plus ``img_point_idx [K]``;
returns

``logits``        ``[K, num_classes]`` fused prediction for the in-view points (``img_point_idx`` order)
``feats``         ``[K, fusion_channels]`` fused features
``point_logits``  ``[P, num_classes]`` the point branch's prediction for every point
``image_logits``  ``[K, num_classes]`` the image branch's prediction for the in-view points
``point_valid``   ``[P]`` bool (points with a voxel)

Teacher training supervises all three heads (see ``docs/models.md``). ``point.backend`` picks the
point branch's sparse package (:mod:`~pcseg_kd.models.sparse.backend`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..registry import MODELS
from .image.resnet_fcn import ResNetFCN
from .sparse.backend import resolve_backend
from .sparse.spunet import SpUNet


@MODELS.register_module("fusion_teacher")
class FusionTeacher(nn.Module):
    rows = "in_view"  # what the rows of ``logits`` are (the engine pairs student and teacher rows by it)
    reads_images = True  # batch["images"] (a dataset read without_pixels() has none)

    def __init__(self, num_classes: int = 19, point: Optional[Dict[str, Any]] = None,
                 image: Optional[Dict[str, Any]] = None, fusion_channels: int = 128):
        super().__init__()
        for name, cfg in (("point", point), ("image", image)):
            if cfg is not None and "num_classes" in cfg:
                raise ValueError(f"fusion_teacher.{name}.num_classes: set num_classes once, on the teacher")
        if fusion_channels < 1:
            raise ValueError(f"fusion_teacher.fusion_channels must be >= 1, got {fusion_channels}")
        # checked here too so that a bad value names the teacher's key, not the student's
        resolve_backend((point or {}).get("backend", "spconv"), key="fusion_teacher.point.backend")
        self.num_classes = num_classes
        self.point = SpUNet(num_classes=num_classes, **(point or {}))
        self.image = ResNetFCN(num_classes=num_classes, **(image or {}))
        d = fusion_channels
        self.out_channels = d
        self.image_proj = nn.Linear(self.image.out_channels, d)
        self.point_learner = nn.Sequential(nn.Linear(self.point.out_channels, d), nn.ReLU(), nn.Linear(d, d))
        self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.Sigmoid())
        self.head = nn.Linear(d, num_classes)

    def fuse(self, point_feats: Tensor, image_feats: Tensor) -> Tensor:
        """``[K, Dp]``, ``[K, Di]`` -> fused ``[K, fusion_channels]``."""
        f2d = self.image_proj(image_feats)
        g = self.point_learner(point_feats)
        return f2d + self.gate(torch.cat([f2d, g], dim=1)) * g

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Tensor]:
        p = self.point(batch)
        i = self.image(batch)
        fused = self.fuse(p["feats"][batch["img_point_idx"]], i["feats"])
        return {"logits": self.head(fused), "feats": fused, "point_logits": p["logits"],
                "image_logits": i["logits"], "point_valid": p["point_valid"]}
