"""The fused op in plain PyTorch: the ``torch`` (eager) and ``compile`` backends.

Same semantics as the Triton kernel and as the reference composition
(``pssm_weights`` then ``dkd_loss`` / ``kd_loss``), but with the student gradient written
out analytically in a custom :class:`torch.autograd.Function` instead of being taped by
autograd: the forward keeps only per-row vectors, the backward recomputes the two
non-target softmaxes and writes the gradient in a handful of passes. On CPU the rows are
processed in chunks that fit in cache (a loop over shapes, never over tensor values).

Gradient (z = x / T, q = softmax over the non-target classes, b = [p_gt, p_rest]):
    ∂TCKD/∂z_s,k = p_s,gt − p_t,gt at the target; (p_s,rest − p_t,rest)·q_s,k elsewhere
    ∂NCKD/∂z_s,k = 0 at the target;              q_s,k − q_t,k elsewhere
    ∂KL/∂z_s,k   = p_s,k − p_t,k  (KD; times Ω when Ω scales the logits)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Rows per chunk on CPU (a loop over shapes only). Eager: 8192 x 20 fp32 = 640 KB per
# temporary, in L2. Compiled: Inductor fuses the temporaries away, a chunk still keeps the
# few it materialises in cache (16384 measured ~2x faster than one chunk at N = 1e6).
CPU_CHUNK_ROWS = 8192
CPU_COMPILED_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class LossSpec:
    kind: str = "dkd"               # "dkd" | "kd"
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    loss_scale: float = 16.0        # T² (KD with scale_by_t2=False: 1)
    ignore_index: Optional[int] = None
    pssm: object = None             # PSSMConfig (Ω detached) or None
    kd_logit_scale: bool = False


def _cdtype(s: Tensor, t: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32


def _cm(x: Tensor, dtype) -> Tensor:
    """Class-major copy ``[C, r]`` in the compute dtype. Torch's CPU reductions over a short
    inner dim (C = 20) are ~10x slower than over the outer dim, so every per-row reduction
    below runs on this layout."""
    if x.dtype != dtype:
        x = x.to(dtype)  # convert first: a converting transposed copy_ is ~30x slower on CPU
    return x.t().contiguous()


def _omega_cm(xs: Tensor, xt: Tensor, y: Tensor, valid: Optional[Tensor], cfg, cls: Tensor) -> Tensor:
    """PSSM Ω (``pssm_weights`` semantics, detached) on class-major raw logits."""
    import torch.nn.functional as F
    if cfg.space == "probs":
        o_s, o_t = F.softmax(xs / cfg.temperature, 0), F.softmax(xt / cfg.temperature, 0)
    else:
        o_s, o_t = xs, xt
    # cosine_similarity: each vector divided by max(‖x‖, 1e-8)
    n_t = (o_t * o_t).sum(0).sqrt_().clamp_min_(1e-8)
    n_s = (o_s * o_s).sum(0).sqrt_().clamp_min_(1e-8)
    cos = (o_t * o_s).sum(0) / (n_t * n_s)
    d = 0.5 * (cos + 1.0)
    above = (d if cfg.tau_scale == "d" else cos) >= cfg.tau
    hi = d if cfg.above == "d" else torch.ones_like(d)
    mask = torch.where(above, hi, torch.full_like(d, cfg.below))

    def right(x):  # argmax(x) == y with torch's first-index tie break, without argmax
        m = x.amax(0)
        x_y = x.gather(0, y.unsqueeze(0)).squeeze(0)
        m_before = x.masked_fill(cls >= y, float("-inf")).amax(0)  # max over classes < y
        return (x_y == m) & (m_before < m)

    r = {"teacher": lambda: right(xt), "student": lambda: right(xs),
         "both": lambda: right(xt) & right(xs)}[cfg.gate]()
    omega = torch.where(r, torch.ones_like(mask), mask)
    if valid is not None:
        omega = omega.masked_fill(~valid, 0.0)
    return omega


def omega_rows(s: Tensor, t: Tensor, y: Tensor, cfg, ignore_index: Optional[int]) -> Tensor:
    """Ω ``[...]`` exactly as the fused loss applies it (:func:`_omega_cm` on its inputs), for a
    caller that needs Ω itself too (PSSM statistics) and passes it back as the loss weight."""
    C = s.shape[-1]
    s2, t2, y2 = s.reshape(-1, C), t.reshape(-1, C), y.reshape(-1)
    dtype = _cdtype(s2, t2)
    valid = None if ignore_index is None else (y2 != ignore_index)
    yy = y2.long() if valid is None else y2.long().masked_fill(~valid, 0)
    cls = torch.arange(C, device=s.device).unsqueeze(1)
    return _omega_cm(_cm(s2, dtype), _cm(t2, dtype), yy, valid, cfg, cls).reshape(s.shape[:-1])


def _prep(s, t, y, w, spec: LossSpec, dtype):
    """Class-major inputs, safe labels and the per-row weights (wl, lam, base)."""
    xs, xt = _cm(s, dtype), _cm(t, dtype)
    C = xs.shape[0]
    cls = torch.arange(C, device=s.device).unsqueeze(1)
    valid = None if spec.ignore_index is None else (y != spec.ignore_index)
    yy = y.long() if valid is None else y.long().masked_fill(~valid, 0)
    omega = None if spec.pssm is None else _omega_cm(xs, xt, yy, valid, spec.pssm, cls)
    vmask = None if valid is None else valid.to(dtype)
    lam = None
    if spec.kind == "kd" and spec.kd_logit_scale and omega is not None:
        lam, base = omega, vmask
    else:
        base = omega if omega is not None else vmask
    wl = base
    if w is not None:
        wl = w.to(dtype) if wl is None else wl * w.to(dtype)
    return xs, xt, yy, cls, wl, lam, base


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


def _nt(z: Tensor, yy: Tensor):
    """In place: z <- z with -inf on the target; returns (z_gt, masked z, max, exp(z - max))
    with the exps in a new tensor."""
    z_g = z.gather(0, yy).squeeze(0)
    zm = z.scatter_(0, yy, float("-inf"))
    m = zm.amax(0)
    e = (zm - m).exp_()
    return z_g, zm, m, e


def rows_forward(s: Tensor, t: Tensor, y: Tensor, w: Optional[Tensor], spec: LossSpec):
    """(per-row loss ``[r]``, 0 on ignored rows; per-row vectors the backward needs)."""
    dtype = _cdtype(s, t)
    xs, xt, yy, cls, wl, lam, base = _prep(s, t, y, w, spec, dtype)
    inv_t = 1.0 / spec.temperature
    if spec.kind == "dkd":
        y1 = yy.unsqueeze(0)
        zt_g, zmt, mt, et = _nt(xt.mul_(inv_t), y1)
        st = et.sum(0)
        lnt_t = mt + st.log()
        zs_g, zms, ms, es = _nt(xs.mul_(inv_t), y1)
        lnt_s = ms + es.sum(0).log()
        lse_t, lse_s = _logaddexp(zt_g, lnt_t), _logaddexp(zs_g, lnt_s)
        lpt_gt, lpt_rest = zt_g - lse_t, lnt_t - lse_t
        lps_gt, lps_rest = zs_g - lse_s, lnt_s - lse_s
        pt_gt, pt_rest = lpt_gt.exp(), lpt_rest.exp()
        tckd = pt_gt * (lpt_gt - lps_gt) + pt_rest * (lpt_rest - lps_rest)
        # Σ q_t·(log q_t - log q_s); log q = z - lnt. The target column is -inf - -inf = nan in
        # dl but q_t = 0 there exactly: zero dl on it before the product (never 0·inf).
        dl = zmt.sub_(zms).scatter_(0, y1, 0.0).sub_(lnt_t - lnt_s)
        nckd = dl.mul_(et).sum(0) / st
        raw = spec.loss_scale * (spec.alpha * tckd + spec.beta * nckd)
        a_rest = spec.alpha * (lps_rest.exp() - pt_rest)
        a_gt = spec.alpha * (lps_gt.exp() - pt_gt)
        saved = (lnt_t, lnt_s, a_rest, a_gt)
    else:
        sc = inv_t if lam is None else (lam * inv_t)
        zt, zs = xt.mul_(sc), xs.mul_(sc)
        lse_t, lse_s = torch.logsumexp(zt, 0), torch.logsumexp(zs, 0)
        lpt = zt.sub_(lse_t)
        dl = lpt - zs.sub_(lse_s)
        raw = spec.loss_scale * dl.mul_(lpt.exp_()).sum(0)
        saved = (lse_t, lse_s)
    per_row = raw if wl is None else raw * wl
    ones = torch.ones_like(raw)
    return per_row, saved + (raw, ones if wl is None else wl, ones if lam is None else lam,
                             ones if base is None else base)


def rows_backward(s: Tensor, t: Tensor, y: Tensor, saved, go: Tensor, spec: LossSpec) -> Tensor:
    """∂loss/∂student ``[r, C]`` in the student's dtype; ``go`` a 0-d scale or ``[r]``."""
    dtype = _cdtype(s, t)
    xs, xt = _cm(s, dtype), _cm(t, dtype)
    inv_t = 1.0 / spec.temperature
    wl, lam = saved[-3], saved[-2]
    coef = (go * (spec.loss_scale * inv_t)) * wl
    if spec.kind == "dkd":
        lnt_t, lnt_s, a_rest, a_gt = saved[:4]
        valid = None if spec.ignore_index is None else (y != spec.ignore_index)
        yy = y.long() if valid is None else y.long().masked_fill(~valid, 0)
        y1 = yy.unsqueeze(0)
        # ∂/∂z_k: α(p_s,rest - p_t,rest)·q_s,k + β(q_s,k - q_t,k) off the target, a_gt on it
        # (β's term kept apart: exactly 0 for C = 2, no cancellation when q_s ≈ q_t)
        qt = xt.mul_(inv_t).sub_(lnt_t).exp_()
        qs = xs.mul_(inv_t).sub_(lnt_s).exp_()
        dq = qs - qt
        g = qs.mul_(a_rest).add_(dq, alpha=spec.beta)
        g = g.scatter_(0, y1, a_gt.unsqueeze(0)).mul_(coef)
    else:
        lse_t, lse_s = saved[:2]
        sc = inv_t * lam
        pt = xt.mul_(sc).sub_(lse_t).exp_()
        g = xs.mul_(sc).sub_(lse_s).exp_().sub_(pt).mul_(coef * lam)
    return g.t().to(s.dtype)  # [r, C] view of the class-major result, in the student's dtype


def _chunks(rows: int, device: torch.device, chunk_rows: Optional[int]):
    if chunk_rows is None:
        chunk_rows = CPU_CHUNK_ROWS if device.type == "cpu" else rows
    chunk_rows = max(1, chunk_rows)
    return [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)] or [(0, 0)]


def _sl(x: Optional[Tensor], a: int, b: int, mark: bool = False) -> Optional[Tensor]:
    if x is None or x.dim() == 0:
        return x
    if not (a == 0 and b == x.shape[0]):
        x = x[a:b]
    if mark:
        torch._dynamo.maybe_mark_dynamic(x, 0)  # compiled path: N is symbolic, no recompiles
    return x


class TorchFusedLoss(torch.autograd.Function):
    """Autograd wrapper of :func:`rows_forward` / :func:`rows_backward` over row chunks.
    ``fwd`` / ``bwd`` may be ``torch.compile``d versions of those two functions."""

    @staticmethod
    def forward(ctx, s, t, y, w, spec: LossSpec, reduction: str, fwd, bwd, chunk_rows):
        R = s.shape[0]
        dtype = _cdtype(s, t)
        mk = fwd is not rows_forward
        outs = [fwd(_sl(s, a, b, mk), _sl(t, a, b, mk), _sl(y, a, b, mk), _sl(w, a, b, mk), spec)
                for a, b in _chunks(R, s.device, chunk_rows)]
        if len(outs) == 1:
            per_row, saved = outs[0]
        else:
            per_row = torch.cat([o[0] for o in outs])
            saved = tuple(torch.cat([o[1][i] for o in outs]) for i in range(len(outs[0][1])))
        count = None
        if reduction == "none":
            out = per_row
        else:
            out = per_row.sum()
            if reduction == "batchmean":
                count = (y != spec.ignore_index).sum() if spec.ignore_index is not None else None
                out = out / (count.clamp_min(1) if count is not None else max(R, 1))
        ctx.spec, ctx.reduction, ctx.bwd, ctx.chunk_rows, ctx.R = spec, reduction, bwd, chunk_rows, R
        ctx.has_w, ctx.w_dtype = w is not None, (w.dtype if w is not None else None)
        ctx.save_for_backward(s, t, y, count, *saved)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, go):
        s, t, y, count, *saved = ctx.saved_tensors
        need_w = ctx.has_w and ctx.needs_input_grad[3]
        dtype = _cdtype(s, t)
        go = go.to(dtype)
        if ctx.reduction == "batchmean":
            go = go / (count.clamp_min(1) if count is not None else max(ctx.R, 1))
        grad = None
        if ctx.needs_input_grad[0]:
            mk = ctx.bwd is not rows_backward
            grad = torch.empty_like(s, memory_format=torch.contiguous_format)
            for a, b in _chunks(ctx.R, s.device, ctx.chunk_rows):
                g = ctx.bwd(_sl(s, a, b, mk), _sl(t, a, b, mk), _sl(y, a, b, mk),
                            tuple(_sl(v, a, b, mk) for v in saved), _sl(go, a, b, mk), ctx.spec)
                grad[a:b].copy_(g)  # same dtype: a plain (transposing) copy
        gw = None
        if need_w:
            raw, base = saved[-4], saved[-1]
            gw = (go * base * raw).to(ctx.w_dtype)
        return grad, None, None, gw, None, None, None, None, None


_compiled = {}


def compiled_pair():
    """``torch.compile``d (rows_forward, rows_backward), built once."""
    if not _compiled:
        _compiled["fwd"] = torch.compile(rows_forward, dynamic=None)
        _compiled["bwd"] = torch.compile(rows_backward, dynamic=None)
    return _compiled["fwd"], _compiled["bwd"]


def fused_torch_2d(s: Tensor, t: Tensor, y: Tensor, w: Optional[Tensor], spec: LossSpec, reduction: str,
                   compiled: bool = False, chunk_rows: Optional[int] = None) -> Tensor:
    if compiled:
        fwd, bwd = compiled_pair()
        if chunk_rows is None:
            chunk_rows = CPU_COMPILED_CHUNK_ROWS if s.device.type == "cpu" else max(1, s.shape[0])
    else:
        fwd, bwd = rows_forward, rows_backward
    return TorchFusedLoss.apply(s, t.detach(), y, w, spec, reduction, fwd, bwd, chunk_rows)
