"""PKT (Passalis & Tefas, 2018): match the conditional distributions of cosine
similarities within the batch (mdistiller: weight 30000).

Each row's similarities, mapped to [0, 1] by (cos + 1) / 2, are normalised to sum to 1
over the batch; the loss is the mean over all N² entries of t · log((t + eps) / (s + eps)).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller, check_number
from .common import compute_dtype, require_feature, row_weights


def _similarity_distribution(f: Tensor, w: Tensor, eps: float) -> Tensor:
    # vector_norm has a zero (not NaN) gradient at a zero vector, unlike sqrt(sum(x²))
    unit = f / (torch.linalg.vector_norm(f, dim=-1, keepdim=True) + eps)
    sim = (unit @ unit.transpose(-1, -2) + 1.0) / 2.0
    sim = sim * w.unsqueeze(-2)  # invalid rows are not candidates
    return sim / sim.sum(-1, keepdim=True).clamp_min(eps)


def pkt_loss(f_s: Tensor, f_t: Tensor, valid: Optional[Tensor] = None, eps: float = 1e-7) -> Tensor:
    """mean_{i,j} t_ij · log((t_ij + eps) / (s_ij + eps)) over valid rows, keeping leading dims.
    ``f_s`` and ``f_t`` may differ in width. The teacher side carries no gradient."""
    if f_s.shape[:-1] != f_t.shape[:-1]:
        raise ValueError(f"pkt_loss: student features {tuple(f_s.shape)} and teacher features "
                         f"{tuple(f_t.shape)} differ in rows/leading dims")
    dtype = compute_dtype(f_s, f_t)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype).detach()
    w = row_weights(valid, f_s[..., 0])
    p_s = _similarity_distribution(f_s, w, eps)
    p_t = _similarity_distribution(f_t, w, eps)
    pairs = w.unsqueeze(-1) * w.unsqueeze(-2)
    per_pair = p_t * torch.log((p_t + eps) / (p_s + eps)) * pairs
    return per_pair.sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1.0)


@DISTILLERS.register_module("pkt")
class PKT(Distiller):
    """CE + ``kd_weight`` · PKT(student_feats, teacher_feats)."""
    uses_features = True

    def __init__(self, eps: float = 1e-7, kd_weight: float = 30000.0, **base: Any):
        super().__init__(kd_weight=kd_weight, **base)
        check_number("eps", eps, strict=True)
        self.eps = eps

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        f_s = require_feature(extras, "student_feats", "pkt")
        f_t = require_feature(extras, "teacher_feats", "pkt")
        return pkt_loss(f_s, f_t, valid, self.eps)
