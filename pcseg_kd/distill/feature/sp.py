"""SP, similarity-preserving KD (Tung & Mori, 2019): match the row-normalised Gram
matrices of the batch (mdistiller: weight 3000).

G = F Fᵀ (N × N), each row L2-normalised; loss = ‖G_t − G_s‖²_F / N².
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller, check_number
from .common import compute_dtype, require_feature, row_weights


def _normalised_gram(f: Tensor, w: Tensor, eps: float) -> Tensor:
    f = f * w.unsqueeze(-1)  # invalid rows become zero rows: they add nothing to any row norm
    gram = f @ f.transpose(-1, -2)
    # F.normalize semantics (x / max(‖x‖, eps)) with vector_norm's finite gradient at 0
    return gram / torch.linalg.vector_norm(gram, dim=-1, keepdim=True).clamp_min(eps)


def sp_loss(f_s: Tensor, f_t: Tensor, valid: Optional[Tensor] = None, eps: float = 1e-12) -> Tensor:
    """‖Ĝ_t − Ĝ_s‖²_F / N² (N = number of valid rows), keeping leading dims. Widths may
    differ. The teacher side carries no gradient."""
    if f_s.shape[:-1] != f_t.shape[:-1]:
        raise ValueError(f"sp_loss: student features {tuple(f_s.shape)} and teacher features "
                         f"{tuple(f_t.shape)} differ in rows/leading dims")
    dtype = compute_dtype(f_s, f_t)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype).detach()
    w = row_weights(valid, f_s[..., 0])
    diff = _normalised_gram(f_t, w, eps) - _normalised_gram(f_s, w, eps)
    n = w.sum(-1).clamp_min(1.0)
    return diff.pow(2).sum((-1, -2)) / (n * n)


@DISTILLERS.register_module("sp")
class SP(Distiller):
    """CE + ``kd_weight`` · SP(student_feats, teacher_feats)."""
    uses_features = True

    def __init__(self, eps: float = 1e-12, kd_weight: float = 3000.0, **base: Any):
        super().__init__(kd_weight=kd_weight, **base)
        check_number("eps", eps, strict=True)
        self.eps = eps

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        f_s = require_feature(extras, "student_feats", "sp")
        f_t = require_feature(extras, "teacher_feats", "sp")
        return sp_loss(f_s, f_t, valid, self.eps)
