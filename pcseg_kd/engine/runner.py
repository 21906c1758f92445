"""Entry-point plumbing shared by ``tools/train.py`` and ``tools/sweep.py``."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..config import CLI, ConfigError, atomic_write_text, load_config_with_provenance, save_config
from .schema import ToyExperimentConfig


def import_all() -> None:
    """Import every module that registers something."""
    import pcseg_kd.data  # noqa: F401
    import pcseg_kd.distill  # noqa: F401
    import pcseg_kd.models  # noqa: F401


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="YAML config (may use _base_)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds.num=10 distiller.beta=2")
    p.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--force", action="store_true", help="recompute results that are already in the work dir")
    return p.parse_intermixed_args(argv)  # options may come before, between or after overrides


def load_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load and validate; then build every part once (task, models, distiller, optimiser
    settings, seeds) so that a bad *value* fails here too, before any training."""
    import_all()
    cfg, prov = load_config_with_provenance(path, overrides, schema=ToyExperimentConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    check_buildable(out, prov)
    return out


def experiment_kind(path: str, overrides: Sequence[str] = ()) -> str:
    """"semantickitti" for configs that say ``experiment: semantickitti``, else "toy"."""
    from ..config import load_config
    return str(load_config(path, overrides).get("experiment") or "toy")


def load_kitti_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load and validate a SemanticKITTI experiment; build its models, distiller and optimiser
    settings once so that a bad value fails before any data is read or generated."""
    from .kitti_schema import STAGES, KittiExperimentConfig, KittiOptimConfig
    from ..registry import DISTILLERS, MODELS

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
        from .kitti import TEACHER_HEADS
        unknown = sorted(set(out["teacher"].get("loss_weights") or {}) - set(TEACHER_HEADS))
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; the teachers' heads are {list(TEACHER_HEADS)}")
    checks += [("stages", stages), ("eval_interval", at_least("eval_interval", 1)),
               ("log_interval", at_least("log_interval", 1)),
               ("checkpoint_interval", at_least("checkpoint_interval", 0)),
               ("teacher.loss_weights", loss_weights)]
    if out["tensorboard"]:
        from .loggers import check_tensorboard
        checks.append(("tensorboard", check_tensorboard))
    _run_checks(checks, prov)
    return out


def _run_checks(checks, prov: Dict[str, str]) -> None:
    errors = []
    for key, build in checks:
        try:
            build()
        except (ValueError, TypeError, KeyError) as e:
            # the command line, if it touched this section, else the file that set its type/keys
            sources = [prov[p] for p in prov if p == key or p.startswith(key + ".")]
            where = CLI if CLI in sources else prov.get(f"{key}.type") or (sources[-1] if sources else "config")
            errors.append(f"{where}: {key}: {e}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def check_buildable(cfg: Dict[str, Any], prov: Dict[str, str]) -> None:
    from ..models.mlp import PlainMLP
    from ..registry import DISTILLERS, TASKS
    from .schema import OptimConfig, seed_list

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
    _run_checks(checks, prov)


def default_work_dir(config_path: str) -> Path:
    p = Path(config_path)
    return Path("work_dirs") / p.parent.name / p.stem


def write_json(path: os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


__all__ = ["parse_args", "load_experiment", "default_work_dir", "write_json", "save_config", "ConfigError"]
