"""A study's results from its cells' ``cell.json``: one record per (teacher, D, fit, method,
seed), per-cell summaries with the paired Δ to the no-KD student of the same seed and its 95 %
t-interval, PSSM's own effect (KD+PSSM − KD, DKD+PSSM − DKD of the same seed), Markdown and a
plot. Written to ``WORK/results.json``, ``WORK/records.json`` (the records alone: what
``docs/results/kitti_shift_study.json`` holds), ``WORK/results.md`` and ``WORK/study.png``."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...config import atomic_write_text
from ...metrics.paired import ci95, format_delta, paired_delta
from ...utils.io import read_json, write_json
from .study import d_tag, method_label

RECORD_KEYS = ("teacher", "degradation", "teacher_fit", "method", "seed", "student_in_view", "student_all",
               "baseline_in_view", "teacher_in_view", "teacher_target_accuracy", "teacher_target_miou",
               "omega_one_share", "omega_zero_share", "output_cmd", "delta_ci95")
PAIRED_KEYS = ("n", "mean", "std", "t", "half_width", "low", "high", "excludes_zero")
PSSM_TYPES = (("kd_pssm", "kd"), ("dkd_pssm", "dkd"))  # distiller types: PSSM's own effect, with − without


def mean_std(values) -> Dict[str, Any]:
    """Mean and sample standard deviation (None for fewer than two) of the values that are not None."""
    vals = [v for v in values if v is not None]
    mean = sum(vals) / len(vals) if vals else None
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals)}


def paired(student: List[Optional[float]], control: List[Optional[float]]) -> Dict[str, Any]:
    """The paired Δ over the seeds where both values exist: mean, std, n, t-interval."""
    pairs = [(a, b) for a, b in zip(student, control) if a is not None and b is not None]
    d = paired_delta([a for a, _ in pairs], [b for _, b in pairs])
    return {k: d[k] for k in PAIRED_KEYS}


def group_key(r: Dict[str, Any]) -> tuple:
    return r["teacher"], r["degradation"], r["teacher_fit"]


def group_tag(t: str, d: Optional[float], fit: Optional[str]) -> str:
    """``fusion/d0/out_of_fold``: the summary's keys (D and fit left out where the study has none)."""
    return "/".join(p for p in (t, d_tag(d), fit) if p)


def gather(study: Dict[str, Any], work_dir: Path, all_cells: List[Dict[str, Any]],
           seconds: Optional[float] = None) -> Dict[str, Any]:
    """results.json (records, summary), records.json, results.md and the plot."""
    outs = {(c["name"], c["seed"]): read_json(c["dir"] / "cell.json") for c in all_cells}
    teachers = {(c["teacher"], c["degradation"]): outs[(c["name"], c["seed"])] for c in all_cells if c["kind"] == "teacher"}
    baseline_method = next(m for m in study["methods"] if any(c["kind"] == "baseline" and c["method"] == m for c in all_cells))
    baselines = {c["seed"]: outs[(c["name"], c["seed"])] for c in all_cells
                 if c["kind"] == "baseline" and c["method"] == baseline_method}
    types = {c["method"]: c["cfg"]["distiller"]["type"] for c in all_cells if c["kind"] in ("baseline", "student")}
    fits = study["fits"]
    records = []
    for c in all_cells:
        if c["kind"] not in ("baseline", "student"):
            continue
        o = outs[(c["name"], c["seed"])]
        base = baselines[c["seed"]]
        # the no-KD student: one run, the record of every (teacher, D, fit) it is the control of
        groups = ([(c["teacher"], c["degradation"], c["fit"])] if c["kind"] == "student"
                  else [(t, d, fit) for (t, d) in teachers for fit in fits])
        for t, d, fit in groups:
            om = o.get("omega_last_epoch") or {}
            tt = o.get("teacher_targets") or {}
            # a no-KD cell run as part of a subset (--only) knows the CMD to that subset's teachers only
            cmd = o["output_cmd"].get(group_tag(t, d, None).replace("/", "-")) if c["kind"] == "baseline" else o["output_cmd"]
            records.append({"teacher": t, "degradation": d, "teacher_fit": fit, "method": c["method"], "seed": c["seed"],
                            "student_in_view": o["in_view"], "student_all": o["all"],
                            "baseline_in_view": base["in_view"], "baseline_all": base["all"],
                            "teacher_in_view": teachers[(t, d)]["in_view"],
                            "teacher_target_accuracy": tt.get("accuracy"), "teacher_target_miou": tt.get("miou"),
                            "omega_one_share": om.get("one"), "omega_zero_share": om.get("zero"),
                            "omega_between_share": om.get("between"), "output_cmd": cmd,
                            "cell_seconds": o.get("seconds")})
    order = {"t": list(study["teachers"]), "m": list(study["methods"]), "f": list(fits)}
    records.sort(key=lambda r: (order["t"].index(r["teacher"]), r["degradation"] if r["degradation"] is not None else -1,
                                order["f"].index(r["teacher_fit"]), order["m"].index(r["method"]), r["seed"]))
    summary = summarise(records, study["metric"])
    for r in records:  # the interval of the record's cell over its seeds
        r["delta_ci95"] = (None if types[r["method"]] == "none"
                           else summary[group_tag(*group_key(r))][r["method"]]["delta_ci95"])
    results = {"name": study["name"], "command": study_command(study), "seeds": study["seeds"],
               "metric": study["metric"], "baseline_method": baseline_method,
               "baseline_in_view": mean_std(b["in_view"] for b in baselines.values()),
               "baseline_all": mean_std(b["all"] for b in baselines.values()),
               "teachers": {group_tag(t, d, None): o["in_view"] for (t, d), o in teachers.items()},
               "summary": summary, "pssm_effect": pssm_effect(records, types, study["metric"]),
               "teacher_effect": teacher_effect(records, types, list(study["teachers"]), study["metric"]),
               "records": records,
               "cell_seconds_total": sum(o.get("seconds") or 0.0 for o in outs.values()),
               "wall_seconds_last_run": seconds}
    halves = [s["delta"]["half_width"] for g in summary.values() for m, s in g.items()
              if types[m] != "none" and s["delta"]["half_width"] is not None]
    results["median_half_width"] = statistics.median(halves) if halves else None
    write_json(work_dir / "results.json", results)
    write_json(work_dir / "records.json", records)
    atomic_write_text(work_dir / "results.md", markdown(study, results, types))
    plot(study, results, types, work_dir / "study.png")
    return results


def study_command(study: Dict[str, Any]) -> str:
    return " ".join(["python tools/kitti_table.py", study["config_path"]] + study["config_overrides"]
                    + [f"--only {o}" for o in study.get("only", [])])


def paired_by_seed(by: Dict[tuple, float], cell: tuple, control: tuple, seeds: List[int]) -> Dict[str, Any]:
    """``by[cell + (seed,)] − by[control + (seed,)]`` over ``seeds``: the paired Δ, its 95 %
    interval (``ci95``) and the seeds."""
    p = paired([by[cell + (s,)] for s in seeds], [by[control + (s,)] for s in seeds])
    return {**p, "ci95": None if p["low"] is None else [p["low"], p["high"]], "seeds": seeds}


def pssm_effect(records: List[Dict[str, Any]], types: Dict[str, str], metric: str) -> Dict[str, Any]:
    """Per teacher, D and fit: (a method of type kd_pssm) − (the method of type kd) of the same
    seed, and likewise DKD; with their intervals: PSSM's effect on its own, not through the
    no-KD student."""
    by_type: Dict[str, str] = {}
    for m, t in types.items():
        by_type.setdefault(t, m)
    by = {group_key(r) + (r["method"], r["seed"]): r[f"student_{metric}"] for r in records}
    out: Dict[str, Any] = {}
    for g in dict.fromkeys(group_key(r) for r in records):
        for with_t, without_t in PSSM_TYPES:
            if with_t not in by_type or without_t not in by_type:
                continue
            w, wo = by_type[with_t], by_type[without_t]
            seeds = sorted(k[-1] for k in by if k[:3] == g and k[3] == w and g + (wo, k[-1]) in by)
            if seeds:
                out.setdefault(group_tag(*g), {})[f"{w}-{wo}"] = paired_by_seed(by, g + (w,), g + (wo,), seeds)
    return out


def teacher_effect(records: List[Dict[str, Any]], types: Dict[str, str], teachers: List[str],
                   metric: str) -> Dict[str, Any]:
    """Per D, fit and distilled method: (the student of each later teacher) − (the student of
    the study's first teacher) of the same seed, with its interval: Table 6's question (is the
    fusion teacher's KD better than the image teacher's?) paired by seed."""
    by = {group_key(r) + (r["method"], r["seed"]): r[f"student_{metric}"] for r in records
          if types[r["method"]] != "none"}
    out: Dict[str, Any] = {}
    first = teachers[0]
    for t, d, fit, m in dict.fromkeys(k[:4] for k in by):
        if t == first:
            continue
        seeds = sorted(k[-1] for k in by if k[:4] == (t, d, fit, m) and (first, d, fit, m, k[-1]) in by)
        if seeds:
            out.setdefault(f"{t} − {first}", {}).setdefault(group_tag(None, d, fit) or "all", {})[m] = \
                paired_by_seed(by, (t, d, fit, m), (first, d, fit, m), seeds)
    return out


def summarise(records: List[Dict[str, Any]], metric: str) -> Dict[str, Any]:
    """Per ``teacher/D/fit`` and method: mean ± sample std over seeds of the student's mIoU (in
    view, all), of the teacher targets' accuracy and mIoU, of the CMD and Ω shares, and the
    paired Δ (on ``metric``) to the no-KD student of the same seed with its 95 % t-interval
    (``delta``: mean, std, n, t, half_width, low, high, excludes_zero; ``delta_ci95``: [low,
    high]); ``delta_in_view`` and ``delta_all`` for both scores."""
    out: Dict[str, Any] = {}
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(group_key(r) + (r["method"],), []).append(r)
    for (t, d, fit, m), rs in groups.items():
        d_in = paired([r["student_in_view"] for r in rs], [r["baseline_in_view"] for r in rs])
        d_all = paired([r["student_all"] for r in rs], [r["baseline_all"] for r in rs])
        delta = d_in if metric == "in_view" else d_all
        out.setdefault(group_tag(t, d, fit), {})[m] = {
            "teacher": t, "degradation": d, "teacher_fit": fit,
            "student_in_view": mean_std(r["student_in_view"] for r in rs),
            "student_all": mean_std(r["student_all"] for r in rs),
            "delta": delta, "delta_ci95": ci95(delta),
            "delta_in_view": d_in, "delta_all": d_all,
            "delta_in_view_ci95": ci95(d_in), "delta_all_ci95": ci95(d_all),
            "teacher_target_accuracy": mean_std(r["teacher_target_accuracy"] for r in rs),
            "teacher_target_miou": mean_std(r["teacher_target_miou"] for r in rs),
            "output_cmd": mean_std(r["output_cmd"] for r in rs),
            "omega_one_share": mean_std(r["omega_one_share"] for r in rs),
            "omega_zero_share": mean_std(r["omega_zero_share"] for r in rs),
            "teacher_in_view": rs[0]["teacher_in_view"], "seeds": sorted(r["seed"] for r in rs)}
    return out


def _pm(s: Dict[str, Any], fmt: str = "{:.2f}") -> str:
    if s["mean"] is None:
        return "–"
    return fmt.format(s["mean"]) + (f" ± {fmt.format(s['std'])}" if s["std"] is not None else "")


def markdown(study: Dict[str, Any], results: Dict[str, Any], types: Dict[str, str]) -> str:
    methods = list(study["methods"])
    summary = results["summary"]
    metric = study["metric"]
    where = "in-view points" if metric == "in_view" else "full scans"
    b = results["baseline_in_view"]
    has_d, has_fit = bool(study["degradations"]), study["fits"] != ["in_sample"]
    lines = [f"# {study['name'] or 'Study'}", "", f"`{results['command']}`", "",
             f"Student val mIoU (%) on {where}, mean ± sample std over seeds {study['seeds']}; in brackets the "
             "paired Δ to the no-KD student of the same seed (mean ± std of the per-seed differences, n, 95 % "
             "t-interval; * marks an interval that excludes 0, the only differences larger than the seed spread). "
             f"No-KD student: {_pm(b)} in view, {_pm(results['baseline_all'])} on full scans. "
             f"Teachers: trained once{' per D' if has_d else ''}, seed {study['teacher_seed']}, in-view mIoU. "
             "The paper's figures (Table 6, real SemanticKITTI) in parentheses"
             + (" at D = 0" if has_d else "") + (", in-sample rows" if has_fit else "") + ".", ""]
    if results.get("median_half_width") is not None:
        lines += [f"Median half-width of the paired intervals: {results['median_half_width']:.2f} points "
                  f"(no-KD seed std {_pm({'mean': b['std'], 'std': None}) if b['std'] is not None else '–'}).", ""]
    head = (["teacher"] + (["D"] if has_d else []) + (["teacher fit", "targets right", "targets mIoU"] if has_fit else [])
            + ["teacher mIoU"] + [method_label(m) for m in methods])
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g, row in summary.items():
        first = next(iter(row.values()))
        t, d, fit = first["teacher"], first["degradation"], first["teacher_fit"]
        paper = study["paper"].get(t, {}) if (d in (None, 0.0) and fit == "in_sample") else {}
        distilled = [s for m, s in row.items() if types[m] != "none"]
        cells = [t] + ([f"{float(d):g}"] if has_d else [])
        if has_fit:
            acc = distilled[0]["teacher_target_accuracy"] if distilled else {"mean": None}
            miou = distilled[0]["teacher_target_miou"] if distilled else {"mean": None}
            cells += [fit.replace("_", "-"), _pm({**acc, "std": None}, "{:.1f} %"), _pm({**miou, "std": None}, "{:.1f}")]
        cells.append(f"{first['teacher_in_view']:.2f}" + (f" ({paper['teacher']:.2f})" if "teacher" in paper else ""))
        for m in methods:
            s = row.get(m)
            if s is None:
                cells.append("–")
                continue
            txt = _pm(s[f"student_{metric}"])
            if types[m] != "none":
                txt += f" [{format_delta(s['delta'])}]"
            if method_label(m) in paper:
                txt += f" ({paper[method_label(m)]:.2f})"
            cells.append(txt)
        lines.append("| " + " | ".join(cells) + " |")
    other = "all" if metric == "in_view" else "in_view"
    lines += ["", f"## {'Full scans' if other == 'all' else 'In-view points'} (student mIoU, Δ to the no-KD student)", "",
              "| cell | " + " | ".join(method_label(m) for m in methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for g, row in summary.items():
        lines.append(f"| {g} | " + " | ".join(
            (_pm(row[m][f"student_{other}"]) + ("" if types[m] == "none" else f" [{format_delta(row[m][f'delta_{other}'])}]"))
            if m in row else "–" for m in methods) + " |")
    effect = results.get("pssm_effect") or {}
    if effect:
        pairs = sorted({k for v in effect.values() for k in v})
        lines += ["", f"## PSSM's own effect ({where}): the method with PSSM − the same method without, same seed", "",
                  "| cell | " + " | ".join(p.replace("-", " − ") for p in pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
        for g, row in effect.items():
            lines.append(f"| {g} | " + " | ".join(format_delta(row[p]) if p in row else "–" for p in pairs) + " |")
    for pair, rows in (results.get("teacher_effect") or {}).items():
        ms = [m for m in methods if any(m in row for row in rows.values())]
        lines += ["", f"## Teacher against teacher ({where}): the student of {pair.split(' − ')[0]} − the student of "
                  f"{pair.split(' − ')[1]}, same D, fit, method and seed", "",
                  "| D / fit | " + " | ".join(method_label(m) for m in ms) + " |", "|---" * (1 + len(ms)) + "|"]
        for g, row in rows.items():
            lines.append(f"| {g} | " + " | ".join(format_delta(row[m]) if m in row else "–" for m in ms) + " |")
    lines += ["", "## SSDH diagnostics: teacher targets on the distilled rows, output CMD (teacher vs student "
              "softmax, in-view val points), PSSM's Ω over the last epoch", "",
              "| cell | method | targets right | targets mIoU | output CMD | Ω = 1 | Ω = 0 | between |", "|---" * 8 + "|"]
    for g, row in summary.items():
        for m in methods:
            s = row.get(m)
            if s is None:
                continue
            one, zero = s["omega_one_share"], s["omega_zero_share"]
            om = (["–", "–", "–"] if one["mean"] is None else
                  [f"{100 * one['mean']:.1f} %", f"{100 * zero['mean']:.1f} %", f"{100 * (1 - one['mean'] - zero['mean']):.1f} %"])
            lines.append(f"| {g} | {method_label(m)} | {_pm(s['teacher_target_accuracy'], '{:.1f}')} | "
                         f"{_pm(s['teacher_target_miou'], '{:.1f}')} | {_pm(s['output_cmd'], '{:.4f}')} | " + " | ".join(om) + " |")
    total = results.get("cell_seconds_total") or 0.0
    lines += ["", f"Cells' compute time, summed: {total / 60:.1f} min"
              + (f"; this run's wall time: {results['wall_seconds_last_run'] / 60:.1f} min"
                 if results.get("wall_seconds_last_run") else "") + "."]
    return "\n".join(lines) + "\n"


def plot(study: Dict[str, Any], results: Dict[str, Any], types: Dict[str, str], path: Path) -> None:
    """The paired Δ (mean and 95 % t-interval over seeds) of every distilled method, one panel
    per teacher (and fit), against D where the study has a D axis, else per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["teacher"], s["teacher_fit"]) for row in results["summary"].values()
                                for s in row.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), sharey=True, squeeze=False)
    ds = [float(d) for d in study["degradations"]] or [None]
    methods = [m for m in study["methods"] if types.get(m, "none") != "none"]
    spread = results["baseline_in_view"]["std"]
    for ax, (t, fit) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            rows = [results["summary"].get(group_tag(t, d, fit), {}).get(m) for d in ds]
            mean = [r["delta"]["mean"] if r and r["delta"]["mean"] is not None else float("nan") for r in rows]
            half = [(r["delta"].get("half_width") or 0.0) if r else 0.0 for r in rows]
            xs = [(d if d is not None else 0.0) + 0.012 * (i - (len(methods) - 1) / 2) for d in ds]
            ax.errorbar(xs, mean, yerr=half, marker="o", capsize=3, label=method_label(m))
        ax.axhline(0.0, color="k", lw=0.8)
        if spread:
            ax.axhspan(-spread, spread, color="0.85", zorder=0, label="no-KD seed std")
        ax.set_title(f"{t} teacher" + (f", {fit.replace('_', '-')}" if study["fits"] != ["in_sample"] else ""))
        if ds != [None]:
            ax.set_xlabel("image degradation D (larger shift →)")
            ax.set_xticks(ds)
        else:
            ax.set_xticks([])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ mIoU vs no-KD student (paired, 95 % CI)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(study["name"] or "study")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
