"""Where a stage's losses and validations go: ``log.jsonl`` always, TensorBoard when asked.

Only rank 0 writes. TensorBoard is an optional extra (``pip install 'pcseg_kd[tensorboard]'``);
``tensorboard: true`` without it fails when the config loads, not mid-run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

from .distributed import DistEnv

TENSORBOARD_HINT = "tensorboard: true needs the tensorboard package: pip install 'pcseg_kd[tensorboard]'"


def check_tensorboard() -> None:
    import importlib
    try:
        importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
    except ImportError as e:
        raise ValueError(f"{TENSORBOARD_HINT} ({e})") from e


def _scalars(record: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step",
                                                                                             "global_step"):
            yield f"{prefix}{key}", float(value)


class StageLogger:
    def __init__(self, stage_dir: Path, env: DistEnv, tensorboard: bool = False, resume_step: int = 0):
        """``resume_step``: the global step a resumed run restarts after; what the killed run
        logged beyond it is dropped (it is about to be computed again)."""
        self.path = Path(stage_dir) / "log.jsonl"
        self.env = env
        self.writer = None
        if env.is_main and self.path.is_file():
            self._trim(resume_step)
        if tensorboard and env.is_main:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(stage_dir) / "tb"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def _trim(self, resume_step: int) -> None:
        from ..utils.io import atomic_write
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if rec.get("global_step", 0) <= resume_step:
                kept.append(line)
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept)))

    def log(self, record: Dict[str, Any], step: int) -> None:
        if not self.env.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in _scalars(record):
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
