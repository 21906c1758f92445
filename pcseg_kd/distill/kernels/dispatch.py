"""Backend selection for the per-row distillation losses (DKD, KD, with or without PSSM).

One entry point, :func:`distill_loss`, with the semantics of the plain PyTorch functions in
:mod:`pcseg_kd.losses` (``dkd_loss``, ``kd_loss``, ``pssm_weights``: the only parts of the
library this module depends on; the distillers depend on it) and these implementations:

``torch``      eager PyTorch, the fused op written with an analytic student gradient
               (:mod:`.torch_fused`; CPU rows in cache-sized chunks), any device and dtype;
``compile``    the same two functions under ``torch.compile``, row dimension marked dynamic
               (one graph for every N);
``triton``     the fused Triton kernel (:mod:`.pssm_dkd_triton`): CUDA tensors, or CPU
               tensors under ``TRITON_INTERPRET=1`` (for tests);
``reference``  the plain autograd composition of the lead's functions (the semantics;
               slowest), also used whenever the teacher's logits require grad.

Choice, first match wins: the ``backend=`` argument, :func:`set_loss_backend` /
:func:`loss_backend` (what a distiller's ``loss_backend`` option sets per call), the
environment variable ``PCSEG_KD_LOSS_BACKEND``, else ``auto``. ``auto`` picks ``triton``
for CUDA tensors when Triton imports and the case is inside the kernel, else ``torch``.

Outside the kernel (float64, C > 1024) a ``triton`` request runs ``torch``. PSSM with
``detach=False`` computes Ω in torch (so its gradient flows) and the DKD/KD part in the
fused op, Ω passed as a weight whose gradient the fused op provides. Forcing ``triton``
where it cannot run at all (Triton missing, CPU tensors without ``TRITON_INTERPRET=1``)
raises.

Nothing here synchronises with the device: choices depend on dtypes, devices, shapes and
``requires_grad`` only, never on tensor values.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from ...losses.dkd import dkd_loss as dkd_loss_torch
from ...losses.kd import kd_loss
from ...losses.pssm import pssm_config
from ...losses.pssm import pssm_weights as torch_pssm_weights
from ...losses.reduce import check_logits, check_reduction, reduce_rows
from . import torch_fused as tf

ENV_VAR = "PCSEG_KD_LOSS_BACKEND"
BACKENDS = ("auto", "torch", "compile", "triton", "reference")
KINDS = ("dkd", "kd")
_override: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _tk():
    """The Triton kernel module, imported on first use: importing pcseg_kd must not import triton."""
    from . import pssm_dkd_triton
    return pssm_dkd_triton


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"loss backend must be one of {BACKENDS}, got {name!r}")
    return name


def check_backend(name: Optional[str]) -> Optional[str]:
    """A distiller's ``loss_backend`` option: None (env / auto) or a known name."""
    return None if name is None else _check_name(name)


def set_loss_backend(name: Optional[str]) -> None:
    """Process-wide choice (``None`` returns to the env var / ``auto``)."""
    global _override
    _override = None if name is None else _check_name(name)


@contextlib.contextmanager
def loss_backend(name: Optional[str]) -> Iterator[None]:
    """``with loss_backend("torch"): ...`` -- scoped :func:`set_loss_backend`."""
    global _override
    old = _override
    set_loss_backend(name)
    try:
        yield
    finally:
        _override = old


def requested_backend(backend: Optional[str] = None) -> str:
    if backend is not None:
        return _check_name(backend)
    if _override is not None:
        return _override
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def triton_can_run(device: torch.device) -> bool:
    if not _tk().HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _tk().interpreting()


def _kernel_covers(s: Tensor, t: Tensor, weight: Optional[Tensor]) -> bool:
    ok_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return (s.dtype in ok_dtypes and t.dtype in ok_dtypes and s.shape[-1] <= _tk().MAX_CLASSES
            and not t.requires_grad and (weight is None or weight.dtype != torch.float64))


def select_backend(s: Tensor, t: Tensor, weight: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> str:
    """The implementation a call with these inputs runs: 'torch', 'compile' or 'triton'."""
    name = requested_backend(backend)
    if name == "auto":
        name = "triton" if (s.device.type == "cuda" and triton_can_run(s.device)) else "torch"
        if name == "triton" and not _kernel_covers(s, t, weight):
            name = "torch"
        return name
    if name == "triton":
        if not triton_can_run(s.device):
            why = ("triton is not installed" if not _tk().HAVE_TRITON else
                   f"tensors are on {s.device.type}; Triton runs CUDA tensors, or CPU tensors "
                   "only under TRITON_INTERPRET=1")
            raise RuntimeError(f"loss backend 'triton' was forced but cannot run: {why}")
        if not _kernel_covers(s, t, weight):
            return "torch"
    return name


# ----------------------------------------------------------------------------- torch path
def _valid(target: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    return None if ignore_index is None else target != ignore_index


def torch_distill_loss(kind: str, s: Tensor, t: Tensor, y: Tensor, alpha: float, beta: float,
                       temperature: float, reduction: str, ignore_index: Optional[int],
                       weight: Optional[Tensor], pssm, kd_apply: str, scale_by_t2: bool) -> Tensor:
    """The reference composition (pssm_weights, then dkd_loss / kd_loss) in PyTorch."""
    omega = None
    if pssm is not None:
        omega = torch_pssm_weights(s, t, y, config=pssm, ignore_index=ignore_index)
    if kind == "dkd":
        w = omega if weight is None else (weight if omega is None else omega * weight.to(omega.dtype))
        return dkd_loss_torch(s, t, y, alpha, beta, temperature, reduction, ignore_index, w)
    valid = _valid(y, ignore_index)
    kw = {}
    w = weight
    if omega is not None:
        if kd_apply == "logit_scale":
            kw["logit_scale"] = omega
        else:
            w = omega if w is None else omega * w.to(omega.dtype)
    if valid is not None:
        w = valid.to(s.dtype if s.dtype == torch.float64 else torch.float32) if w is None else w * valid
    per_row = kd_loss(s, t, temperature, reduction="none", weight=w, scale_by_t2=scale_by_t2, **kw)
    if valid is not None:
        per_row = torch.where(valid, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    return reduce_rows(per_row, reduction, valid)


# ----------------------------------------------------------------------------- fused paths
def _loss_scale(kind: str, temperature: float, scale_by_t2: bool) -> float:
    """T² for DKD and for KD with ``scale_by_t2`` (Hinton), else 1."""
    return temperature ** 2 if (kind == "dkd" or scale_by_t2) else 1.0


def _params(kind: str, alpha: float, beta: float, temperature: float, ignore_index: Optional[int],
            pssm, kd_apply: str, scale_by_t2: bool, omega_only: bool = False):
    mode = _tk().MODE_OMEGA if omega_only else (_tk().MODE_DKD if kind == "dkd" else _tk().MODE_KD)
    loss_scale = _loss_scale(kind, temperature, scale_by_t2)
    kw = {}
    if pssm is not None:
        kw = dict(pssm=True, space_probs=pssm.space == "probs", pssm_temperature=pssm.temperature,
                  gate=_tk().GATES[pssm.gate], tau=pssm.tau, tau_on_d=pssm.tau_scale == "d",
                  below=pssm.below, above_d=pssm.above == "d",
                  kd_logit_scale=(kind == "kd" and kd_apply == "logit_scale"))
    return _tk().FusedParams(mode=mode, alpha=alpha, beta=beta, temperature=temperature,
                          loss_scale=loss_scale, ignore_index=ignore_index, **kw)


def _check(kind: str, s: Tensor, t: Tensor, y: Tensor) -> None:
    check_logits(f"{kind}_loss", s, t, y)


def fused_distill_loss(impl: str, kind: str, s: Tensor, t: Tensor, y: Tensor, alpha: float, beta: float,
                       temperature: float, reduction: str, ignore_index: Optional[int],
                       weight: Optional[Tensor], pssm, kd_apply: str, scale_by_t2: bool,
                       block_rows: Optional[int] = None) -> Tensor:
    """The fused op (student gradient only, teacher detached) on ``impl`` = "triton" (kernel),
    "torch" (eager, analytic backward) or "compile" (the same under torch.compile)."""
    _check(kind, s, t, y)
    if pssm is not None and not pssm.detach:
        # Ω needs its gradient: compute it in torch, let the fused op treat it as a weight.
        if kind == "kd" and kd_apply == "logit_scale":
            # the gradient through a logit scale is not in the fused op
            return torch_distill_loss(kind, s, t, y, alpha, beta, temperature, reduction,
                                      ignore_index, weight, pssm, kd_apply, scale_by_t2)
        omega = torch_pssm_weights(s, t, y, config=pssm, ignore_index=ignore_index)
        weight = omega if weight is None else omega * weight.to(omega.dtype)
        pssm = None
    C = s.shape[-1]
    lead = s.shape[:-1]
    s2, t2, y2 = s.reshape(-1, C), t.reshape(-1, C), y.reshape(-1)
    w2 = None if weight is None else weight.reshape(-1)
    if impl == "triton":
        p = _params(kind, alpha, beta, temperature, ignore_index, pssm, kd_apply, scale_by_t2)
        out = _tk().fused_loss_2d(s2, t2, y2, w2, p, reduction, block_rows)
    else:
        spec = tf.LossSpec(kind=kind, alpha=alpha, beta=beta, temperature=temperature,
                           loss_scale=_loss_scale(kind, temperature, scale_by_t2),
                           ignore_index=ignore_index, pssm=pssm,
                           kd_logit_scale=(kind == "kd" and kd_apply == "logit_scale"))
        out = tf.fused_torch_2d(s2.contiguous(), t2.contiguous(), y2, w2, spec, reduction,
                                compiled=impl == "compile", chunk_rows=block_rows)
    return out.reshape(lead) if reduction == "none" else out


# ----------------------------------------------------------------------------- public entry
def distill_loss(kind: str, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                 alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 reduction: str = "batchmean", ignore_index: Optional[int] = None,
                 weight: Optional[Tensor] = None, pssm=None, kd_apply: str = "weight",
                 scale_by_t2: bool = True, backend: Optional[str] = None) -> Tensor:
    """Per-row ``weight·Ω·(α·TCKD + β·NCKD)·T²`` (``kind="dkd"``) or ``weight·Ω·KL·T²``
    (``kind="kd"``; ``kd_apply="logit_scale"`` scales both logits by Ω instead), 0 on
    ignored rows, reduced by "none" | "sum" | "batchmean" (mean over non-ignored rows).
    ``pssm``: a :class:`~pcseg_kd.losses.pssm.PSSMConfig` or None (Ω = 1)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kd_apply not in ("weight", "logit_scale"):
        raise ValueError(f"kd_apply must be 'weight' or 'logit_scale', got {kd_apply!r}")
    check_reduction(reduction)
    args = (alpha, beta, temperature, reduction, ignore_index, weight, pssm, kd_apply, scale_by_t2)
    name = select_backend(student_logits, teacher_logits, weight, backend)
    if name == "reference" or teacher_logits.requires_grad:
        # the fused ops treat the teacher as detached; keep autograd's answer for the teacher
        return torch_distill_loss(kind, student_logits, teacher_logits, target, *args)
    return fused_distill_loss(name, kind, student_logits, teacher_logits, target, *args)


def applied_omega(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, pssm,
                  ignore_index: Optional[int] = None, backend: Optional[str] = None) -> Optional[Tensor]:
    """Ω as the fused PyTorch loss would compute it inside, for a caller that also needs Ω (its
    statistics) and then passes it to :func:`distill_loss` as ``weight`` with ``pssm=None``:
    the same loss, bit for bit, with Ω computed once. None where the loss runs elsewhere (the
    Triton kernel keeps Ω in registers; the reference path; Ω with a gradient)."""
    if pssm is None or not pssm.detach or teacher_logits.requires_grad:
        return None
    if select_backend(student_logits, teacher_logits, None, backend) != "torch":
        return None  # (the compiled loss computes Ω in compiled code: not bit for bit the eager Ω)
    return tf.omega_rows(student_logits.detach(), teacher_logits, target, pssm, ignore_index)


def pssm_weights(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                 preset: str = "reference", ignore_index: Optional[int] = None,
                 backend: Optional[str] = None, **overrides) -> Tensor:
    """:func:`pcseg_kd.losses.pssm.pssm_weights` with backend dispatch: the kernel's Ω-only
    mode (one read of both logits and the labels, one float32 write per row) when the
    Triton backend is chosen and Ω needs no gradient."""
    cfg = overrides.pop("config", None) or pssm_config(preset, **overrides)
    grad_needed = (not cfg.detach) and (student_logits.requires_grad or teacher_logits.requires_grad)
    name = select_backend(student_logits, teacher_logits, None, backend)
    if name != "triton" or grad_needed:
        return torch_pssm_weights(student_logits, teacher_logits, target, config=cfg,
                                  ignore_index=ignore_index)
    _check("pssm", student_logits, teacher_logits, target)
    C = student_logits.shape[-1]
    p = _params("dkd", 1.0, 1.0, 1.0, ignore_index, cfg, "weight", True, omega_only=True)
    om = _tk().fused_omega_2d(student_logits.reshape(-1, C), teacher_logits.reshape(-1, C),
                           target.reshape(-1), p)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    return om.reshape(student_logits.shape[:-1]).to(dtype)
