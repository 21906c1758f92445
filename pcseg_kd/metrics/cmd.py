"""Central Moment Discrepancy (Zellinger et al., 2017).

CMD_K(X, Y) = ||E X - E Y||_2 / |b-a| + sum_{k=2..K} ||c_k(X) - c_k(Y)||_2 / |b-a|^k,
c_k the coordinate-wise k-th central moment. With ``bounds=None`` the |b-a| factors are
omitted, as in the reference code (which the paper's CMD figures come from).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def cmd(x: Tensor, y: Tensor, k: int = 5, bounds: Optional[Tuple[float, float]] = None) -> Tensor:
    """CMD between samples ``x`` ``[..., N, D]`` and ``y`` ``[..., M, D]`` (leading dims kept)."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"cmd: feature dims differ: {x.shape[-1]} vs {y.shape[-1]}")
    if k < 1:
        raise ValueError(f"cmd: k must be >= 1, got {k}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    span = 1.0 if bounds is None else float(bounds[1] - bounds[0])
    if span <= 0:
        raise ValueError(f"cmd: bounds must satisfy b > a, got {bounds}")
    mx, my = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    total = torch.linalg.vector_norm(mx - my, dim=(-2, -1)) / span
    cx, cy = x - mx, y - my
    for order in range(2, k + 1):
        diff = cx.pow(order).mean(-2) - cy.pow(order).mean(-2)
        total = total + torch.linalg.vector_norm(diff, dim=-1) / span ** order
    return total
