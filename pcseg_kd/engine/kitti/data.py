"""SemanticKITTI data plumbing for the engine: the synthetic default, the sharded batch
sampler (same permutation on every rank, resumable mid-epoch) and the loaders."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from ..distributed import DistEnv, broadcast_object


def generate_synthetic_if_missing(roots: List[str], spec: Optional[Dict[str, Any]], env: DistEnv) -> None:
    """The embedded default: write a synthetic dataset at a root that has no ``sequences/``,
    only when the config asks for it (``data.synthetic``); rank 0 writes, the others wait.
    The spec is kept in ``ROOT/synthetic.json``: a root generated under another spec is an
    error naming it (it would silently train on other data), not reused."""
    if not spec:
        return
    from ...data.kitti.synthetic.generate import generate_dataset, synthetic_config
    from ...utils.io import read_json, write_json

    full_spec = dict(spec)
    spec = dict(spec)
    sequences = [str(s) for s in spec.pop("sequences", ["00", "08"])]
    error = None
    if env.is_main:
        try:
            config = synthetic_config(spec)
            for root in dict.fromkeys(roots):
                root = Path(root)
                if (root / "sequences").is_dir():
                    saved = read_json(root / "synthetic.json", default=None)
                    if saved is not None and saved != full_spec:
                        diff = sorted(k for k in set(saved) | set(full_spec) if saved.get(k) != full_spec.get(k))
                        raise ValueError(f"data.synthetic: {root} holds a synthetic dataset generated with other "
                                         f"settings ({', '.join(diff)} differ from {root / 'synthetic.json'}): "
                                         "delete that folder to generate it again, or use another root")
                    continue
                print(f"data.synthetic: {root} has no sequences/, generating a synthetic SemanticKITTI "
                      f"({', '.join(sequences)}) there", flush=True)
                # written aside and renamed into place: a killed generation leaves no half dataset
                for stale in root.glob(".synthetic-*"):  # what killed generations left (not live ones)
                    if not _pid_alive(stale.name.removeprefix(".synthetic-")):
                        shutil.rmtree(stale, ignore_errors=True)
                tmp = root / f".synthetic-{os.getpid()}"
                generate_dataset(tmp, sequences, config, progress=sys.stderr.isatty())
                try:
                    os.replace(tmp / "sequences", root / "sequences")
                except OSError:
                    if not (root / "sequences").is_dir():
                        raise
                    # another run generated the same dataset meanwhile (same spec, same files): use it
                shutil.rmtree(tmp, ignore_errors=True)
                write_json(root / "synthetic.json", full_spec)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"data.synthetic: generation failed on rank 0 ({failed})")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class ShardedBatchSampler(Sampler):
    """Batches of indices for one rank: a permutation drawn from ``(seed, epoch)`` (so it is
    the same on every rank and after a resume), the rank's share of it, ``start`` batches
    skipped (mid-epoch resume). ``drop_last`` gives every rank the same number of batches."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, env: DistEnv, drop_last: bool):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = env.rank, env.world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[self.rank::self.world]

    def full_length(self) -> int:
        per_rank = self.n // self.world if self.drop_last else -(-(self.n - self.rank) // self.world)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.full_length() - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        idx = self._indices()
        if self.drop_last:
            idx = idx[: (self.n // self.world) // self.batch_size * self.batch_size]
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        return iter(batches[self.start:])


def make_loader(ds, sampler: ShardedBatchSampler, num_workers: int, device: torch.device) -> DataLoader:
    from ...data.kitti.collate import collate_kitti
    from ...utils.workers import worker_init
    # workers die with the run: an orphan would keep loading and hold the work folder's lock
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_kitti, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=worker_init())


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
