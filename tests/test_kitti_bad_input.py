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
    # read without pixels (a LiDAR student): the header is checked, the body is never decoded
    expect_error(dataset(tmp_path).without_pixels(), p["image"], r"damaged PNG: no IHDR header")
    p["image"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4) + b"IHDR" + bytes(8) + bytes(9))
    expect_error(dataset(tmp_path).without_pixels(), p["image"], r"damaged PNG: header says 0x0 pixels")
    p["image"].write_bytes(b"not a PNG at all")  # another format is decoded to learn its size
    expect_error(dataset(tmp_path).without_pixels(), p["image"], r"unreadable image")


def test_image_size_from_the_png_header_is_the_decoded_size(tmp_path):
    import cv2

    from pcseg_kd.data.kitti.reader import read_image, read_image_size
    for i, (h, w) in enumerate([(1, 1), (94, 310), (376, 1241)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((h, w, 3), np.uint8))
        assert read_image_size(path) == read_image(path).shape[:2] == (h, w)
    jpg = tmp_path / "a.jpg"
    cv2.imwrite(str(jpg), np.zeros((5, 7, 3), np.uint8))
    assert read_image_size(jpg) == (5, 7)


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


@pytest.mark.parametrize("far", [1e8, -1e30, 1500.0])
def test_finite_but_absurd_coordinates_are_rejected(tmp_path, far):
    pts = np.random.default_rng(0).uniform(1, 20, (100, 4)).astype(np.float32)
    pts[:, 3] = 0.5
    pts[17, 2] = far
    p = write_frame(tmp_path, points=pts)
    expect_error(dataset(tmp_path), p["scan"], r"coordinates beyond 1000 m in 1 of 100 points \(first at row 17")
    # with skip_bad_frames the frame is skipped (and counted) rather than reaching the network
    pts[17, 2] = 999.0  # the bound itself is fine
    write_frame(tmp_path, points=pts)
    assert len(dataset(tmp_path)[0]["points"]) == 100


def test_absurd_remission_is_rejected(tmp_path):
    pts = np.random.default_rng(0).uniform(1, 20, (100, 4)).astype(np.float32)
    pts[3, 3] = 1e30
    p = write_frame(tmp_path, points=pts)
    expect_error(dataset(tmp_path), p["scan"], r"remission beyond 1e\+06 in 1 of 100 points \(first at row 3")


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_image_of_another_size_than_the_calibration_implies(tmp_path, scale):
    h, w = int(376 * scale), int(1241 * scale)
    p = write_frame(tmp_path, image_hw=(h, w))
    expect_error(dataset(tmp_path), p["image"],
                 rf"image size {w}x{h} does not fit calib {re.escape(str(p['calib']))}'s P2: .*implies about 1214x370")
    assert "image" not in dataset(tmp_path, load_image=False)[0]  # LiDAR-only use does not read it


def test_real_kitti_image_sizes_fit_their_calibrations(tmp_path):
    from pcseg_kd.data.kitti import lidar_to_image_matrix
    from pcseg_kd.data.kitti.projection import check_image_size
    from pcseg_kd.data.kitti.synthetic.calibrations import KITTI_04_12
    from pcseg_kd.data.kitti.testing import FIXTURE_SEQ

    real = FIXTURE_SEQ / "calib.txt"
    calib_00 = read_calib(real) if real.is_file() else None
    if calib_00 is not None:
        check_image_size("000000.png", (376, 1241), lidar_to_image_matrix(calib_00), real)
        check_image_size("000000.png", (376, 1241), calib_00["P2"], real)
    check_image_size("000000.png", (370, 1226), lidar_to_image_matrix(KITTI_04_12))
    for hw in [(185, 613), (740, 2452)]:
        with pytest.raises(KittiDataError, match=r"^000000.png: image size"):
            check_image_size("000000.png", hw, lidar_to_image_matrix(KITTI_04_12))
    # and a whole frame in KITTI 04-10's layout loads
    write_frame(tmp_path, image_hw=(370, 1226), calib=KITTI_04_12)
    assert len(dataset(tmp_path)[0]["img_point_idx"]) > 0


def test_principal_point_of_p2_times_tr_is_p2s():
    from pcseg_kd.data.kitti import lidar_to_image_matrix
    from pcseg_kd.data.kitti.projection import principal_point
    from pcseg_kd.data.kitti.synthetic.calibrations import KITTI_00_02
    cx, cy = principal_point(lidar_to_image_matrix(KITTI_00_02))
    assert abs(cx - KITTI_00_02["P2"][0, 2]) < 1e-3 and abs(cy - KITTI_00_02["P2"][1, 2]) < 1e-3


def test_kitti_data_error_survives_pickling_and_dataloader_workers(tmp_path):
    import pickle

    import torch

    err = KittiDataError(tmp_path / "x.bin", "size 17 bytes is not a multiple of 16")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is KittiDataError and str(back) == str(err) and back.path == err.path
    assert back.problem == err.problem

    p = write_frame(tmp_path)
    p["scan"].write_bytes(p["scan"].read_bytes()[:17])
    ds = dataset(tmp_path)
    with pytest.raises(KittiDataError) as direct:
        ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(KittiDataError) as info:
        next(iter(loader))
    assert type(info.value) is KittiDataError
    assert str(info.value) == str(direct.value)
    assert info.value.path == str(p["scan"]) and "size 17 bytes" in info.value.problem
    assert "DataLoader worker" in (info.value.worker_traceback or "")  # the worker's traceback is kept
