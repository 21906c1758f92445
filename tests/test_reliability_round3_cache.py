"""Reliability, round 3 (issue 22): loader workers die with their parent, the work-dir lock
cannot outlive the process that took it, and a teacher cache proves whose logits it holds
(every damaged-cache error names the file)."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pcseg_kd.data.kitti import teacher_cache as tc
from pcseg_kd.engine.distributed import DistEnv
from pcseg_kd.utils import workers
from pcseg_kd.utils.io import write_json
from pcseg_kd.utils.lock import WorkDirLocked, work_dir_lock

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
FP_A = {"teacher": {"settings": {"lr": 0.01}, "weights_sha256": "a" * 64}, "inputs": {"image_scale": 0.25}}
FP_B = {"teacher": {"settings": {"lr": 0.01}, "weights_sha256": "b" * 64}, "inputs": {"image_scale": 0.25}}
FRAMES = ["00/000000", "00/000001"]


# ----------------------------------------------------------------------------- helpers
def alive(pid):
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def children(pid):
    """Live processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid and alive(int(d.name)):
                out.append(int(d.name))
    return out


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def lock_is_free(folder):
    """Whether another process can take the work folder's lock now."""
    code = f"from pcseg_kd.utils.lock import work_dir_lock\nwith work_dir_lock({str(folder)!r}): pass"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def spawn(code):
    """A python subprocess running ``code`` that prints one line (a pid) when it is ready."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


# ----------------------------------------------------------------------------- the lock
@linux_only
def test_a_forked_child_closes_its_copy_of_the_lock_and_the_parent_keeps_the_lock(tmp_path):
    with work_dir_lock(tmp_path):
        fd = [f for f in Path("/proc/self/fd").iterdir() if os.path.realpath(f) == str(tmp_path / ".lock")]
        assert len(fd) == 1 and not os.get_inheritable(int(fd[0].name))   # close-on-exec
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: is the lock file still open here?
            still_open = any(os.path.realpath(f) == str(tmp_path / ".lock") for f in Path("/proc/self/fd").iterdir())
            os.write(w, b"1" if still_open else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"0"                     # the child's copy is closed ...
        os.waitpid(pid, 0)
        assert not lock_is_free(tmp_path)                # ... and closing it did not unlock the parent's
    assert lock_is_free(tmp_path)


@linux_only
def test_a_child_orphaned_by_kill_9_does_not_hold_the_lock(tmp_path):
    parent, child = spawn(f"""
        import os, time
        from pcseg_kd.utils.lock import work_dir_lock
        with work_dir_lock({str(tmp_path)!r}):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)          # a worker busy loading: lives on after its parent
                os._exit(0)
            print(pid, flush=True)
            time.sleep(60)
    """)
    try:
        assert alive(child) and not lock_is_free(tmp_path)
        kill(parent.pid)
        parent.wait()
        assert alive(child)                              # orphaned (no death signal asked for here)
        with work_dir_lock(tmp_path):                    # yet the folder is free
            pass
    finally:
        kill(parent.pid)
        kill(child)


# ----------------------------------------------------------------------------- the worker init
@linux_only
def test_worker_init_kills_the_worker_with_its_parent(tmp_path):
    parent, child = spawn("""
        import os, time
        from pcseg_kd.utils.workers import worker_init
        init = worker_init()
        pid = os.fork()
        if pid == 0:
            init(0)
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)
    """)
    try:
        time.sleep(0.5)                                  # the child has set its death signal
        assert alive(child)
        kill(parent.pid)
        parent.wait()
        wait_for(lambda: not alive(child), 10, f"worker {child} to die with its parent")
    finally:
        kill(parent.pid)
        kill(child)


@linux_only
def test_a_worker_whose_parent_died_before_its_init_kills_itself(tmp_path):
    """The race prctl cannot cover: the parent dies between the fork and the request."""
    parent, child = spawn("""
        import os, time
        from pcseg_kd.utils.workers import worker_init
        init = worker_init()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            while os.getppid() == me:   # wait for the parent's death, then start the worker
                time.sleep(0.01)
            init(0)
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)
    """)
    try:
        kill(parent.pid)
        parent.wait()
        wait_for(lambda: not alive(child), 10, f"orphaned worker {child} to kill itself")
    finally:
        kill(child)


def test_worker_init_composes_with_the_loaders_own_and_is_a_no_op_elsewhere(monkeypatch):
    seen = []
    init = workers.worker_init(seen.append)
    assert workers.worker_init(init) is init
    monkeypatch.setattr(workers.sys, "platform", "darwin")
    assert workers.die_with_parent() is False
    init(3)
    assert seen == [3]
    # a real loader: the worker runs the composed init (and the loader still delivers)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1,
                                         worker_init_fn=workers.worker_init(_mark_worker))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


def _mark_worker(worker_id):
    if worker_id != 0:
        raise AssertionError(worker_id)


def test_every_loader_of_the_engine_dies_with_its_parent():
    from pcseg_kd.engine.kitti.data import ShardedBatchSampler, make_loader

    sampler = ShardedBatchSampler(4, 2, False, 0, DistEnv(), False)
    loader = make_loader(list(range(4)), sampler, 1, torch.device("cpu"))
    assert isinstance(loader.worker_init_fn, workers.DieWithParent)
    src = (ROOT / "pcseg_kd/engine/kitti/export.py").read_text()
    assert "worker_init_fn=worker_init()" in src    # the export's own loader (exercised by the kill test below)


# ----------------------------------------------------------------------------- kill -9 of the export
@pytest.fixture(scope="module")
def export_setup(tmp_path_factory):
    """A tiny dataset and an (untrained) fusion teacher's weights: the export only needs weights."""
    from kitti_common import QUICK, tiny_overrides, tiny_root
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.kitti.teacher import without_pretrained
    from pcseg_kd.registry import MODELS

    root = tiny_root(tmp_path_factory, "round3_cache", frames=4, seed=3)
    cfg = load_kitti_experiment(QUICK, tiny_overrides(root))
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(MODELS.build(without_pretrained(cfg["teacher"]["model"])).state_dict(), weights)
    return [QUICK, *tiny_overrides(root), f"teacher_checkpoint={weights}", "data.num_workers=1", "threads=1"]


@linux_only
def test_kill_9_of_the_export_after_its_worker_forked_then_a_rerun_gets_the_lock(export_setup, tmp_path):
    work = tmp_path / "work"
    args = [*export_setup, "--work-dir", str(work), "--chunk-frames", "2", "--no-progress"]
    # the export, with its loader worker held in the first scan (a slow disk): the parent waits
    # for that batch when it is killed
    slow = textwrap.dedent(f"""
        import importlib.util, sys, time, torch
        from pcseg_kd.engine.kitti import export
        real = export._Scans.__getitem__
        def slow(self, i):
            if torch.utils.data.get_worker_info() is not None:
                time.sleep(60)
            return real(self, i)
        export._Scans.__getitem__ = slow
        spec = importlib.util.spec_from_file_location("export_teacher", {str(ROOT / 'tools/export_teacher.py')!r})
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        tool.main({args!r})
    """)
    parent = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        def forked():
            if parent.poll() is not None:
                raise AssertionError(f"the export ended before its worker was seen: {parent.stderr.read()}")
            return children(parent.pid)
        worker = wait_for(forked, 120, "the export's loader worker")[0]
        assert (work / ".lock").is_file() and (work / "teacher_cache" / ".lock").is_file()
        kill(parent.pid)                                  # right after the worker forked
        parent.wait()
        wait_for(lambda: not alive(worker), 10, f"the loader worker {worker} to die with the export")
        assert lock_is_free(work) and lock_is_free(work / "teacher_cache")
        rerun = subprocess.run([sys.executable, str(ROOT / "tools/export_teacher.py"), *args], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert "4 scans in 2 chunks (2 written now)" in rerun.stdout
        tc.TeacherCache(work / "teacher_cache").check_chunks()
    finally:
        kill(parent.pid)
        if worker:
            kill(worker)


# ----------------------------------------------------------------------------- whose logits
def make_cache(root, fp=FP_A, frames=FRAMES, scan_points=5, chunk_frames=1):
    """A valid cache written by the format's own writer: 3 rows a frame."""
    meta = tc.new_meta(list(frames), 2, ["a", "b"], fp, chunk_frames)
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json(Path(root) / "meta.json", meta)
    for k in range(tc.num_chunks(meta)):
        fs = tc.chunk_frames_of(meta, k)
        tc.write_chunk(root, k, fs, [np.arange(6.0).reshape(3, 2)] * len(fs), [np.array([0, 2, 4])] * len(fs),
                       [scan_points] * len(fs), fingerprint=fp)
    return meta


def fake_ds(frames=FRAMES):
    return SimpleNamespace(frames=[SimpleNamespace(frame_id=f) for f in frames], class_names=["a", "b"])


def plan(out, fp=FP_A, chunk_frames=None):
    from pcseg_kd.engine.kitti.export import _plan
    return _plan(Path(out), fake_ds(), 2, fp, chunk_frames, DistEnv())


def test_chunks_carry_their_teachers_fingerprint(tmp_path):
    make_cache(tmp_path)
    for k in range(2):
        assert json.loads((tmp_path / f"chunk_0000{k}.json").read_text())["fingerprint"] == FP_A
    tc.TeacherCache(tmp_path).check_chunks()


def test_a_chunk_of_another_teacher_under_this_meta_is_refused_naming_the_chunk(tmp_path):
    make_cache(tmp_path / "mine", FP_A)
    make_cache(tmp_path / "theirs", FP_B)
    for ext in (".json", ".logits.npy", ".point_index.npy"):
        (tmp_path / "mine" / f"chunk_00001{ext}").write_bytes((tmp_path / "theirs" / f"chunk_00001{ext}").read_bytes())
    want = (r"mine/chunk_00001.json: the chunk was written by another teacher than .*mine/meta.json's "
            r"\(fingerprint.teacher.weights_sha256: chunk 'bbbb.*, meta.json 'aaaa")
    with pytest.raises(tc.TeacherCacheError, match=want):
        tc.TeacherCache(tmp_path / "mine")
    with pytest.raises(tc.TeacherCacheError, match=want):              # the export does not keep it as done
        plan(tmp_path / "mine")
    assert plan(tmp_path / "theirs", FP_B)[1] == []                     # its own teacher's: complete


def test_chunks_without_a_meta_json_are_refused_not_adopted(tmp_path):
    make_cache(tmp_path, FP_B)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(tc.TeacherCacheError, match=r"holds 6 chunk file\(s\) \(chunk_00000.json, ...\) but no "
                                                   r"meta.json, so whose logits they are is unknown"):
        plan(tmp_path, FP_A)
    assert not (tmp_path / "meta.json").exists()                        # no meta.json written over them
    with pytest.raises(tc.TeacherCacheError, match=r"meta.json: no teacher cache here"):
        tc.TeacherCache(tmp_path)


def test_an_old_chunk_without_a_fingerprint_is_refused_asking_for_a_new_export(tmp_path):
    make_cache(tmp_path)
    path = tmp_path / "chunk_00000.json"
    chunk = json.loads(path.read_text())
    del chunk["fingerprint"]
    path.write_text(json.dumps(chunk))
    want = r"chunk_00000.json: the chunk does not say which teacher wrote it .*export it again"
    with pytest.raises(tc.TeacherCacheError, match=want):
        tc.TeacherCache(tmp_path)
    with pytest.raises(tc.TeacherCacheError, match=want):
        plan(tmp_path)


def test_point_indices_beyond_the_scan_are_refused(tmp_path):
    make_cache(tmp_path, scan_points=5)
    np.save(tmp_path / "chunk_00001.point_index.npy", np.array([0, 2, 4], np.int32) + 10**6)
    cache = tc.TeacherCache(tmp_path)
    cache.rows("00/000000", 5)                                          # the other chunk is fine
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.point_index.npy: frame 00/000001 has point index "
                                                   r"1000004, its scan has 5 points"):
        cache.rows("00/000001", 5)
    np.save(tmp_path / "chunk_00001.point_index.npy", np.array([-1, 2, 4], np.int32))
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.point_index.npy: frame 00/000001 has point index -1"):
        tc.TeacherCache(tmp_path).rows("00/000001", 5)
    with pytest.raises(ValueError, match=r"chunk_00000.point_index.npy: frame 00/000000: point indices must be"):
        tc.write_chunk(tmp_path, 0, FRAMES[:1], [np.zeros((1, 2))], [np.array([5])], [5], fingerprint=FP_A)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused_naming_the_chunk_once_per_chunk(tmp_path, monkeypatch, bad):
    make_cache(tmp_path)
    logits = np.arange(6.0, dtype=np.float16).reshape(3, 2)
    logits[1, 0] = bad
    np.save(tmp_path / "chunk_00001.logits.npy", logits)
    cache = tc.TeacherCache(tmp_path)
    maps = []
    real = tc._map
    monkeypatch.setattr(tc, "_map", lambda *a: maps.append(a[0]) or real(*a))
    for _ in range(5):
        cache.rows("00/000000", 5)
    assert len(maps) == 2                                               # checked once, when first mapped
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.logits.npy: non-finite logits \(NaN/inf\) in 1 of 3 "
                                                   r"rows \(first: row 1, frame 00/000001\)"):
        cache.rows("00/000001", 5)
    with pytest.raises(ValueError, match=r"chunk_00000.logits.npy: frame 00/000000: non-finite teacher logits"):
        tc.write_chunk(tmp_path, 0, FRAMES[:1], [logits.astype(np.float32)], [np.array([0, 1, 2])], [5],
                       fingerprint=FP_A)


def test_a_damaged_chunk_met_in_a_loader_worker_keeps_its_message(tmp_path):
    make_cache(tmp_path)
    logits = np.zeros((3, 2), np.float16)
    logits[2] = np.nan
    np.save(tmp_path / "chunk_00000.logits.npy", logits)

    class Scans(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"frame_id": "00/000000", "num_scan_points": 5, "point_index": torch.arange(5)}

    ds = tc.TeacherCacheDataset(Scans(), tc.TeacherCache(tmp_path))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(tc.TeacherCacheError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"{tmp_path}/chunk_00000.logits.npy: non-finite logits")
    assert "Original Traceback" in err.value.worker_traceback


def test_a_truncated_npy_names_the_file(tmp_path):
    make_cache(tmp_path)
    path = tmp_path / "chunk_00001.logits.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.logits.npy: not a readable .npy array "
                                                   r"\(mmap length is greater than file size\)"):
        tc.TeacherCache(tmp_path).rows("00/000001", 5)
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.logits.npy: not a readable .npy array"):
        tc.TeacherCache(tmp_path).rows("00/000001", 5)


def test_an_object_array_names_the_file(tmp_path):
    make_cache(tmp_path)
    np.save(tmp_path / "chunk_00001.point_index.npy", np.array([0, 2, 4], dtype=object), allow_pickle=True)
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.point_index.npy: not a readable .npy array "
                                                   r"\(Array can't be memory-mapped"):
        tc.TeacherCache(tmp_path).rows("00/000001", 5)
    np.save(tmp_path / "chunk_00001.point_index.npy", np.array([0.0, 2.0, 4.0]))
    with pytest.raises(tc.TeacherCacheError, match=r"chunk_00001.point_index.npy: holds float64, expected integer"):
        tc.TeacherCache(tmp_path).rows("00/000001", 5)


@pytest.mark.parametrize("key, value, want", [
    ("chunk_frames", 0, "chunk_frames must be a whole number >= 1, got 0"),
    ("chunk_frames", "1", "chunk_frames must be a whole number >= 1, got '1'"),
    ("num_classes", "2", "num_classes must be a whole number >= 1, got '2'"),
    ("num_classes", 3, "2 class_names for num_classes 3"),
    ("frames", "00/000000", "frames must be a list of strings, got '00/000000'"),
    ("fingerprint", None, "fingerprint must be a mapping, got None"),
])
def test_a_damaged_meta_json_names_the_file_and_the_field(tmp_path, key, value, want):
    make_cache(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta[key] = value
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(tc.TeacherCacheError, match=re.escape(f"{tmp_path}/meta.json: damaged teacher cache "
                                                             f"meta.json: {want}")):
        tc.TeacherCache(tmp_path)
    with pytest.raises(tc.TeacherCacheError, match=rf"{tmp_path}/meta.json: damaged"):
        plan(tmp_path)                                                  # the export too (was a ZeroDivisionError)


def test_chunk_frames_0_of_the_export_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"--chunk-frames \(chunk_frames\) must be a whole number >= 1, got 0"):
        plan(tmp_path / "new", chunk_frames=0)
