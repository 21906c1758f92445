"""tools/gpu_check.sh, the one command a lent GPU runs (issue 19): its plumbing on a CPU
(DEVICE=cpu: tiny sizes, spconv on both sides of the parity check), so that no device time
goes to a typo; its time budget and its output's fit to what the device tool brings back."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools/gpu_check.sh"
needs_spconv = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")


def dry_run(tmp_path, checks):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "WHEELS": str(tmp_path / "no_wheels"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CHECKS": checks}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return r, tmp_path / "out"


def gpu_branch_timeouts():
    """The seconds each sequential step of the GPU branch may take, read from the script."""
    text = SCRIPT.read_text()
    gpu = text[text.index("\nelse\n"):text.index("\nfi\n", text.index("\nelse\n"))]
    steps = {k: int(v) for k, v in re.findall(r"\b(T_[A-Z_]+)=(\d+)", gpu)}
    # fixed timeouts outside the branch, except the two background generations (they overlap steps 1-2)
    fixed = [int(t) for t in re.findall(r"\btimeout (\d+) ", text)]
    background = [int(t) for t in
                  re.findall(r"timeout (\d+) \$PY tools/make_synthetic_kitti.py --out \"\$(?:DATA|QUICK)\"", text)]
    return steps, fixed, background


def test_gpu_budget_fits_nine_minutes():
    steps, fixed, background = gpu_branch_timeouts()
    assert set(steps) == {"T_PARITY", "T_LOSS_TESTS", "T_LOSS_BENCH", "T_STEPS", "T_TRAIN", "T_TEST"}
    assert len(background) == 2
    for t in background:
        fixed.remove(t)
    sequential = sum(steps.values()) + sum(fixed)
    assert sequential <= 540, (steps, fixed)
    # the background generations end before the first step that reads their data (steps 3, 4)
    assert max(background) <= steps["T_PARITY"] + steps["T_LOSS_TESTS"] + steps["T_LOSS_BENCH"]


@needs_spconv
def test_dry_run_parity_and_environment(tmp_path):
    r, out = dry_run(tmp_path, "parity")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env = (out / "env.txt").read_text()
    assert "backend auto on cpu -> spconv" in env and re.search(r"env rc=0 parity rc=0 \n?$", env)
    report = json.loads((out / "parity.json").read_text())
    assert report["ok"] and report["backend"] == "spconv" and list(report["sizes"]) == ["tiny"]
    checks = report["sizes"]["tiny"]["checks"]
    assert {"point_valid", "sites_down0", "sites_up3", "logits_train", "logits_eval", "grads"} <= set(checks)
    assert checks["grads"]["params"] > 20
    # the same package and thread count on both sides: the same float32 numbers
    assert checks["logits_train"]["rel_err"] == checks["logits_train"]["cpu_fp32_rel_err"]


@pytest.mark.slow
@needs_spconv
def test_dry_run_every_step(tmp_path):
    r, out = dry_run(tmp_path, "parity loss steps e2e")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # what the tool brings back
    assert files == sorted(["env.txt", "parity.txt", "parity.json", "loss.txt", "steps.txt", "steps.json",
                            "e2e.txt", "e2e_metrics.json"])
    assert "env rc=0 data rc=0 parity rc=0 loss_tests rc=0 loss_bench rc=0 steps rc=0 train rc=0 test rc=0" in \
        (out / "env.txt").read_text()
    steps = json.loads((out / "steps.json").read_text())
    assert set(steps["runs"]) == {"no_kd/fp32", "cached_kd/fp32", "online_teacher/fp32", "fusion_teacher/fp32"}
    assert all(run["scans_per_s"] > 0 and run["peak_mib"] is None for run in steps["runs"].values())
    e2e = (out / "e2e.txt").read_text()
    for stage in ("teacher", "baseline", "student"):
        assert re.search(rf"^{stage}: loss \(sum of the logged loss_\* terms\) [\d.]+ at step 1 -> ", e2e, re.M)
    assert "mIoU" in e2e and "passed" in (out / "loss.txt").read_text()
