"""The paper's Table 6 layout on SemanticKITTI: teachers (rows) × distillation methods (columns).

A table config names an experiment config (``base``), teachers (row label -> dotted overrides
for the teacher) and methods (column label -> dotted overrides, usually the distiller). Every
teacher is trained once, every student against it with ``teacher_checkpoint``, and the no-KD
column (a method whose distiller is ``none``) once for all rows, each cell in its own work
folder, so a killed table resumes cell by cell (and inside a cell, step by step). The table
is written as Markdown with the paper's numbers beside ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...config import atomic_write_text, save_config
from ...utils.io import write_json
from ..distributed import DistEnv


@dataclass(kw_only=True)
class KittiTableConfig:
    experiment: str = "semantickitti_table"
    name: str = ""
    base: str = ""                                                # experiment config, relative to this file
    overrides: List[str] = field(default_factory=list)            # applied to every cell
    teachers: Dict[str, List[str]] = field(default_factory=dict)  # row label -> overrides
    methods: Dict[str, List[str]] = field(default_factory=dict)   # column label -> overrides
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)  # row -> {column or "teacher": mIoU}
    metric: str = "in_view"                                       # student score: "in_view" (the teacher's rows) or "all"
    seeds: List[int] = field(default_factory=lambda: [0])         # every cell (teachers too) once per seed


def load_table(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from ...config import ConfigError, load_config_with_provenance
    cfg, _ = load_config_with_provenance(path, overrides, schema=KittiTableConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    if not out["base"]:
        raise ConfigError(f"{path}: base: the experiment config every cell starts from is required")
    out["base"] = str((Path(path).parent / out["base"]).resolve())
    if not out["teachers"] or not out["methods"]:
        raise ConfigError(f"{path}: teachers and methods must both name at least one entry")
    if out["metric"] not in ("all", "in_view"):
        raise ConfigError(f"{path}: metric must be 'all' or 'in_view', got {out['metric']!r}")
    if not out["seeds"] or len(set(out["seeds"])) != len(out["seeds"]):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct seeds, got {out['seeds']}")
    return out


def cell_configs(table: Dict[str, Any], work_dir: Path) -> List[Dict[str, Any]]:
    """Every run of the table, in order (teachers first), as dicts of row, column, seed, work
    folder and experiment config; each is loaded and validated before anything trains, so a
    bad override fails first. A seed trains its own teachers and students."""
    from .schema import load_kitti_experiment

    runs = []
    for seed in table["seeds"]:
        common = list(table["overrides"]) + [f"seed={seed}"]
        tag = f"seed{seed}"
        for row, t_over in table["teachers"].items():
            cfg = load_kitti_experiment(table["base"], common + list(t_over) + ["stages=[teacher]"])
            runs.append({"row": row, "col": "teacher", "seed": seed, "dir": work_dir / tag / "teachers" / row,
                         "cfg": cfg})
        baselines_done = set()
        for row, t_over in table["teachers"].items():
            teacher_ckpt = work_dir / tag / "teachers" / row / "teacher" / "final.pt"
            for col, m_over in table["methods"].items():
                cfg = load_kitti_experiment(table["base"], common + list(t_over) + list(m_over) + ["stages=[student]"])
                if cfg["distiller"]["type"] == "none":  # no teacher involved: one run serves every row
                    if col not in baselines_done:
                        baselines_done.add(col)
                        runs.append({"row": "*", "col": col, "seed": seed, "dir": work_dir / tag / "students" / col,
                                     "cfg": cfg})
                    continue
                cfg["teacher_checkpoint"] = str(teacher_ckpt)
                runs.append({"row": row, "col": col, "seed": seed, "cfg": cfg,
                             "dir": work_dir / tag / "students" / f"{row}-{col}"})
    return runs


def run_table(table: Dict[str, Any], work_dir: Path, env: DistEnv, progress: bool = True,
              runs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """``runs``: the table's :func:`cell_configs`, if already loaded."""
    from .train import run_kitti

    runs = runs if runs is not None else cell_configs(table, work_dir)
    per_seed: Dict[str, Dict[str, Dict[int, Optional[float]]]] = {row: {} for row in table["teachers"]}
    done = sum((run["dir"] / "metrics.json").is_file() for run in runs)  # a finished cell's summary
    if done and env.is_main:
        print(f"resuming: {done} of {len(runs)} cells done ({work_dir})", flush=True)
    for run in runs:
        if env.is_main:
            print(f"== seed {run['seed']}: {run['row']} / {run['col']} -> {run['dir']}", flush=True)
        if env.is_main:  # each cell is an ordinary tools/train.py work folder
            run["dir"].mkdir(parents=True, exist_ok=True)
            save_config(run["cfg"], run["dir"] / "config.yaml")
        out = run_kitti(run["cfg"], run["dir"], env, progress)  # writes the cell's metrics.json
        stage = "teacher" if run["col"] == "teacher" else "student"
        metrics = out.get(stage, {})
        key = "in_view" if stage == "teacher" else table["metric"]
        value = metrics.get(key, {}).get("miou")
        for row in (per_seed if run["row"] == "*" else [run["row"]]):
            per_seed[row].setdefault(run["col"], {})[run["seed"]] = value
    results = {row: {col: summarise(vals) for col, vals in cols.items()} for row, cols in per_seed.items()}
    baseline = next((r["col"] for r in runs if r["row"] == "*"), None)  # the first no-KD column
    if baseline is not None:
        add_paired_deltas(results, baseline)
    if env.is_main:
        write_json(work_dir / "results.json", results)
        atomic_write_text(work_dir / "results.md", markdown(table, results, baseline))
    return results


def mean_std(values) -> Dict[str, Any]:
    """Mean and sample standard deviation (None for fewer than two) of the values that are not None."""
    vals = [v for v in values if v is not None]
    mean = sum(vals) / len(vals) if vals else None
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals)}


def summarise(by_seed: Dict[int, Optional[float]]) -> Dict[str, Any]:
    """Mean and sample standard deviation over the seeds that produced a value, and every value."""
    return {**mean_std(by_seed.values()), "by_seed": {str(k): v for k, v in by_seed.items()}}


PAIRED_KEYS = ("n", "mean", "std", "t", "half_width", "low", "high", "excludes_zero")


def add_paired_deltas(results: Dict[str, Dict[str, Dict[str, Any]]], baseline: str) -> None:
    """Each distilled cell gets ``delta`` (the paired Δ to the ``baseline`` column over the
    seeds both have: mean, std, t-interval, whether it excludes 0) and ``delta_ci95``."""
    from ...metrics.paired import ci95, paired_delta

    for cols in results.values():
        base = (cols.get(baseline) or {}).get("by_seed", {})
        for col, cell in cols.items():
            if col in ("teacher", baseline):
                continue
            seeds = [k for k, v in cell["by_seed"].items() if v is not None and base.get(k) is not None]
            d = paired_delta([cell["by_seed"][k] for k in seeds], [base[k] for k in seeds])
            cell["delta"] = {k: d[k] for k in PAIRED_KEYS}
            cell["delta_ci95"] = ci95(d)


def markdown(table: Dict[str, Any], results: Dict[str, Dict[str, Dict[str, Any]]],
             baseline: Optional[str] = None) -> str:
    """Cells are mean ± std over seeds; ``baseline``: the no-KD column, against which every
    method's paired Δ (student − no-KD student of the same seed) is given with its 95 %
    t-interval, the best method's (by mean Δ) beside the row."""
    from ...metrics.paired import format_delta
    cols = ["teacher"] + list(table["methods"])

    def fmt(cell):
        if not cell or cell["mean"] is None:
            return "–"
        return f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")

    lines = [f"# {table['name'] or 'SemanticKITTI'}: val mIoU (%), student scored on "
             f"{'full scans' if table['metric'] == 'all' else 'in-view points'}, teachers on in-view points",
             "", "| teacher | " + " | ".join(cols) + (f" | best Δ vs {baseline}" if baseline else "") + " |",
             "|---" * (len(cols) + 1 + bool(baseline)) + "|"]
    for row, vals in results.items():
        paper = table["paper"].get(row, {})
        cells = [fmt(vals.get(c)) + (f" ({paper[c]:.2f})" if c in paper else "") for c in cols]
        extra = []
        if baseline:
            deltas = [vals[c]["delta"] for c in table["methods"]
                      if c != baseline and (vals.get(c) or {}).get("delta", {}).get("mean") is not None]
            extra = [format_delta(max(deltas, key=lambda d: d["mean"])) if deltas else "–"]
        lines.append(f"| {row} | " + " | ".join(cells + extra) + " |")
    seeds = table["seeds"]
    lines += ["", f"Mean ± sample standard deviation over seeds {seeds} (± omitted for one seed). "
              "In parentheses: the paper's Table 6, where it reports the cell."]
    others = [c for c in table["methods"] if c != baseline]
    if baseline and others:
        lines += ["", f"## Paired Δ to {baseline} (student − {baseline} student of the same seed)", "",
                  "Mean ± sample std of the per-seed differences, n seeds, 95 % t-interval; * marks an interval "
                  "that excludes 0 (only those are differences larger than the seed spread).", "",
                  "| teacher | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
        for row, vals in results.items():
            lines.append(f"| {row} | " + " | ".join(
                format_delta(vals[c]["delta"]) if "delta" in (vals.get(c) or {}) else "–" for c in others) + " |")
    return "\n".join(lines) + "\n"

