"""KD + PSSM: Ω applied as the authors do (scaling both logits) or as a loss weight."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..registry import DISTILLERS
from .kd import KD
from ..losses.pssm import PSSMConfig, pssm_config
from ..losses.reduce import row_mean
from .kernels.dispatch import applied_omega, pssm_weights

NORMALIZE = ("batch", "kept")


def pssm_row_count(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, valid: Tensor,
                   pssm: PSSMConfig, normalize: str, ignore_index: Optional[int] = None,
                   backend: Optional[str] = None, omega: Optional[Tensor] = None) -> Optional[Tensor]:
    """Denominator of the row mean: all valid rows ("batch", the authors'; returns None) or
    only the rows PSSM keeps, Ω > 0 ("kept"; a device tensor ``[...]``, no gradient).
    ``omega``: Ω when the caller has it already."""
    if normalize == "batch":
        return None
    if normalize != "kept":
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if omega is None:  # the Ω the PyTorch loss applies, so that the count and the loss agree
        omega = applied_omega(student_logits, teacher_logits.detach(), target, pssm, ignore_index, backend)
    if omega is None:
        # Ω is computed again here (the fused kernel computes its own): one extra read of both
        # logits, cheaper than materialising Ω for the loss on the kernel path
        omega = pssm_weights(student_logits.detach(), teacher_logits.detach(), target, config=pssm,
                             ignore_index=ignore_index, backend=backend)
    return ((omega > 0) & valid).sum(-1)


class OmegaStats:
    """Mixin of the PSSM distillers: how many distilled rows got Ω = 1, Ω = 0 or a value in
    between, counted on the device while :meth:`track_omega` is on and read (one host sync)
    by :meth:`pop_omega_shares`, e.g. once per epoch. What the SSDH diagnostics report:
    where the mask switches the teacher off, and how often."""

    omega_counts: Optional[Tensor] = None   # [rows with Ω = 1, rows with Ω = 0, distilled rows]
    _tracking_omega: bool = False

    def track_omega(self, on: bool = True) -> None:
        self._tracking_omega = on

    @property
    def tracking_omega(self) -> bool:
        return self._tracking_omega

    def record_omega(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, valid: Tensor,
                     omega: Optional[Tensor] = None) -> None:
        """Count Ω (``omega`` when the caller has it, else computed here) while tracking."""
        if not self._tracking_omega:
            return
        if omega is None:
            # computed again (the fused kernel keeps Ω in registers): one extra read of both logits
            omega = pssm_weights(student_logits.detach(), teacher_logits.detach(), target, config=self.pssm,
                                 ignore_index=self.ignore_index, backend=self.loss_backend)
        counts = torch.stack([((omega == 1) & valid).sum(), ((omega == 0) & valid).sum(), valid.sum()])
        self.omega_counts = counts if self.omega_counts is None else self.omega_counts + counts

    def shared_omega(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Optional[Tensor]:
        """Ω computed once for both the statistics and the loss, where that saves work: while
        tracking, on the PyTorch loss path (the Triton kernel computes its own; None)."""
        if not self._tracking_omega:
            return None
        return applied_omega(student_logits, teacher_logits, target, self.pssm, self.ignore_index,
                             self.loss_backend)

    def pop_omega_shares(self) -> Optional[Dict[str, float]]:
        """Shares of the distilled rows since the last call (None if none were counted); resets."""
        if self.omega_counts is None:
            return None
        one, zero, rows = (int(v) for v in self.omega_counts.tolist())  # the host sync, once per call
        self.omega_counts = None
        if rows == 0:
            return None
        return {"one": one / rows, "zero": zero / rows, "between": (rows - one - zero) / rows, "rows": rows}


def check_pssm_threshold(name: str, pssm: PSSMConfig) -> PSSMConfig:
    """τ outside the range of what it compares (cos in [-1, 1], d in [0, 1]) keeps every row or
    none: a typo (``tau: 996``), not a setting."""
    low = -1.0 if pssm.tau_scale == "cos" else 0.0
    if not (math.isfinite(pssm.tau) and low <= pssm.tau <= 1.0):
        raise ValueError(f"{name}.pssm.tau must be in [{low:g}, 1] (it compares "
                         f"{'the cosine' if pssm.tau_scale == 'cos' else 'd = (cos + 1) / 2'}), got {pssm.tau!r}")
    return pssm


def check_normalize(name: str, normalize: str) -> str:
    if normalize not in NORMALIZE:
        raise ValueError(f"{name}.normalize must be 'batch' or 'kept', got {normalize!r}")
    return normalize


@DISTILLERS.register_module("kd_pssm")
class KDPSSM(OmegaStats, KD):
    def __init__(self, pssm: Optional[Dict[str, Any]] = None, apply: str = "logit_scale",
                 normalize: str = "batch", **kd: Any):
        super().__init__(**kd)
        pssm = dict(pssm or {})
        self.pssm = check_pssm_threshold("kd_pssm", pssm_config(pssm.pop("preset", "reference"), **pssm))
        if apply not in ("logit_scale", "weight"):
            raise ValueError(f"kd_pssm.apply must be 'logit_scale' or 'weight', got {apply!r}")
        self.apply, self.normalize = apply, check_normalize("kd_pssm", normalize)

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        self.record_omega(student_logits, teacher_logits, target, valid)
        per_row = self.kd_rows(student_logits, teacher_logits, target, self.pssm, self.apply)
        count = pssm_row_count(student_logits, teacher_logits, target, valid, self.pssm,
                               self.normalize, self.ignore_index, self.loss_backend)
        return row_mean(per_row, valid, count)
