"""KD (Hinton et al., 2015): the distiller. The loss math is :func:`pcseg_kd.losses.kd.kd_loss`."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..registry import DISTILLERS
from ..losses.reduce import row_mean
from .base import Distiller, check_number
from .kernels.dispatch import check_backend, distill_loss


@DISTILLERS.register_module("kd")
class KD(Distiller):
    """CE + KD. Paper Eq. 4 with ce_weight = 1-λ, kd_weight = λ.

    The per-row loss runs through the backend dispatch (``loss_backend``: None = env /
    auto, the fused Triton kernel on CUDA), with :func:`kd_loss`'s semantics."""

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True,
                 loss_backend: Optional[str] = None, **base: Any):
        super().__init__(**base)
        check_number("temperature", temperature, strict=True)
        self.temperature = temperature
        self.scale_by_t2 = scale_by_t2
        self.loss_backend = check_backend(loss_backend)  # None: PCSEG_KD_LOSS_BACKEND / auto

    def kd_rows(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                pssm=None, kd_apply: str = "weight") -> Tensor:
        """Per-row KD (``[..., N]``, 0 on ignored rows), optionally PSSM-masked."""
        return distill_loss("kd", student_logits, teacher_logits, target, temperature=self.temperature,
                            reduction="none", ignore_index=self.ignore_index, pssm=pssm,
                            kd_apply=kd_apply, scale_by_t2=self.scale_by_t2, backend=self.loss_backend)

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        return row_mean(self.kd_rows(student_logits, teacher_logits, target), valid)
