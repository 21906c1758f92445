"""KD + PSSM: Ω applied as the authors do (scaling both logits) or as a loss weight."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from ..registry import DISTILLERS
from .kd import KD, kd_loss
from .pssm import pssm_config, pssm_weights
from .reduce import row_mean


def pssm_row_count(omega: Tensor, valid: Tensor, normalize: str) -> Optional[Tensor]:
    """Denominator of the row mean: all valid rows ("batch", the authors') or only the
    rows PSSM keeps ("kept")."""
    if normalize == "batch":
        return None
    if normalize == "kept":
        return ((omega > 0) & valid).sum(-1)
    raise ValueError(f"normalize must be 'batch' or 'kept', got {normalize!r}")


@DISTILLERS.register_module("kd_pssm")
class KDPSSM(KD):
    def __init__(self, pssm: Optional[Dict[str, Any]] = None, apply: str = "logit_scale",
                 normalize: str = "batch", **kd: Any):
        super().__init__(**kd)
        pssm = dict(pssm or {})
        self.pssm = pssm_config(pssm.pop("preset", "reference"), **pssm)
        if apply not in ("logit_scale", "weight"):
            raise ValueError(f"kd_pssm.apply must be 'logit_scale' or 'weight', got {apply!r}")
        if normalize not in ("batch", "kept"):
            raise ValueError(f"kd_pssm.normalize must be 'batch' or 'kept', got {normalize!r}")
        self.apply, self.normalize = apply, normalize

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        omega = pssm_weights(student_logits, teacher_logits, target, config=self.pssm,
                             ignore_index=self.ignore_index)
        kw = {"logit_scale": omega} if self.apply == "logit_scale" else {"weight": omega}
        per_row = kd_loss(student_logits, teacher_logits, self.temperature, reduction="none",
                          scale_by_t2=self.scale_by_t2, **kw)
        return row_mean(per_row, valid, pssm_row_count(omega, valid, self.normalize))
