"""tools/sweep.py end to end on a tiny grid, resuming from finished cells."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pcseg_kd.engine.toy.sweep as sweep_mod

ROOT = Path(__file__).resolve().parents[1]
TINY = ["seeds.num=3", "teacher.epochs=20", "student.epochs=20", "sweep.shift_values=[10,0]"]


def test_sweep_writes_tables_and_resumes(tmp_path, monkeypatch):
    # teacher and baseline are trained once per shift level, shared by the 4 methods
    import pcseg_kd.engine.toy.train as toy
    calls = []
    real = toy.train_teacher_and_baseline
    monkeypatch.setattr(toy, "train_teacher_and_baseline", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = sweep_mod.run_sweep(str(ROOT / "configs/gauss/sweep_table8.yaml"), TINY, tmp_path, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"] == ["KD", "KL+PSSM", "DKD", "DKD+PSSM"] and res["shift_values"] == [10, 0]
    md = (tmp_path / "results.md").read_text()
    assert "KL+PSSM" in md and "/ 73.51 |" in md and "/ 68.44 |" in md  # our numbers beside the paper's
    assert (tmp_path / "accuracy_vs_cmd.png").stat().st_size > 10_000
    assert len(list((tmp_path / "cells").glob("*.json"))) == 8
    assert len(calls) == 2

    # a rerun takes every cell from disk
    def boom(*a, **k):
        raise AssertionError("recomputed a finished cell")
    monkeypatch.setattr(sweep_mod, "run_setting", boom)
    again = sweep_mod.run_sweep(str(ROOT / "configs/gauss/sweep_table8.yaml"), TINY, tmp_path, progress=False)
    assert again["results"] == summary["results"]
    # a changed config invalidates the cells
    with pytest.raises(AssertionError, match="recomputed"):
        sweep_mod.run_sweep(str(ROOT / "configs/gauss/sweep_table8.yaml"), TINY + ["student.lr=0.2"], tmp_path,
                            progress=False)


def test_train_cli_writes_metrics_and_config(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), str(ROOT / "configs/gauss/dkd_pssm.yaml"),
                          "seeds.num=2", "teacher.epochs=5", "student.epochs=5", "--work-dir", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_seeds"] == 2 and len(m["per_seed"]["student_acc"]) == 2
    assert "dkd_pssm" in (tmp_path / "config.yaml").read_text()


def test_train_cli_rejects_bad_config_before_work(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), str(ROOT / "configs/gauss/kd.yaml"),
                          "distiller.alpha=2", "--work-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "invalid config" in out.stderr and "distiller.alpha: unknown key for distiller 'kd'" in out.stderr
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "config.yaml").exists()
    # a bad value inside a section (not only an unknown key) also fails before any training
    out = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), str(ROOT / "configs/gauss/kd_pssm.yaml"),
                          "distiller.pssm.tuo=0.9", "--work-dir", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode != 0 and "unknown PSSM option" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "config.yaml").exists()
