"""Checkpoints: weights_only loading (a crafted pickle must not run), content checksum,
last.pt's previous copy, RNG states in weights_only types; atomic writes and strict JSON."""
import json
import os
import pickle
import random
import stat

import numpy as np
import pytest
import torch

from pcseg_kd.engine import checkpoint as ckpt
from pcseg_kd.utils import io as uio


class _RunsCode:
    """Unpickling calls ``os.system`` (a classic malicious pickle)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_crafted_checkpoint_does_not_run_and_is_refused_by_name(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "teacher_evil.pt"
    payload = {"model": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}
    if fmt == "torch_zip":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    # the crafted file does run code under a plain pickle load: the test is not vacuous
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_RunsCode(probe)))
    assert probe.exists()

    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(bad)
    assert not marker.exists(), "loading the checkpoint ran code"
    msg = str(info.value)
    assert str(bad) in msg and "refused" in msg and "system" in msg


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
                      "n": torch.tensor(5)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 32, generator=g)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}]},
            "epoch": 2, "metrics": {"miou": float("nan"), "name": "x"}, "rng": [ckpt.rng_state()]}


def test_round_trip_and_checksum_catches_zeroed_bytes(tmp_path):
    path = tmp_path / "final.pt"
    ckpt.save_checkpoint(path, _state())
    back = ckpt.load_checkpoint(path)
    assert ckpt.CHECKSUM_KEY not in back
    assert torch.equal(back["model"]["w"], _state()["model"]["w"]) and back["epoch"] == 2
    raw = bytearray(path.read_bytes())
    # zero 256 bytes inside the exp_avg tensor's data (found by its bytes, not guessed)
    needle = _state()["optimizer"]["state"][0]["exp_avg"].numpy().tobytes()[:64]
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 64: at + 320] = bytes(256)
    path.write_bytes(bytes(raw))
    # torch itself loads the damaged file without any complaint: this is what the checksum is for
    assert torch.load(path, weights_only=True)["epoch"] == 2
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*damaged"):
        ckpt.load_checkpoint(path)
    # metadata-only (mmap) reads skip the tensor hash unless asked
    assert ckpt.load_checkpoint(path, mmap=True)["epoch"] == 2
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(path, mmap=True, verify=True)


def test_4kib_zeroed_in_the_middle_of_last_pt_offers_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    s1 = _state()
    ckpt.save_checkpoint(path, s1)
    assert not ckpt.previous_path(path).exists()
    s2 = _state()
    s2["model"]["w"] = s2["model"]["w"] * 2
    s2["epoch"] = 3
    big = torch.randn(4096)
    s2["model"]["big"] = big
    ckpt.save_checkpoint(path, s2)
    prev = tmp_path / "last.prev.pt"
    assert prev.is_file() and ckpt.load_checkpoint(prev)["epoch"] == 2
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid - 2048: mid + 2048] = bytes(4096)
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and str(prev) in msg and "can be used" in msg and "it verifies" in msg
    # and the previous one really is usable
    assert torch.equal(ckpt.load_checkpoint(prev)["model"]["w"], s1["model"]["w"])
    # saving again rotates: the damaged file becomes the previous one only after the new one is complete
    s3 = _state()
    s3["epoch"] = 4
    ckpt.save_checkpoint(path, s3)
    assert ckpt.load_checkpoint(path)["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_other_files_keep_no_previous_copy(tmp_path):
    ckpt.save_checkpoint(tmp_path / "final.pt", {"a": 1})
    ckpt.save_checkpoint(tmp_path / "final.pt", {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]


def test_bare_state_dict_without_checksum_still_loads(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "bare.pt")
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "bare.pt")["w"], torch.ones(3))


def test_rng_state_is_weights_only_and_restores_bitwise(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.random(), np.random.randn(3), torch.randn(2)  # noqa: B018 (advance, incl. numpy's cached gaussian)
    np.random.standard_normal()
    path = tmp_path / "rng.pt"
    ckpt.save_checkpoint(path, {"rng": [ckpt.rng_state()]})
    expect = (random.random(), np.random.standard_normal(5).tolist(), np.random.randint(0, 1 << 30, 4).tolist(),
              torch.randn(4).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = torch.load(path, weights_only=True)  # plain torch, weights_only: loads
    ckpt.set_rng_state(state["rng"][0])
    got = (random.random(), np.random.standard_normal(5).tolist(), np.random.randint(0, 1 << 30, 4).tolist(),
           torch.randn(4).tolist())
    assert got == expect


def test_checkpoint_of_an_older_version_with_numpy_rng_state_still_loads(tmp_path):
    """Older checkpoints stored numpy's RNG state as an array: exactly numpy's array globals are
    allowed for them; a numpy global beside a foreign one is still refused."""
    old = {"rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
           "epoch": 1}
    torch.save(old, tmp_path / "last.pt")
    back = ckpt.load_checkpoint(tmp_path / "last.pt")
    np.testing.assert_array_equal(back["rng"][0]["numpy"][1], old["rng"][0]["numpy"][1])
    marker = tmp_path / "PWNED"
    torch.save({**old, "x": _RunsCode(marker)}, tmp_path / "mixed.pt")
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_checkpoint(tmp_path / "mixed.pt")
    assert not marker.exists()


def test_rng_state_of_older_versions_still_restores():
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(old)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_content_digest_is_exact():
    a = {"x": torch.zeros(3), "f": 0.1}
    assert ckpt.content_digest(a) == ckpt.content_digest({"x": torch.zeros(3), "f": 0.1})
    assert ckpt.content_digest(a) != ckpt.content_digest({"x": torch.zeros(3), "f": 0.1 + 1e-17 * 2})
    assert ckpt.content_digest(a) != ckpt.content_digest({"x": torch.zeros(3, dtype=torch.float64), "f": 0.1})
    assert ckpt.content_digest(a) != ckpt.content_digest({"x": torch.zeros(1, 3), "f": 0.1})


# -- atomic writes ---------------------------------------------------------------------------
def test_atomic_write_removes_leftovers_of_a_killed_write(tmp_path):
    target = tmp_path / "metrics.json"
    # a write killed in another process: tagged with a pid that no longer runs
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    left = tmp_path / f".metrics.json.{dead}.abc123.tmp"
    left.write_text("partial")
    old_untagged = tmp_path / ".metrics.json.q1w2e3.tmp"  # the format before pid tags
    old_untagged.write_text("partial")
    os.utime(old_untagged, (0, 0))
    alive = tmp_path / f".metrics.json.{os.getppid()}.zzz.tmp"  # a live writer's file is left alone
    alive.write_text("in progress")
    same_pid = tmp_path / f".metrics.json.{os.getpid()}.old.tmp"  # a killed process that had our pid
    same_pid.write_text("partial")
    other = tmp_path / ".other.json.1.tmp"
    other.write_text("x")
    uio.write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", alive.name, other.name])


def test_atomic_write_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = uio.atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        p = uio.atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        os.umask(0o002)
        p = ckpt.save_checkpoint(tmp_path / "final.pt", {"a": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_atomic_write_into_a_read_only_folder_names_the_file(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root may write into a 0500 folder: make the temp file creation fail as it would
        import errno
        import tempfile

        def denied(dir=None, prefix="", suffix="", **kw):
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x" + suffix))
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"cannot write {ro / 'x.json'}"):
            uio.write_json(ro / "x.json", {})
    finally:
        ro.chmod(0o700)


def test_atomic_write_disk_full_names_the_file(tmp_path):
    import errno

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'm.json'}: No space left") as info:
        uio.atomic_write(tmp_path / "m.json", full)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# -- strict JSON -----------------------------------------------------------------------------
def test_json_writer_writes_null_for_non_finite_floats(tmp_path):
    obj = {"miou": float("nan"), "iou": [1.5, float("inf"), -float("inf"), np.float32("nan"), np.float64(2.5)],
           "n": np.int64(3), "t": torch.tensor(float("nan")), "nested": ({"x": float("nan")},), "ok": 0.1}
    p = uio.write_json(tmp_path / "m.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # a strict parser (one that refuses NaN/Infinity, as jq and JavaScript do) reads it
    def refuse(c):
        raise ValueError(c)
    back = json.loads(text, parse_constant=refuse)
    assert back == {"miou": None, "iou": [1.5, None, None, None, 2.5], "n": 3, "t": None,
                    "nested": [{"x": None}], "ok": 0.1}
    # plain json.dumps would have written bare NaN: the writer is what prevents it
    assert "NaN" in json.dumps(obj["miou"])


def test_runner_write_json_is_strict(tmp_path):
    from pcseg_kd.engine.runner import write_json
    write_json(tmp_path / "r.json", {"a": float("nan")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None}


def test_checkpoint_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno
    import io

    real_fdopen = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Full(real_fdopen(fd, mode, *a, **k)))
    target = tmp_path / "last.pt"
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device") as info:
        ckpt.save_checkpoint(target, {"w": torch.randn(10000)})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no temporary file left
