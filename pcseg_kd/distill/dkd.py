"""DKD (Zhao et al., 2022): (α·TCKD + β·NCKD)·T², mdistiller semantics, computed in log space.

mdistiller removes the target class with ``z/T - 1000`` and takes ``log`` of
``1 - p_gt`` in probability space; both break for large logits or confident rows
(``log 0``). Here every log-probability is a difference of logsumexps, so the loss and
its gradient stay finite for logits up to ±1e4, for p_gt -> 1 and for C = 2 (NCKD = 0).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..registry import DISTILLERS
from .base import Distiller
from .reduce import check_logits, check_reduction, compute_dtype, reduce_rows, row_mean


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
             ignore_index: Optional[int] = None, weight: Optional[Tensor] = None,
             backend: Optional[str] = None) -> Tensor:
    """(α·TCKD + β·NCKD)·T² per row; ``weight`` is a per-row loss weight (e.g. PSSM's Ω).

    Rows whose target is ``ignore_index`` give 0 and are not counted by "batchmean".
    Half-precision inputs are computed in float32.

    ``backend``: "auto" (default: the fused Triton kernel for CUDA tensors when Triton is
    available, else PyTorch), "torch", "compile" or "triton"; also settable with
    ``pcseg_kd.distill.kernels.set_loss_backend`` or ``PCSEG_KD_LOSS_BACKEND``.
    """
    from .kernels.dispatch import distill_loss
    return distill_loss("dkd", student_logits, teacher_logits, target, alpha, beta, temperature,
                        reduction, ignore_index, weight, backend=backend)


def dkd_loss_torch(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
                   beta: float = 8.0, temperature: float = 4.0, reduction: str = "batchmean",
                   ignore_index: Optional[int] = None, weight: Optional[Tensor] = None) -> Tensor:
    """The PyTorch implementation of :func:`dkd_loss` (the reference semantics)."""
    check_reduction(reduction)
    tckd, nckd, valid = dkd_terms(student_logits, teacher_logits, target, temperature, ignore_index)
    per_row = (alpha * tckd + beta * nckd) * (temperature ** 2)
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return reduce_rows(per_row, reduction, valid if ignore_index is not None else None)


@DISTILLERS.register_module("dkd")
class DKD(Distiller):
    """CE + DKD with warm-up. Defaults α=1, β=8, T=4 are mdistiller's CIFAR ones; its warm-up
    of 20 epochs is ``warmup_epochs: 20`` (default 0: the small tasks use none)."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 loss_backend: Optional[str] = None, **base: Any):
        base.setdefault("warmup_epochs", 0)
        super().__init__(**base)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        from .kernels.dispatch import check_backend  # lazy: importing pcseg_kd must not import triton
        self.loss_backend = check_backend(loss_backend)  # None: PCSEG_KD_LOSS_BACKEND / auto

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        per_row = dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta,
                           self.temperature, reduction="none", ignore_index=self.ignore_index,
                           backend=self.loss_backend)
        return row_mean(per_row, valid)
