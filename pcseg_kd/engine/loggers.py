"""Where a stage's losses and validations go, as hooks of the stage runner: ``log.jsonl``
always, TensorBoard (``tensorboard: true``) and Weights & Biases (``wandb: {project: ...}``)
when the config asks for them.

Only rank 0 writes. TensorBoard and wandb are optional extras (``pip install
'pcseg_kd[tensorboard]'`` / ``'pcseg_kd[wandb]'``); asking for one that is not installed fails
when the config loads, not mid-run. Each logger has ``log(record, step)``; the runner hands
every record to every logger.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set, Tuple

from .hook import Hook

TENSORBOARD_HINT = "tensorboard: true needs the tensorboard package: pip install 'pcseg_kd[tensorboard]'"
WANDB_HINT = "wandb: needs the wandb package: pip install 'pcseg_kd[wandb]'"


def check_tensorboard() -> None:
    import importlib
    try:
        importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
    except ImportError as e:
        raise ValueError(f"{TENSORBOARD_HINT} ({e})") from e


def check_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{WANDB_HINT} ({e})") from e


WANDB_KEYS = ("project", "entity", "mode", "name", "tags")


def check_wandb_settings(settings: Dict[str, Any]) -> None:
    """``wandb:`` settings: known keys, a known mode, and the package installed."""
    unknown = sorted(set(settings) - set(WANDB_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; wandb takes {list(WANDB_KEYS)}")
    if settings.get("mode") not in (None, "online", "offline", "disabled"):
        raise ValueError(f"mode must be online, offline or disabled, got {settings['mode']!r}")
    check_wandb()


def _scalars(record: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step",
                                                                                             "global_step"):
            yield f"{prefix}{key}", float(value)


class LoggerHook(Hook):
    """A logger of the stage runner: set up in ``before_run`` (after a resume has restored the
    position), handed every record by ``log(record, step)``, closed in ``after_run``."""
    priority = 0

    def log(self, record: Dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...

    def after_run(self, runner) -> None:
        self.close()


class JsonlLogger(LoggerHook):
    """``WORK/<stage>/log.jsonl``: one JSON record a line (step losses, epoch means, validations).

    On resume, what the killed run logged past the checkpoint it resumes from is dropped, as it
    is about to be logged again: records past its global step, and validation records its
    history does not hold (a kill between logging a validation and checkpointing it)."""

    def __init__(self, stage_dir: Path, is_main: bool):
        self.path = Path(stage_dir) / "log.jsonl"
        self.is_main = is_main

    def before_run(self, runner) -> None:
        if self.is_main and self.path.is_file():
            self.trim(runner.global_step, {h.get("epoch") for h in runner.history})

    def trim(self, resume_step: int, validated: Optional[Set[int]] = None) -> None:
        from ..utils.io import atomic_write
        validated = validated or set()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            keep = rec.get("global_step", 0) <= resume_step
            if "val" in rec:  # logged, then killed before the checkpoint that records it: redone
                keep = keep and rec.get("epoch") in validated
            if keep:
                kept.append(line)
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept)))

    def log(self, record: Dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardLogger(LoggerHook):
    """TensorBoard events in ``WORK/<stage>/tb`` (a resumed run purges the steps it redoes)."""

    def __init__(self, stage_dir: Path, is_main: bool):
        self.dir, self.is_main, self.writer = Path(stage_dir) / "tb", is_main, None

    def before_run(self, runner) -> None:
        if not self.is_main:
            return
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        step = runner.global_step
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=step + 1 if step else None)

    def log(self, record: Dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in _scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(LoggerHook):
    """A Weights & Biases run per stage (``wandb: {project, entity, mode, name, tags}``); its id
    is kept in ``WORK/<stage>/wandb_id`` so that a resumed stage continues the same run.
    ``mode: offline`` (or ``WANDB_MODE=offline``) writes it locally for ``wandb sync``."""

    def __init__(self, stage_dir: Path, is_main: bool, settings: Dict[str, Any], config: Dict[str, Any],
                 stage: str):
        self.stage_dir, self.is_main, self.settings = Path(stage_dir), is_main, dict(settings)
        self.config, self.stage, self.run = config, stage, None

    def before_run(self, runner) -> None:
        if not self.is_main:
            return
        check_wandb()
        import wandb

        from ..utils.io import atomic_write
        id_file = self.stage_dir / "wandb_id"
        # a run id of our own (wandb's are 8 lowercase alphanumerics): no reliance on its internals
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        atomic_write(id_file, lambda f: f.write(run_id + "\n"))
        s = self.settings
        name = s.get("name") or f"{self.config.get('name') or 'kitti'}-{self.stage}"
        self.run = wandb.init(project=s.get("project", "pcseg_kd"), entity=s.get("entity"), mode=s.get("mode"),
                              name=name, tags=list(s.get("tags") or []) + [self.stage], id=run_id, resume="allow",
                              dir=str(self.stage_dir), config=self.config, reinit=True)

    def log(self, record: Dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(_scalars(record)), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def build_loggers(cfg: Dict[str, Any], stage_dir: Path, is_main: bool, stage: str) -> list:
    """The loggers a config asks for: JSONL always, then TensorBoard and wandb."""
    loggers: list = [JsonlLogger(stage_dir, is_main)]
    if cfg.get("tensorboard"):
        loggers.append(TensorBoardLogger(stage_dir, is_main))
    if cfg.get("wandb"):
        loggers.append(WandbLogger(stage_dir, is_main, cfg["wandb"], cfg, stage))
    return loggers
