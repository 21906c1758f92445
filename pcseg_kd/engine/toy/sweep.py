"""A grid of shift level x method, with teacher and baseline trained once per level.

Each finished cell is written to ``WORK_DIR/cells/`` at once, so a killed sweep resumes
where it stopped (cells whose config changed are recomputed).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

from tqdm.auto import tqdm

from ...utils.io import read_json
from ..runner import save_config, write_json
from .schema import load_experiment
from .train import run_setting, show_progress

SHARED_KEYS = ("task", "model", "teacher_model", "teacher", "student", "seeds", "device")


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fmt_shift(v: Any) -> str:
    return str(v).replace("/", "_").replace(" ", "")


def run_sweep(config_path: str, overrides: Sequence[str], work_dir: Path, progress: bool = True,
              force: bool = False) -> Dict[str, Any]:
    top = load_experiment(config_path, overrides)
    sweep = top.get("sweep")
    if not sweep or not sweep.get("methods") or not sweep.get("shift_values"):
        raise SystemExit(f"error: {config_path}: a sweep config needs sweep.methods and sweep.shift_values")
    base_dir = Path(config_path).resolve().parent
    key, values, methods = sweep["shift_key"], list(sweep["shift_values"]), dict(sweep["methods"])
    method_paths = {}
    for label, rel in methods.items():
        path = (base_dir / rel)
        if not path.is_file():
            raise SystemExit(f"error: {config_path}: sweep.methods.{label}: file {rel!r} not found (looked at {path})")
        method_paths[label] = str(path)
    # validate every cell's config before any training starts
    cells = {(v, label): load_experiment(p, [*overrides, f"{key}={json.dumps(v)}"])
             for v in values for label, p in method_paths.items()}

    cell_dir = work_dir / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    save_config(top, work_dir / "config.yaml")
    results: Dict[str, Dict[str, Any]] = {label: {} for label in methods}
    shared_by_key: Dict[str, Any] = {}
    levels: Dict[str, Dict[str, float]] = {}
    plan = []
    for v in values:
        for label in methods:
            cfg = cells[(v, label)]
            cfg.pop("sweep", None)
            digest = _digest(cfg)
            path = cell_dir / f"{_fmt_shift(v)}__{_digest(label)}.json"
            # a cell file a kill truncated: a warning naming it, and the cell is computed again
            cached = read_json(path, default=None) if not force else None
            done = cached["metrics"] if cached and cached.get("digest") == digest else None
            plan.append((v, label, cfg, digest, path, done))
    n_done = sum(p[-1] is not None for p in plan)
    if n_done:
        print(f"resuming: {n_done} of {len(plan)} cells done ({cell_dir})", flush=True)
    show = show_progress(progress)
    bar = tqdm(total=len(cells), desc="sweep", disable=not show)
    for i, (v, label, cfg, digest, path, done) in enumerate(plan, 1):
        bar.set_postfix_str(f"{key}={v} {label}")
        if done is not None:
            metrics = done
        else:
            skey = _digest({k: cfg.get(k) for k in SHARED_KEYS})
            out = run_setting(cfg, progress=False, shared=shared_by_key.get(skey))
            shared_by_key = {skey: out["shared"]}  # keep only this level's teacher/baseline in memory
            metrics = out["metrics"]
            write_json(path, {"digest": digest, "label": label, "shift": v, "metrics": metrics})
        results[label][json.dumps(v)] = metrics
        levels.setdefault(json.dumps(v), {k: metrics[k] for k in ("input_cmd", "teacher_acc_mean", "baseline_acc_mean")})
        # one line per cell, bars or not: a log file shows how far a sweep got and what each cell gave
        line = (f"[{i}/{len(plan)}] {key}={v} {label}: student {metrics['student_acc_mean']:.2f} "
                f"(Δ {metrics['delta_mean']:+.2f} ± {metrics['delta_std']:.2f}), no-KD "
                f"{metrics['baseline_acc_mean']:.2f}, teacher {metrics['teacher_acc_mean']:.2f}"
                + (" (done before)" if done is not None else f", {metrics['seconds']:.1f}s"))
        (bar.write if show else print)(line)
        sys.stdout.flush()
        bar.update(1)
    bar.close()
    summary = {"config": config_path, "shift_key": key, "shift_values": values, "methods": list(methods),
               "levels": levels, "results": results, "paper": sweep.get("paper") or {}}
    write_json(work_dir / "results.json", summary)
    (work_dir / "results.md").write_text(markdown_tables(summary, config_path, overrides))
    plot_accuracy_vs_cmd(summary, work_dir / "accuracy_vs_cmd.png")
    return summary


def markdown_tables(summary: Dict[str, Any], config_path: str, overrides: Sequence[str]) -> str:
    key, values, methods = summary["shift_key"], summary["shift_values"], summary["methods"]
    res, levels, paper = summary["results"], summary["levels"], summary["paper"]
    n_seeds = next(iter(next(iter(res.values())).values()))["n_seeds"]
    cmd_line = " ".join(["python tools/sweep.py", config_path, *overrides])
    lines = [f"Command: `{cmd_line}`  ", f"Seeds per cell: {n_seeds}. Accuracies in %, mean ± std over seeds; "
             f"Δ = student − no-KD baseline, per seed, then mean ± std.", ""]
    # Table 2 layout: one row per shift level
    head = ["input CMD", key, "teacher", "no-KD"] + [f"{m} (Δ ± std)" for m in methods]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in values:
        lv = levels[json.dumps(v)]
        row = [f"{lv['input_cmd']:.2f}", str(v), f"{lv['teacher_acc_mean']:.2f}", f"{lv['baseline_acc_mean']:.2f}"]
        for m in methods:
            r = res[m][json.dumps(v)]
            row.append(f"{r['student_acc_mean']:.2f} ({r['delta_mean']:+.2f} ± {r['delta_std']:.2f})")
        lines.append("| " + " | ".join(row) + " |")
    # Table 8 layout: one row per method, one column per CMD, with the paper's value beside ours
    lines += ["", "Student accuracy by method (ours / paper where the config records the paper's numbers):", ""]
    head = ["method"] + [f"CMD {levels[json.dumps(v)]['input_cmd']:.2f}" for v in values]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("no-KD", [levels[json.dumps(v)]["baseline_acc_mean"] for v in values])]
    rows += [(m, [res[m][json.dumps(v)]["student_acc_mean"] for v in values]) for m in methods]
    for name, ours in rows:
        ref = {str(k): v for k, v in (paper.get(name) or {}).items()}  # shift value -> paper's number
        cells = [f"{o:.2f}" + (f" / {ref[str(v)]:.2f}" if ref.get(str(v)) is not None else "")
                 for v, o in zip(values, ours)]
        lines.append("| " + " | ".join([name] + cells) + " |")
    # Table 1 layout: output CMD (student vs teacher softmax on the training set) per method
    lines += ["", "Output CMD (student vs teacher softmax outputs, training set, after training):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        lines.append("| " + " | ".join([m] + [f"{res[m][json.dumps(v)]['output_cmd']:.3f}" for v in values]) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_cmd(summary: Dict[str, Any], path: Path) -> None:
    """Left: mean student accuracy against input CMD (the paper's Fig. 2 / 4). Right: the
    paired gain over the no-KD baseline, with a band of one standard deviation over seeds
    (accuracy itself varies more between seeds than between methods)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = summary["shift_values"]
    x = np.array([summary["levels"][json.dumps(v)]["input_cmd"] for v in values])
    order = np.argsort(x)
    fig, (ax_acc, ax_delta) = plt.subplots(1, 2, figsize=(11, 4))
    base = np.array([summary["levels"][json.dumps(v)]["baseline_acc_mean"] for v in values])
    ax_acc.plot(x[order], base[order], "k--", label="no-KD")
    ax_delta.axhline(0.0, color="k", ls="--", lw=1)
    for m in summary["methods"]:
        r = [summary["results"][m][json.dumps(v)] for v in values]
        mean = np.array([c["student_acc_mean"] for c in r])
        delta = np.array([c["delta_mean"] for c in r])
        std = np.array([c["delta_std"] for c in r])
        ax_acc.plot(x[order], mean[order], marker="o", label=m)
        line, = ax_delta.plot(x[order], delta[order], marker="o", label=m)
        ax_delta.fill_between(x[order], (delta - std)[order], (delta + std)[order], alpha=0.12, color=line.get_color())
    n = next(iter(next(iter(summary["results"].values())).values()))["n_seeds"]
    ax_acc.set_ylabel(f"student test accuracy (%), mean of {n} seeds")
    ax_delta.set_ylabel("student − no-KD (points), ±1 std")
    for ax in (ax_acc, ax_delta):
        ax.set_xlabel("input CMD (teacher vs student modality)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
