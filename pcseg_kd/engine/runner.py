"""Entry-point plumbing shared by ``tools/train.py`` and ``tools/sweep.py``."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import OmegaConf

from ..config import ConfigError, atomic_write_text, load_config, save_config
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
    return p.parse_args(argv)


def load_experiment(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    import_all()
    cfg = load_config(path, overrides, schema=ToyExperimentConfig)
    return OmegaConf.to_container(cfg, resolve=True)


def default_work_dir(config_path: str) -> Path:
    p = Path(config_path)
    return Path("work_dirs") / p.parent.name / p.stem


def write_json(path: os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fail(err: Exception) -> None:
    raise SystemExit(f"error: {err}")


__all__ = ["parse_args", "load_experiment", "default_work_dir", "write_json", "save_config", "ConfigError", "fail"]
