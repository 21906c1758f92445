"""RKD (Park et al., 2019): match the student's pairwise distances (normalised by their
mean) and triplet angles to the teacher's, with smooth-L1 (mdistiller: distance weight
25, angle weight 50, kd_weight 1).

Both relations are computed from row *differences* f_j - f_i, as mdistiller's angle term
does, never from a Gram-matrix expansion (G_ii + G_jj - 2 G_ij), which cancels in float32:
with it, duplicate rows got cosines of ~7e4 and rows 1e-4 of their norm apart cosines off
by ~1e19, and a common offset of 1e4 made the distances 16x wrong. Differences are
translation invariant and exact for duplicates.

mdistiller divides by the mean of the positive distances, which is NaN for a batch of
one sample (no pairs); here an empty mean is 0, so such a batch gives a loss of 0.
Zero-length difference vectors (i == j, or duplicate rows) have angle entries 0 (as
mdistiller's ``F.normalize``) that are constants: their gradient is 0, not 1/eps.

The angle term costs O(N³·D) time but never holds an N³ tensor: it works anchor-chunk by
anchor-chunk and recomputes the chunk in backward (:class:`_AngleLoss`), for every batch,
masked rows included.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller, check_number
from .common import compute_dtype, require_feature, row_weights

#: target size (elements) of one anchor chunk's temporaries ([S, chunk, N, max(N, D)])
CHUNK_ELEMENTS = 1 << 18
#: largest S·N³ for which forward keeps smooth-L1's derivative for backward (64 MiB in
#: float32) instead of recomputing both models' angles there (2 of 5 N³·D products)
KEEP_ELEMENTS = 1 << 24


def _pair_masks(weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Pair weights ``[..., N, N]`` of valid rows, with and without the diagonal."""
    pairs = weights.unsqueeze(-1) * weights.unsqueeze(-2)
    eye = torch.eye(weights.shape[-1], dtype=torch.bool, device=weights.device)
    return pairs, pairs.masked_fill(eye, 0.0)


def pairwise_distances(f: Tensor, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """``[..., N, N]`` Euclidean distances |f_i - f_j| from the differences themselves
    (``torch.cdist`` without its matmul shortcut): exact for duplicate rows (0, with a zero
    gradient) and unaffected by a common offset. ``eps`` is kept for the signature
    (mdistiller clamps squared norms at it; differences need no clamp)."""
    lead = f.shape[:-2]
    flat = f.reshape(-1, *f.shape[-2:])
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    if squared:
        d = d * d
    return d.reshape(*lead, *d.shape[-2:])


def _normalised_distances(f: Tensor, offdiag: Tensor, eps: float, squared: bool) -> Tensor:
    d = pairwise_distances(f, eps, squared) * offdiag
    mean = d.sum((-1, -2)) / offdiag.sum((-1, -2)).clamp_min(1.0)
    return d / mean.clamp_min(eps).unsqueeze(-1).unsqueeze(-1)


def _unit_differences(f: Tensor, rows: slice, eps: float) -> Tuple[Tensor, Tensor]:
    """For anchors ``rows`` of ``f`` ``[S, N, D]``: unit vectors (f_j - f_i)/|f_j - f_i|
    ``[S, c, N, D]`` and the inverse norms ``[S, c, N]`` (0 where |f_j - f_i| <= eps: the
    vector is then 0, and so is its gradient)."""
    diff = f.unsqueeze(1) - f[:, rows].unsqueeze(2)
    norm = torch.linalg.vector_norm(diff, dim=-1)
    inv = torch.where(norm > eps, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm))
    return diff * inv.unsqueeze(-1), inv


def triplet_angles(f: Tensor, eps: float = 1e-12) -> Tensor:
    """``[..., N, N, N]``: entry (i, j, k) = cos of the angle at anchor i between
    f_j - f_i and f_k - f_i (0 when f_j = f_i or f_k = f_i, in particular i == j or i == k).
    All anchors at once (N³ memory): the loss uses the chunked :class:`_AngleLoss`."""
    n = f.shape[-2]
    u, _ = _unit_differences(f.reshape(-1, n, f.shape[-1]), slice(0, n), eps)
    return (u @ u.transpose(-1, -2)).reshape(*f.shape[:-2], n, n, n)


def _chunk_weights(w: Tensor, rows: slice) -> Tensor:
    """Triplet weights w_i·w_j·w_k ``[S, c, N, N]`` for anchors ``rows``."""
    return w[:, rows, None, None] * (w[:, None, :, None] * w[:, None, None, :])


class _AngleLoss(torch.autograd.Function):
    """Σ_{i,j,k} w_i w_j w_k · smoothL1(cos_s - cos_t) per model, from features ``[S, N, D]``
    and row weights ``[S, N]``. Works anchor-chunk by anchor-chunk. With ``keep`` it stores
    one N³ tensor (smooth-L1's derivative) for backward; without, it recomputes the chunk
    in backward and stores nothing N³ (the plain autograd version keeps ~10 N³ tensors
    and is memory bound)."""

    @staticmethod
    def forward(ctx, f_s, f_t, w, chunk, eps, keep):
        n = f_s.shape[-2]
        total = f_s.new_zeros(f_s.shape[0])
        grads = []
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            u_s, _ = _unit_differences(f_s, rows, eps)
            u_t, _ = _unit_differences(f_t, rows, eps)
            delta = u_s @ u_s.transpose(-1, -2) - u_t @ u_t.transpose(-1, -2)
            weights = _chunk_weights(w, rows)
            a = delta.abs()
            total += (torch.where(a < 1.0, 0.5 * delta * delta, a - 0.5) * weights).sum((1, 2, 3))
            if keep:  # smooth-L1' (β = 1) is the difference clamped to [-1, 1]
                grads.append(delta.clamp_(-1.0, 1.0).mul_(weights))
        ctx.save_for_backward(f_s, f_t, w, *grads)
        ctx.chunk, ctx.eps = chunk, eps
        return total

    @staticmethod
    def backward(ctx, grad_out):
        f_s, f_t, w, *grads = ctx.saved_tensors
        n, eps = f_s.shape[-2], ctx.eps
        g_f = torch.zeros_like(f_s)
        scale = grad_out.view(-1, 1, 1, 1)
        for c, start in enumerate(range(0, n, ctx.chunk)):
            rows = slice(start, min(start + ctx.chunk, n))
            u_s, inv = _unit_differences(f_s, rows, eps)
            if grads:
                e = grads[c] * scale
            else:
                u_t, _ = _unit_differences(f_t, rows, eps)
                cos_s, cos_t = u_s @ u_s.transpose(-1, -2), u_t @ u_t.transpose(-1, -2)
                e = (cos_s - cos_t).clamp_(-1.0, 1.0).mul_(_chunk_weights(w, rows)).mul_(scale)
            g_u = (e + e.transpose(-1, -2)) @ u_s                       # d loss / d u_ij
            g_diff = (g_u - u_s * (u_s * g_u).sum(-1, keepdim=True)) * inv.unsqueeze(-1)
            # diff[i, j] = f_j - f_i
            g_f += g_diff.sum(1)
            g_f[:, rows] -= g_diff.sum(2)
        return g_f, None, None, None, None, None


def angle_loss(f_s: Tensor, f_t: Tensor, valid: Optional[Tensor] = None, eps: float = 1e-12,
               chunk: Optional[int] = None) -> Tensor:
    """Mean over the triplets (i, j, k) of valid rows of smoothL1(ψ_A(s) - ψ_A(t)) (mdistiller's
    mean over all N³ entries when every row is valid), for ``[..., N, D]`` features; memory-lean.
    ``chunk``: anchors per chunk (default: temporaries of about ``CHUNK_ELEMENTS``)."""
    lead, n = f_s.shape[:-2], f_s.shape[-2]
    f_s = f_s.reshape(-1, n, f_s.shape[-1])
    f_t = f_t.detach().reshape(-1, n, f_t.shape[-1])
    w = row_weights(valid, f_s[..., 0])
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, f_s.shape[0] * n * max(n, f_s.shape[-1], f_t.shape[-1])))
    keep = f_s.shape[0] * n ** 3 <= KEEP_ELEMENTS and f_s.requires_grad
    total = _AngleLoss.apply(f_s, f_t, w, int(chunk), eps, keep)
    count = w.sum(-1)
    return (total / (count * count * count).clamp_min(1.0)).reshape(lead)


def rkd_loss(f_s: Tensor, f_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             valid: Optional[Tensor] = None, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """distance_weight · smoothL1(ψ_D(s), ψ_D(t)) + angle_weight · smoothL1(ψ_A(s), ψ_A(t)).

    ``f_s`` ``[..., N, D_s]`` and ``f_t`` ``[..., N, D_t]`` may differ in width (only relations
    are compared). smooth-L1 (β = 1) is averaged over all N² pairs / N³ triplets of valid
    rows (mdistiller's "mean"), keeping leading dims. The teacher side carries no gradient.
    """
    if f_s.shape[:-1] != f_t.shape[:-1]:
        raise ValueError(f"rkd_loss: student features {tuple(f_s.shape)} and teacher features "
                         f"{tuple(f_t.shape)} differ in rows/leading dims")
    dtype = compute_dtype(f_s, f_t)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype).detach()
    w = row_weights(valid, f_s[..., 0])
    loss = f_s.new_zeros(f_s.shape[:-2])
    if distance_weight:
        pairs, offdiag = _pair_masks(w)
        d_s = _normalised_distances(f_s, offdiag, eps, squared)
        with torch.no_grad():
            d_t = _normalised_distances(f_t, offdiag, eps, squared)
        per_pair = F.smooth_l1_loss(d_s, d_t, reduction="none") * pairs
        loss = loss + distance_weight * per_pair.sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1.0)
    if angle_weight:
        loss = loss + angle_weight * angle_loss(f_s, f_t, w, eps)
    return loss


@DISTILLERS.register_module("rkd")
class RKD(Distiller):
    """CE + ``kd_weight`` · RKD(student_feats, teacher_feats). The angle term costs N³·D
    time per model but only chunk-sized memory."""
    uses_features = True

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False,
                 eps: float = 1e-12, **base: Any):
        super().__init__(**base)
        for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            check_number(name, value)
        check_number("eps", eps, strict=True)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.squared, self.eps = squared, eps

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        f_s = require_feature(extras, "student_feats", "rkd")
        f_t = require_feature(extras, "teacher_feats", "rkd")
        return rkd_loss(f_s, f_t, self.distance_weight, self.angle_weight, valid, self.squared, self.eps)
