"""The distiller contract every task uses (Gaussian, sklearn, MNIST, SemanticKITTI).

A distiller maps the student's and the (frozen) teacher's outputs to a dict of loss
terms. Inputs are ``[..., N, C]`` logits and ``[..., N]`` targets; leading dims are
independent problems (seeds trained side by side), so every term is reduced over the
rows only and keeps the leading dims. The engine sums the terms.

Feature distillers receive the penultimate features as ``student_feats`` /
``teacher_feats`` (``[..., N, D]``) and sample indices as ``index``; trainable parts
(regressors, embeddings) are created in :meth:`build_modules` and are trained with the
student, because they are parameters of the distiller module.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..registry import DISTILLERS
from ..losses.reduce import row_mean
from ..losses.segmentation import ce_rows


def check_number(name: str, value: Any, low: float = 0.0, strict: bool = False, why: str = "") -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number >= ``low`` (> ``low``
    with ``strict``): a distiller's argument reaches it from the config or from code alike."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if strict else value >= low)
    if not ok:
        bound = f"> {low:g}" if strict else f"a number >= {low:g}"
        raise ValueError(f"{name} must be {bound} and finite, got {value!r}{why}")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """DKD warm-up: min(epoch / warmup, 1), epochs counted from 1 (a Python number: no sync)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(max(epoch, 0) / warmup_epochs, 1.0)


class Distiller(nn.Module):
    """Base: ``ce_weight * CE + kd_weight * warmup * kd_term``.

    ``ignore_index``: target value of rows that get no loss and are not counted.
    ``uses_features``: the method reads ``student_feats`` / ``teacher_feats`` (engines
    gather them only then).
    """

    uses_features = False

    def __init__(self, ce_weight: float = 1.0, kd_weight: float = 1.0, warmup_epochs: int = 0,
                 ignore_index: Optional[int] = None):
        super().__init__()
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("warmup_epochs", warmup_epochs)):
            check_number(name, value, why=" (a negative weight would train the student away from its labels "
                                          "or its teacher)" if name != "warmup_epochs" else "")
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup_epochs = warmup_epochs
        self.ignore_index = ignore_index

    # Feature distillers override this to create their trainable parts.
    def build_modules(self, student_dim: int, teacher_dim: int, num_models: int = 1,
                      num_samples: int = 0, num_classes: int = 0) -> None:
        return None

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        raise NotImplementedError

    @property
    def has_kd(self) -> bool:
        return bool(self.kd_weight) and type(self).kd_term is not Distiller.kd_term

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int = 1,
                valid: Optional[Tensor] = None, **extras: Any) -> Tensor:
        """``kd_weight · warm-up · kd_term`` alone, reduced over the rows: what SemanticKITTI
        adds on the in-view points while its cross entropy covers every point."""
        if valid is None:
            valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        scale = self.kd_weight * warmup_factor(epoch, self.warmup_epochs)
        return scale * self.kd_term(student_logits, teacher_logits.detach(), target, valid, **extras)

    def forward(self, student_logits: Tensor, teacher_logits: Optional[Tensor], target: Tensor,
                epoch: int = 1, **extras: Any) -> Dict[str, Tensor]:
        ce, valid = ce_rows(student_logits, target, self.ignore_index)
        losses = {"loss_ce": self.ce_weight * row_mean(ce, valid)}
        if self.has_kd and teacher_logits is not None:
            losses["loss_kd"] = self.kd_loss(student_logits, teacher_logits, target, epoch, valid, **extras)
        return losses


@DISTILLERS.register_module("none")
class NoKD(Distiller):
    """The no-KD baseline: cross entropy only."""

    def __init__(self, ce_weight: float = 1.0, ignore_index: Optional[int] = None):
        super().__init__(ce_weight=ce_weight, kd_weight=0.0, ignore_index=ignore_index)
