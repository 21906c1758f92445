"""DKD (Zhao et al., 2022): (α·TCKD + β·NCKD)·T², mdistiller semantics, computed in log space.

mdistiller removes the target class with ``z/T - 1000`` and takes ``log`` of
``1 - p_gt`` in probability space; both break for large logits or confident rows
(``log 0``). Here every log-probability is a difference of logsumexps, so the loss and
its gradient stay finite for logits up to ±1e4, for p_gt -> 1 and for C = 2 (NCKD = 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .reduce import check_logits, check_reduction, compute_dtype, reduce_rows


def target_mask(target: Tensor, num_classes: int, ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """One-hot mask of the target class ``[..., N, C]`` and the valid-row mask ``[..., N]``."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = target.masked_fill(~valid, 0).long()
    gt = torch.zeros(*target.shape, num_classes, dtype=torch.bool, device=target.device)
    gt.scatter_(-1, safe.unsqueeze(-1), True)
    return gt, valid


def _decoupled_logprobs(z: Tensor, gt: Tensor):
    """log p_gt, log(1 - p_gt) and the non-target log-probs (target column finite, unused)."""
    lse_all = torch.logsumexp(z, -1)
    lse_nt = torch.logsumexp(z.masked_fill(gt, float("-inf")), -1)
    log_p_gt = (z * gt).sum(-1) - lse_all
    log_p_rest = lse_nt - lse_all
    log_nt = z - lse_nt.unsqueeze(-1)
    return log_p_gt, log_p_rest, log_nt


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0,
              ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row TCKD and NCKD (before α, β, T²) and the valid-row mask, each ``[..., N]``."""
    check_logits("dkd_loss", student_logits, teacher_logits, target)
    num_classes = student_logits.shape[-1]
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype) / temperature
    zt = teacher_logits.to(dtype) / temperature
    gt, valid = target_mask(target, num_classes, ignore_index)

    t_gt, t_rest, t_nt = _decoupled_logprobs(zt, gt)
    s_gt, s_rest, s_nt = _decoupled_logprobs(zs, gt)
    tckd = t_gt.exp() * (t_gt - s_gt) + t_rest.exp() * (t_rest - s_rest)
    # Teacher's non-target distribution with an exact zero on the target column; the
    # log-ratio is zeroed there too, so 0 * (finite) never becomes 0 * inf.
    q_t = t_nt.masked_fill(gt, float("-inf")).exp()
    nckd = (q_t * (t_nt - s_nt).masked_fill(gt, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=tckd.device)
    return torch.where(valid, tckd, zero), torch.where(valid, nckd, zero), valid


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
                   beta: float = 8.0, temperature: float = 4.0, reduction: str = "batchmean",
                   ignore_index: Optional[int] = None, weight: Optional[Tensor] = None) -> Tensor:
    """(α·TCKD + β·NCKD)·T² per row; ``weight`` is a per-row loss weight (e.g. PSSM's Ω).

    Rows whose target is ``ignore_index`` give 0 and are not counted by "batchmean".
    Half-precision inputs are computed in float32. The plain PyTorch semantics;
    :func:`pcseg_kd.distill.kernels.distill_loss` runs the same loss on the fused backends."""
    check_reduction(reduction)
    tckd, nckd, valid = dkd_terms(student_logits, teacher_logits, target, temperature, ignore_index)
    per_row = (alpha * tckd + beta * nckd) * (temperature ** 2)
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return reduce_rows(per_row, reduction, valid if ignore_index is not None else None)
