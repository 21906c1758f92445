"""Row reductions shared by every loss.

Losses work on ``[..., N, C]`` logits: the trailing ``N`` rows are samples (points),
any leading dims are independent problems (e.g. seeds trained side by side). A
reduction over rows therefore keeps the leading dims.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "batchmean")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half inputs (half math overflows in exp/log), else the input's dtype."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def check_logits(name: str, s: Tensor, t: Tensor, y: Optional[Tensor] = None) -> None:
    """Shape checks shared by every per-row loss, with the loss's name in the message."""
    if s.shape != t.shape:
        raise ValueError(f"{name}: student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ in shape")
    if y is not None and y.shape != s.shape[:-1]:
        raise ValueError(f"{name}: target shape {tuple(y.shape)} does not match logits "
                         f"{tuple(s.shape)} (expected {tuple(s.shape[:-1])})")
    if s.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got {s.shape[-1]}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(per_row: Tensor, reduction: str, valid: Optional[Tensor] = None) -> Tensor:
    """Reduce a per-row loss over *all* rows (torch semantics: 'batchmean' divides by the
    number of valid rows in the whole tensor)."""
    check_reduction(reduction)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    count = per_row.numel() if valid is None else valid.sum()
    return per_row.sum() / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))


def row_mean(per_row: Tensor, valid: Optional[Tensor] = None, count: Optional[Tensor] = None) -> Tensor:
    """Mean over the last (row) dim, keeping leading dims; rows outside ``valid`` are not
    counted. ``count`` overrides the denominator (e.g. PSSM's "kept" normalisation)."""
    if valid is not None:
        per_row = per_row * valid
        if count is None:
            count = valid.sum(-1)
    if count is None:
        return per_row.mean(-1)
    return per_row.sum(-1) / count.clamp_min(1).to(per_row.dtype)
