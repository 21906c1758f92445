"""Config schema of the SemanticKITTI experiments (``configs/kitti_*.yaml``, ``configs/kitti/``).

An experiment has up to two stages, run in order and each resumable on its own:
``teacher`` (trains the image or fusion teacher with cross entropy on its heads) and
``student`` (trains the sparse student with cross entropy on every point plus the
distiller's KD term on the in-view points, against the frozen teacher).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ...config import load_config_with_provenance, registry_field
from ...registry import DATASETS, DISTILLERS, MODELS
from ..runner import import_all, run_checks

STAGES = ("teacher", "student")


@dataclass
class KittiOptimConfig:
    optimizer: str = "adamw"       # "adamw" | "sgd"
    lr: float = 2e-3
    weight_decay: float = 5e-3
    momentum: float = 0.9          # sgd only
    schedule: str = "onecycle"     # "onecycle" | "cosine" | "constant"
    pct_start: float = 0.04        # onecycle warm-up fraction
    epochs: int = 50
    batch_size: int = 2            # scans per process and step
    grad_clip: float = 0.0         # max gradient norm; 0 = off
    amp: bool = False              # float16 autocast + GradScaler (CUDA only; ignored on CPU)
    max_steps_per_epoch: int = 0   # 0 = the whole epoch; > 0 caps it (smoke runs, benchmarks)

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1, weight_decay >= 0; got lr={self.lr}, "
                             f"epochs={self.epochs}, batch_size={self.batch_size}, weight_decay={self.weight_decay}")
        if not 0 < self.pct_start < 1 or not 0 <= self.momentum < 1 or self.grad_clip < 0 \
                or self.max_steps_per_epoch < 0:
            raise ValueError(f"need 0 < pct_start < 1, 0 <= momentum < 1, grad_clip >= 0, max_steps_per_epoch >= 0; "
                             f"got {self.pct_start}, {self.momentum}, {self.grad_clip}, {self.max_steps_per_epoch}")


@dataclass
class StageConfig:
    model: Dict[str, Any] = registry_field(MODELS)
    optim: KittiOptimConfig = field(default_factory=KittiOptimConfig)
    loss_weights: Dict[str, float] = field(default_factory=dict)  # teacher: head name -> CE weight


@dataclass
class KittiDataConfig:
    train: Dict[str, Any] = registry_field(DATASETS)
    val: Optional[Dict[str, Any]] = registry_field(DATASETS, default=None)
    num_workers: int = 2
    # generate a synthetic dataset at the train/val root when that root has no sequences/
    # (the embedded default; never used for a real dataset path unless asked for here)
    synthetic: Optional[Dict[str, Any]] = None


@dataclass(kw_only=True)
class KittiExperimentConfig:
    experiment: str = "semantickitti"
    name: str = ""
    data: KittiDataConfig = field(default_factory=KittiDataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    teacher_checkpoint: Optional[str] = None   # use these teacher weights instead of training the teacher
    student: StageConfig = field(default_factory=StageConfig)
    distiller: Dict[str, Any] = registry_field(DISTILLERS)
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    eval_interval: int = 1          # epochs between validations (the last epoch is always validated)
    log_interval: int = 20          # steps between logged losses (the only host syncs of a step)
    checkpoint_interval: int = 0    # steps between mid-epoch checkpoints; 0 = at the end of each epoch only
    tensorboard: bool = False       # also write the logged losses and validations as TensorBoard events (WORK/<stage>/tb)
    seed: int = 0
    device: str = "auto"            # "auto" | "cuda" | "cpu"
    threads: int = 0                # torch intra-op threads; 0 = torch default


def load_kitti_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load and validate a SemanticKITTI experiment; build its models, distiller and optimiser
    settings once so that a bad value fails before any data is read or generated."""
    import_all()
    cfg, prov = load_config_with_provenance(path, overrides, schema=KittiExperimentConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    for split in ("train", "val"):  # the experiment's seed drives augmentation too, unless a dataset sets its own
        if out["data"].get(split) is not None:
            out["data"][split].setdefault("seed", out["seed"])
    def model(section):
        # built on the meta device: the constructor's checks run, no weights are allocated
        def build():
            with torch.device("meta"):
                MODELS.build(section)
        return build

    checks = [("student.model", model(out["student"]["model"])),
              ("student.optim", lambda: KittiOptimConfig(**out["student"]["optim"])),
              ("distiller", lambda: DISTILLERS.build(out["distiller"]))]
    if "teacher" in out["stages"] and not out.get("teacher_checkpoint"):
        checks += [("teacher.model", model(out["teacher"]["model"])),
                   ("teacher.optim", lambda: KittiOptimConfig(**out["teacher"]["optim"]))]

    def stages():
        bad = [s for s in out["stages"] if s not in STAGES]
        if bad or not out["stages"]:
            raise ValueError(f"must be a non-empty list of {list(STAGES)}, got {out['stages']}")

    def at_least(key, low):
        def check():
            if out[key] < low:
                raise ValueError(f"must be >= {low}, got {out[key]}")
        return check

    def loss_weights():
        from .train import TEACHER_HEADS
        unknown = sorted(set(out["teacher"].get("loss_weights") or {}) - set(TEACHER_HEADS))
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; the teachers' heads are {list(TEACHER_HEADS)}")
    checks += [("stages", stages), ("eval_interval", at_least("eval_interval", 1)),
               ("log_interval", at_least("log_interval", 1)),
               ("checkpoint_interval", at_least("checkpoint_interval", 0)),
               ("teacher.loss_weights", loss_weights)]
    if out["tensorboard"]:
        from ..loggers import check_tensorboard
        checks.append(("tensorboard", check_tensorboard))
    run_checks(checks, prov)
    return out
