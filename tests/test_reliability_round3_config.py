"""Reliability round 3 (issue 22), configs and the small tasks: every bad setting fails at load
naming the key (and the file), a diverged small-task run exits != 0 naming the stage and the
setting, and the toy engine's progress output suits log files (issue 18)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcseg_kd.config import ConfigError, load_config
from pcseg_kd.engine.kitti.schema import check_num_classes, load_kitti_experiment
from pcseg_kd.engine.toy.schema import load_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/kitti/quickstart.yaml")
GAUSS_KD_PSSM = str(ROOT / "configs/gauss/kd_pssm.yaml")
GAUSS_DKD = str(ROOT / "configs/gauss/dkd.yaml")


def config_error(loader, path, overrides=()):
    with pytest.raises(ConfigError) as info:
        loader(path, list(overrides))
    return str(info.value)


# ----------------------------------------------------------------------------- files
def test_duplicate_key_names_the_key_the_file_and_both_lines(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("_base_: " + str(ROOT / "configs/gauss/kd.yaml") + "\n"
                   "student:\n  lr: 0.1\n  epochs: 10\n  lr: 0.5\n")
    msg = config_error(load_experiment, str(cfg))
    assert msg.startswith(f"{cfg}: ") and "duplicate key 'lr'" in msg and "line 3" in msg and "line 5" in msg


def test_duplicate_key_in_a_base_file_names_that_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("a: 1\na: 2\n")
    top = tmp_path / "top.yaml"
    top.write_text("_base_: base.yaml\nb: 3\n")
    with pytest.raises(ConfigError, match=rf"^{base}: .*duplicate key 'a'"):
        load_config(top)


def test_same_key_in_two_mappings_is_not_a_duplicate(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("teacher: {lr: 0.1}\nstudent: {lr: 0.2}\n")
    assert load_config(cfg)["student"]["lr"] == 0.2


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", bytes(range(128, 256))])
def test_binary_config_names_the_file(tmp_path, payload):
    cfg = tmp_path / "model.yaml"
    cfg.write_bytes(payload)
    with pytest.raises(ConfigError, match=rf"^{cfg}: not a text config \(not UTF-8"):
        load_config(cfg)


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("override, key", [
    ("student.optim.lr=.inf", "student.optim.lr"),
    ("teacher.optim.lr=.nan", "teacher.optim.lr"),
    ("distiller.ce_weight=.inf", "distiller.ce_weight"),
    ("distiller.kd_weight=.nan", "distiller.kd_weight"),
    ("student.loss.lovasz=.inf", "student.loss.lovasz"),
    ("data.train.voxel_size=[0.1,.nan,0.1]", r"data.train.voxel_size\[1\]"),
])
def test_kitti_non_finite_settings_fail_at_load_naming_the_key(override, key):
    msg = config_error(load_kitti_experiment, QUICK, [override])
    assert f"command line: {key.replace(chr(92), '')}: must be a finite number" in msg, msg


@pytest.mark.parametrize("override, key", [
    ("teacher.lr=.inf", "teacher.lr"), ("student.weight_decay=.nan", "student.weight_decay"),
    ("distiller.temperature=.inf", "distiller.temperature"), ("distiller.ce_weight=.inf", "distiller.ce_weight"),
])
def test_small_task_non_finite_settings_fail_at_load_naming_the_key(override, key):
    msg = config_error(load_experiment, GAUSS_KD_PSSM, [override])
    assert f"command line: {key}: must be a finite number" in msg, msg


@pytest.mark.parametrize("override, expected", [
    ("distiller.alpha=-1", "distiller: alpha must be a number >= 0"),
    ("distiller.beta=-0.5", "distiller: beta must be a number >= 0"),
    ("distiller.temperature=0", "distiller: temperature must be > 0"),
    ("distiller.warmup_epochs=-2", "distiller: warmup_epochs must be a number >= 0"),
])
def test_small_task_dkd_ranges(override, expected):
    assert expected in config_error(load_experiment, GAUSS_DKD, [override])


def test_kitti_dkd_alpha_beta_ranges():
    msg = config_error(load_kitti_experiment, QUICK, ["distiller={_delete_: true, type: dkd, beta: -1}"])
    assert "command line: distiller: beta must be a number >= 0" in msg


@pytest.mark.parametrize("tau", [996, -2])
def test_pssm_threshold_outside_what_it_compares(tau):
    msg = config_error(load_experiment, GAUSS_KD_PSSM, [f"distiller.pssm.tau={tau}"])
    assert f"kd_pssm.pssm.tau must be in [-1, 1] (it compares the cosine), got {tau}" in msg


@pytest.mark.parametrize("override, expected", [
    ("data.num_workers=-1", "command line: data.num_workers: must be >= 0"),
    (f"seed={2 ** 70}", f"command line: seed: must be a whole number >= 0 and < {2 ** 32}, got {2 ** 70}"),
    ("data.train.seed=-3", "command line: data.train.seed: must be a whole number in [0, 2**32), got -3"),
    ("teacher.loss_weights={logits: -1}", "command line: teacher.loss_weights: head weights must be >= 0"),
])
def test_kitti_ranges_name_the_key(override, expected):
    assert expected in config_error(load_kitti_experiment, QUICK, [override])


@pytest.mark.parametrize("override, expected", [
    (f"seeds.start={2 ** 70}", "seeds: seeds.start + seeds.num must be <= 2**32"),
    (f"seeds.values=[1,{2 ** 70}]", "seeds: seeds.values must be seeds >= 0 and < 2**32"),
])
def test_small_task_seed_range(override, expected):
    assert expected in config_error(load_experiment, GAUSS_KD_PSSM, [override])


# ----------------------------------------------------------------------------- classes
def test_num_classes_as_a_string_is_a_type_error_naming_the_key():
    msg = config_error(load_kitti_experiment, QUICK, ["student.model.num_classes='19'"])
    assert "command line: student.model.num_classes: expected int, got str '19'" in msg


@pytest.mark.parametrize("section, n", [("student", 20), ("teacher", 18)])
def test_num_classes_against_the_label_map_at_load(section, n):
    msg = config_error(load_kitti_experiment, QUICK, [f"{section}.model.num_classes={n}"])
    assert f"{section}.model.num_classes: {n} classes, but the data has 19" in msg
    assert f"set {section}.model.num_classes=19" in msg


def test_check_num_classes_function():
    cfg = load_kitti_experiment(QUICK)
    check_num_classes(cfg, 19)  # the quickstart's models: the label map's 19 classes
    with pytest.raises(ConfigError, match=r"^student.model.num_classes: 19 classes, but the data has 20"):
        check_num_classes(cfg, 20)
    # a baseline-only run builds no teacher: its teacher section is not checked
    cfg = load_kitti_experiment(QUICK, ["stages=[baseline]", "teacher.model.num_classes=7"])
    check_num_classes(cfg, 19)


# ----------------------------------------------------------------------------- small-task runs
DIVERGE = ["model.hidden=[8]", "seeds.num=2", "teacher.epochs=30", "student.epochs=30", "task.n_test=50"]


def test_diverged_teacher_raises_naming_stage_and_setting():
    from pcseg_kd.engine.toy.train import DivergedError, run_setting
    cfg = load_experiment(GAUSS_KD_PSSM, DIVERGE + ["teacher.lr=1e6"])
    with pytest.raises(DivergedError, match=r"^teacher diverged: non-finite weights .* in 2 of 2 seeds .*"
                                            r"teacher.lr=1e\+06 \(sgd, 30 epochs\)"):
        run_setting(cfg)


def test_diverged_student_names_the_distiller_settings():
    from pcseg_kd.engine.toy.train import DivergedError, run_setting
    # teacher and baseline train normally; the student is blown up by its KD term
    cfg = load_experiment(GAUSS_KD_PSSM, DIVERGE + ["distiller.kd_weight=1e6"])
    with pytest.raises(DivergedError) as info:
        run_setting(cfg)
    msg = str(info.value)
    assert msg.startswith("student (kd_pssm) diverged: non-finite weights after training in 2 of 2 seeds"), msg
    assert "student.lr=0.1 (sgd, 30 epochs)" in msg and "kd_weight=1000000.0" in msg


def test_diverged_run_exits_nonzero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "tools/train.py", GAUSS_KD_PSSM, *DIVERGE, "teacher.lr=1e6",
                        "--work-dir", str(tmp_path / "w"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    assert "error: teacher diverged" in r.stderr and "teacher.lr=1e+06" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w" / "metrics.json").exists()


def test_toy_progress_bars_stay_out_of_log_files(capfd):
    from pcseg_kd.engine.toy.train import run_setting
    cfg = load_experiment(GAUSS_KD_PSSM, ["seeds.num=1", "teacher.epochs=5", "student.epochs=5", "model.hidden=[4]"])
    run_setting(cfg, progress=True)  # stderr is a pipe here, as in a log file
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err


def test_toy_progress_bars_on_a_terminal(monkeypatch, capfd):
    import pcseg_kd.engine.toy.train as toy
    monkeypatch.setattr(toy.sys.stderr, "isatty", lambda: True, raising=False)
    assert toy.show_progress(True) and not toy.show_progress(False)


SWEEP = ["seeds.num=1", "teacher.epochs=5", "student.epochs=5", "sweep.shift_values=[10]",
         "sweep.methods={_delete_: true, KD: kd.yaml, DKD: dkd.yaml}", "task.n_test=50"]


def test_sweep_prints_a_line_per_cell_and_says_when_it_resumes(tmp_path, capsys):
    from pcseg_kd.engine.toy.sweep import run_sweep
    path = str(ROOT / "configs/gauss/sweep_table8.yaml")
    run_sweep(path, SWEEP, tmp_path, progress=False)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split(":")[0] for ln in lines] == ["[1/2] task.overlap=10 KD", "[2/2] task.overlap=10 DKD"], out
    assert "resuming" not in out
    cell = json.loads(next((tmp_path / "cells").glob("10__*.json")).read_text())
    assert f"student {cell['metrics']['student_acc_mean']:.2f}" in out
    next(p for p in (tmp_path / "cells").glob("*.json") if json.loads(p.read_text())["label"] == "DKD").unlink()
    run_sweep(path, SWEEP, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "resuming: 1 of 2 cells done" in out
    assert "[1/2] task.overlap=10 KD" in out and "(done before)" in out.splitlines()[1]


def test_warmup_longer_than_training_warns():
    with pytest.warns(UserWarning, match=r"command line: distiller.warmup_epochs=2000 exceeds student.epochs=1000: "
                                         r"the KD term ends at 50%"):
        load_experiment(GAUSS_DKD, ["distiller.warmup_epochs=2000"])


def test_warmup_within_training_is_silent(recwarn):
    load_experiment(GAUSS_DKD, ["distiller.warmup_epochs=20"])
    assert not [w for w in recwarn if "warmup_epochs" in str(w.message)]


# ----------------------------------------------------------------------------- work folders
def test_dangling_symlink_work_dir_is_a_usage_error(tmp_path, capsys):
    from pcseg_kd.engine.runner import parse_args
    link = tmp_path / "work"
    link.symlink_to(tmp_path / "gone")
    for target, expected in ((link, f"--work-dir {link}: a symlink to {tmp_path / 'gone'}, which does not exist"),
                             (link / "sub", f"--work-dir {link / 'sub'}: {link} is a symlink to")):
        with pytest.raises(SystemExit) as info:
            parse_args("x", ["cfg.yaml", "--work-dir", str(target)])
        assert info.value.code == 2
        assert expected in capsys.readouterr().err
    (tmp_path / "gone").mkdir()  # the link resolves now: accepted
    assert parse_args("x", ["cfg.yaml", "--work-dir", str(link)]).work_dir == str(link)


@pytest.mark.parametrize("distiller, expected", [
    ("{_delete_: true, type: rkd, distance_weight: -1}", "distiller: distance_weight must be a number >= 0"),
    ("{_delete_: true, type: rkd, eps: 0}", "distiller: eps must be > 0"),
    ("{_delete_: true, type: crd, momentum: 1.5}", "distiller: momentum must be in [0, 1), got 1.5"),
    ("{_delete_: true, type: crd, temperature: -0.07}", "distiller: temperature must be > 0"),
    ("{_delete_: true, type: pkt, eps: -1}", "distiller: eps must be > 0"),
])
def test_feature_distiller_ranges(distiller, expected):
    assert expected in config_error(load_experiment, str(ROOT / "configs/gauss/kd.yaml"), [f"distiller={distiller}"])
