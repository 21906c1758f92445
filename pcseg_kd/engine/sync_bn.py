"""Synchronized BatchNorm for ``torchrun`` training, on CUDA (NCCL) and on CPU (Gloo).

:func:`convert_sync_batchnorm` replaces every ``nn.BatchNorm1d`` / ``2d`` / ``3d`` of a model
by :class:`SyncBatchNorm1d` / ``2d`` / ``3d``. These are subclasses of the torch classes they
replace (``isinstance(m, nn.BatchNorm2d)`` still holds) that reuse the very same parameter and
buffer tensors, so an optimizer built before the conversion keeps working and ``state_dict``
keys are unchanged (a checkpoint of a converted model loads into the plain one and back).

What a converted layer does:

* **training, process group of more than one rank, CUDA input**: torch's own
  ``nn.SyncBatchNorm`` code path (NCCL all-gather of per-rank mean / invstd / count).
* **training, process group of more than one rank, CPU input**: torch's ``nn.SyncBatchNorm``
  refuses CPU tensors, and DDP refuses a CPU model that holds an ``nn.SyncBatchNorm``, so the
  layer computes per-channel sums and the row count over the local batch, sums them over the
  ranks with an autograd-aware all-reduce, and normalises by the global mean and biased
  variance. Running statistics get the global mean and the global unbiased variance with
  ``momentum`` (or the cumulative average for ``momentum=None``) and ``num_batches_tracked``
  exactly as ``nn.BatchNorm`` updates them.
* **eval mode, no process group, or a world of one**: the plain ``nn.BatchNorm`` forward.

Gradients: the all-reduce's backward sums the incoming gradients over the ranks, so rank r
receives d(sum over ranks of the local losses)/d(its inputs); DDP then averages over ranks,
which gives the gradient of the mean of the local losses. That is the single-process gradient
on the global batch when every rank's loss is its local mean and the local batches have equal
sizes (with unequal sizes scale each rank's loss so that the mean over ranks is the global
loss, e.g. ``world_size * local_sum / global_count``).

Row counts may differ between ranks, and a rank may have zero rows for a layer: the global
mean is count-weighted (every row counts once, whichever rank holds it), a rank with no rows
contributes zeros and still takes part in the collectives, so the other ranks neither hang nor
see NaNs. Only when the *global* count is at most one does the layer raise (as plain BN does
for one row), on every rank alike.

**spconv**: SpUNet's ``nn.BatchNorm1d`` layers normalise the active voxels' features
``[N, C]``; they are converted too, so their statistics are over all ranks' active voxels,
each voxel weighted once, exactly as one process holding the whole global batch would compute
them. spconv's ``SparseSequential`` silently skips a plain module when its sparse tensor has no
voxels, which under synchronisation would leave the other ranks waiting in a collective; the
BN layers that sit directly in a ``SparseSequential`` (and spconv's own ``SparseBatchNorm``)
therefore become :class:`SparseSyncBatchNorm1d`, an spconv module that takes the sparse tensor
itself, joins the collectives even with zero voxels, and skips them (as spconv would) when
not synchronising.

Cost on CPU: two small all-reduces (C + 1 and C float64 values) per BN layer in the forward and
two in the backward, plus one host read of the global count; on Gloo that is latency bound
(tens to hundreds of microseconds each).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.sparse.spconv_compat import HAVE_SPCONV

if HAVE_SPCONV:
    import spconv.pytorch as spconv

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "SparseSyncBatchNorm1d",
           "convert_sync_batchnorm", "all_reduce_sum_autograd"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: y = sum_s x_s on every rank, so the gradient of the
    total loss sum_r L_r with respect to x_s is sum_r dL_r/dy, another all-reduce sum.

    Same semantics as ``torch.distributed.nn.functional.all_reduce`` (checked against it in
    tests/test_sync_bn.py), which torch 2.13 deprecates with a FutureWarning on every call and
    whose suggested replacement lives in the private ``_functional_collectives``; this needs
    only the public ``dist.all_reduce``."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # a copy: the engine may hand the same gradient tensor to other consumers
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_autograd(tensor: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-reduce sum over ``group`` (default: the whole world)."""
    return _AllReduceSum.apply(tensor, dist.group.WORLD if group is None else group)


class _SyncMixin:
    """The synchronising forward shared by the 1d / 2d / 3d classes (placed before the torch
    class in the bases, so ``super().forward`` is the plain BatchNorm forward)."""

    process_group: Any = None  # None: the whole world, as nn.SyncBatchNorm

    def _sync_group(self) -> Optional[Any]:
        """The group to synchronise over now, or None for the plain forward."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _check_non_zero_input_channels(self, input: Tensor) -> None:  # nn.SyncBatchNorm.forward calls it
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        if input.device.type != "cpu":
            # torch's implementation reads only attributes this class has (process_group,
            # momentum, eps, buffers, the two input checks); not subclassing nn.SyncBatchNorm
            # keeps DDP from rejecting the model on CPU
            return nn.SyncBatchNorm.forward(self, input)
        return self._cpu_sync_forward(input, group)

    def _cpu_sync_forward(self, x: Tensor, group: Any) -> Tensor:
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)

        # Two passes, the mean first and then the centred sum of squares, each with its own
        # all-reduce: the one-pass E[x^2] - E[x]^2 loses about log10(mean^2 / var) digits
        # to cancellation (features far from zero mean, e.g. raw coordinates, would keep few
        # of float32's seven), whereas the centred squares carry no such cancellation. The
        # sums accumulate in float64: they are only C values each, and it keeps the rounding
        # of sums over 10^5 and more voxels out of the statistics.
        count = x.new_full((1,), x.numel() // channels, dtype=torch.float64)
        total = all_reduce_sum_autograd(torch.cat([x.sum(dims, dtype=torch.float64), count]), group)
        n = int(total[channels].item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n} over all ranks "
                             f"(input size {list(x.shape)} on this rank)")
        mean = total[:channels] / n
        xc = x - mean.to(x.dtype).view(shape)
        var = all_reduce_sum_autograd((xc * xc).sum(dims, dtype=torch.float64), group) / n
        # one [N, C] product: autograd then keeps only xc alive for the backward, about what
        # plain BN keeps
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype)
        y = xc * scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(shape)

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1))
                self.running_mean.mul_(1 - f).add_((f * mean.detach()).to(self.running_mean.dtype))
                self.running_var.mul_(1 - f).add_((f * unbiased).to(self.running_var.dtype))
        return y


class SyncBatchNorm1d(_SyncMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` synchronised over the process group while training (module docstring)."""


class SyncBatchNorm2d(_SyncMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` synchronised over the process group while training (module docstring)."""


class SyncBatchNorm3d(_SyncMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` synchronised over the process group while training (module docstring)."""


if HAVE_SPCONV:
    class SparseSyncBatchNorm1d(SyncBatchNorm1d, spconv.SparseModule):
        """:class:`SyncBatchNorm1d` that ``SparseSequential`` hands the sparse tensor to, so
        that a rank without voxels still joins the collectives (module docstring)."""

        def forward(self, input):
            if not isinstance(input, spconv.SparseConvTensor):
                return super().forward(input)
            if input.indices.shape[0] == 0 and self._sync_group() is None:
                return input  # what SparseSequential does with a plain module
            return input.replace_feature(super().forward(input.features))
else:  # pragma: no cover - depends on the environment
    SparseSyncBatchNorm1d = None

_PLAIN = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}
_SYNCED = (SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, nn.SyncBatchNorm)


def _synced_copy(bn: _BatchNorm, cls: type, process_group: Any) -> _BatchNorm:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta", bias=bn.bias is not None)
    # the same tensor objects, not copies: optimizers, EMA copies and tied references keep working
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = bn._buffers.get(name)
    new.process_group = process_group
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def _convert(module: nn.Module, process_group: Any, in_sparse_seq: bool, name: str) -> nn.Module:
    if isinstance(module, _SYNCED):
        return module
    if isinstance(module, _BatchNorm):
        sparse_bn = HAVE_SPCONV and type(module) is spconv.SparseBatchNorm
        if sparse_bn or (in_sparse_seq and type(module) is nn.BatchNorm1d):
            return _synced_copy(module, SparseSyncBatchNorm1d, process_group)
        if type(module) in _PLAIN:
            return _synced_copy(module, _PLAIN[type(module)], process_group)
        # a subclass may change what forward computes (or, lazy, have no parameters yet);
        # leaving it unsynchronised would be a silent difference between ranks
        raise TypeError(f"convert_sync_batchnorm: cannot synchronise {name or 'the module'} of type "
                        f"{type(module).__qualname__} (only nn.BatchNorm1d/2d/3d and spconv's "
                        "SparseBatchNorm; run lazy modules once before converting)")
    sparse_seq = HAVE_SPCONV and isinstance(module, spconv.SparseSequential)
    for child_name, child in list(module.named_children()):
        new = _convert(child, process_group, sparse_seq, f"{name}.{child_name}" if name else child_name)
        if new is not child:
            module.add_module(child_name, new)  # same key, same position in the parent's order
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` / ``2d`` / ``3d`` in ``module`` (in place; the module
    itself is returned, or its replacement if it is a BatchNorm) by the synchronised class.

    Keeps weights, buffers (the same tensors), eps, momentum, affine, bias,
    track_running_stats and the train/eval flag; ``state_dict`` keys do not change.
    Already synchronised layers (these classes, ``nn.SyncBatchNorm``) are left as they are;
    another ``_BatchNorm`` subclass raises ``TypeError``. ``process_group``: the group to
    synchronise over (default: the whole world). Call it before wrapping in DDP.
    """
    return _convert(module, process_group, False, "")
