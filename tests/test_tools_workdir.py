"""The tools read the run's own config (``--work-dir WORK`` alone), tools/test.py's per-class
table, ``--checkpoint best``, the fov / test-split refusal, the ``--sequences`` dry run and
``--overwrite``. The work folders are written by hand as tools/train.py writes them
(``config.yaml``, ``<stage>/final.pt``) with untrained tiny models: no training run."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides

pytestmark = needs_spconv


def tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    return tiny_synthetic(tmp_path_factory.mktemp("kitti_tools"), sequences=("00", "08", "11"), frames=2, seed=5)


def make_run(work, root, *extra, teacher=False, seed=0):
    """A work folder as tools/train.py leaves it: config.yaml and the stages' final.pt."""
    from pcseg_kd.engine.checkpoint import save_checkpoint
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.runner import save_config
    from pcseg_kd.registry import MODELS

    cfg = load_kitti_experiment(QUICK, tiny_overrides(root) + list(extra))
    save_config(cfg, work / "config.yaml")
    torch.manual_seed(seed)
    for stage in ["student"] + (["teacher"] if teacher else []):
        model = MODELS.build(cfg[stage]["model"])
        save_checkpoint(work / stage / "final.pt", {"model": model.state_dict(), "model_cfg": cfg[stage]["model"],
                                                    "config": cfg})
    return cfg


@pytest.fixture(scope="module")
def fov_run(data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("fov_run")
    make_run(work, data_root, teacher=True)
    return work


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("full_run")
    make_run(work, data_root, "protocol=full")
    return work


def test_test_py_with_work_dir_alone_reads_its_config_and_prints_the_table(fov_run, capsys):
    result = tool("test").main(["--work-dir", str(fov_run), "--no-progress"])
    out = capsys.readouterr().out
    assert f"config: {fov_run / 'config.yaml'} (the run's own)" in out
    m = result["metrics"]["all"]
    # the table's rows are the JSON's numbers, absent classes marked
    for name, v in m["iou"].items():
        row = [line.split() for line in out.splitlines() if line.startswith(name + " ")][0]
        assert row[1] == ("n/a" if v != v else f"{v:.2f}")
    present = [v for v in m["iou"].values() if v == v]
    assert f"all: mIoU {m['miou']:.2f} over 19 classes; {sum(present) / len(present):.2f} over the " \
           f"{len(present)} present" in out
    saved = json.loads((fov_run / "test_student_val.json").read_text())
    assert saved["metrics"]["all"]["miou"] == pytest.approx(m["miou"])


def test_overrides_and_a_given_config_win_and_say_so(fov_run, data_root, capsys):
    test = tool("test")
    result = test.main(["--work-dir", str(fov_run), "data.val.frame_stride=1", "--no-progress"])
    out = capsys.readouterr().out
    assert "command-line overrides win: data.val.frame_stride=1" in out
    assert result["scans"] == 2  # the saved config has every second scan: 1
    result = test.main([QUICK, *tiny_overrides(data_root), "--work-dir", str(fov_run), "--no-progress"])
    assert f"config: {QUICK} (given, so it wins over {fov_run / 'config.yaml'}" in capsys.readouterr().out
    assert result["scans"] == 1


def test_checkpoint_best_reads_best_pt_and_a_missing_one_says_so(fov_run, tmp_path, capsys):
    import shutil
    test = tool("test")
    with pytest.raises(SystemExit, match=r"best\.pt does not exist .*--checkpoint final"):
        test.main(["--work-dir", str(fov_run), "--checkpoint", "best", "--no-progress"])
    work = tmp_path / "run"
    shutil.copytree(fov_run, work)
    shutil.copy(work / "student" / "final.pt", work / "student" / "best.pt")
    result = test.main(["--work-dir", str(work), "--checkpoint", "best", "--no-progress"])
    assert result["checkpoint"] == str(work / "student" / "best.pt")
    assert (work / "test_student_val_best.json").is_file()


def test_no_config_and_no_work_dir_or_a_work_dir_without_config_is_one_clear_error(tmp_path):
    test = tool("test")
    with pytest.raises(SystemExit, match="give a CONFIG or --work-dir"):
        test.main([])
    with pytest.raises(SystemExit, match=f"{tmp_path / 'config.yaml'} does not exist"):
        test.main(["--work-dir", str(tmp_path)])


def test_split_test_under_fov_is_refused_unless_asked_for(fov_run, tmp_path, capsys):
    test = tool("test")
    preds = tmp_path / "preds"
    with pytest.raises(SystemExit) as e:
        test.main(["--work-dir", str(fov_run), "--split", "test", "--predictions", str(preds), "--no-progress"])
    msg = str(e.value)
    assert "protocol: fov" in msg and "84 %" in msg and "--allow-fov-test" in msg and "submission.yaml" in msg
    assert not preds.exists()
    result = test.main(["--work-dir", str(fov_run), "--split", "test", "--sequences", "11", "--allow-fov-test",
                        "--predictions", str(preds), "--no-progress"])
    assert result["written"] == 2


def test_sequences_dry_run_writes_only_that_subset_of_the_test_split(full_run, data_root, tmp_path, capsys):
    test = tool("test")
    preds = tmp_path / "sub"
    result = test.main(["--work-dir", str(full_run), "--split", "test", "--sequences", "11",
                        "--predictions", str(preds), "--no-progress"])
    files = sorted(p.relative_to(preds).as_posix() for p in preds.rglob("*.label"))
    assert files == ["sequences/11/predictions/000000.label", "sequences/11/predictions/000001.label"]
    for f in files:  # one uint32 per point of the scan, every point predicted (full protocol)
        scan = np.fromfile(data_root / f.replace("predictions", "velodyne").replace(".label", ".bin"), np.float32)
        raw = np.fromfile(preds / f, np.uint32)
        assert len(raw) == len(scan) // 4 and (raw != 0).all()
    assert result["sequences"] == ["11"] and "dry run on a subset" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="the test split is sequences 11-21"):
        test.main(["--work-dir", str(full_run), "--split", "test", "--sequences", "08", "--no-progress"])


def test_predictions_folder_with_labels_is_refused_unless_overwrite_which_removes_stale(full_run, tmp_path):
    test = tool("test")
    preds = tmp_path / "sub"
    args = ["--work-dir", str(full_run), "--split", "test", "--sequences", "11", "--predictions", str(preds),
            "--no-progress"]
    test.main(args)
    stale = preds / "sequences" / "12" / "predictions" / "000007.label"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 8)
    kept = preds / "sequences" / "11" / "predictions" / "000000.label"
    before = kept.read_bytes()
    os.utime(kept, (0, 0))
    with pytest.raises(SystemExit, match=r"already holds 3 \.label files.*--overwrite"):
        test.main(args)
    assert stale.exists() and kept.stat().st_mtime == 0  # nothing touched
    result = test.main(args + ["--overwrite"])
    assert result["removed_stale"] == 1 and not stale.exists()
    assert kept.read_bytes() == before and kept.stat().st_mtime > 0  # rewritten, same model


def test_export_teacher_with_work_dir_alone_reads_the_run_config(fov_run, tmp_path, capsys):
    export = tool("export_teacher")
    out = export.main(["--work-dir", str(fov_run), "--out", str(tmp_path / "cache"), "--no-progress"])
    printed = capsys.readouterr().out
    assert f"config: {fov_run / 'config.yaml'} (the run's own)" in printed
    assert out["frames"] == 2 and (tmp_path / "cache" / "meta.json").is_file()


def test_export_teacher_help_gives_kitti_override_examples():
    import subprocess
    import sys
    text = subprocess.run([sys.executable, str(ROOT / "tools/export_teacher.py"), "--help"], capture_output=True,
                          text=True, check=True).stdout
    assert "data.train.root=" in text and "seeds.num" not in text and "--work-dir" in text


def test_visualize_with_work_dir_and_pair_on_a_train_py_folder(fov_run, tmp_path, capsys):
    vis = tool("visualize_kitti")
    png = tmp_path / "labels.png"
    vis.main(["--work-dir", str(fov_run), "--frame", "08/000000", "--out", str(png)])
    assert png.stat().st_size > 0
    assert f"config: {fov_run / 'config.yaml'} (the run's own)" in capsys.readouterr().out
    omega = tmp_path / "omega.png"
    vis.main(["--pair", str(fov_run), "--frame", "08/000000", "--out", str(omega)])  # teacher/ and student/
    assert omega.stat().st_size > 0
    bare = tmp_path / "student_only"  # a student without its teacher: named, not a traceback
    (bare / "student").mkdir(parents=True)
    (bare / "config.yaml").write_bytes((fov_run / "config.yaml").read_bytes())
    (bare / "student" / "final.pt").write_bytes((fov_run / "student" / "final.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"teacher/final\.pt does not exist.*teacher_checkpoint"):
        vis.main(["--pair", str(bare), "--frame", "08/000000", "--out", str(tmp_path / "x.png")])
