"""A short end-to-end sweep on the embedded digits default: every method of Table 10 over
two noise levels, through the engine's sweep, plus config validation of every
digits/mnist config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import pcseg_kd.data.mnist_task  # noqa: F401  (registers "digits" and "mnist")
import pcseg_kd.engine.toy.sweep as sweep_mod
from pcseg_kd.engine.toy.schema import load_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ["seeds.num=2", "teacher.epochs=2", "student.epochs=2", "task.n_train=256", "task.n_test=128",
        "sweep.shift_values=[0,5]"]
METHODS = ["FitNet", "CRD", "RKD", "PKT", "SP", "KL", "KL+PSSM", "DKD", "DKD+PSSM"]


def test_digits_table10_sweep_end_to_end(tmp_path):
    cfg = str(ROOT / "configs/digits/sweep_table10.yaml")
    summary = sweep_mod.run_sweep(cfg, TINY, tmp_path, progress=False)
    assert summary["methods"] == METHODS and summary["shift_values"] == [0, 5]
    for method in METHODS:
        for level in ("0", "5"):
            m = summary["results"][method][level]
            assert m["n_seeds"] == 2
            for key in ("teacher_acc_mean", "baseline_acc_mean", "student_acc_mean", "student_acc_std"):
                assert math.isfinite(m[key]) and 0 <= m[key] <= 100, (method, level, key)
    # teacher and no-KD baseline are shared by every method of a level; the baseline does
    # not see the teacher's noise, the teacher does
    r = summary["results"]
    assert r["FitNet"]["5"]["baseline_acc_mean"] == r["DKD+PSSM"]["5"]["baseline_acc_mean"] \
        == r["DKD"]["0"]["baseline_acc_mean"]
    assert r["DKD"]["0"]["teacher_acc_mean"] != r["DKD"]["5"]["teacher_acc_mean"]
    assert summary["levels"]["5"]["input_cmd"] != summary["levels"]["0"]["input_cmd"]
    md = (tmp_path / "results.md").read_text()
    assert "/ 82.78 |" in md and "/ 76.20 |" in md  # the paper's Table 10 beside ours
    assert json.loads((tmp_path / "results.json").read_text())["results"]["CRD"]["5"]["n_seeds"] == 2


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")
                                        if p.parent.name in ("digits", "mnist") and p.name != "_base_.yaml"))
def test_configs_validate(path):
    cfg = load_experiment(str(ROOT / path))
    assert cfg["task"]["type"] == path.split("/")[1]
    assert cfg["model"]["hidden"] == ([1024, 256] if "mnist" in path else [256, 64])
