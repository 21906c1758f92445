"""Pieces shared by the feature distillers.

Feature tensors are ``[..., N, D]``: N rows (samples) after any leading dims of
independent models (seeds trained side by side). Parameter-free losses accept any
leading dims; trainable parts hold one copy per model (``[S, ...]``) and accept
``[S, N, D]`` or, for a single model, ``[N, D]``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision features are upcast:
    Gram matrices and exp(·/0.07) overflow in fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def require_feature(extras: Mapping[str, Any], name: str, method: str) -> Tensor:
    """Fetch an engine-provided extra (``student_feats``, ``teacher_feats``, ``index``) or fail
    with a message saying which task-side piece is missing."""
    value = extras.get(name)
    if value is None:
        raise ValueError(f"{method} needs '{name}' from the engine (penultimate features / sample "
                         f"indices); the task or model in use did not provide it")
    return value


def row_weights(valid: Optional[Tensor], rows: Tensor) -> Tensor:
    """Float weights shaped like ``rows`` (``[..., N]``): 1 for valid rows (all rows when
    ``valid`` is None)."""
    if valid is None:
        return torch.ones(rows.shape, dtype=rows.dtype, device=rows.device)
    return valid.to(rows.dtype).expand(rows.shape)


def masked_mean_rows(per_row: Tensor, weights: Tensor) -> Tensor:
    """Mean over the row dim of a ``[..., N]`` tensor, counting only weighted rows; 0 when
    no row counts (never 0/0)."""
    return (per_row * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


class BatchedLinear(nn.Module):
    """``num_models`` independent linear maps ``in -> out`` (weight ``[S, in, out]``), so that
    seed s's regressor/embedding only ever sees seed s's rows. Initialised like
    ``nn.Linear`` (uniform ±1/sqrt(in) for weight and bias), independently per model."""

    def __init__(self, num_models: int, in_dim: int, out_dim: int):
        super().__init__()
        if num_models < 1 or in_dim < 1 or out_dim < 1:
            raise ValueError(f"BatchedLinear needs positive sizes, got models={num_models}, "
                             f"in={in_dim}, out={out_dim}")
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_models, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_models, 1, out_dim).uniform_(-bound, bound))

    @property
    def num_models(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[0] != self.num_models or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"BatchedLinear({self.num_models} models, {self.weight.shape[1]} -> "
                             f"{self.weight.shape[2]}) got input of shape {tuple(x.shape)}; expected "
                             f"[{self.num_models}, N, {self.weight.shape[1]}]"
                             + (" or [N, D] for a single model" if self.num_models == 1 else ""))
        w, b = self.weight, self.bias
        if x.dtype != w.dtype:  # the loss runs in the features' compute dtype
            w, b = w.to(x.dtype), b.to(x.dtype)
        out = torch.baddbmm(b, x, w)
        return out.squeeze(0) if squeeze else out
