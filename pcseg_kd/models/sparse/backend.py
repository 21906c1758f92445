"""Which sparse-convolution package runs the sparse nets: the one place the model key
``backend`` (``student.model.backend``, ``teacher.model.point.backend``) is resolved.

``spconv``         spconv 2.x (the default). Its CPU build needs the guards of :mod:`.spconv_compat`
                   (installed by the models when they use it); its CUDA wheels stop at CUDA 12.6.
``spconv_triton``  spconv-Triton (``pip install spconv-triton``): spconv's API and state-dict layout
                   in Triton kernels, CUDA only (its ops assert CUDA tensors; its modules construct
                   anywhere, so a CPU can build and load the model, not run it). REFERENCE §7.
``auto``           spconv-Triton when CUDA is available and spconv has no CUDA build (or is missing),
                   else spconv. Decided when the model is built, from ``torch.cuda.is_available()``:
                   the setting that lets one checkpoint config run both on a CPU machine and on a
                   GPU machine without spconv-cu1xx.

Both packages give the same parameter names and shapes ([out, k, k, k, in] weights), so weights
trained under one load under the other (``tests/test_sparse_backend.py``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Optional, Tuple, Union

import torch

from ...registry import MissingDependencyError
from .spconv_compat import HAVE_SPCONV, require_spconv

BACKENDS: Tuple[str, ...] = ("spconv", "spconv_triton", "auto")
KEY_HINT = "student.model.backend, or teacher.model.point.backend for the fusion teacher"

__all__ = ["BACKENDS", "HAVE_SPCONV_TRITON", "any_sparse_backend", "spconv_has_cuda", "resolve_backend",
           "sparse_backend", "check_input_device"]

# find_spec, not import: importing spconv_triton imports triton (seconds), paid only when chosen.
# It does not declare triton (torch's CUDA wheels bring it): without it the import would fail.
HAVE_SPCONV_TRITON: bool = all(importlib.util.find_spec(m) is not None for m in ("spconv_triton", "triton"))


def any_sparse_backend() -> bool:
    """Whether a sparse net can be built here at all (with either package)."""
    return HAVE_SPCONV or HAVE_SPCONV_TRITON


@functools.lru_cache(maxsize=None)
def spconv_has_cuda() -> bool:
    """Whether the installed spconv is a CUDA build (False without spconv)."""
    if not HAVE_SPCONV:
        return False
    from spconv.cppconstants import CPU_ONLY_BUILD
    return not CPU_ONLY_BUILD


def _check_name(name: object, key: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{key}: unknown sparse backend {name!r}; one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def resolve_backend(name: str, device: Optional[Union[str, torch.device]] = None, key: str = "backend") -> str:
    """``spconv`` or ``spconv_triton`` for a configured ``name``; ``device`` (default: ``cuda`` when
    available, else ``cpu``) decides ``auto``. Raises ``ValueError`` naming ``key`` for an unknown
    name and ``ImportError`` naming it when the chosen package is not installed."""
    name = _check_name(name, key)
    if name == "auto":
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = torch.device(device).type == "cuda"
        name = "spconv_triton" if on_cuda and HAVE_SPCONV_TRITON and not spconv_has_cuda() else "spconv"
    if name == "spconv" and not HAVE_SPCONV:
        try:
            require_spconv(f"{key}: spconv")
        except ImportError as e:
            hint = (" spconv-Triton is installed: on a CUDA machine set backend: spconv_triton (or auto)."
                    if HAVE_SPCONV_TRITON else "")
            raise MissingDependencyError(f"{e}{hint}") from e.__cause__
    if name == "spconv_triton" and not HAVE_SPCONV_TRITON:
        raise MissingDependencyError(f"{key}: spconv_triton: the package spconv-triton (or triton) is not installed "
                          "(`pip install 'pcseg_kd[gpu]'`, i.e. spconv-triton and triton)")
    return name


@functools.lru_cache(maxsize=None)
def _package(resolved: str) -> ModuleType:
    if resolved == "spconv_triton":
        mod = importlib.import_module("spconv_triton.pytorch")
        from .spconv_compat import _silence_fx_tracing_warning
        _silence_fx_tracing_warning()  # spconv-Triton's tensor class triggers the same torch.fx line
        return mod
    return importlib.import_module("spconv.pytorch")


def sparse_backend(name: str, device: Optional[Union[str, torch.device]] = None,
                   key: str = "backend") -> ModuleType:
    """The ``spconv.pytorch``-like module for a configured backend (see :func:`resolve_backend`)."""
    resolved = resolve_backend(name, device, key)
    try:
        return _package(resolved)
    except ImportError as e:  # installed but broken (e.g. a triton that does not fit this torch)
        raise ImportError(f"{key}: {resolved} is installed but cannot be imported: {e}") from e


def check_input_device(resolved: str, features: torch.Tensor) -> None:
    """Fail with the key to change when the input's device cannot run on ``resolved``, instead of
    the package's own assertion deep inside a kernel. Reads ``.is_cuda`` only: no sync."""
    if resolved == "spconv_triton" and not features.is_cuda:
        raise RuntimeError(f"sparse backend 'spconv_triton' runs on CUDA only, but the input is on "
                           f"{features.device}: set backend: spconv or auto ({KEY_HINT}; a checkpoint's "
                           "stored model config sets it too)")
    if resolved == "spconv" and features.is_cuda and not spconv_has_cuda():
        raise RuntimeError("sparse backend 'spconv': the installed spconv is a CPU-only build and the input "
                           f"is on {features.device}: set backend: spconv_triton or auto ({KEY_HINT}), or "
                           "install spconv's CUDA wheel")
