"""KD (Hinton et al., 2015): KL(softmax(t/T) || softmax(s/T)) * T^2, per row."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reduce import compute_dtype, reduce_rows


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            reduction: str = "batchmean", weight: Optional[Tensor] = None,
            logit_scale: Optional[Tensor] = None, scale_by_t2: bool = True) -> Tensor:
    """Per-row KL(σ(t/T) ‖ σ(s/T)), summed over classes.

    ``reduction``: "none" -> shape ``[..., N]``; "sum"; "batchmean" -> sum / N (rows, not
    rows x classes, the bug of ``kl_div(reduction="mean")``).
    ``weight``: per-row loss weight (PSSM as a loss weight).
    ``logit_scale``: per-row factor applied to *both* logits before the softmax (the
    authors' KD+PSSM: a factor 0 makes both distributions uniform, so the row's KD term
    vanishes).
    ``scale_by_t2``: multiply by T^2 (Hinton); the authors' Gaussian protocol does not.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ in shape")
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    if logit_scale is not None:
        s = s * logit_scale.to(dtype).unsqueeze(-1)
        t = t * logit_scale.to(dtype).unsqueeze(-1)
    # z - logsumexp(z) rather than F.log_softmax: same values, much faster on CPU for small C
    log_p_t = t - torch.logsumexp(t, -1, keepdim=True)
    log_p_s = s - torch.logsumexp(s, -1, keepdim=True)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if scale_by_t2:
        per_row = per_row * (temperature ** 2)
    if weight is not None:
        per_row = per_row * weight.to(dtype)
    return reduce_rows(per_row, reduction)
