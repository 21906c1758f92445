"""DKD + PSSM (paper Eq. 9): each row's TCKD and NCKD weighted by Ω."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from ..registry import DISTILLERS
from .dkd import DKD
from .kd_pssm import OmegaStats, check_normalize, check_pssm_threshold, pssm_row_count
from ..losses.pssm import PSSMConfig, pssm_config
from ..losses.reduce import row_mean
from .kernels.dispatch import distill_loss


def pssm_dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
                  beta: float = 8.0, temperature: float = 4.0, reduction: str = "none",
                  ignore_index: Optional[int] = None, pssm: Optional[PSSMConfig] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Ω-weighted DKD per row: the semantics the fused kernel implements.

    ``backend`` as in :func:`~pcseg_kd.distill.kernels.distill_loss`; on the Triton backend Ω and
    the loss come from one fused kernel (one read of both logits and the labels)."""
    pssm = pssm or pssm_config("reference")
    return distill_loss("dkd", student_logits, teacher_logits, target, alpha, beta, temperature,
                        reduction, ignore_index, None, pssm=pssm, backend=backend)


@DISTILLERS.register_module("dkd_pssm")
class DKDPSSM(OmegaStats, DKD):
    def __init__(self, pssm: Optional[Dict[str, Any]] = None, normalize: str = "batch", **dkd: Any):
        super().__init__(**dkd)
        pssm = dict(pssm or {})
        self.pssm = check_pssm_threshold("dkd_pssm", pssm_config(pssm.pop("preset", "reference"), **pssm))
        self.normalize = check_normalize("dkd_pssm", normalize)

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        omega = self.shared_omega(student_logits, teacher_logits, target)
        self.record_omega(student_logits, teacher_logits, target, valid, omega)
        if omega is None:
            per_row = pssm_dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta,
                                    self.temperature, "none", self.ignore_index, self.pssm,
                                    backend=self.loss_backend)
        else:  # the same loss with Ω as its weight: Ω computed once for the statistics and the loss
            per_row = distill_loss("dkd", student_logits, teacher_logits, target, self.alpha, self.beta,
                                   self.temperature, "none", self.ignore_index, omega,
                                   backend=self.loss_backend)
        count = pssm_row_count(student_logits, teacher_logits, target, valid, self.pssm,
                               self.normalize, self.ignore_index, self.loss_backend, omega)
        return row_mean(per_row, valid, count)
