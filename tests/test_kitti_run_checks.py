"""Issue 12 items in the training entry point: one run per work folder, values that make no
sense refused when the config loads (or before the first stage), a teacher checkpoint of the
wrong kind, the thread count in the fingerprint, skipped validation frames scored once, and
log-friendly progress output."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides, tiny_root
import torch




@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "kitti_run_checks", frames=2, seed=6)


def overrides(root, **extra):
    return tiny_overrides(root, student_epochs=1, steps=1, **{"student.optim.batch_size": 1,
                                                              "teacher.optim.batch_size": 1, **extra})


def test_a_second_run_on_the_same_work_dir_is_refused(tmp_path):
    from pcseg_kd.utils.lock import work_dir_lock
    with work_dir_lock(tmp_path / "w"):
        r = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), str(ROOT / "configs/gauss/none.yaml"),
                            "--work-dir", str(tmp_path / "w"), "seeds.num=1", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "is in use by another run (pid" in r.stderr and "Traceback" not in r.stderr
    with work_dir_lock(tmp_path / "w"):  # released when its holder is done
        pass


def test_values_that_make_no_sense_are_config_errors(data_root):
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.toy.schema import load_experiment

    bad = {"data.train.max_frames": "-1", "data.val.frame_stride": "0", "data.train.image_crop_hw": "[0,0]",
           "data.val.voxel_size": "[0.1,0.1]", "threads": "-1", "seed": "-1", "device": "gpu",
           "data.synthetic": "{framez: 2}", "distiller.kd_weight": "-0.5"}
    with pytest.raises(ConfigError) as e:
        load_kitti_experiment(QUICK, overrides(data_root, **bad))
    text = str(e.value)
    assert "data.train: image_crop_hw must be" in text and "data.val: voxel_size must be" in text
    for key in ("max_frames must be null (all) or a whole number >= 1, got -1", "frame_stride must be a whole number >= 1",
                "threads: must be", "seed: must be", "device: must be", "data.synthetic: unknown key(s) ['framez']",
                "distiller: kd_weight must be a number >= 0"):
        assert key in text, key
    with pytest.raises(ConfigError, match="ce_weight must be a number >= 0"):
        load_experiment(str(ROOT / "configs/gauss/kd.yaml"), ["distiller.ce_weight=-1"])


@needs_spconv
def test_a_batch_larger_than_the_dataset_fails_before_any_stage_trains(data_root, tmp_path):
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    cfg = load_kitti_experiment(QUICK, overrides(data_root, **{"student.optim.batch_size": 5}))
    with pytest.raises(ValueError, match=r"student.optim.batch_size: 2 training scans give no full batch of 5"):
        kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    assert not (tmp_path / "teacher").exists()


@needs_spconv
def test_teacher_checkpoint_of_another_kind_of_model_is_refused(data_root, tmp_path):
    from pcseg_kd.engine.checkpoint import save_checkpoint
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    save_checkpoint(tmp_path / "student.pt", {"model": {"w": torch.zeros(1)}, "model_cfg": {"type": "spunet"}})
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[student]", teacher_checkpoint=tmp_path / "student.pt"))
    with pytest.raises(ValueError, match=r"student.pt hold a 'spunet' model, but teacher.model is a 'fusion_teacher'"):
        kitti.load_teacher(cfg, tmp_path, torch.device("cpu"))


@needs_spconv
def test_resuming_under_another_thread_count_is_refused(data_root, tmp_path, monkeypatch):
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]", threads=1))
    real = kitti.write_stage_metrics
    from pcseg_kd.engine.kitti import runner
    monkeypatch.setattr(runner, "save_checkpoint", _dies_on_final(runner.save_checkpoint))
    with pytest.raises(KeyboardInterrupt):
        kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    monkeypatch.undo()
    assert kitti.write_stage_metrics is real and (tmp_path / "teacher" / "last.pt").is_file()
    other = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]", threads=2))
    with pytest.raises(kitti.ResumeMismatch, match=r"teacher/last.pt .*\(threads changed\)"):
        kitti.run_kitti(other, tmp_path, DistEnv(), progress=False)
    torch.set_num_threads(2)


def _dies_on_final(save):
    def wrapped(path, state, *a, **k):
        if Path(path).name == "final.pt":
            raise KeyboardInterrupt("simulated kill")
        return save(path, state, *a, **k)
    return wrapped


def test_a_skipped_validation_frame_is_not_scored_twice(data_root, tmp_path):
    from pcseg_kd.data.kitti import SemanticKITTIDataset

    root = tmp_path / "root"
    shutil.copytree(data_root, root)
    good = SemanticKITTIDataset(str(root), split="val", sequences=["08"], voxel_size=[0.2] * 3)
    labelled = [int((good[i]["labels"] != 255).sum()) for i in range(len(good))]
    scan = root / "sequences" / "08" / "velodyne" / "000000.bin"
    scan.write_bytes(scan.read_bytes()[:100])  # truncated: frame 0 is bad
    ds = SemanticKITTIDataset(str(root), split="val", sequences=["08"], voxel_size=[0.2] * 3, skip_bad_frames=True)
    with pytest.warns(UserWarning, match="skipping bad frame 08/000000"):
        got = [int((ds[i]["labels"] != 255).sum()) for i in range(len(ds))]
    assert got == [0, labelled[1]] and sum(got) == sum(labelled[1:])
    # the scores say which frame was skipped
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti.data import ShardedBatchSampler, make_loader
    from pcseg_kd.engine.kitti.evaluate import evaluate

    class Constant(torch.nn.Module):
        rows = "points"

        def forward(self, batch):
            return {"logits": torch.zeros(len(batch["labels"]), 19)}

    env = DistEnv()
    loader = make_loader(ds, ShardedBatchSampler(len(ds), 2, False, 0, env, False), 0, torch.device("cpu"))
    with pytest.warns(UserWarning, match="skipping bad frame"):
        metrics = evaluate(Constant(), loader, env, 19, 255, ds.class_names)
    assert metrics["all"]["skipped_frames"] == ["08/000000"] and metrics["all"]["points"] == labelled[1]
