#!/usr/bin/env python
"""Compare teacher, no-KD baseline and distilled student over runs (seeds) of one config.

    python tools/kitti_compare.py work_dirs/qs_s0 work_dirs/qs_s1 work_dirs/qs_s2
    python tools/kitti_compare.py work_dirs/qs_s0 work_dirs/qs_s1 --students work_dirs/cache_s0 work_dirs/cache_s1

Reads each work folder's metrics.json (written by tools/train.py with stages teacher,
baseline, student) and prints, on the in-view points (the rows all three are scored on):
a Markdown table of mIoU per run with the paired differences student − baseline and
teacher − baseline, mean ± sample std over the runs with the differences' 95 % t-interval
(marked * where it excludes 0: only then is a difference more than the seed spread), and the
per-class transfer check: the correlation, over classes present in a run, between the
teacher's and the student's per-class IoU gain over the baseline (does distillation move the
student towards the teacher's classes?).
``--students`` takes the students from other work folders, one per run (a student-only run that
reused that run's teacher, e.g. another distiller or ``distiller.teacher_source=cache``).
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.metrics.paired import format_delta, paired_delta  # noqa: E402
from pcseg_kd.utils.io import read_json  # noqa: E402

STAGES = ("teacher", "baseline", "student")


def load(work: Path, student: Path = None) -> dict:
    m = read_json(work / "metrics.json")
    if student is not None:
        other = read_json(student / "metrics.json")
        if "in_view" not in other.get("student", {}):
            raise ValueError(f"{student / 'metrics.json'}: no in-view result for the student")
        m["student"] = other["student"]
    missing = [s for s in STAGES if "in_view" not in m.get(s, {})]
    if missing:
        raise ValueError(f"{work / 'metrics.json'}: no in-view result for {', '.join(missing)} "
                         "(train with stages=[teacher,baseline,student])")
    return m


def correlation(x, y):
    if len(x) < 2:
        return float("nan")
    mx, my = statistics.mean(x), statistics.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return sxy / (sx * sy) if sx and sy else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dirs", nargs="+", type=Path)
    p.add_argument("--students", nargs="+", type=Path, default=None,
                   help="take each run's student from these work folders instead (one per run)")
    args = p.parse_args(argv)
    if args.students is not None and len(args.students) != len(args.work_dirs):
        raise SystemExit(f"error: --students: {len(args.students)} folders for {len(args.work_dirs)} runs")
    rows, pooled = [], ([], [])
    print("| run | teacher | baseline (no KD) | student | student − baseline | teacher − baseline | per-class corr |")
    print("|---|---|---|---|---|---|---|")
    for i, work in enumerate(args.work_dirs):
        m = load(work, args.students[i] if args.students else None)
        t, b, s = (m[k]["in_view"]["miou"] for k in STAGES)
        it, ib, is_ = (m[k]["in_view"]["iou"] for k in STAGES)
        present = [c for c in it if None not in (it[c], ib[c], is_[c])]
        gain_t = [it[c] - ib[c] for c in present]
        gain_s = [is_[c] - ib[c] for c in present]
        pooled[0].extend(gain_t)
        pooled[1].extend(gain_s)
        rows.append((t, b, s))
        print(f"| {work} | {t:.2f} | {b:.2f} | {s:.2f} | {s - b:+.2f} | {t - b:+.2f} | {correlation(gain_t, gain_s):.2f} |")
    cols = list(zip(*rows))
    diff_s, diff_t = paired_delta(cols[2], cols[1]), paired_delta(cols[0], cols[1])
    if len(rows) > 1:
        def f(v):
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
        print(f"| mean ± std ({len(rows)} runs) | {f(cols[0])} | {f(cols[1])} | {f(cols[2])} | {format_delta(diff_s)} | "
              f"{format_delta(diff_t)} | {correlation(*pooled):.2f} (pooled) |")
    print()
    print("Paired differences over the runs (each run's student and teacher against its own baseline): "
          "mean ± sample std, 95 % t-interval; * marks an interval that excludes 0.")
    print(f"  student − baseline: {format_delta(diff_s)}")
    print(f"  teacher − baseline: {format_delta(diff_t)}")
    if len(rows) < 2:
        print("  One run decides nothing: a difference needs runs of several seeds to be told from the seed spread.")


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))
