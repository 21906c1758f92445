"""The teacher-output cache: its format, the export (resumable, sharded), the checks that
refuse a cache of another teacher or dataset, and the student trained from it, which equals
the student trained online when the teacher's input is the same."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides, tiny_root
from pcseg_kd.config import ConfigError
from pcseg_kd.data.kitti import teacher_cache as tc
from pcseg_kd.engine.distributed import DistEnv
from pcseg_kd.engine.kitti import train as kt
from pcseg_kd.engine.kitti.export import export_teacher, teacher_inputs
from pcseg_kd.engine.kitti.schema import load_kitti_experiment

pytestmark = needs_spconv
SAME_INPUT = {"data.train.augment": "false", "data.train.image_crop_hw": "null", "student.optim.batch_size": 1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "teacher_cache", frames=4, seed=7)


@pytest.fixture(scope="module")
def teacher_pt(data_root, tmp_path_factory):
    """A trained (one-epoch) fusion teacher's final.pt."""
    work = tmp_path_factory.mktemp("teacher_work")
    cfg = load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[teacher]"))
    kt.run_kitti(cfg, work, DistEnv(), progress=False)
    return work / "teacher" / "final.pt"


def cache_files(folder):
    """The cache's files (not the exporter's .lock)."""
    return [f for f in folder.iterdir() if not f.name.startswith(".")]


def cfg_for(data_root, teacher_pt, **extra):
    return load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[student]",
                                                       teacher_checkpoint=str(teacher_pt), **extra))


# ----------------------------------------------------------------------------- the format
def test_chunks_round_trip_and_rows_pair_by_raw_point_index(tmp_path):
    rng = np.random.default_rng(0)
    frames = ["00/000000", "00/000001", "00/000002"]
    sizes = [50, 40, 30]
    meta = tc.new_meta(frames, 4, list("abcd"), {"teacher": "t"}, chunk_frames=2)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    truth = {}
    for k in range(tc.num_chunks(meta)):
        fs = tc.chunk_frames_of(meta, k)
        idx = [rng.permutation(sizes[frames.index(f)])[:17] for f in fs]   # unsorted: the writer sorts
        lg = [rng.normal(size=(17, 4)) for _ in fs]
        tc.write_chunk(tmp_path, k, fs, lg, idx, [sizes[frames.index(f)] for f in fs], fingerprint=meta["fingerprint"])
        truth.update({f: (i, g) for f, i, g in zip(fs, idx, lg)})
    cache = tc.TeacherCache(tmp_path)
    for f, (idx, lg) in truth.items():
        got_idx, got = cache.rows(f, sizes[frames.index(f)])
        order = np.argsort(idx)
        assert got.dtype == np.float16 and (np.diff(got_idx) > 0).all()
        np.testing.assert_array_equal(got_idx, idx[order])
        np.testing.assert_array_equal(got, lg[order].astype(np.float16))

    # a dataset wrapper pairs each sample row with the cached row of its raw point index
    class Fake(torch.utils.data.Dataset):
        frames = []

        def __len__(self):
            return 1

        def __getitem__(self, i):  # rows in shuffled order, some without cached logits
            pi = rng.permutation(sizes[1])
            return {"frame_id": "00/000001", "num_scan_points": sizes[1], "point_index": torch.from_numpy(pi)}

    sample = tc.TeacherCacheDataset(Fake(), cache)[0]
    idx, lg = truth["00/000001"]
    want = {int(p): lg[j].astype(np.float16) for j, p in enumerate(idx)}
    rows = sample["kd_point_idx"].numpy()
    assert sorted(int(sample["point_index"][r]) for r in rows) == sorted(want)   # every cached point, once
    for r, t in zip(rows, sample["teacher_logits"].numpy()):
        np.testing.assert_array_equal(t, want[int(sample["point_index"][r])])


def test_bad_caches_are_refused_naming_the_file(tmp_path):
    frames = ["00/000000", "00/000001"]
    meta = tc.new_meta(frames, 2, ["a", "b"], {"teacher": {"w": 1}, "inputs": {"image_scale": 0.25}}, 1)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tc.write_chunk(tmp_path, 0, frames[:1], [np.zeros((3, 2))], [np.array([0, 1, 2])], [5], fingerprint=meta["fingerprint"])
    with pytest.raises(tc.TeacherCacheError, match=r"incomplete teacher cache, 1 of 2 chunks missing.*chunk_00001"):
        tc.TeacherCache(tmp_path)
    tc.write_chunk(tmp_path, 1, frames[1:], [np.zeros((1, 2))], [np.array([4])], [5], fingerprint=meta["fingerprint"])
    cache = tc.TeacherCache(tmp_path)
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.json: frame 00/000001 was cached with 5 points.*now has 6"):
        cache.rows("00/000001", 6)
    with pytest.raises(tc.TeacherCacheError, match=r"meta.json: 1 training frame\(s\) are not in the cache \(first: 08/000000"):
        cache.check_run(frames + ["08/000000"], 2, ["a", "b"])
    with pytest.raises(tc.TeacherCacheError, match=r"meta.json: 2 classes"):
        cache.check_run(frames, 3, ["a", "b", "c"])
    with pytest.raises(tc.TeacherCacheError, match=r"another teacher or other inputs \(inputs.image_scale: cached 0.25, now 0.5"):
        cache.check_run(frames, 2, ["a", "b"], {"teacher": {"w": 1}, "inputs": {"image_scale": 0.5}})
    cache.check_run(frames, 2, ["a", "b"], {"teacher": {"w": 1}, "inputs": {"image_scale": 0.25}})
    with pytest.raises(ValueError, match=r"distinct and in \[0, 5\)"):
        tc.write_chunk(tmp_path, 1, frames[1:], [np.zeros((1, 2))], [np.array([5])], [5], fingerprint=meta["fingerprint"])
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(tc.TeacherCacheError, match="meta.json: not a pcseg_kd.teacher_cache"):
        tc.TeacherCache(tmp_path)
    with pytest.raises(tc.TeacherCacheError, match="no teacher cache here"):
        tc.TeacherCache(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the export
def test_export_holds_the_online_teachers_logits_for_every_in_view_point(data_root, teacher_pt, tmp_path):
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.registry import DATASETS

    cfg = cfg_for(data_root, teacher_pt, **SAME_INPUT)
    out = export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "cache", chunk_frames=3, batch_size=1, progress=False)
    assert out["frames"] == 4 and out["chunks"] == 2 and out["written"] == 2 and out["rows"] > 0
    cache = tc.TeacherCache(tmp_path / "cache")
    teacher = kt.load_teacher(cfg, tmp_path, torch.device("cpu"))
    ds = DATASETS.build(cfg["data"]["train"])
    cached_ds = tc.TeacherCacheDataset(ds, cache)
    for i in range(len(ds)):
        batch = collate_kitti([cached_ds[i]])
        with torch.no_grad():
            online = teacher(batch)["logits"]
        assert torch.equal(batch["kd_point_idx"], batch["img_point_idx"])    # fov, whole image: every point
        assert torch.equal(batch["teacher_logits"], online.half())            # float16 rounding, nothing else
    # batched (the default: the teacher's training batch, 2 here): the same rows, logits within float16 rounding
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "batched", chunk_frames=3, progress=False)
    batched = tc.TeacherCache(tmp_path / "batched")
    for f in cache.index:
        (i1, l1), (i4, l4) = cache.rows(f, cache.index[f].num_scan_points), batched.rows(f, cache.index[f].num_scan_points)
        np.testing.assert_array_equal(i1, i4)
        np.testing.assert_allclose(l4.astype(np.float32), l1.astype(np.float32), rtol=2e-3, atol=2e-3)
    meta = tc.read_meta(tmp_path / "cache")
    assert meta["fingerprint"]["inputs"] == teacher_inputs(cfg["data"]["train"])
    assert len(meta["fingerprint"]["teacher"]["weights_sha256"]) == 64


def test_with_augmentation_kd_reaches_every_in_view_point_not_only_the_crop(data_root, teacher_pt, tmp_path):
    from pcseg_kd.registry import DATASETS

    cfg = cfg_for(data_root, teacher_pt, **{"data.train.image_crop_hw": "[64,96]"})
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "cache", progress=False)
    ds = tc.TeacherCacheDataset(DATASETS.build(cfg["data"]["train"]), tc.TeacherCache(tmp_path / "cache"))
    ds.set_epoch(3)
    sample = ds[1]
    n = len(sample["points"])
    assert len(sample["kd_point_idx"]) == n                  # fov protocol: every point of the scan is in view
    assert len(sample["img_point_idx"]) < n                  # the crop the online teacher would have seen
    np.testing.assert_array_equal(sample["point_index"].numpy(), np.sort(sample["point_index"].numpy()))


def test_a_killed_export_resumes_to_the_same_files(data_root, teacher_pt, tmp_path, monkeypatch):
    cfg = cfg_for(data_root, teacher_pt)
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "whole", chunk_frames=1, progress=False)
    real = tc.write_chunk
    calls = []

    def dies_at_the_third(root, k, *a, **kw):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(root, k, *a, **kw)

    monkeypatch.setattr(tc, "write_chunk", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "resumed", chunk_frames=1, progress=False)
    monkeypatch.setattr(tc, "write_chunk", real)
    with pytest.raises(tc.TeacherCacheError, match="incomplete"):
        tc.TeacherCache(tmp_path / "resumed")
    again = export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "resumed", chunk_frames=1, progress=False)
    assert again["written"] == 2                             # only what the kill left
    for f in sorted(cache_files(tmp_path / "whole")):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name
    with pytest.raises(tc.TeacherCacheError, match=r"meta.json: a teacher cache exported with other settings.*chunk_frames"):
        export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "resumed", chunk_frames=2, progress=False)


def _export_worker(rank, init_file, cfg, work, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        export_teacher(cfg, work, DistEnv(rank=rank, world_size=2), out, chunk_frames=1, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_export_and_write_what_one_process_writes(data_root, teacher_pt, tmp_path):
    import torch.multiprocessing as mp
    cfg = cfg_for(data_root, teacher_pt)
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "one", chunk_frames=1, progress=False)
    mp.spawn(_export_worker, args=(str(tmp_path / "init"), cfg, tmp_path, tmp_path / "two"), nprocs=2, join=True)
    names = sorted(f.name for f in cache_files(tmp_path / "one"))
    assert names == sorted(f.name for f in cache_files(tmp_path / "two")) and len(names) == 1 + 4 * 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ----------------------------------------------------------------------------- the student stage
class Float16Teacher(nn.Module):
    """The online teacher with its logits rounded as the cache stores them."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.rows, self.out_channels = teacher, teacher.rows, teacher.out_channels

    def forward(self, batch):
        out = dict(self.teacher(batch))
        out["logits"] = out["logits"].half().float()
        return out


def test_the_cached_student_is_the_online_student(data_root, teacher_pt, tmp_path, monkeypatch):
    """Same teacher input (no augmentation, whole image): bitwise the same student when the
    online teacher's logits are rounded to float16 as the cache stores them."""
    cache_cfg = cfg_for(data_root, teacher_pt, **SAME_INPUT, **{"distiller.teacher_source": "cache"})
    # one scan per teacher pass, as the online teacher sees the student's batches of one
    export_teacher(cache_cfg, tmp_path / "cache", DistEnv(), batch_size=1, progress=False)
    kt.run_kitti(cache_cfg, tmp_path / "cache", DistEnv(), progress=False)
    real = kt.load_teacher
    monkeypatch.setattr(kt, "load_teacher", lambda *a, **kw: Float16Teacher(real(*a, **kw)))
    online_cfg = cfg_for(data_root, teacher_pt, **SAME_INPUT)
    kt.run_kitti(online_cfg, tmp_path / "online", DistEnv(), progress=False)
    cached = torch.load(tmp_path / "cache" / "student" / "final.pt", weights_only=False)
    online = torch.load(tmp_path / "online" / "student" / "final.pt", weights_only=False)
    for k, v in online["model"].items():
        assert torch.equal(v, cached["model"][k]), k
    logs = [[json.loads(x) for x in (tmp_path / d / "student" / "log.jsonl").read_text().splitlines()]
            for d in ("cache", "online")]
    kd = [[r["loss_kd"] for r in log if "loss_kd" in r] for log in logs]
    assert kd[0] == kd[1] and len(kd[0]) >= 4 and all(v > 0 for v in kd[0])


def test_student_stage_refuses_another_teachers_cache_and_a_cache_it_cannot_make(data_root, teacher_pt, tmp_path):
    cfg = cfg_for(data_root, teacher_pt, **{"distiller.teacher_source": "cache"})
    kt.run_kitti(cfg, tmp_path, DistEnv(), progress=False)                 # exports the cache, then trains
    assert tc.TeacherCache(tmp_path / "teacher_cache").meta["frames"] == ["00/000000", "00/000001", "00/000002",
                                                                          "00/000003"]
    assert "loss_kd" in (tmp_path / "student" / "log.jsonl").read_text()
    other = load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[student]", teacher_checkpoint=str(teacher_pt),
                                                        **{"distiller.teacher_source": "cache",
                                                           "distiller.teacher_cache": str(tmp_path / "teacher_cache"),
                                                           "data.train.image_scale": 0.2}))
    with pytest.raises(tc.TeacherCacheError, match=r"teacher_cache/meta.json: the cache was exported from another teacher "
                                                   r"or other inputs \(inputs.image_scale: cached 0.25, now 0.2"):
        kt.run_kitti(other, tmp_path / "other", DistEnv(), progress=False)
    # no cache and no teacher weights to export one from
    bare = load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[student]",
                                                       **{"distiller.teacher_source": "cache",
                                                          "distiller.teacher_cache": str(tmp_path / "none")}))
    with pytest.raises(tc.TeacherCacheError, match=r"none: no complete teacher cache, and no teacher weights"):
        kt.run_kitti(bare, tmp_path / "bare", DistEnv(), progress=False)


def test_a_cache_from_another_teacher_without_its_weights_is_distilled(data_root, teacher_pt, tmp_path):
    """Any teacher that writes the format can be distilled: a cache whose teacher this run does
    not have is taken as it is (frames, classes and point counts still checked)."""
    cfg = cfg_for(data_root, teacher_pt)
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "external", progress=False)
    ext = load_kitti_experiment(QUICK, tiny_overrides(data_root, stages="[student]",
                                                      **{"distiller.teacher_source": "cache",
                                                         "distiller.teacher_cache": str(tmp_path / "external")}))
    res = kt.run_kitti(ext, tmp_path / "work", DistEnv(), progress=False)
    assert "in_view" in res["student"]
    fp = torch.load(tmp_path / "work" / "student" / "final.pt", weights_only=False)["fingerprint"]
    assert fp["teacher"] == tc.read_meta(tmp_path / "external")["fingerprint"]
    assert "teacher_cache" not in fp["distiller"] and fp["distiller"]["teacher_source"] == "cache"


def test_config_errors_for_the_teacher_source(data_root):
    with pytest.raises(ConfigError, match=r"distiller.teacher_source: expected"):
        load_kitti_experiment(QUICK, tiny_overrides(data_root, **{"distiller.teacher_source": "disk"}))
    with pytest.raises(ConfigError, match=r"distiller: teacher_source: cache holds the teacher's logits only"):
        load_kitti_experiment(QUICK, tiny_overrides(data_root, **{"distiller": "{_delete_: true, type: fitnet, teacher_source: cache}"}))
    with pytest.raises(ConfigError, match=r"distiller.teacher_sauce: unknown key.*teacher_source, teacher_cache"):
        load_kitti_experiment(QUICK, tiny_overrides(data_root, **{"distiller.teacher_sauce": "cache"}))


def test_export_cli(data_root, teacher_pt, tmp_path):
    args = [sys.executable, str(ROOT / "tools/export_teacher.py"), QUICK, *tiny_overrides(data_root),
            f"teacher_checkpoint={teacher_pt}", "--work-dir", str(tmp_path), "--chunk-frames", "3", "--no-progress"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "4 scans in 2 chunks (2 written now)" in out.stdout
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert "(0 written now, 2 already there)" in again.stdout
    shutil.rmtree(tmp_path / "teacher_cache")
    bad = subprocess.run(args[:-3] + ["--batch-size", "0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "error: --batch-size must be >= 1" in bad.stderr


def test_bench_distill_runs_the_three_steps_and_ends_with_the_ratio(data_root, tmp_path):
    """The benchmark's plumbing (figures are not asserted: timings belong to benchmarks)."""
    args = [sys.executable, str(ROOT / "tools/bench_distill.py"), QUICK, *tiny_overrides(data_root),
            "--steps", "2", "--warmup", "1", "--work-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for name in ("no KD", "online teacher", "teacher cache", "export"):
        assert any(line.strip().startswith(name) for line in lines), name
    assert lines[-1].startswith("cache/no-KD step ratio: ") and float(lines[-1].split(": ")[1]) > 0
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)   # a second run measures again
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1].startswith("cache/no-KD")


def test_points_without_a_teacher_voxel_are_not_cached(data_root, teacher_pt, tmp_path):
    """out_of_range: drop: a point outside the grid gets no point feature at export; augmentation
    could later give it a student voxel, so its row must not be a KD target."""
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.registry import DATASETS

    small = {"data.train.out_of_range": "drop", "data.train.point_range": "[-8,-8,-3,8,8,2]"}
    cfg = cfg_for(data_root, teacher_pt, **SAME_INPUT, **small)
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "cache", batch_size=1, progress=False)
    cache = tc.TeacherCache(tmp_path / "cache")
    teacher = kt.load_teacher(cfg, tmp_path, torch.device("cpu"))
    ds = DATASETS.build(cfg["data"]["train"])
    for i in range(len(ds)):
        sample = ds[i]
        with torch.no_grad():
            out = teacher(collate_kitti([sample]))
        voxel = out["point_valid"][sample["img_point_idx"]]
        assert 0 < int(voxel.sum()) < len(voxel)                    # the case arises
        idx, logits = cache.rows(sample["frame_id"], sample["num_scan_points"])
        want = sample["point_index"][sample["img_point_idx"][voxel]].numpy()
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(logits, out["logits"][voxel].half().numpy())


def test_the_student_stage_finishes_an_export_killed_with_its_own_chunking(data_root, teacher_pt, tmp_path,
                                                                           monkeypatch):
    cfg = cfg_for(data_root, teacher_pt, **{"distiller.teacher_source": "cache"})
    real, calls = tc.write_chunk, []

    def dies_at_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(tc, "write_chunk", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        export_teacher(cfg, tmp_path, DistEnv(), chunk_frames=1, progress=False)
    monkeypatch.setattr(tc, "write_chunk", real)
    kt.run_kitti(cfg, tmp_path, DistEnv(), progress=False)      # resumes the export (chunks of 1), then trains
    cache = tc.TeacherCache(tmp_path / "teacher_cache")
    assert cache.meta["chunk_frames"] == 1 and (tmp_path / "student" / "final.pt").is_file()


def test_bad_frames_are_skipped_by_the_export_as_by_training(data_root, teacher_pt, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    bad = root / "sequences" / "00" / "velodyne" / "000001.bin"
    bad.write_bytes(bad.read_bytes()[:-5])                          # truncated: not a whole number of points
    over = {"data.train.root": str(root), "data.val.root": str(root)}
    cfg = cfg_for(data_root, teacher_pt, **over)
    with pytest.raises(Exception, match="000001.bin"):
        export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "strict", progress=False)
    cfg = cfg_for(data_root, teacher_pt, **over, **{"data.train.skip_bad_frames": "true",
                                                    "distiller.teacher_source": "cache"})
    with pytest.warns(UserWarning, match="skipping bad frame 00/000001"):
        kt.run_kitti(cfg, tmp_path / "work", DistEnv(), progress=False)
    cache = tc.TeacherCache(tmp_path / "work" / "teacher_cache")
    assert cache.index["00/000001"].end == cache.index["00/000001"].start   # kept in place, no rows
    assert cache.index["00/000002"].end > cache.index["00/000002"].start


def test_unsorted_point_indices_and_changed_scans_are_refused(data_root, teacher_pt, tmp_path):
    from pcseg_kd.registry import DATASETS

    frames = ["00/000000"]
    meta = tc.new_meta(frames, 2, ["a", "b"], {}, 1)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tc.write_chunk(tmp_path, 0, frames, [np.zeros((3, 2))], [np.array([0, 1, 2])], [9], fingerprint={})
    np.save(tmp_path / "chunk_00000.point_index.npy", np.array([2, 0, 1], np.int32))   # another writer, unsorted
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00000.point_index.npy: a scan's point indices are not"):
        tc.TeacherCache(tmp_path).rows("00/000000", 9)
    # a scan that changed since the export is refused when the run starts, not mid-epoch
    cfg = cfg_for(data_root, teacher_pt)
    export_teacher(cfg, tmp_path, DistEnv(), tmp_path / "cache", progress=False)
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    scan = root / "sequences" / "00" / "velodyne" / "000002.bin"
    scan.write_bytes(scan.read_bytes() + bytes(16))                 # one point more
    ds = DATASETS.build({**cfg["data"]["train"], "root": str(root)})
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00000.json: frame 00/000002 was cached with \d+ points, "
                                                   r"its scan .*000002.bin now has"):
        tc.TeacherCache(tmp_path / "cache").check_run(ds.frames, ds.num_classes, ds.class_names)


def test_a_cached_student_decodes_no_image_and_trains_as_if_it_did(data_root, teacher_pt, tmp_path, monkeypatch):
    """With the teacher's rows from the cache no model in the student's steps reads pixels:
    its datasets read image sizes only (without_pixels), and the student is bitwise the one
    trained from datasets that decode every image (the same augmentation draws)."""
    from pcseg_kd.data.kitti import dataset as kd_dataset

    cfg = cfg_for(data_root, teacher_pt, **{"distiller.teacher_source": "cache"})
    export_teacher(cfg, tmp_path / "cache", DistEnv(), progress=False)
    for d in ("pixel_free", "pixels"):
        shutil.copytree(tmp_path / "cache", tmp_path / d)
    real = kd_dataset.read_image
    calls = []
    monkeypatch.setattr(kd_dataset, "read_image", lambda p: calls.append(p) or real(p))
    kt.run_kitti(cfg, tmp_path / "pixel_free", DistEnv(), progress=False)
    assert calls == []
    monkeypatch.setattr(kd_dataset.SemanticKITTIDataset, "without_pixels", lambda self: self)
    kt.run_kitti(cfg, tmp_path / "pixels", DistEnv(), progress=False)
    assert len(calls) > 4  # this run decoded its images
    runs = [torch.load(tmp_path / d / "student" / "final.pt", weights_only=False)["model"]
            for d in ("pixel_free", "pixels")]
    for k, v in runs[1].items():
        assert torch.equal(v, runs[0][k]), k
    scores = [json.loads((tmp_path / d / "metrics.json").read_text())["student"]
              for d in ("pixel_free", "pixels")]
    assert scores[0] == scores[1]
