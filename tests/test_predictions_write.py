"""The one write path of prediction files (pcseg_kd/engine/kitti/predict.py): atomic, never
through a symlink, a failed write naming the file and the cause, a folder with .label files
refused unless --overwrite, and then the stale files of other frames removed."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pcseg_kd.engine.kitti.predict import (PredictionWriteError, check_predictions_dir, remove_stale,
                                           write_label_file)


def label_path(root, seq="11", frame="000000"):
    return root / "sequences" / seq / "predictions" / f"{frame}.label"


def test_write_is_the_benchmark_format_and_leaves_no_temporary(tmp_path):
    raw = np.array([0, 10, 40, 252, 2 ** 32 - 1], dtype=np.uint32)
    path = label_path(tmp_path)
    write_label_file(tmp_path, path, raw)
    assert path.read_bytes() == raw.astype("<u4").tobytes()  # little-endian uint32, nothing else
    assert os.listdir(path.parent) == ["000000.label"]
    write_label_file(tmp_path, path, raw[:2].astype(np.int64))  # converted, not written as int64
    assert np.fromfile(path, np.uint32).tolist() == [0, 10]


def test_a_symlinked_label_file_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    root = tmp_path / "sub"
    path = label_path(root)
    path.parent.mkdir(parents=True)
    path.symlink_to(outside)
    with pytest.raises(PredictionWriteError, match=rf"refusing to write {path}: {path} is a symlink \(to {outside}\)"):
        write_label_file(root, path, np.zeros(4, np.uint32))
    assert outside.read_text() == "keep me" and path.is_symlink()


def test_a_symlinked_folder_inside_the_predictions_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "sub"
    (root / "sequences" / "11").mkdir(parents=True)
    (root / "sequences" / "11" / "predictions").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PredictionWriteError, match=r"sequences/11/predictions is a symlink"):
        write_label_file(root, label_path(root), np.zeros(4, np.uint32))
    assert list(elsewhere.iterdir()) == []


def test_a_full_disk_names_the_file_and_the_cause_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = label_path(tmp_path)
    write_label_file(tmp_path, path, np.arange(6, dtype=np.uint32))
    old = path.read_bytes()

    def full(fd):  # the data reaches the disk at fsync: where a full disk shows
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PredictionWriteError) as e:
        write_label_file(tmp_path, path, np.arange(100, dtype=np.uint32))
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert path.read_bytes() == old  # not truncated: the rename never happened
    assert os.listdir(path.parent) == ["000000.label"]  # the temporary is gone


def test_check_predictions_dir_refuses_labels_unless_overwrite(tmp_path):
    assert check_predictions_dir(tmp_path / "new", overwrite=False) == []
    (tmp_path / "empty").mkdir()
    assert check_predictions_dir(tmp_path / "empty", overwrite=False) == []
    root = tmp_path / "sub"
    a, b = label_path(root, "11", "000000"), label_path(root, "12", "000003")
    for p in (a, b):
        write_label_file(root, p, np.zeros(2, np.uint32))
    with pytest.raises(PredictionWriteError, match=rf"{root} already holds 2 \.label files.*--overwrite"):
        check_predictions_dir(root, overwrite=False)
    old = check_predictions_dir(root, overwrite=True)
    assert old == [a, b]
    assert remove_stale(old, {a}) == [b]
    assert a.is_file() and not b.exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PredictionWriteError, match="is not a folder"):
        check_predictions_dir(tmp_path / "afile", overwrite=True)
