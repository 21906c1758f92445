"""Fused Triton kernels: PSSM weight + masked DKD (or KD) per row, and its student gradient.

One program handles a tile of ``BLOCK_R`` rows x ``BLOCK_C`` (next power of two >= C)
classes. Per row it reads the teacher logits, the student logits, the label (and an
optional per-row weight), computes in float32 registers

* Ω (PSSM, authors' or paper's knobs, Ω detached) -- cosine of logits or of softmax
  probabilities, argmax gate of the teacher / student / both, threshold on cos or d,
  value below / above;
* DKD: (α·TCKD + β·NCKD)·T² in log space (every log-probability is a difference of
  logsumexps; log(1 - p_gt) is ``lse_nontarget - lse_all``, never ``log(1 - p)``), or
  KD: KL(σ(t/T) ‖ σ(s/T))·T² with Ω as a loss weight or as a logit scale;

and writes either the per-row loss (``reduction="none"``) or one partial sum and one
valid-row count per program (``"sum"``/``"batchmean"``), which torch then sums in a
fixed order: no atomics, so the result is bitwise reproducible run to run.

The backward kernel re-reads the same inputs and ``grad_output`` (a device tensor:
a scalar already divided by the device-side row count, or one value per row) and
writes ∂loss/∂student_logits in the student's dtype. No host synchronisation anywhere.
See ``docs/loss_kernel.md`` for the derivation and the byte counts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

try:  # Triton is optional: the torch path covers every case.
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False

MODE_DKD, MODE_KD, MODE_OMEGA = 0, 1, 2
GATES = {"teacher": 0, "student": 1, "both": 2}
MAX_CLASSES = 1024  # BLOCK_C cap; larger C falls back to torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class FusedParams:
    """Everything the kernel needs besides tensors (Python numbers: no sync, hashable)."""

    mode: int = MODE_DKD
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    loss_scale: float = 16.0          # T² (KD may use 1: ``scale_by_t2=False``)
    ignore_index: Optional[int] = None
    # PSSM (None -> Ω = 1)
    pssm: bool = False
    space_probs: bool = False
    pssm_temperature: float = 1.0
    gate: int = 0
    tau: float = 0.996
    tau_on_d: bool = False
    below: float = 0.0
    above_d: bool = True
    kd_logit_scale: bool = False      # KD only: Ω scales both logits instead of weighting the loss


if HAVE_TRITON:

    @triton.jit
    def _log1p(x):
        # Accurate log(1 + x) for x >= 0 without libdevice (works in the interpreter too).
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))

    @triton.jit
    def _masked_exp_lse(z, mask, neg_inf):
        # exp(z - max) on the masked entries (exact 0 elsewhere), its row sum, and the logsumexp
        m = tl.max(tl.where(mask, z, neg_inf), 1)
        e = tl.where(mask, tl.exp(z - m[:, None]), 0.0)
        total = tl.sum(e, 1)
        return e, total, m + tl.log(total)

    @triton.jit
    def _decoupled_logprobs(z, is_gt, non_target, neg_inf):
        # non-target logsumexp, then the full one by logaddexp with the target logit, so
        # log p_gt and log(1 - p_gt) never go through log(1 - p)
        z_gt = tl.sum(tl.where(is_gt, z, 0.0), 1)
        e, total, lnt = _masked_exp_lse(z, non_target, neg_inf)
        lse = tl.maximum(z_gt, lnt) + _log1p(tl.exp(-tl.abs(z_gt - lnt)))
        return e, total, lnt, z_gt - lse, lnt - lse

    @triton.jit
    def _fused_kernel(
        s_ptr, t_ptr, y_ptr, w_ptr, go_ptr,
        out_ptr, part_ptr, cnt_ptr, grad_ptr, gw_ptr,
        R, C, ignore_index,
        alpha, beta, inv_t, loss_scale, inv_tp, tau, below,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        MODE: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_W: tl.constexpr,
        HAS_PSSM: tl.constexpr, SPACE_PROBS: tl.constexpr, GATE: tl.constexpr,
        TAU_ON_D: tl.constexpr, ABOVE_D: tl.constexpr, KD_LOGIT_SCALE: tl.constexpr,
        FWD: tl.constexpr, REDUCE: tl.constexpr, BWD: tl.constexpr,
        GO_PER_ROW: tl.constexpr, NEED_WGRAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < R
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        neg_inf = float("-inf")

        xs = tl.load(s_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        xt = tl.load(t_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
        if HAS_IGNORE:
            valid = rmask & (y != ignore_index)
        else:
            valid = rmask
        g = tl.where(valid, y, 0)
        is_gt = cols[None, :] == g[:, None]

        # ------------------------------------------------------------------ Ω (PSSM)
        omega = tl.where(valid, 1.0, 0.0)
        if HAS_PSSM:
            if SPACE_PROBS:
                at = tl.where(cmask[None, :], xt * inv_tp, neg_inf)
                at = tl.exp(at - tl.max(at, 1)[:, None])
                o_t = at / tl.sum(at, 1)[:, None]
                a_s = tl.where(cmask[None, :], xs * inv_tp, neg_inf)
                a_s = tl.exp(a_s - tl.max(a_s, 1)[:, None])
                o_s = a_s / tl.sum(a_s, 1)[:, None]
            else:
                o_t = xt
                o_s = xs
            # torch.nn.functional.cosine_similarity: each vector divided by max(‖x‖, eps) first.
            n_t = tl.maximum(tl.sqrt(tl.sum(o_t * o_t, 1)), 1e-8)
            n_s = tl.maximum(tl.sqrt(tl.sum(o_s * o_s, 1)), 1e-8)
            cos = tl.sum((o_t / n_t[:, None]) * (o_s / n_s[:, None]), 1)
            d = 0.5 * (cos + 1.0)
            if TAU_ON_D:
                above = d >= tau
            else:
                above = cos >= tau
            if ABOVE_D:
                hi = d
            else:
                hi = tl.full([BLOCK_R], 1.0, tl.float32)
            mask_v = tl.where(above, hi, below)
            if GATE == 0:
                right = tl.argmax(tl.where(cmask[None, :], xt, neg_inf), 1, tie_break_left=True) == y
            elif GATE == 1:
                right = tl.argmax(tl.where(cmask[None, :], xs, neg_inf), 1, tie_break_left=True) == y
            else:
                right = (tl.argmax(tl.where(cmask[None, :], xt, neg_inf), 1, tie_break_left=True) == y) & \
                        (tl.argmax(tl.where(cmask[None, :], xs, neg_inf), 1, tie_break_left=True) == y)
            omega = tl.where(valid, tl.where(right, 1.0, mask_v), 0.0)

        if MODE == 2:  # Ω only (pssm_weights)
            tl.store(out_ptr + rows, omega, mask=rmask)
            return

        # loss weight wl and logit scale lam
        if MODE == 1 and KD_LOGIT_SCALE:
            lam = omega
            wl = tl.where(valid, 1.0, 0.0)
        else:
            lam = tl.full([BLOCK_R], 1.0, tl.float32)
            wl = omega
        if HAS_W:
            wl = wl * tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)

        if MODE == 0:
            # ---------------------------------------------------------------- DKD
            zs = xs * inv_t
            zt = xt * inv_t
            ntm = cmask[None, :] & (cols[None, :] != g[:, None])
            et, st, lnt_t, lpt_gt, lpt_rest = _decoupled_logprobs(zt, is_gt, ntm, neg_inf)
            es, ss, lnt_s, lps_gt, lps_rest = _decoupled_logprobs(zs, is_gt, ntm, neg_inf)

            pt_gt = tl.exp(lpt_gt)
            pt_rest = tl.exp(lpt_rest)
            qt = et / st[:, None]  # exact 0 on the target column and on padding
            if FWD or NEED_WGRAD:
                tckd = pt_gt * (lpt_gt - lps_gt) + pt_rest * (lpt_rest - lps_rest)
                dlog = (zt - lnt_t[:, None]) - (zs - lnt_s[:, None])
                nckd = tl.sum(tl.where(ntm, qt * dlog, 0.0), 1)
                raw = loss_scale * (alpha * tckd + beta * nckd)
        else:
            # ---------------------------------------------------------------- KD
            zs = xs * (inv_t * lam)[:, None]
            zt = xt * (inv_t * lam)[:, None]
            et, st, lse_t = _masked_exp_lse(zt, cmask[None, :], neg_inf)
            es, ss, lse_s = _masked_exp_lse(zs, cmask[None, :], neg_inf)
            pt = et / st[:, None]
            if FWD or NEED_WGRAD:
                dlog = (zt - lse_t[:, None]) - (zs - lse_s[:, None])
                raw = loss_scale * tl.sum(tl.where(cmask[None, :], pt * dlog, 0.0), 1)

        if FWD:
            per = tl.where(rmask, wl * raw, 0.0)
            if REDUCE:
                tl.store(part_ptr + pid, tl.sum(per, 0))
                tl.store(cnt_ptr + pid, tl.sum(valid.to(tl.int32), 0))
            else:
                tl.store(out_ptr + rows, per, mask=rmask)

        if BWD:
            if GO_PER_ROW:
                go = tl.load(go_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            else:
                go = tl.load(go_ptr).to(tl.float32)
            coef = go * wl * (loss_scale * inv_t)
            if MODE == 0:
                qs = es / ss[:, None]
                ps_gt = tl.exp(lps_gt)
                ps_rest = tl.exp(lps_rest)
                # ∂TCKD/∂z_k: p_s,gt - p_t,gt at the target; (p_s,rest - p_t,rest)·q_s,k elsewhere
                # ∂NCKD/∂z_k: 0 at the target; q_s,k - q_t,k elsewhere
                g_t = tl.where(is_gt, (ps_gt - pt_gt)[:, None], (ps_rest - pt_rest)[:, None] * qs)
                g_n = tl.where(is_gt, 0.0, qs - qt)
                grad = coef[:, None] * (alpha * g_t + beta * g_n)
            else:
                ps = es / ss[:, None]
                grad = (coef * lam)[:, None] * (ps - pt)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=m2)
            if NEED_WGRAD:
                if MODE == 1 and KD_LOGIT_SCALE:
                    base_w = tl.where(valid, 1.0, 0.0)
                else:
                    base_w = omega
                tl.store(gw_ptr + rows, go * base_w * raw, mask=rmask)


def _blocks(num_classes: int, block_rows: Optional[int]) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps).

    GPU: 1024 elements per program over 8 warps = 4 per thread (C = 20 -> 32 rows x 32
    classes). Compiled offline for sm_90 (``cuobjdump -res-usage``, Triton 3.9) this is
    62-69 registers and no spill; 8 per thread is ~90-104 registers, 16 per thread spills
    (255 registers + ~0.5-1 KB stack). The interpreter runs one numpy program at a
    time, so there a big tile is much faster."""
    block_c = max(2, triton.next_power_of_2(num_classes))
    if block_rows is None:
        budget = 32768 if interpreting() else 1024
        block_rows = max(1, min(1024, budget // block_c))
    block_rows = triton.next_power_of_2(block_rows)
    num_warps = 8 if block_rows * block_c >= 1024 else 4
    return block_rows, block_c, num_warps


def _launch(s, t, y, w, p: FusedParams, *, fwd: bool, reduce: bool, bwd: bool, go=None,
            go_per_row: bool = False, need_wgrad: bool = False, block_rows: Optional[int] = None):
    R, C = s.shape
    BR, BC, nw = _blocks(C, block_rows)
    grid = (triton.cdiv(R, BR),)
    dev = s.device
    f32 = torch.float32
    out = part = cnt = grad = gw = None
    if p.mode == MODE_OMEGA or (fwd and not reduce):
        out = torch.empty(R, device=dev, dtype=f32)
    if fwd and reduce:
        part = torch.empty(grid[0], device=dev, dtype=f32)
        cnt = torch.empty(grid[0], device=dev, dtype=torch.int32)
    if bwd:
        grad = torch.empty_like(s)
    if need_wgrad:
        gw = torch.empty(R, device=dev, dtype=f32)
    dummy = s  # never dereferenced: the constexpr flag removes the access
    _fused_kernel[grid](
        s, t, y, w if w is not None else dummy, go if go is not None else dummy,
        out if out is not None else dummy, part if part is not None else dummy,
        cnt if cnt is not None else dummy, grad if grad is not None else dummy,
        gw if gw is not None else dummy,
        R, C, 0 if p.ignore_index is None else int(p.ignore_index),
        float(p.alpha), float(p.beta), 1.0 / float(p.temperature), float(p.loss_scale),
        1.0 / float(p.pssm_temperature), float(p.tau), float(p.below),
        BLOCK_R=BR, BLOCK_C=BC, MODE=p.mode, HAS_IGNORE=p.ignore_index is not None,
        HAS_W=w is not None, HAS_PSSM=p.pssm, SPACE_PROBS=p.space_probs, GATE=p.gate,
        TAU_ON_D=p.tau_on_d, ABOVE_D=p.above_d, KD_LOGIT_SCALE=p.kd_logit_scale,
        FWD=fwd, REDUCE=reduce, BWD=bwd, GO_PER_ROW=go_per_row, NEED_WGRAD=need_wgrad,
        num_warps=nw,
    )
    return out, part, cnt, grad, gw


class FusedDistillLoss(torch.autograd.Function):
    """Autograd wrapper. Inputs are 2-D ``[R, C]`` contiguous logits, ``[R]`` labels and an
    optional ``[R]`` weight; gradient flows to the student logits (and to ``weight`` if it
    requires grad); the teacher is treated as detached."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, y: Tensor, w: Optional[Tensor], p: FusedParams,
                reduction: str, block_rows: Optional[int]):
        reduce = reduction != "none"
        out, part, cnt, _, _ = _launch(s, t, y, w, p, fwd=True, reduce=reduce, bwd=False,
                                       block_rows=block_rows)
        count = None
        if reduce:
            total = part.sum()
            count = cnt.sum()  # int64 on device: exact, no sync
            result = total / count.clamp_min(1) if reduction == "batchmean" else total
        else:
            result = out
        ctx.p, ctx.reduction, ctx.block_rows = p, reduction, block_rows
        ctx.has_w = w is not None
        ctx.save_for_backward(s, t, y, w, count)
        return result

    @staticmethod
    def backward(ctx, go: Tensor):
        s, t, y, w, count = ctx.saved_tensors
        need_s = ctx.needs_input_grad[0]
        need_w = ctx.has_w and ctx.needs_input_grad[3]
        if not (need_s or need_w):
            return None, None, None, None, None, None, None
        if ctx.reduction == "none":
            go_t, per_row = go.contiguous().to(torch.float32), True
        elif ctx.reduction == "batchmean":
            go_t, per_row = (go.to(torch.float32) / count.clamp_min(1)).reshape(1), False
        else:
            go_t, per_row = go.to(torch.float32).reshape(1), False
        _, _, _, grad, gw = _launch(s, t, y, w, ctx.p, fwd=False, reduce=False, bwd=True, go=go_t,
                                    go_per_row=per_row, need_wgrad=need_w, block_rows=ctx.block_rows)
        if gw is not None:
            gw = gw.to(w.dtype)
        return (grad if need_s else None), None, None, gw, None, None, None


def fused_loss_2d(s: Tensor, t: Tensor, y: Tensor, w: Optional[Tensor], p: FusedParams,
                  reduction: str, block_rows: Optional[int] = None) -> Tensor:
    """Run the fused op on 2-D inputs (callers flatten leading dims)."""
    return FusedDistillLoss.apply(s.contiguous(), t.detach().contiguous(), y.contiguous(),
                                  None if w is None else w.contiguous(), p, reduction, block_rows)


def fused_omega_2d(s: Tensor, t: Tensor, y: Tensor, p: FusedParams,
                   block_rows: Optional[int] = None) -> Tensor:
    """Ω only (``pssm_weights``), float32 ``[R]``, no gradient."""
    out, *_ = _launch(s.detach().contiguous(), t.detach().contiguous(), y.contiguous(), None,
                      p, fwd=False, reduce=False, bwd=False, block_rows=block_rows)
    return out
