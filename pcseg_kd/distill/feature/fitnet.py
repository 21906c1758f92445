"""FitNet (Romero et al., 2014): a regressor maps the student's hint features to the
teacher's width; the loss is their mean squared error (mdistiller: weight 100).

What is here, against mdistiller's FitNet:

* the hint is the **penultimate features** the engine passes (``student_feats`` /
  ``teacher_feats``: vectors ``[..., N, D]``, the small tasks' MLP activations or the
  SemanticKITTI per-point features), not an intermediate convolutional feature map;
* the default regressor (``regressor: linear``) is a plain per-model linear map
  student width -> teacher width. mdistiller's ``ConvReg`` is a conv (1×1 when the
  spatial sizes agree) + BatchNorm + ReLU on a hint layer; on vector features that is
  Linear + BatchNorm1d + ReLU, available as ``regressor: conv_bn_relu`` (batch statistics
  over the valid rows of each model in training, running statistics in eval);
* mdistiller sizes its regressor by pushing a 3-channel dummy image through both
  networks, which breaks when teacher and student see different modalities; here the
  widths come from :meth:`build_modules`.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

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


REGRESSORS = ("linear", "conv_bn_relu")


class BatchedConvReg(nn.Module):
    """mdistiller's ``ConvReg`` (conv + BatchNorm + ReLU) for vector hints, one per model:
    relu(BN(x·W + b)). BatchNorm normalises each model's batch by the mean and biased
    variance over its valid rows (training) or by running statistics (eval; momentum 0.1,
    unbiased running variance, eps 1e-5, as ``nn.BatchNorm1d``). No host sync."""

    def __init__(self, num_models: int, in_dim: int, out_dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.linear = BatchedLinear(num_models, in_dim, out_dim)
        self.gamma = nn.Parameter(torch.ones(num_models, 1, out_dim))
        self.beta = nn.Parameter(torch.zeros(num_models, 1, out_dim))
        self.register_buffer("running_mean", torch.zeros(num_models, 1, out_dim))
        self.register_buffer("running_var", torch.ones(num_models, 1, out_dim))
        self.eps, self.momentum = eps, momentum

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        squeeze = x.dim() == 2
        z = self.linear(x)
        if squeeze:
            z = z.unsqueeze(0)
        gamma, beta = self.gamma.to(z.dtype), self.beta.to(z.dtype)
        if self.training:
            w = row_weights(None if valid is None else valid.reshape(z.shape[:-1]), z[..., 0]).unsqueeze(-1)
            count = w.sum(-2, keepdim=True)
            mean = (z * w).sum(-2, keepdim=True) / count.clamp_min(1.0)
            var = ((z - mean).pow(2) * w).sum(-2, keepdim=True) / count.clamp_min(1.0)
            with torch.no_grad():
                unbiased = var * count / (count - 1.0).clamp_min(1.0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(z.dtype), self.running_var.to(z.dtype)
        out = torch.relu((z - mean) * torch.rsqrt(var + self.eps) * gamma + beta)
        return out.squeeze(0) if squeeze else out


@DISTILLERS.register_module("fitnet")
class FitNet(Distiller):
    """CE + ``kd_weight`` · MSE(regressor(student_feats), teacher_feats).

    ``regressor``: ``linear`` (or True; the default: a plain linear map on the penultimate
    features), ``conv_bn_relu`` (mdistiller's ConvReg on vector features: linear +
    BatchNorm + ReLU), or False (none; then widths must match).
    """
    uses_features = True

    def __init__(self, regressor: Union[bool, str] = True, kd_weight: float = 100.0, **base: Any):
        super().__init__(kd_weight=kd_weight, **base)
        if regressor is True:
            regressor = "linear"
        if regressor is not False and regressor not in REGRESSORS:
            raise ValueError(f"fitnet.regressor must be one of {REGRESSORS} or false, got {regressor!r}")
        self.regressor_kind = regressor or None
        self.use_regressor = regressor is not False
        self.regressor: Optional[nn.Module] = None

    def build_modules(self, student_dim: int, teacher_dim: int, num_models: int = 1,
                      num_samples: int = 0, num_classes: int = 0) -> None:
        if self.regressor_kind == "linear":
            self.regressor = BatchedLinear(max(num_models, 1), student_dim, teacher_dim)
        elif self.regressor_kind == "conv_bn_relu":
            self.regressor = BatchedConvReg(max(num_models, 1), student_dim, teacher_dim)
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
            f_s = f_s.to(compute_dtype(f_s, f_t))
            f_s = self.regressor(f_s, valid) if isinstance(self.regressor, BatchedConvReg) else self.regressor(f_s)
        return fitnet_loss(f_s, f_t, valid)
