"""tools/kitti_compare.py: paired differences and the per-class transfer correlation."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(work, t, b, s, iou_t, iou_b, iou_s):
    work.mkdir()
    def block(m, iou):
        return {"in_view": {"miou": m, "iou": iou, "points": 10}}
    (work / "metrics.json").write_text(json.dumps({"protocol": "fov", "distiller": "dkd_pssm", "teacher": block(t, iou_t),
                                                   "baseline": block(b, iou_b), "student": block(s, iou_s)}))


def test_compare_prints_paired_differences_and_the_transfer_correlation(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for i in range(2):
        it, ib, is_ = (dict(zip("abcde", rng.uniform(0, 100, 5).round(3))) for _ in range(3))
        it["f"], ib["f"], is_["f"] = None, None, None  # absent class: left out
        _run(tmp_path / f"r{i}", 40.0 + i, 30.0 + 2 * i, 33.0 - i, it, ib, is_)
        runs.append((it, ib, is_))
    out = subprocess.run([sys.executable, str(ROOT / "tools/kitti_compare.py"), str(tmp_path / "r0"), str(tmp_path / "r1")],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    it, ib, is_ = runs[0]
    gt = [it[c] - ib[c] for c in "abcde"]
    gs = [is_[c] - ib[c] for c in "abcde"]
    assert f"| {tmp_path / 'r0'} | 40.00 | 30.00 | 33.00 | +3.00 | +10.00 | {np.corrcoef(gt, gs)[0, 1]:.2f} |" == lines[2]
    # paired Δ student − baseline: +3, 0 -> mean 1.5, std 2.12, t(0.975, 1) = 12.706: half-width 19.06
    assert lines[4].startswith("| mean ± std (2 runs) | 40.50 ± 0.71 | 31.00 ± 1.41 | 32.50 ± 0.71 | "
                               "+1.50 ± 2.12 (n=2, 95 % CI [-17.56, +20.56]) | "
                               "+9.50 ± 0.71 (n=2, 95 % CI [+3.15, +15.85]) * |")
    assert "  student − baseline: +1.50 ± 2.12 (n=2, 95 % CI [-17.56, +20.56])" in lines
    assert "  teacher − baseline: +9.50 ± 0.71 (n=2, 95 % CI [+3.15, +15.85]) *" in lines


def test_compare_names_a_work_dir_without_the_three_stages(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "metrics.json").write_text(json.dumps({"teacher": {"in_view": {"miou": 1, "iou": {}}}}))
    r = subprocess.run([sys.executable, str(ROOT / "tools/kitti_compare.py"), str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no in-view result for baseline, student" in r.stderr


def test_students_from_other_work_dirs_replace_each_runs_student(tmp_path):
    iou = {"a": 10.0, "b": 20.0}
    _run(tmp_path / "r0", 40.0, 30.0, 33.0, iou, iou, iou)
    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / "metrics.json").write_text(json.dumps({"student": {"in_view": {"miou": 37.5, "iou": iou}}}))
    cmd = [sys.executable, str(ROOT / "tools/kitti_compare.py"), str(tmp_path / "r0"), "--students", str(tmp_path / "s0")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2].startswith(f"| {tmp_path / 'r0'} | 40.00 | 30.00 | 37.50 | +7.50 | +10.00 |")
    assert "  student − baseline: +7.50 (n=1, no interval: needs 2 or more seeds)" in out
    assert out[-1].startswith("  One run decides nothing")
    bad = subprocess.run(cmd + [str(tmp_path / "s0")], capture_output=True, text=True)
    assert bad.returncode == 1 and "--students: 2 folders for 1 runs" in bad.stderr
