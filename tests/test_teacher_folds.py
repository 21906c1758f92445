"""Out-of-fold teacher targets (teacher.folds), the held-out teacher (teacher.data) and the
teacher-target statistics of the student stage."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kitti_common import QUICK, needs_spconv, tiny_overrides, tiny_root
from pcseg_kd.config import ConfigError
from pcseg_kd.data.kitti import teacher_cache as tc
from pcseg_kd.data.kitti.folds import FrameSubset, contiguous_folds
from pcseg_kd.engine import checkpoint as ckpt
from pcseg_kd.engine.distributed import DistEnv
from pcseg_kd.engine.kitti import runner as kitti_runner
from pcseg_kd.engine.kitti import train as kt
from pcseg_kd.engine.kitti.hooks import target_scores
from pcseg_kd.engine.kitti.schema import load_kitti_experiment
from pcseg_kd.registry import DATASETS


# ----------------------------------------------------------------------------- fold assignment
def frames_of(spec):
    """Frame stand-ins: {sequence: n frames}, listed interleaved (the folds must not care)."""
    out = [SimpleNamespace(sequence=s, frame=f"{i:06d}") for s, n in spec.items() for i in range(n)]
    return out[::2] + out[1::2]


@pytest.mark.parametrize("spec,k", [({"00": 10}, 2), ({"00": 7, "01": 5}, 3), ({"00": 4, "05": 9, "07": 3}, 3)])
def test_folds_are_contiguous_blocks_per_sequence_covering_every_scan_once(spec, k):
    frames = frames_of(spec)
    folds = contiguous_folds(frames, k)
    assert len(folds) == len(frames) and set(folds) == set(range(k))
    for seq, n in spec.items():
        by_frame = sorted((f.frame, fold) for f, fold in zip(frames, folds) if f.sequence == seq)
        seq_folds = [fold for _, fold in by_frame]
        assert seq_folds == sorted(seq_folds)                       # contiguous: non-decreasing in frame order
        sizes = np.bincount(seq_folds, minlength=k)
        assert sizes.max() - sizes.min() <= 1 or n < k              # balanced within the sequence


def test_sequence_folds_keep_whole_sequences_together():
    frames = frames_of({"00": 4, "01": 3, "02": 5, "05": 2})
    folds = contiguous_folds(frames, 3, by="sequence")
    by_seq = {}
    for f, fold in zip(frames, folds):
        by_seq.setdefault(f.sequence, set()).add(fold)
    assert by_seq == {"00": {0}, "01": {1}, "02": {2}, "05": {0}}   # sorted sequences, round robin
    with pytest.raises(ValueError, match=r"fold_by=sequence: 3 folds of 2 training sequence\(s\) \(00, 01\)"):
        contiguous_folds(frames_of({"00": 4, "01": 4}), 3, by="sequence")
    with pytest.raises(ValueError, match=r"teacher.fold_by must be one of \['block', 'sequence'\]"):
        contiguous_folds(frames, 2, by="random")


def test_fold_errors():
    with pytest.raises(ValueError, match=r"teacher.folds must be a whole number >= 2"):
        contiguous_folds(frames_of({"00": 4}), 1)
    with pytest.raises(ValueError, match=r"leave fold\(s\) \[2\] empty"):
        contiguous_folds(frames_of({"00": 2}), 3)


def test_frame_subset_is_the_datasets_frames_at_those_indices():
    class Ds:
        frames = list("abcdef")
        ignore_index = 255

        def __getitem__(self, i):
            return {"frame_id": self.frames[i], "i": i}

    sub = FrameSubset(Ds(), [1, 4, 5])
    assert len(sub) == 3 and sub.frames == ["b", "e", "f"] and sub.ignore_index == 255
    assert [sub[j]["i"] for j in range(3)] == [1, 4, 5]   # augmentation seeds stay the full set's indices


# ----------------------------------------------------------------------------- config errors
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "teacher_folds", frames=4, seed=11)


def fold_cfg(root, **extra):
    o = {"teacher.folds": 2, "distiller.teacher_source": "cache", "data.train.augment": "false",
         "data.train.image_crop_hw": "null", "student.optim.batch_size": 1, "teacher.optim.batch_size": 1,
         "threads": 1, **extra}
    return load_kitti_experiment(QUICK, tiny_overrides(root, student_epochs=1, steps=2, **o))


@pytest.mark.parametrize("extra,match", [
    ({"distiller.teacher_source": "online"}, r"teacher.folds: out-of-fold targets come from the teacher cache"),
    ({"teacher.folds": 1}, r"teacher.folds: must be 0 \(off\) or a whole number >= 2"),
    ({"teacher.data": "{sequences: ['08']}"}, r"teacher.folds: folds split the student's training scans"),
    ({"student.folds": 2}, r"student.folds / student.data are not used"),
    ({"teacher.fold_by": "random"}, r"teacher.fold_by must be one of"),
])
def test_fold_config_errors_name_the_key(data_root, extra, match):
    with pytest.raises(ConfigError, match=match):
        fold_cfg(data_root, **extra)


def test_teacher_data_with_an_unknown_key_is_refused(data_root):
    with pytest.raises(ConfigError, match=r"teacher.data: unknown key\(s\) \['sequencez'\]"):
        load_kitti_experiment(QUICK, tiny_overrides(data_root, **{"teacher.data": "{sequencez: ['08']}"}))


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fold_run(data_root, tmp_path_factory):
    """teacher + 2 fold teachers + cached student; the frames each fold teacher trained on."""
    work = tmp_path_factory.mktemp("fold_run")
    cfg = fold_cfg(data_root, **{"teacher.optim.max_steps_per_epoch": 0, "student.optim.max_steps_per_epoch": 0})
    seen = run_recording_frames(cfg, work)
    return SimpleNamespace(cfg=cfg, work=work, seen=seen)


def run_recording_frames(cfg, work):
    """Run the experiment; {stage name: the frame ids its training steps received}."""
    seen = {}
    real = kitti_runner.StageRunner.train_step

    def spy(self, batch):
        seen.setdefault(self.name, set()).update(batch["frame_ids"])
        return real(self, batch)

    mp = pytest.MonkeyPatch()
    mp.setattr(kitti_runner.StageRunner, "train_step", spy)
    try:
        kt.run_kitti(cfg, work, DistEnv(), progress=False)
    finally:
        mp.undo()
    return seen


@needs_spconv
def test_no_fold_teacher_sees_a_scan_of_its_own_fold(fold_run):
    ds = DATASETS.build(fold_run.cfg["data"]["train"])
    folds = contiguous_folds(ds.frames, 2)
    ids = [f.frame_id for f in ds.frames]
    assert fold_run.seen["teacher"] == set(ids)                     # the full teacher: every scan
    for k in range(2):
        own = {i for i, f in zip(ids, folds) if f == k}
        assert fold_run.seen[f"teacher_fold_{k}"] == set(ids) - own   # every scan outside fold k, none inside
    fp = ckpt.load_checkpoint(fold_run.work / "teacher_fold_1" / "final.pt")["fingerprint"]
    assert fp["fold"]["k"] == 1 and fp["fold"]["folds"] == 2
    summary = json.loads((fold_run.work / "metrics.json").read_text())
    assert set(summary["fold_teachers"]) == {"teacher_fold_0", "teacher_fold_1"}


@needs_spconv
def test_cached_logits_are_the_out_of_fold_teachers(fold_run):
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.engine.kitti.teacher import load_frozen

    cfg, work = fold_run.cfg, fold_run.work
    cache = tc.TeacherCache(work / "teacher_cache")
    ds = DATASETS.build(cfg["data"]["train"])
    folds = contiguous_folds(ds.frames, 2)
    assert cache.meta["frame_folds"] == folds
    assert [t["settings"]["fold"]["k"] for t in cache.meta["fingerprint"]["teacher"]["fold_teachers"]] == [0, 1]
    teachers = [load_frozen(work / f"teacher_fold_{k}" / "final.pt", cfg["teacher"]["model"], torch.device("cpu"))
                for k in range(2)]
    cached = tc.TeacherCacheDataset(ds, cache)
    for i in range(len(ds)):
        batch = collate_kitti([cached[i]])
        with torch.no_grad():
            own = teachers[folds[i]](batch)["logits"]
            other = teachers[1 - folds[i]](batch)["logits"]
        assert torch.equal(batch["teacher_logits"], own.half())      # the fold teacher that did not see it
        assert not torch.equal(batch["teacher_logits"], other.half())


@needs_spconv
def test_teacher_target_accuracy_equals_a_brute_force_count(fold_run):
    """Augmentation off, batch 1, every scan once in epoch 1: the hook's confusion counts
    equal the cache's argmax against the labels, counted here scan by scan."""
    cfg, work = fold_run.cfg, fold_run.work
    ds = DATASETS.build(cfg["data"]["train"])
    cache = tc.TeacherCache(work / "teacher_cache")
    c = cache.meta["num_classes"]
    conf = np.zeros((c, c), np.int64)
    for i in range(len(ds)):
        sample = ds[i]
        idx, logits = cache.rows(sample["frame_id"], int(sample["num_scan_points"]))
        labels = dict(zip(sample["point_index"].tolist(), sample["labels"].tolist()))
        for p, row in zip(idx, logits.astype(np.float32)):
            y = labels.get(int(p))
            if y is not None and y < c:
                conf[y, int(np.argmax(row))] += 1
    got = json.loads((work / "student" / "metrics.json").read_text())["teacher_targets"][0]
    want = target_scores(torch.from_numpy(conf))
    assert got["rows"] == want["rows"] == conf.sum()
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-9)


def test_target_scores_against_hand_counts():
    conf = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 4]])   # class 1 absent from the labels
    s = target_scores(conf)
    assert s["rows"] == 10 and s["accuracy"] == pytest.approx(70.0)
    # IoU: class 0: 3 / (4 + 5 - 3) = 0.5; class 2: 4 / (6 + 4 - 4) = 2/3; class 1 not counted
    assert s["miou"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


@needs_spconv
def test_a_killed_fold_stage_resumes_to_the_same_weights(data_root, fold_run, tmp_path, monkeypatch):
    cfg = fold_run.cfg
    real = kitti_runner.StageRunner.train_step
    calls = {"n": 0}

    def dies(self, batch):
        if self.name == "teacher_fold_1":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
        return real(self, batch)

    monkeypatch.setattr(kitti_runner.StageRunner, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        kt.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    assert (tmp_path / "teacher_fold_0" / "final.pt").is_file()
    assert not (tmp_path / "teacher_fold_1" / "final.pt").exists()
    monkeypatch.setattr(kitti_runner.StageRunner, "train_step", real)
    kt.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    for name in ("teacher_fold_1", "student"):
        clean = ckpt.load_checkpoint(fold_run.work / name / "final.pt")["model"]
        resumed = ckpt.load_checkpoint(tmp_path / name / "final.pt")["model"]
        for key in clean:
            torch.testing.assert_close(resumed[key], clean[key], rtol=0, atol=0, msg=f"{name}: {key}")


@needs_spconv
def test_held_out_teacher_trains_on_its_own_data(data_root, tmp_path):
    cfg = load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[teacher]", threads=1,
                                                      **{"teacher.data": "{sequences: ['08']}",
                                                         "teacher.loss.class_weights": "frequency"}))
    seen = run_recording_frames(cfg, tmp_path)["teacher"]
    assert seen and all(f.startswith("08/") for f in seen)
    fp = ckpt.load_checkpoint(tmp_path / "teacher" / "final.pt")["fingerprint"]
    assert fp["train"]["sequences"] == ["08"]
    counts = json.loads((tmp_path / "class_counts_teacher.json").read_text())
    assert counts["train"]["sequences"] == ["08"]


@needs_spconv
def test_a_teacher_checkpoint_brings_its_fold_teachers(fold_run, data_root, tmp_path):
    """teacher_checkpoint OTHER/teacher/final.pt: the fold teachers are OTHER/teacher_fold_k's,
    and the cache exported from them holds what the run that trained them exported."""
    cfg = fold_cfg(data_root, stages="[student]", teacher_checkpoint=str(fold_run.work / "teacher" / "final.pt"),
                   **{"student.optim.max_steps_per_epoch": 1})
    from pcseg_kd.engine.kitti.export import export_teacher
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "cache", progress=False)
    ours, theirs = tc.TeacherCache(tmp_path / "cache"), tc.TeacherCache(fold_run.work / "teacher_cache")
    assert ours.meta["fingerprint"] == theirs.meta["fingerprint"]
    for f, where in theirs.index.items():
        (i1, l1), (i2, l2) = ours.rows(f, where.num_scan_points), theirs.rows(f, where.num_scan_points)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)
    missing = fold_cfg(data_root, stages="[student]", teacher_checkpoint=str(tmp_path / "elsewhere" / "teacher" / "final.pt"))
    (tmp_path / "elsewhere" / "teacher").mkdir(parents=True)
    (tmp_path / "elsewhere" / "teacher" / "final.pt").write_bytes((fold_run.work / "teacher" / "final.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"elsewhere/teacher_fold_0/final.pt do not exist"):
        export_teacher(missing, tmp_path, DistEnv(), tmp_path / "cache2", progress=False)
