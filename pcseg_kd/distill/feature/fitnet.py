"""FitNet (Romero et al., 2014): a regressor maps the student's hint features to the
teacher's width; the loss is their mean squared error (mdistiller: weight 100).

mdistiller sizes its regressor by pushing a 3-channel dummy image through both
networks, which breaks when teacher and student see different modalities; here the
widths come from :meth:`build_modules`.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller
from .common import BatchedLinear, compute_dtype, masked_mean_rows, require_feature, row_weights


def fitnet_loss(student_hint: Tensor, teacher_hint: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """mean over rows and feature dims of (student_hint - teacher_hint)^2 (``F.mse_loss``'s
    "mean"), keeping leading dims. Both are ``[..., N, D]`` of the same width (the student's
    already regressed)."""
    if student_hint.shape != teacher_hint.shape:
        raise ValueError(f"fitnet_loss: regressed student hint {tuple(student_hint.shape)} and teacher "
                         f"hint {tuple(teacher_hint.shape)} differ in shape")
    dtype = compute_dtype(student_hint, teacher_hint)
    diff = student_hint.to(dtype) - teacher_hint.to(dtype)
    per_row = diff.pow(2).mean(-1)
    return masked_mean_rows(per_row, row_weights(valid, per_row))


@DISTILLERS.register_module("fitnet")
class FitNet(Distiller):
    """CE + ``kd_weight`` · MSE(regressor(student_feats), teacher_feats).

    ``regressor``: False skips it (then widths must match).
    """
    uses_features = True

    def __init__(self, regressor: bool = True, kd_weight: float = 100.0, **base: Any):
        super().__init__(kd_weight=kd_weight, **base)
        self.use_regressor = regressor
        self.regressor: Optional[BatchedLinear] = None

    def build_modules(self, student_dim: int, teacher_dim: int, num_models: int = 1,
                      num_samples: int = 0, num_classes: int = 0) -> None:
        if self.use_regressor:
            self.regressor = BatchedLinear(max(num_models, 1), student_dim, teacher_dim)
        elif student_dim != teacher_dim:
            raise ValueError(f"fitnet with regressor=False needs equal widths, got student {student_dim} "
                             f"and teacher {teacher_dim}")

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        f_s = require_feature(extras, "student_feats", "fitnet")
        f_t = require_feature(extras, "teacher_feats", "fitnet").detach()
        if self.use_regressor:
            if self.regressor is None:
                raise RuntimeError("fitnet: build_modules(student_dim, teacher_dim, ...) was not called "
                                   "before training, so there is no regressor")
            f_s = self.regressor(f_s.to(compute_dtype(f_s, f_t)))
        return fitnet_loss(f_s, f_t, valid)
