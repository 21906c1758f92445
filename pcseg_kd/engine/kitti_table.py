"""The paper's Table 6 layout on SemanticKITTI: teachers (rows) × distillation methods (columns).

A table config names an experiment config (``base``), teachers (row label -> dotted overrides
for the teacher) and methods (column label -> dotted overrides, usually the distiller). Every
teacher is trained once, every student against it with ``teacher_checkpoint``, and the no-KD
column (a method whose distiller is ``none``) once for all rows, each cell in its own work
folder, so a killed table resumes cell by cell (and inside a cell, step by step). The table
is written as Markdown with the paper's numbers beside ours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import atomic_write_text
from .distributed import DistEnv


@dataclass(kw_only=True)
class KittiTableConfig:
    experiment: str = "semantickitti_table"
    name: str = ""
    base: str = ""                                                # experiment config, relative to this file
    overrides: List[str] = field(default_factory=list)            # applied to every cell
    teachers: Dict[str, List[str]] = field(default_factory=dict)  # row label -> overrides
    methods: Dict[str, List[str]] = field(default_factory=dict)   # column label -> overrides
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)  # row -> {column or "teacher": mIoU}
    metric: str = "all"                                           # student score: "all" or "in_view"


def load_table(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from ..config import ConfigError, load_config_with_provenance
    cfg, _ = load_config_with_provenance(path, overrides, schema=KittiTableConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    if not out["base"]:
        raise ConfigError(f"{path}: base: the experiment config every cell starts from is required")
    out["base"] = str((Path(path).parent / out["base"]).resolve())
    if not out["teachers"] or not out["methods"]:
        raise ConfigError(f"{path}: teachers and methods must both name at least one entry")
    if out["metric"] not in ("all", "in_view"):
        raise ConfigError(f"{path}: metric must be 'all' or 'in_view', got {out['metric']!r}")
    return out


def cell_configs(table: Dict[str, Any], work_dir: Path) -> List[Dict[str, Any]]:
    """Every run of the table, in order, as (label, work folder, experiment config); each is
    loaded and validated before anything trains, so a bad override fails first."""
    from .runner import load_kitti_experiment

    runs = []
    common = list(table["overrides"])
    for row, t_over in table["teachers"].items():
        cfg = load_kitti_experiment(table["base"], common + list(t_over) + ["stages=[teacher]"])
        runs.append({"row": row, "col": "teacher", "dir": work_dir / "teachers" / row, "cfg": cfg})
    baseline_done = False
    for row, t_over in table["teachers"].items():
        teacher_ckpt = work_dir / "teachers" / row / "teacher" / "final.pt"
        for col, m_over in table["methods"].items():
            cfg = load_kitti_experiment(table["base"], common + list(t_over) + list(m_over) + ["stages=[student]"])
            if cfg["distiller"]["type"] == "none":  # no teacher involved: one run serves every row
                if baseline_done:
                    continue
                baseline_done = True
                runs.append({"row": "*", "col": col, "dir": work_dir / "students" / col, "cfg": cfg})
                continue
            cfg["teacher_checkpoint"] = str(teacher_ckpt)
            runs.append({"row": row, "col": col, "dir": work_dir / "students" / f"{row}-{col}", "cfg": cfg})
    return runs


def run_table(table: Dict[str, Any], work_dir: Path, env: DistEnv, progress: bool = True) -> Dict[str, Any]:
    from .kitti import run_kitti

    runs = cell_configs(table, work_dir)
    results: Dict[str, Dict[str, Optional[float]]] = {row: {} for row in table["teachers"]}
    for run in runs:
        if env.is_main:
            print(f"== {run['row']} / {run['col']} -> {run['dir']}", flush=True)
        out = run_kitti(run["cfg"], run["dir"], env, progress)
        stage = "teacher" if run["col"] == "teacher" else "student"
        metrics = out.get(stage, {})
        key = "in_view" if stage == "teacher" else table["metric"]
        value = metrics.get(key, {}).get("miou")
        for row in (results if run["row"] == "*" else [run["row"]]):
            results[row][run["col"]] = value
    baseline = next((r["col"] for r in runs if r["row"] == "*"), None)
    if env.is_main:
        atomic_write_text(work_dir / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(work_dir / "results.md", markdown(table, results, baseline))
    return results


def markdown(table: Dict[str, Any], results: Dict[str, Dict[str, Optional[float]]],
             baseline: Optional[str] = None) -> str:
    """``baseline``: the no-KD column, against which the best method's Δ is given."""
    cols = ["teacher"] + list(table["methods"])

    def fmt(v):
        return "–" if v is None else f"{v:.2f}"

    lines = [f"# {table['name'] or 'SemanticKITTI'}: val mIoU (%), student scored on "
             f"{'full scans' if table['metric'] == 'all' else 'in-view points'}, teachers on in-view points",
             "", "| teacher | " + " | ".join(cols) + (f" | best Δ vs {baseline}" if baseline else "") + " |",
             "|---" * (len(cols) + 1 + bool(baseline)) + "|"]
    for row, vals in results.items():
        paper = table["paper"].get(row, {})
        cells = [fmt(vals.get(c)) + (f" ({paper[c]:.2f})" if c in paper else "") for c in cols]
        extra = []
        if baseline and vals.get(baseline) is not None:
            deltas = [vals[c] - vals[baseline] for c in table["methods"]
                      if c != baseline and vals.get(c) is not None]
            extra = [f"{max(deltas):+.2f}" if deltas else "–"]
        lines.append(f"| {row} | " + " | ".join(cells + extra) + " |")
    lines += ["", "In parentheses: the paper's Table 6, where it reports the cell."]
    return "\n".join(lines) + "\n"

