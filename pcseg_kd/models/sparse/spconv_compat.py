"""spconv availability and the guards spconv 2.3.8 needs on a CPU-only machine (REFERENCE §4).

Two defects of spconv 2.3.8 (CPU build) with a CUDA-less torch, both measured here:

1. **Backward raises** ``AssertionError: Torch not compiled with CUDA enabled``.
   ``spconv.pytorch.ops.indice_conv_backward`` (the pure-Python path the CPU build takes,
   ``GEMM_CPP is None``) calls ``get_current_stream()`` -- i.e. ``torch.cuda.current_stream()`` --
   unconditionally, before its CPU branch, which never uses the stream.
2. **Wrong, non-deterministic outputs with more than one intra-op thread.** The CPU
   gather-mm-scatter loop of ``indice_conv`` / ``indice_conv_backward`` goes through
   ``SpconvOps.scatter_add_cpu``, which races when OpenMP runs it on more than one thread
   (a few output rows differ per run; with ``torch.set_num_threads(1)`` the results match a
   dense ``conv3d`` to 1e-15).

:func:`install_cpu_guards` patches, once per process:

* every public tensor op of ``spconv.pytorch.ops`` (the functions spconv's autograd Functions in
  ``spconv.pytorch.functional`` and its modules in ``spconv.pytorch.conv`` / ``pool`` call, always
  as ``ops.<name>`` attribute look-ups, so rebinding the attribute on the ``ops`` module reaches
  them, forward *and* autograd backward). Any other loaded ``spconv`` module that holds one of
  these functions under an imported name is patched too (none does in 2.3.8). On CPU tensors the
  op runs with one torch intra-op thread and the previous count is restored afterwards, even if
  the op raises; calls with any CUDA tensor pass straight through.
* ``get_current_stream`` in ``spconv.pytorch.cppcore`` (its definition, so modules imported later
  pick up the patched one) and in every loaded ``spconv`` module that imported it by name
  (``ops``, ``hash``, ``utils``, and the quantization modules if loaded). It returns a dummy
  stream ``0`` inside a guarded CPU op or when CUDA is unavailable, else the real current stream.

On CUDA the guards only read Python-level tensor attributes (``.is_cuda``): no thread change, no
host-device sync, results unchanged.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable, Dict, Tuple

import torch

try:  # a CUDA wheel on a machine without its CUDA runtime fails here with an OSError, not ImportError
    from spconv.pytorch import cppcore as _sp_cppcore
    from spconv.pytorch import ops as _sp_ops

    HAVE_SPCONV: bool = True
    _SPCONV_IMPORT_ERROR: BaseException | None = None
except Exception as _err:  # pragma: no cover - depends on the environment
    HAVE_SPCONV = False
    _SPCONV_IMPORT_ERROR = _err
    _sp_cppcore = None
    _sp_ops = None

__all__ = [
    "HAVE_SPCONV",
    "require_spconv",
    "spconv_missing_message",
    "install_cpu_guards",
    "uninstall_cpu_guards",
    "cpu_guards_installed",
    "GUARDED_OPS",
    "UNGUARDED_OPS",
]

# The public functions of spconv.pytorch.ops that take tensors (spconv 2.3.8). Names missing from
# another spconv version are skipped.
GUARDED_OPS: Tuple[str, ...] = (
    "get_indice_pairs",
    "get_indice_pairs_implicit_gemm",
    "indice_conv",
    "fused_indice_conv",
    "indice_conv_backward",
    "implicit_gemm",
    "implicit_gemm_backward",
    "indice_maxpool",
    "indice_maxpool_backward",
    "indice_maxpool_implicit_gemm",
    "indice_maxpool_implicit_gemm_backward",
    "indice_avgpool_implicit_gemm",
    "indice_avgpool_implicit_gemm_backward",
    "maximum_value_int_",
    "global_pool_rearrange",
)
# Public functions of ops left alone: pure-Python shape arithmetic on lists, no tensors, no stream.
UNGUARDED_OPS: Tuple[str, ...] = ("get_conv_output_size", "get_deconv_output_size")

_GUARD_MARK = "__pcseg_cpu_guard__"

# (module name, attribute) -> the object that was there before install_cpu_guards().
_originals: Dict[Tuple[str, str], Any] = {}
# wrapper -> original, kept alive here so ids stay unique while uninstalling
_wrappers: Dict[int, Tuple[Callable, Callable]] = {}
_installed = False
_lock = threading.Lock()
# Per-thread depth of guarded CPU ops in progress (autograd runs CPU backward on the calling thread,
# but a thread-local keeps concurrent threads from seeing each other's state).
_tls = threading.local()


def spconv_missing_message(what: str = "it") -> str:
    """Why spconv is unusable here and how to install it (for error messages)."""
    return (f"{what} requires spconv 2.x, which could not be imported ({_SPCONV_IMPORT_ERROR!r}). "
            "Install the CPU build with `pip install 'pcseg_kd[spconv]'` (i.e. `pip install spconv`), "
            "or, for CUDA, the wheel matching your CUDA toolkit, e.g. `pip install spconv-cu120` or "
            "`pip install spconv-cu121` (install only one spconv package).")


def require_spconv(what: str) -> None:
    """Raise ``ImportError`` naming ``what`` if spconv cannot be imported."""
    if HAVE_SPCONV:
        return
    raise ImportError(spconv_missing_message(what)) from _SPCONV_IMPORT_ERROR


def _silence_fx_tracing_warning() -> None:
    """torch logs ``is_fx_tracing will return true for both fx.symbolic_trace and torch.export ...``
    once per process, the first time spconv builds a ``SparseConvTensor`` (its
    ``ProxyableClassMeta`` calls ``torch.fx``'s ``is_fx_tracing``); nothing here traces, so the
    line only clutters every KITTI command. The warning is an ``lru_cache``d function: calling
    it once with its logger disabled uses up its one emission."""
    try:
        from torch.fx import _symbolic_trace as st
    except Exception:  # pragma: no cover - another torch layout
        return
    warn = getattr(st, "is_fx_tracing_warning", None)
    log = getattr(st, "log", None)
    if warn is None or log is None:
        return
    disabled = log.disabled
    log.disabled = True
    try:
        warn()
    except Exception:  # pragma: no cover
        pass
    finally:
        log.disabled = disabled


if HAVE_SPCONV:
    _silence_fx_tracing_warning()


def _is_cpu_call(args: tuple, kwargs: dict) -> bool:
    """True when the call has tensors and none of them is on CUDA.

    Only reads ``.is_cuda`` (a Python-level attribute): no device sync.
    """
    seen = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                return False
            seen = True
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                return False
            seen = True
    return seen


def _cpu_guard(fn: Callable) -> Callable:
    """Wrap an ops function: on CPU tensors, run it with one intra-op thread (defect 2) and mark the
    thread as inside a CPU op so the stream look-up returns the dummy 0 (defect 1)."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if not _is_cpu_call(args, kwargs):
            return fn(*args, **kwargs)  # CUDA: untouched
        prev = torch.get_num_threads()
        _tls.depth = getattr(_tls, "depth", 0) + 1
        try:
            if prev != 1:
                torch.set_num_threads(1)
            return fn(*args, **kwargs)
        finally:
            _tls.depth -= 1
            if prev != 1:
                torch.set_num_threads(prev)

    setattr(guarded, _GUARD_MARK, True)
    return guarded


def _make_stream_fn(real: Callable[[], int]) -> Callable[[], int]:
    """Wrap spconv's ``get_current_stream`` (defect 1): spconv calls it on CPU paths that never
    use the stream, and it raises without CUDA."""

    @functools.wraps(real)
    def get_current_stream():
        if getattr(_tls, "depth", 0) > 0 or not torch.cuda.is_available():
            return 0
        return real()

    setattr(get_current_stream, _GUARD_MARK, True)
    return get_current_stream


def _spconv_modules():
    # list(): importing inside a patched call must not change the dict under iteration.
    return [(name, mod) for name, mod in list(sys.modules.items())
            if mod is not None and (name == "spconv" or name.startswith("spconv."))]


def _set(modname: str, attr: str, new: Any) -> None:
    mod = sys.modules[modname]
    _originals.setdefault((modname, attr), getattr(mod, attr))
    setattr(mod, attr, new)


def install_cpu_guards() -> None:
    """Install the CPU guards (see the module docstring). Idempotent; a no-op without spconv."""
    global _installed
    if _installed or not HAVE_SPCONV:
        return
    with _lock:
        if _installed:
            return
        # original function -> its guarded wrapper, for the ops and for the stream look-up
        replace: Dict[int, Callable] = {}
        for name in GUARDED_OPS:
            fn = getattr(_sp_ops, name, None)
            if fn is None or getattr(fn, _GUARD_MARK, False):
                continue
            replace[id(fn)] = _cpu_guard(fn)
        real_stream = _sp_cppcore.get_current_stream
        if not getattr(real_stream, _GUARD_MARK, False):
            replace[id(real_stream)] = _make_stream_fn(real_stream)
        # Patch every loaded spconv namespace holding one of these objects: ops.<name> (what
        # functional/conv/pool call), cppcore.get_current_stream (the definition, seen by later
        # `from ... import get_current_stream`), and the modules that imported it by name.
        for modname, mod in _spconv_modules():
            for attr, val in list(vars(mod).items()):
                if callable(val) and id(val) in replace:
                    _set(modname, attr, replace[id(val)])
        for wrapper in replace.values():
            _wrappers[id(wrapper)] = (wrapper, wrapper.__wrapped__)
        _installed = True


def uninstall_cpu_guards() -> None:
    """Put back every object :func:`install_cpu_guards` replaced (for tests)."""
    global _installed
    with _lock:
        if not _installed:
            return
        for (modname, attr), orig in _originals.items():
            mod = sys.modules.get(modname)
            if mod is not None:
                setattr(mod, attr, orig)
        # spconv modules imported after install took the patched get_current_stream from cppcore
        for _, mod in _spconv_modules():
            for attr, val in list(vars(mod).items()):
                if callable(val) and id(val) in _wrappers and _wrappers[id(val)][0] is val:
                    setattr(mod, attr, _wrappers[id(val)][1])
        _originals.clear()
        _wrappers.clear()
        _installed = False


def cpu_guards_installed() -> bool:
    """Whether :func:`install_cpu_guards` is in effect."""
    return _installed
