"""Config schema of the small-task experiments (``configs/gauss``, ``configs/sklearn``, ...)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from ...config import load_config_with_provenance, registry_field
from ...registry import DISTILLERS, MODELS, TASKS
from ..runner import import_all, run_checks


@dataclass
class OptimConfig:
    optimizer: str = "sgd"        # "sgd" | "adam"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1000
    batch_size: Optional[int] = None  # None: full batch (the authors' Gaussian and sklearn code)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0 or self.epochs < 1 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, epochs >= 1, weight_decay >= 0, 0 <= momentum < 1; got lr={self.lr}, "
                             f"epochs={self.epochs}, weight_decay={self.weight_decay}, momentum={self.momentum}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null (full batch), got {self.batch_size}")


#: numpy's and torch's seeds are 32-bit: a larger one fails deep inside them, far from its key
SEED_LIMIT = 2 ** 32


@dataclass
class SeedConfig:
    start: int = 0
    num: int = 10
    values: Optional[List[int]] = None   # explicit seed list (then start is unused)


def seed_list(seeds: Dict[str, Any]) -> List[int]:
    """``values[:num]`` when a list is given (so ``seeds.num=3`` still means three seeds),
    else ``start .. start + num - 1``."""
    if seeds["num"] < 1:
        raise ValueError(f"seeds.num must be >= 1, got {seeds['num']}")
    if seeds.get("values"):
        values = [int(s) for s in seeds["values"]][: seeds["num"]]
        if min(values) < 0 or max(values) >= SEED_LIMIT:
            raise ValueError(f"seeds.values must be seeds >= 0 and < 2**32, got {seeds['values']}")
        if len(set(values)) == 1 and len(values) > 1:
            raise ValueError(f"seeds.values repeats one seed {len(values)} times: that is one run, not "
                             f"{len(values)} independent ones ({seeds['values']})")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:  # the authors' sklearn list repeats 94: kept to reproduce it, but said
            import warnings
            warnings.warn(f"seeds.values repeats {repeated}: those runs are identical, so the spread over "
                          f"seeds counts them {len(values) - len(set(values))} more time(s)", stacklevel=2)
        return values
    if seeds["start"] < 0:
        raise ValueError(f"seeds.start must be >= 0, got {seeds['start']}")
    if seeds["start"] + seeds["num"] > SEED_LIMIT:
        raise ValueError(f"seeds.start + seeds.num must be <= 2**32 (seeds are 32-bit), got "
                         f"{seeds['start']} + {seeds['num']}")
    return list(range(seeds["start"], seeds["start"] + seeds["num"]))


@dataclass
class SweepConfig:
    shift_key: str = "task.overlap"      # dotted key varied along the table's columns
    shift_values: List[Any] = field(default_factory=list)
    methods: Dict[str, str] = field(default_factory=dict)  # table label -> method config (relative path)
    paper: Dict[str, Any] = field(default_factory=dict)    # label -> {shift value: the paper's number}


@dataclass(kw_only=True)
class ToyExperimentConfig:
    name: str = ""
    task: Dict[str, Any] = registry_field(TASKS)
    model: Dict[str, Any] = registry_field(MODELS)                   # student and baseline
    teacher_model: Optional[Dict[str, Any]] = registry_field(MODELS, default=None)  # None: same as model
    distiller: Dict[str, Any] = registry_field(DISTILLERS)
    teacher: OptimConfig = field(default_factory=OptimConfig)        # teacher training
    student: OptimConfig = field(default_factory=OptimConfig)        # student and baseline training
    seeds: SeedConfig = field(default_factory=SeedConfig)
    device: str = "cpu"
    threads: int = 0                                                 # torch intra-op threads; 0 = torch default
    sweep: Optional[SweepConfig] = None


def load_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load and validate; then build every part once (task, models, distiller, optimiser
    settings, seeds) so that a bad *value* fails here too, before any training."""
    import_all()
    cfg, prov = load_config_with_provenance(path, overrides, schema=ToyExperimentConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    check_buildable(out, prov)
    warn_long_warmup(out, prov)
    return out


def warn_long_warmup(cfg: Dict[str, Any], prov: Dict[str, str]) -> None:
    """A DKD-style warm-up longer than the student's training never lets the KD term reach its
    weight: allowed (a deliberate damping), but said."""
    import warnings
    warmup, epochs = cfg["distiller"].get("warmup_epochs") or 0, cfg["student"]["epochs"]
    if isinstance(warmup, (int, float)) and warmup > epochs:
        where = prov.get("distiller.warmup_epochs") or prov.get("distiller.type") or "config"
        warnings.warn(f"{where}: distiller.warmup_epochs={warmup} exceeds student.epochs={epochs}: the KD term "
                      f"ends at {epochs / warmup:.0%} of distiller.kd_weight and never reaches it", stacklevel=2)


def check_buildable(cfg: Dict[str, Any], prov: Dict[str, str]) -> None:
    from ...models.mlp import PlainMLP

    def model(section):
        kw = {k: v for k, v in section.items() if k != "type"}
        return lambda: PlainMLP(2, 2, **kw)

    checks = [("task", lambda: TASKS.build(cfg["task"])),
              ("distiller", lambda: DISTILLERS.build(cfg["distiller"])),
              ("model", model(cfg["model"])),
              ("teacher", lambda: OptimConfig(**cfg["teacher"])),
              ("student", lambda: OptimConfig(**cfg["student"])),
              ("seeds", lambda: seed_list(cfg["seeds"]))]
    if cfg.get("teacher_model"):
        checks.append(("teacher_model", model(cfg["teacher_model"])))

    def device():
        import torch
        if cfg["device"] not in ("cpu", "cuda") and not str(cfg["device"]).startswith("cuda:"):
            raise ValueError(f"must be cpu, cuda or cuda:N, got {cfg['device']!r}")
        if str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{cfg['device']!r} asked for, but torch sees no CUDA device; use device=cpu")
    checks.append(("device", device))
    run_checks(checks, prov)
