"""Entry-point plumbing shared by every tool: arguments, work folders, config checks, JSON output.

Each experiment kind loads its own config: :func:`pcseg_kd.engine.toy.schema.load_experiment`
(the small tasks) and :func:`pcseg_kd.engine.kitti.schema.load_kitti_experiment` (SemanticKITTI)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from ..config import CLI, ConfigError, save_config


def import_all() -> None:
    """Import every module that registers something."""
    import pcseg_kd.data  # noqa: F401
    import pcseg_kd.distill  # noqa: F401
    import pcseg_kd.models  # noqa: F401


def parse_args(description: str, argv: Optional[Sequence[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The common arguments; ``extra`` adds a tool's own options to the parser."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="YAML config (may use _base_)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds.num=10 distiller.beta=2")
    p.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config's parent folder>/<config stem>, e.g. configs/kitti/quickstart.yaml -> work_dirs/kitti/quickstart)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--force", action="store_true", help="recompute results that are already in the work dir")
    if extra is not None:
        extra(p)
    args = p.parse_intermixed_args(argv)  # options may come before, between or after overrides
    if args.work_dir is not None:
        try:
            check_work_dir(args.work_dir)
        except ValueError as e:
            p.error(str(e))
    return args


def check_work_dir(path: "os.PathLike | str") -> Path:
    """``path`` as a work folder, or a ValueError saying why it cannot be one: a symlink whose
    target does not exist (``mkdir`` would say only "File exists"), or a file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--work-dir {path}: a symlink to {os.readlink(path)}, which does not exist: "
                         "create the target folder, or remove the link")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--work-dir {path}: exists and is not a folder")
    for parent in path.parents:  # a dangling link above the folder fails the same way
        if parent.is_symlink() and not parent.exists():
            raise ValueError(f"--work-dir {path}: {parent} is a symlink to {os.readlink(parent)}, which does "
                             "not exist")
    return path


def experiment_kind(path: str, overrides: Sequence[str] = ()) -> str:
    """"semantickitti" for configs that say ``experiment: semantickitti``, else "toy"."""
    from ..config import load_config
    return str(load_config(path, overrides).get("experiment") or "toy")


def run_checks(checks, prov: Dict[str, str]) -> None:
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


def default_work_dir(config_path: str) -> Path:
    p = Path(config_path)
    return Path("work_dirs") / p.parent.name / p.stem


def write_json(path: os.PathLike, obj: Any) -> None:
    """Strict JSON (non-finite floats as ``null``), written atomically: :func:`pcseg_kd.utils.io.write_json`."""
    from ..utils.io import write_json as _write_json
    _write_json(path, obj, indent=2)


__all__ = ["parse_args", "run_checks", "import_all", "experiment_kind", "default_work_dir", "check_work_dir", "write_json", "save_config", "ConfigError"]
