"""``forbid_host_sync()``: fail loudly where code would make the host wait for the device.

A training step or a loss must not read tensor values on the host (``.item()``,
``bool(t)``, ``if t > 0:``, ``.tolist()``, boolean-mask indexing, ``nonzero``,
``torch.equal`` ...): on a GPU each of these stalls the launch queue. CUDA has a
switch for this (``torch.cuda.set_sync_debug_mode("error")``), which only exists where
there is a GPU. This guard reports the same mistakes on any device, CPU included, so
the property is testable on a GPU-less machine:

* at the ATen level (a ``TorchDispatchMode``, which also sees autograd's backward),
  every op whose result needs a device value on the host: ``_local_scalar_dense``
  (``item``, ``bool``, ``int``, ``float``), ``nonzero``, ``equal``, ``is_nonzero``,
  ``masked_select``, ``unique``, ``bincount``, ``histc`` without a range, boolean-mask
  ``index`` / ``index_put_``, ``repeat_interleave`` without ``output_size``, a copy from an
  accelerator to the CPU;
* at the Python level (a ``TorchFunctionMode``), ``Tensor.tolist`` / ``numpy`` /
  ``cpu`` and ``np.asarray(t)``, which never reach the dispatcher as an op.

On CUDA the context also turns on ``set_sync_debug_mode("error")`` for the
synchronisations inside CUDA kernels' host code that neither mode can see.

    with forbid_host_sync():
        loss = distiller(student_logits, teacher_logits, labels)["loss_kd"]
        loss.backward()
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncError(RuntimeError):
    """Raised inside :func:`forbid_host_sync` by an op that reads device values on the host."""


_SYNC_OPS = {  # aten overload packet name -> what the user probably wrote
    "_local_scalar_dense": "Tensor.item() / bool(t) / int(t) / float(t) / Python branching on a tensor",
    "nonzero": "nonzero() / argwhere / boolean-mask indexing",
    "equal": "torch.equal",
    "is_nonzero": "bool(t) on a one-element tensor",
    "masked_select": "masked_select / t[mask]",
    "_unique": "torch.unique", "_unique2": "torch.unique", "unique_dim": "torch.unique",
    "unique_consecutive": "torch.unique_consecutive",
    "bincount": "torch.bincount (its output size is max(input) + 1; use scatter_add_ into a fixed size)",
}
_PY_METHODS = {"tolist": "Tensor.tolist()", "numpy": "Tensor.numpy()", "cpu": "Tensor.cpu()",
               "__array__": "np.asarray(t) / np.array(t)"}


def _has_bool_index(indices) -> bool:
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices
               if i is not None)


class _SyncDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        why = _SYNC_OPS.get(name)
        if why is None and name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            if len(args) > 1 and _has_bool_index(args[1]):
                why = "boolean-mask indexing t[mask] / t[mask] = v (its size needs nonzero)"
        elif why is None and name == "repeat_interleave":
            if kwargs.get("output_size") is None and torch.is_tensor(args[0 if len(args) == 1 else 1]):
                why = "repeat_interleave with tensor repeats and no output_size"
        elif why is None and name == "histc":
            lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
            hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
            if lo == hi:
                why = "torch.histc without a range (min == max: it reads the data's range)"
        elif why is None and name == "_to_copy":
            src, dst = args[0].device, kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.type != "cpu":
                why = "a copy to the CPU (.cpu(), .to('cpu'))"
        if why is not None:
            raise HostSyncError(f"host-device synchronisation inside forbid_host_sync(): aten.{name} "
                                f"({why})")
        return func(*args, **kwargs)


class _SyncFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _PY_METHODS and args and torch.is_tensor(args[0]):
            raise HostSyncError(f"host-device synchronisation inside forbid_host_sync(): "
                                f"{_PY_METHODS[name]}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_sync(cuda: bool = True) -> Iterator[None]:
    """Raise :class:`HostSyncError` on any op inside the block that reads device values on
    the host (see the module docstring). ``cuda``: also set CUDA's sync debug mode to
    "error" while inside, when CUDA is available."""
    use_cuda = cuda and torch.cuda.is_available()
    old = torch.cuda.get_sync_debug_mode() if use_cuda else None
    if use_cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _SyncFunctionMode(), _SyncDispatchMode():
            yield
    finally:
        if use_cuda:
            torch.cuda.set_sync_debug_mode(old)
