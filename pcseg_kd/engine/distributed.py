"""torch.distributed plumbing for ``torchrun``: one process per device, NCCL on CUDA, Gloo on CPU.

``torchrun --nproc_per_node=N tools/train.py CONFIG`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; a plain ``python tools/train.py`` runs as a world of one without a process
group. Rank 0 writes logs, checkpoints and metrics; every rank trains on its shard
(``pcseg_kd.engine.kitti.ShardedBatchSampler``) and evaluation sums the confusion matrices
across ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {name!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_module(module: torch.nn.Module, env: DistEnv, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers (for modules outside DDP, e.g. a
    feature distiller's regressor, whose random initialisation differs per rank)."""
    if env.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(env: Optional[DistEnv]) -> None:
    if env is not None and env.distributed and dist.is_initialized():
        dist.destroy_process_group()
