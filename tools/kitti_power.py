#!/usr/bin/env python
"""Power analysis of a SemanticKITTI experiment: how many seeds tell its distillation effect
from the seed spread, and where that spread comes from.

    python tools/kitti_power.py configs/kitti/quickstart.yaml --seeds 5 --work-dir work_dirs/power_qs
    python tools/kitti_power.py configs/kitti/quickstart.yaml --seeds 5 --work-dir work_dirs/power_qs \\
        data.synthetic.scene.density=2 student.optim.epochs=30          # a candidate scale
    python tools/kitti_power.py configs/kitti/quickstart.yaml --seeds 5 --work-dir W --analyse-only

Trains the config's teacher once (``--teacher-seed``, in ``WORK/teacher``; or reuse one with
``--teacher-checkpoint``), then for each seed the no-KD student and the distilled student
(stages ``baseline`` and ``student`` of one run, ``WORK/seedS``, the seed driving
initialisation, shuffling and augmentation of both), each an ordinary ``tools/train.py`` work
folder, so a killed analysis resumes where it stopped (rerun the same command). With
``distiller.teacher_source: cache`` every seed reads one cache (``WORK/teacher_cache``).

Prints, and writes to ``WORK/power.md`` and ``WORK/power.json``: the no-KD student's mean ±
std over seeds; the paired Δ (distilled − no-KD of the same seed) with its 95 % t-interval
and half-width, and the seeds that interval would need to reach ``--target`` at the measured
std; per class, the IoU's std over seeds and its share of the variance of the mIoU and of the
Δ (the shares sum to 100 %: a class's covariance with the mean over classes, so one that
moves against the others has a negative share); and the confusions (share of a class's
labelled points predicted as another class) that move most between seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.metrics.paired import ci95, format_delta, paired_delta, t_quantile  # noqa: E402
from pcseg_kd.utils.cli import run_main  # noqa: E402
from pcseg_kd.utils.io import read_json, write_json  # noqa: E402

STAGES = ("baseline", "student")


# ----------------------------------------------------------------------------- analysis
def seeds_for(std: Optional[float], target: float, limit: int = 1000) -> Optional[int]:
    """The fewest seeds whose 95 % t-interval half-width is at most ``target`` for a paired
    difference of sample std ``std`` (None beyond ``limit`` or without a std)."""
    if std is None:
        return None
    for n in range(2, limit + 1):
        if t_quantile(0.975, n - 1) * std / math.sqrt(n) <= target:
            return n
    return None


def iou_matrix(runs: List[Dict[str, Any]], stage: str, metric: str, classes: List[str]) -> np.ndarray:
    """(seeds, classes) IoU in %, a class absent from the validation rows as 0 (as the mIoU
    counts it, so that the row means are the mIoUs)."""
    return np.array([[run[stage][metric]["iou"].get(c) or 0.0 for c in classes] for run in runs], dtype=np.float64)


def variance_shares(x: np.ndarray) -> Dict[str, Any]:
    """Per column of ``x`` (seeds × classes): its std over seeds and its share of the variance
    of the row mean, cov(x_c, mean) / var(mean); the shares sum to 1."""
    n, c = x.shape
    std = x.std(0, ddof=1) if n > 1 else np.full(c, np.nan)
    if n < 2:
        return {"std": std, "share": np.full(c, np.nan), "total_var": float("nan")}
    cov = np.cov(x, rowvar=False, ddof=1).reshape(c, c)
    total = cov.sum() / c ** 2  # var of the mean over classes
    share = cov.sum(1) / c ** 2 / total if total > 0 else np.full(c, np.nan)
    return {"std": std, "share": share, "total_var": float(total)}


def confusion_moves(confs: List[np.ndarray], classes: List[str], top: int) -> List[Dict[str, Any]]:
    """The off-diagonal entries of the row-normalised confusion (% of class ``label``'s points
    predicted as ``predicted``; the last column, points without a prediction, as "miss") whose
    std over seeds is largest."""
    rates = []
    for conf in confs:
        rows = conf.sum(1, keepdims=True)
        rates.append(np.where(rows > 0, 100.0 * conf / np.maximum(rows, 1), np.nan))
    rates = np.stack(rates)  # seeds × C × (C + 1)
    names = list(classes) + ["miss"]
    out = []
    for i, label in enumerate(classes):
        for j, pred in enumerate(names):
            if i == j or np.isnan(rates[:, i, j]).any():
                continue
            v = rates[:, i, j]
            out.append({"label": label, "predicted": pred, "per_seed": v.tolist(), "mean": float(v.mean()),
                        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0})
    out.sort(key=lambda e: -e["std"])
    return out[:top]


def analyse(runs: List[Dict[str, Any]], seeds: List[int], metric: str, target: float, top: int,
            teacher: Optional[Dict[str, Any]] = None,
            confusions: Optional[Dict[str, List[np.ndarray]]] = None) -> Dict[str, Any]:
    """Everything the report prints, from each seed's ``metrics.json`` (``runs``, in the order of
    ``seeds``), the teacher's (optional) and each stage's confusion matrices per seed (optional)."""
    classes = list(runs[0]["baseline"][metric]["iou"])
    base = [r["baseline"][metric]["miou"] for r in runs]
    student = [r["student"][metric]["miou"] for r in runs]
    d = paired_delta(student, base)
    b_iou, s_iou = iou_matrix(runs, "baseline", metric, classes), iou_matrix(runs, "student", metric, classes)
    vb, vd = variance_shares(b_iou), variance_shares(s_iou - b_iou)
    out: Dict[str, Any] = {
        "metric": metric, "seeds": seeds, "baseline": base, "student": student,
        "baseline_mean": float(np.mean(base)), "baseline_std": float(np.std(base, ddof=1)) if len(base) > 1 else None,
        "student_mean": float(np.mean(student)),
        "student_std": float(np.std(student, ddof=1)) if len(student) > 1 else None,
        "delta": {k: d[k] for k in ("n", "mean", "std", "t", "half_width", "low", "high", "excludes_zero")},
        "delta_ci95": ci95(d), "target_half_width": target, "seeds_for_target": seeds_for(d["std"], target),
        "classes": [{"class": c, "baseline_mean": float(b_iou[:, i].mean()), "baseline_std": float(vb["std"][i]),
                     "baseline_share": float(vb["share"][i]), "delta_mean": float((s_iou - b_iou)[:, i].mean()),
                     "delta_std": float(vd["std"][i]), "delta_share": float(vd["share"][i])}
                    for i, c in enumerate(classes)],
    }
    if teacher is not None:
        t = teacher["teacher"]["in_view"]["miou"]
        base_in_view = [r["baseline"]["in_view"]["miou"] for r in runs]
        out["teacher_in_view"] = t
        out["teacher_minus_baseline_in_view"] = t - float(np.mean(base_in_view))
    if confusions:
        out["confusions"] = {stage: confusion_moves(c, classes, top) for stage, c in confusions.items() if c}
    return out


def fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(a: Dict[str, Any], title: str) -> str:
    seeds = a["seeds"]
    lines = [f"# Power analysis: {title}", ""] + ([f"`{a['command']}`", ""] if a.get("command") else []) + [
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), val mIoU (%) on "
             f"{'in-view points' if a['metric'] == 'in_view' else 'full scans'}.", "",
             "| seed | no-KD student | distilled student | Δ |", "|---|---|---|---|"]
    for s, b, st in zip(seeds, a["baseline"], a["student"]):
        lines.append(f"| {s} | {b:.2f} | {st:.2f} | {st - b:+.2f} |")
    d = a["delta"]
    lines += ["", f"- no-KD student: {a['baseline_mean']:.2f} ± {fmt(a['baseline_std'])} (mean ± sample std over seeds)",
              f"- distilled student: {a['student_mean']:.2f} ± {fmt(a['student_std'])}",
              f"- paired Δ (distilled − no-KD, same seed): {format_delta(d)}"
              + (f"; half-width {d['half_width']:.2f}" if d["half_width"] is not None else ""),
              f"- seeds for a half-width ≤ {a['target_half_width']:g} at this Δ std: "
              + (str(a["seeds_for_target"]) if a["seeds_for_target"] else "– (no std, or more than 1000)")]
    if "teacher_in_view" in a:
        lines.append(f"- teacher: {a['teacher_in_view']:.2f} in view, {a['teacher_minus_baseline_in_view']:+.2f} "
                     "over the no-KD student's mean")
    lines += ["", "## Where the spread comes from", "",
              "Per class: IoU mean ± std over seeds, and its share of the variance of the mIoU (no-KD student) "
              "and of the Δ (shares sum to 100 %; an absent class counts 0, as in the mIoU).", "",
              "| class | no-KD IoU | share of no-KD variance | Δ IoU | share of Δ variance |", "|---|---|---|---|---|"]
    def size(v: float) -> float:
        return 0.0 if math.isnan(v) else -abs(v)

    def pct(v: float) -> str:
        return "–" if math.isnan(v) else f"{100 * v:.1f} %"
    for c in sorted(a["classes"], key=lambda c: (size(c["delta_share"]), size(c["baseline_share"]))):
        lines.append(f"| {c['class']} | {c['baseline_mean']:.1f} ± {fmt(c['baseline_std'], '.1f')} | "
                     f"{pct(c['baseline_share'])} | {c['delta_mean']:+.1f} ± {fmt(c['delta_std'], '.1f')} | "
                     f"{pct(c['delta_share'])} |")
    for stage, moves in (a.get("confusions") or {}).items():
        name = "no-KD student" if stage == "baseline" else "distilled student"
        lines += ["", f"## Confusions that move most between seeds ({name})", "",
                  "% of the class's labelled points predicted as the other class, per seed; sorted by std.", "",
                  "| label → predicted | per seed | mean ± std |", "|---|---|---|"]
        for m in moves:
            lines.append(f"| {m['label']} → {m['predicted']} | {' / '.join(f'{v:.1f}' for v in m['per_seed'])} | "
                         f"{m['mean']:.1f} ± {m['std']:.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- training
def stage_confusion(cfg: Dict[str, Any], ckpt: Path, metric: str) -> List[List[int]]:
    """The confusion matrix of a stage's final checkpoint on the validation set."""
    import torch

    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti.data import ShardedBatchSampler, make_loader
    from pcseg_kd.engine.kitti.evaluate import evaluate
    from pcseg_kd.engine.kitti.teacher import load_frozen
    from pcseg_kd.registry import DATASETS

    device = torch.device("cuda" if cfg["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    env = DistEnv(device=device)
    model = load_frozen(ckpt, cfg["student"]["model"], device)
    val = DATASETS.build(cfg["data"]["val"])
    sampler = ShardedBatchSampler(len(val), cfg["student"]["optim"]["batch_size"], False, 0, env, False)
    out = evaluate(model, make_loader(val, sampler, cfg["data"]["num_workers"], device), env, model.num_classes,
                   val.ignore_index, val.class_names, confusion=True)
    return out[metric]["confusion"]


def seed_confusions(cfg: Dict[str, Any], seed_dir: Path, metric: str) -> Optional[Dict[str, np.ndarray]]:
    """Both stages' confusion matrices, kept in ``seed_dir/confusion.json`` beside the
    checkpoints they came from (recomputed when a checkpoint changed)."""
    cache = read_json(seed_dir / "confusion.json", default=None) or {}
    out, changed = {}, False
    for stage in STAGES:
        ckpt = seed_dir / stage / "final.pt"
        if not ckpt.is_file():
            if stage in cache.get(metric, {}):  # analysed before, checkpoint since removed
                out[stage] = np.array(cache[metric][stage]["confusion"])
                continue
            return None
        stat = ckpt.stat()
        ident = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(metric, {}).get(stage)
        if entry is None or entry.get("checkpoint") != ident:
            entry = {"checkpoint": ident, "confusion": stage_confusion(cfg, ckpt, metric)}
            cache.setdefault(metric, {})[stage] = entry
            changed = True
        out[stage] = np.array(entry["confusion"])
    if changed:
        write_json(seed_dir / "confusion.json", cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="experiment YAML with a distiller (the distilled student)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of every run (a candidate scale)")
    ap.add_argument("--seeds", type=int, required=True, help="number of seeds (5 or more for a usable interval)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST .. FIRST + N - 1")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: work_dirs/power/<config stem>")
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--teacher-checkpoint", type=Path, default=None, help="reuse a trained teacher's final.pt")
    ap.add_argument("--metric", choices=("in_view", "all"), default="in_view")
    ap.add_argument("--target", type=float, default=1.5, help="95 %% half-width to plan the seed count for")
    ap.add_argument("--top", type=int, default=8, help="confusions to list per student")
    ap.add_argument("--analyse-only", action="store_true", help="train nothing: analyse the finished seeds")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options
    if args.seeds < 2:
        raise ValueError(f"--seeds must be at least 2 (an interval needs 2; use 5 or more), got {args.seeds}")
    if not args.target > 0:
        raise ValueError(f"--target must be > 0, got {args.target}")
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    work = args.work_dir or Path("work_dirs") / "power" / Path(args.config).stem
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    overrides = list(args.overrides)
    probe = load_kitti_experiment(args.config, overrides)  # a bad config fails before anything trains
    if (probe["distiller"].get("type") or "none") == "none":
        raise ValueError(f"{args.config}: distiller.type is none: the power analysis compares a distilled "
                         "student with the no-KD student; give a config with a distiller")
    teacher_dir = work / "teacher"
    ckpt = args.teacher_checkpoint or teacher_dir / "teacher" / "final.pt"
    if args.teacher_checkpoint is not None and not ckpt.is_file():
        raise FileNotFoundError(f"--teacher-checkpoint {ckpt} does not exist")
    seed_over = [f"teacher_checkpoint={ckpt}"]
    if probe["distiller"].get("teacher_source") == "cache" and not probe["distiller"].get("teacher_cache"):
        seed_over.append(f"distiller.teacher_cache={work / 'teacher_cache'}")  # one export for every seed
    cfgs = {s: load_kitti_experiment(args.config, overrides + seed_over + [f"seed={s}", "stages=[baseline,student]"])
            for s in seeds}
    if not args.analyse_only:
        train(args, overrides, teacher_dir, cfgs, work)
    runs, missing = [], []
    for s in seeds:
        m = read_json(work / f"seed{s}" / "metrics.json", default=None) or {}
        if all(args.metric in m.get(stage, {}) for stage in STAGES):
            runs.append(m)
        else:
            missing.append(s)
    if missing:
        raise ValueError(f"{work}: seeds {missing} have no finished no-KD and distilled student "
                         f"({work}/seedS/metrics.json); run without --analyse-only to train them")
    teacher = read_json(teacher_dir / "metrics.json", default=None) if args.teacher_checkpoint is None else None
    confusions: Dict[str, List[np.ndarray]] = {stage: [] for stage in STAGES}
    for s in seeds:
        saved = work / f"seed{s}" / "config.yaml"  # what the seed was trained with, whatever this command says
        cfg = yaml.safe_load(saved.read_text()) if saved.is_file() else cfgs[s]
        c = seed_confusions(cfg, work / f"seed{s}", args.metric)
        if c is None:
            confusions = {}
            print(f"note: {work / f'seed{s}'} has no final checkpoints: confusions left out", flush=True)
            break
        for stage in STAGES:
            confusions[stage].append(c[stage])
    a = analyse(runs, seeds, args.metric, args.target, args.top,
                teacher if teacher and "teacher" in teacher else None, confusions)
    a["command"] = " ".join(["python tools/kitti_power.py", args.config] + overrides + ["--seeds", str(args.seeds)])
    title = " ".join([args.config] + overrides)
    text = report(a, title)
    from pcseg_kd.config import atomic_write_text
    write_json(work / "power.json", a)
    atomic_write_text(work / "power.md", text)
    print(text + f"\nwrote {work / 'power.md'}, {work / 'power.json'}")
    return 0


def train(args, overrides: List[str], teacher_dir: Path, cfgs: Dict[int, Dict[str, Any]], work: Path) -> None:
    """The teacher once, then each seed's no-KD and distilled students (each run resumes)."""
    from pcseg_kd.config import save_config
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.kitti.train import run_kitti
    from pcseg_kd.utils.lock import work_dir_lock

    env = init_distributed(next(iter(cfgs.values()))["device"])
    try:
        todo = []
        if args.teacher_checkpoint is None:
            t_cfg = load_kitti_experiment(args.config, overrides + [f"seed={args.teacher_seed}", "stages=[teacher]"])
            todo.append(("teacher", teacher_dir, t_cfg))
        todo += [(f"seed {s}", work / f"seed{s}", cfg) for s, cfg in cfgs.items()]
        for i, (what, folder, cfg) in enumerate(todo):
            if env.is_main:
                print(f"== [{i + 1}/{len(todo)}] {what} -> {folder}", flush=True)
            with (work_dir_lock(folder) if env.is_main else contextlib.nullcontext()):
                if env.is_main:
                    save_config(cfg, folder / "config.yaml")
                run_kitti(cfg, folder, env, progress=not args.no_progress)
    finally:
        cleanup(env)


if __name__ == "__main__":
    sys.exit(run_main(main))
