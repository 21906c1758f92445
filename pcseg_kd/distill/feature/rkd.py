"""RKD (Park et al., 2019): match the student's pairwise distances (normalised by their
mean) and triplet angles to the teacher's, with smooth-L1 (mdistiller: distance weight
25, angle weight 50, kd_weight 1).

mdistiller divides by the mean of the positive distances, which is NaN for a batch of
one sample (no pairs); here an empty mean is 0, so such a batch gives a loss of 0.
Zero-length difference vectors (i == j, or duplicate samples) are normalised to 0 with
a finite gradient.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import DISTILLERS
from ..base import Distiller
from .common import compute_dtype, require_feature, row_weights


def _pair_masks(weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Pair weights ``[..., N, N]`` of valid rows, with and without the diagonal."""
    pairs = weights.unsqueeze(-1) * weights.unsqueeze(-2)
    eye = torch.eye(weights.shape[-1], dtype=torch.bool, device=weights.device)
    return pairs, pairs.masked_fill(eye, 0.0)


def pairwise_distances(f: Tensor, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """``[..., N, N]`` Euclidean distances (mdistiller's ``_pdist``: squared norms clamped at
    ``eps`` before the square root; the diagonal is exactly 0)."""
    sq = f.pow(2).sum(-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * f @ f.transpose(-1, -2)).clamp_min(eps)
    d = d2 if squared else d2.sqrt()
    eye = torch.eye(f.shape[-2], dtype=torch.bool, device=f.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(f: Tensor, offdiag: Tensor, eps: float, squared: bool) -> Tensor:
    d = pairwise_distances(f, eps, squared) * offdiag
    mean = d.sum((-1, -2)) / offdiag.sum((-1, -2)).clamp_min(1.0)
    return d / mean.clamp_min(eps).unsqueeze(-1).unsqueeze(-1)


def triplet_angles(f: Tensor, eps: float = 1e-12) -> Tensor:
    """``[..., N, N, N]``: entry (i, j, k) = cos of the angle at anchor i between
    f_j - f_i and f_k - f_i (0 when i == j or i == k).

    Computed from the Gram matrix G (<f_j - f_i, f_k - f_i> = G_jk - G_ij - G_ik + G_ii),
    so the cost is O(N²·D + N³) instead of mdistiller's O(N³·D). Angles are translation
    invariant, so the features are centred first: that keeps G small and the expansion
    from cancelling in float32. (The same helpers as the chunked :class:`_AngleLoss`, all
    anchors at once.)
    """
    n = f.shape[-2]
    g, r = _gram_and_inverse_norms(f.reshape(-1, n, f.shape[-1]), eps)
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    cos, _, _ = _chunk_cos(g, r, slice(0, n), eye)
    return cos.reshape(*f.shape[:-2], n, n, n)


def _gram_and_inverse_norms(f: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Centred Gram matrix ``[..., N, N]`` and 1/|f_j - f_i| (1 on the diagonal)."""
    f = f - f.mean(-2, keepdim=True)
    g = f @ f.transpose(-1, -2)
    diag = g.diagonal(dim1=-2, dim2=-1)
    sq = diag.unsqueeze(-1) + diag.unsqueeze(-2) - 2.0 * g
    eye = torch.eye(f.shape[-2], dtype=torch.bool, device=f.device)
    norm = torch.where(eye, torch.ones_like(sq), sq.clamp_min(eps * eps).sqrt().clamp_min(eps))
    return g, 1.0 / norm


def _chunk_cos(g: Tensor, r: Tensor, rows: slice, eye_rows: Tensor):
    """cos and the raw dot products for anchors ``rows``: ``[S, c, N, N]``; degenerate entries 0."""
    diag = g.diagonal(dim1=-2, dim2=-1)[:, rows]
    dot = g.unsqueeze(1) - g[:, rows].unsqueeze(-1) - g[:, rows].unsqueeze(-2) + diag[:, :, None, None]
    cos = dot * r[:, rows].unsqueeze(-1) * r[:, rows].unsqueeze(-2)
    degenerate = eye_rows.unsqueeze(-1) | eye_rows.unsqueeze(-2)
    return cos.masked_fill(degenerate, 0.0), dot, degenerate


class _AngleLoss(torch.autograd.Function):
    """mean over (i, j, k) of smoothL1(cos_s - cos_t), from Gram matrices and inverse norms
    ``[S, N, N]``. Works anchor-chunk by anchor-chunk and recomputes in backward, so no
    N³ tensor is ever stored: the plain autograd version keeps ~10 of them and is memory
    bound (≈6x slower on a 2-core CPU at N = 128)."""

    @staticmethod
    def forward(ctx, g_s, r_s, g_t, r_t, chunk):
        n = g_s.shape[-1]
        eye = torch.eye(n, dtype=torch.bool, device=g_s.device)
        total = g_s.new_zeros(g_s.shape[0])
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            cos_s, _, _ = _chunk_cos(g_s, r_s, rows, eye[rows])
            cos_t, _, _ = _chunk_cos(g_t, r_t, rows, eye[rows])
            total += torch.nn.functional.smooth_l1_loss(cos_s, cos_t, reduction="none").sum((1, 2, 3))
        ctx.save_for_backward(g_s, r_s, g_t, r_t)
        ctx.chunk = chunk
        return total / n ** 3

    @staticmethod
    def backward(ctx, grad_out):
        g_s, r_s, g_t, r_t = ctx.saved_tensors
        n = g_s.shape[-1]
        eye = torch.eye(n, dtype=torch.bool, device=g_s.device)
        d_g, d_r = torch.zeros_like(g_s), torch.zeros_like(r_s)
        scale = (grad_out / n ** 3).view(-1, 1, 1, 1)
        for start in range(0, n, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, n))
            cos_s, dot, degenerate = _chunk_cos(g_s, r_s, rows, eye[rows])
            cos_t, _, _ = _chunk_cos(g_t, r_t, rows, eye[rows])
            e = (cos_s - cos_t).clamp(-1.0, 1.0).masked_fill(degenerate, 0.0) * scale  # smooth-L1' (β = 1)
            r_ij, r_ik = r_s[:, rows].unsqueeze(-1), r_s[:, rows].unsqueeze(-2)
            p = e * r_ij * r_ik  # d loss / d dot
            # dot[i, j, k] = G_jk - G_ij - G_ik + G_ii
            d_g += p.sum(1)
            d_g[:, rows] -= p.sum(-1) + p.sum(-2)
            idx = torch.arange(rows.start, rows.stop, device=g_s.device)
            d_g[:, idx, idx] += p.sum((-1, -2))
            ed = e * dot
            d_r[:, rows] += (ed * r_ik).sum(-1) + (ed * r_ij).sum(-2)
        return d_g, d_r, None, None, None


def angle_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-12) -> Tensor:
    """mean_{i,j,k} smoothL1(ψ_A(s) - ψ_A(t)) for ``[S, N, D]`` (or ``[N, D]``) features, memory-lean."""
    squeeze = f_s.dim() == 2
    if squeeze:
        f_s, f_t = f_s.unsqueeze(0), f_t.unsqueeze(0)
    lead = f_s.shape[:-2]
    f_s, f_t = f_s.reshape(-1, *f_s.shape[-2:]), f_t.reshape(-1, *f_t.shape[-2:])
    g_s, r_s = _gram_and_inverse_norms(f_s, eps)
    with torch.no_grad():
        g_t, r_t = _gram_and_inverse_norms(f_t, eps)
    s, n = g_s.shape[0], g_s.shape[-1]
    chunk = max(1, (1 << 18) // max(1, s * n * n))  # ~256k entries per temporary: cache-sized
    out = _AngleLoss.apply(g_s, r_s, g_t, r_t, chunk).reshape(lead)
    return out.squeeze(0) if squeeze else out


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
    pairs, offdiag = _pair_masks(w)
    loss = f_s.new_zeros(f_s.shape[:-2])
    if distance_weight:
        d_s = _normalised_distances(f_s, offdiag, eps, squared)
        with torch.no_grad():
            d_t = _normalised_distances(f_t, offdiag, eps, squared)
        per_pair = F.smooth_l1_loss(d_s, d_t, reduction="none") * pairs
        loss = loss + distance_weight * per_pair.sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1.0)
    if angle_weight:
        if valid is None:  # the common case: chunked, nothing N³ kept for backward
            loss = loss + angle_weight * angle_loss(f_s, f_t, eps)
        else:
            with torch.no_grad():
                a_t = triplet_angles(f_t, eps)
            per_triple = F.smooth_l1_loss(triplet_angles(f_s, eps), a_t, reduction="none")
            triples = pairs.unsqueeze(-1) * w.unsqueeze(-2).unsqueeze(-2)
            per_triple = per_triple * triples
            loss = loss + angle_weight * per_triple.sum((-1, -2, -3)) / triples.sum((-1, -2, -3)).clamp_min(1.0)
    return loss


@DISTILLERS.register_module("rkd")
class RKD(Distiller):
    """CE + ``kd_weight`` · RKD(student_feats, teacher_feats). The angle term costs N³ memory
    per model: keep batches moderate (N = 128 → 2M entries)."""
    uses_features = True

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False,
                 eps: float = 1e-12, **base: Any):
        super().__init__(**base)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.squared, self.eps = squared, eps

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                valid: Tensor, **extras: Any) -> Tensor:
        f_s = require_feature(extras, "student_feats", "rkd")
        f_t = require_feature(extras, "teacher_feats", "rkd")
        return rkd_loss(f_s, f_t, self.distance_weight, self.angle_weight, valid, self.squared, self.eps)
