"""Which config a tool reads: the one given, else the run's own ``WORK/config.yaml``.

``tools/train.py`` writes the resolved config to ``WORK/config.yaml``; ``tools/test.py``,
``tools/export_teacher.py`` and ``tools/visualize_kitti.py`` then need only ``--work-dir WORK``
(no training overrides repeated). A config given on the command line still wins, and so do
dotted overrides over either; the tool says which it read in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...config import ConfigError
from ..runner import default_work_dir


def split_config_arg(config: Optional[str], overrides: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``tools/test.py --work-dir W key=value``: argparse hands the first override to the optional
    ``config`` positional; it is an override when it has ``=`` and is no file."""
    overrides = list(overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config] + overrides
    return config, overrides


def resolve_run_config(config: Optional[str], overrides: Sequence[str], work_dir: Optional[str],
                       tool: str) -> Tuple[Dict[str, Any], Path, str]:
    """``(cfg, work_dir, note)``: the experiment config, the work folder and one line saying
    which config was read and what won. Raises ConfigError naming the missing file."""
    from .schema import load_kitti_experiment

    config, overrides = split_config_arg(config, overrides)
    if config is None:
        if work_dir is None:
            raise ConfigError(f"{tool}: give a CONFIG or --work-dir WORK (a tools/train.py output folder, "
                              "whose WORK/config.yaml is then read)")
        saved = Path(work_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{saved} does not exist: --work-dir must be a folder tools/train.py wrote "
                              "(it saves the run's config there), or give the CONFIG too")
        note = f"config: {saved} (the run's own)"
        if overrides:
            note += f"; command-line overrides win: {' '.join(overrides)}"
        return load_kitti_experiment(str(saved), overrides), Path(work_dir), note
    wd = Path(work_dir) if work_dir else default_work_dir(config)
    note = f"config: {config}"
    if work_dir and (wd / "config.yaml").is_file():
        note += f" (given, so it wins over {wd / 'config.yaml'}, the run's own)"
    if overrides:
        note += f"; command-line overrides win: {' '.join(overrides)}"
    return load_kitti_experiment(config, overrides), wd, note
