"""Every bad input gives a KittiDataError naming the file and the problem, or with
skip_bad_frames a warning and a count; never a numpy crash or a silent wrong result."""
import re

import numpy as np
import pytest

from pcseg_kd.data.kitti import KittiDataError, SemanticKITTIDataset, read_calib
from pcseg_kd.data.kitti.testing import write_frame


def dataset(root, **kw):
    kw.setdefault("augment", False)
    return SemanticKITTIDataset(str(root), split="train", sequences=["00"], **kw)


def expect_error(ds, path, pattern, index=0):
    with pytest.raises(KittiDataError) as info:
        ds[index]
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert re.search(pattern, msg), msg
    return info.value


def test_good_frame_loads(tmp_path):
    write_frame(tmp_path)
    s = dataset(tmp_path)[0]
    assert len(s["points"]) == 2000 and len(s["img_point_idx"]) > 0


@pytest.mark.parametrize("nbytes", [17, 2000 * 16 - 3, 8])
def test_truncated_or_odd_sized_bin(tmp_path, nbytes):
    p = write_frame(tmp_path)
    data = p["scan"].read_bytes()
    p["scan"].write_bytes(data[:nbytes])
    expect_error(dataset(tmp_path), p["scan"], rf"size {nbytes} bytes is not a multiple of 16")


def test_empty_scan(tmp_path):
    p = write_frame(tmp_path)
    p["scan"].write_bytes(b"")
    expect_error(dataset(tmp_path), p["scan"], r"empty scan")


def test_label_length_differs_from_scan(tmp_path):
    p = write_frame(tmp_path)
    p["label"].write_bytes(p["label"].read_bytes()[:-8])
    expect_error(dataset(tmp_path), p["label"], r"label count mismatch: 1998 labels for a scan of 2000 points")
    p["label"].write_bytes(b"abc")
    expect_error(dataset(tmp_path), p["label"], r"not a multiple of 4")


def test_missing_label_file(tmp_path):
    p = write_frame(tmp_path)
    p["label"].unlink()
    expect_error(dataset(tmp_path), p["label"], r"label file not found")
    # the test split has no labels and does not look for them
    assert not SemanticKITTIDataset(str(tmp_path), split="test", sequences=["00"])[0]["has_labels"]


def test_unknown_raw_label_ids(tmp_path):
    sem = np.full(2000, 40, np.uint32)
    sem[5:8] = 123
    p = write_frame(tmp_path, semantic=sem)
    expect_error(dataset(tmp_path), p["label"], r"unknown raw label ids: 123 \(x3\)")
    labels = dataset(tmp_path, unknown_labels="ignore")[0]["labels"]
    assert (labels[5:8] == 255).all() and (labels[8:] == 8).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinates(tmp_path, bad):
    pts = np.random.default_rng(0).uniform(1, 20, (100, 4)).astype(np.float32)
    pts[42, 1] = bad
    p = write_frame(tmp_path, points=pts)
    expect_error(dataset(tmp_path), p["scan"], r"non-finite values \(NaN/inf\) in 1 of 100 points \(first at row 42\)")


def test_missing_image(tmp_path):
    p = write_frame(tmp_path, image=False)
    expect_error(dataset(tmp_path), p["image"], r"image not found")
    assert "image" not in dataset(tmp_path, load_image=False)[0]  # LiDAR-only use needs none


def test_unreadable_image(tmp_path):
    p = write_frame(tmp_path)
    p["image"].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    expect_error(dataset(tmp_path), p["image"], r"unreadable image")


def test_missing_or_broken_calib(tmp_path):
    p = write_frame(tmp_path)
    p["calib"].unlink()
    expect_error(dataset(tmp_path), p["calib"], r"calibration file not found")
    p["calib"].write_text("P2: 1 2 3\n")
    expect_error(dataset(tmp_path), p["calib"], r"line 1 \(P2\): 3 numbers, expected 12")
    p["calib"].write_text("P2: " + " ".join(["1"] * 12) + "\n")
    with pytest.raises(KittiDataError, match="missing Tr"):
        read_calib(p["calib"])


def test_no_point_in_view(tmp_path):
    behind = np.random.default_rng(0).uniform([-30, -5, -1, 0], [-5, 5, 1, 1], (500, 4)).astype(np.float32)
    p = write_frame(tmp_path, points=behind)
    expect_error(dataset(tmp_path), p["scan"], r"no point in the camera's view \(000000.png, 1241x376")
    assert len(dataset(tmp_path, require_in_view=False)[0]["img_point_idx"]) == 0


def test_missing_sequence_and_root(tmp_path):
    with pytest.raises(KittiDataError, match="no sequences/ folder"):
        dataset(tmp_path)
    write_frame(tmp_path)
    with pytest.raises(KittiDataError, match="sequence 08: velodyne folder not found"):
        SemanticKITTIDataset(str(tmp_path), split="val")


def test_skip_bad_frames_warns_and_counts(tmp_path):
    for i in range(4):
        p = write_frame(tmp_path, frame=f"{i:06d}", seed=i)
        if i == 1:
            p["scan"].write_bytes(p["scan"].read_bytes()[:100])
        if i == 2:
            sem = np.full(2000, 999, np.uint32)
            write_frame(tmp_path, frame=f"{i:06d}", semantic=sem, seed=i)
    ds = dataset(tmp_path, skip_bad_frames=True)
    with pytest.warns(UserWarning) as caught:
        s = ds[1]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert re.search(r"skipping bad frame 00/000001 \(1 skipped so far\): .*000001.bin: size 100 bytes", messages[0])
    assert re.search(r"skipping bad frame 00/000002 \(2 skipped so far\): .*000002.label: unknown raw label", messages[1])
    assert s["frame_id"] == "00/000003"  # frames 1 and 2 are bad: the next good one
    assert ds.bad_frames.count == 2 and sum(ds.bad_frames.by_kind.values()) == 2
    with pytest.raises(KittiDataError):
        dataset(tmp_path)[1]
