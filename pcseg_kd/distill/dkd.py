"""DKD (Zhao et al., 2022): the distiller. The loss math is :func:`pcseg_kd.losses.dkd.dkd_loss`."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..losses.reduce import row_mean
from ..registry import DISTILLERS
from .base import Distiller, check_number
from .kernels.dispatch import check_backend, distill_loss


@DISTILLERS.register_module("dkd")
class DKD(Distiller):
    """CE + DKD with warm-up. Defaults α=1, β=8, T=4 are mdistiller's CIFAR ones; its warm-up
    of 20 epochs is ``warmup_epochs: 20`` (default 0: the small tasks use none)."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 loss_backend: Optional[str] = None, **base: Any):
        base.setdefault("warmup_epochs", 0)
        super().__init__(**base)
        check_number("temperature", temperature, strict=True)
        for name, value in (("alpha", alpha), ("beta", beta)):  # weights of TCKD and NCKD
            check_number(name, value, why=" (a negative weight trains the student away from its teacher)")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.loss_backend = check_backend(loss_backend)  # None: PCSEG_KD_LOSS_BACKEND / auto

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        per_row = distill_loss("dkd", student_logits, teacher_logits, target, self.alpha, self.beta,
                               self.temperature, reduction="none", ignore_index=self.ignore_index,
                               backend=self.loss_backend)
        return row_mean(per_row, valid)
