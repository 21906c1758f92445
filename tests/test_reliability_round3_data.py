"""Reliability round 3 (issue 22), SemanticKITTI data: frame lists whose files disagree,
folders in place of files, degenerate calibrations and all-unlabelled training data are
errors naming the file (or the data and the setting), never silent data loss."""
import re

import numpy as np
import pytest

from pcseg_kd.data.kitti import KittiDataError, SemanticKITTIDataset
from pcseg_kd.data.kitti.calib import read_calib
from pcseg_kd.data.kitti.synthetic.calibrations import KITTI_00_02
from pcseg_kd.data.kitti.testing import write_frame


def dataset(root, **kw):
    kw.setdefault("augment", False)
    return SemanticKITTIDataset(str(root), split="train", sequences=["00"], **kw)


def load_error(ds, index=0):
    with pytest.raises(KittiDataError) as info:
        ds[index]
    return info.value


# ----------------------------------------------------------------------------- frame lists
def test_missing_scan_beside_its_label_and_image_names_the_bin(tmp_path):
    for i in range(3):
        p = write_frame(tmp_path, frame=f"{i:06d}", seed=i)
    p["scan"].unlink()  # 000002.bin gone, its .label and .png still there
    with pytest.raises(KittiDataError) as info:
        dataset(tmp_path)
    assert info.value.path == str(p["scan"])
    assert "scan not found, but labels/000002.label exists (1 such frame(s) in sequence 00)" in str(info.value)


def test_missing_scan_beside_its_image_only(tmp_path):
    p = write_frame(tmp_path, frame="000000")
    q = write_frame(tmp_path, frame="000001", seed=1)
    q["scan"].unlink()
    q["label"].unlink()
    with pytest.raises(KittiDataError, match=re.escape(f"{q['scan']}: scan not found, but image_2/000001.png")):
        dataset(tmp_path)
    # a LiDAR-only run does not read images: the stray .png is none of its business
    assert len(dataset(tmp_path, load_image=False)) == 1 and p["scan"].is_file()


def test_test_split_without_labels_folder_is_fine(tmp_path):
    p = write_frame(tmp_path)
    for f in p["label"].parent.iterdir():
        f.unlink()
    p["label"].parent.rmdir()
    assert len(SemanticKITTIDataset(str(tmp_path), split="test", sequences=["00"])) == 1


@pytest.mark.parametrize("kind", ["label", "scan", "image"])
def test_a_folder_in_place_of_a_file_says_so(tmp_path, kind):
    p = write_frame(tmp_path)
    p[kind].unlink()
    p[kind].mkdir()
    err = load_error(dataset(tmp_path))
    assert err.path == str(p[kind]) and "is a directory, not a file" in err.problem, str(err)


# ----------------------------------------------------------------------------- calibration
def calib_with(**changes):
    calib = {k: np.array(v, dtype=np.float64).copy() for k, v in KITTI_00_02.items()}
    for key, fn in changes.items():
        fn(calib[key])
    return calib


def zero_row(r):
    def f(m):
        m[r, :] = 0.0
    return f


def set_entry(r, c, v):
    def f(m):
        m[r, c] = v
    return f


@pytest.mark.parametrize("changes, pattern", [
    ({"P2": zero_row(2)}, r"P2: row 2 of its 3x3 part is all zeros"),
    ({"P2": zero_row(0)}, r"P2: row 0 of its 3x3 part is all zeros"),
    ({"Tr": lambda m: m.fill(0.0)}, r"Tr: row 0 of its 3x3 part is all zeros"),
    ({"P2": set_entry(0, 0, 1e300)}, r"P2: entry \(0, 0\) = 1e\+300 is beyond 1e\+06"),
    ({"Tr": set_entry(1, 3, -1e300)}, r"Tr: entry \(1, 3\) = -1e\+300 is beyond 1e\+06"),
])
def test_degenerate_calibration_names_the_calib_file(tmp_path, changes, pattern):
    p = write_frame(tmp_path, calib=calib_with(**changes))
    with pytest.raises(KittiDataError) as info:
        read_calib(p["calib"])
    assert info.value.path == str(p["calib"]) and re.search(pattern, info.value.problem), str(info.value)
    err = load_error(dataset(tmp_path))
    assert err.path == str(p["calib"]), str(err)


def test_calibration_that_maps_nothing_ahead_into_the_image_names_the_calib_file(tmp_path):
    # Tr turned around (x -> -x): the camera looks backwards; every scan would fail on its own
    flipped = calib_with(Tr=lambda m: m.__setitem__(slice(None), m @ np.diag([-1.0, -1.0, 1.0, 1.0])))
    points = np.random.default_rng(0).uniform([-30, -5, -1, 0], [-5, 5, 1, 1], (500, 4))  # behind the car
    p = write_frame(tmp_path, points=points, calib=flipped)
    err = load_error(dataset(tmp_path))
    assert err.path == str(p["calib"]) and "maps no point ahead of the LiDAR" in err.problem, str(err)


def test_principal_point_of_a_degenerate_projection_names_the_calib_file():
    from pcseg_kd.data.kitti.projection import check_image_size
    m = np.zeros((3, 4))
    m[0, 0] = m[1, 1] = 700.0  # third row zero: no depth
    with pytest.raises(KittiDataError, match=r"^calib.txt: P2 @ Tr: projection matrix has a zero third row"):
        check_image_size("000000.png", (376, 1241), m, "calib.txt")
    m[0, 0] = m[1, 1] = 1e300
    m[2, :3] = [1e300, 1e300, 1e300]  # inf / inf: NaN
    with pytest.raises(KittiDataError, match=r"^calib.txt: P2 @ Tr: non-finite principal point"):
        check_image_size("000000.png", (376, 1241), m, "calib.txt")


def test_kitti_calibrations_pass():
    from pcseg_kd.data.kitti.calib import check_matrix
    from pcseg_kd.data.kitti.synthetic.calibrations import KITTI_04_12
    for calib in (KITTI_00_02, KITTI_04_12):
        for key, m in calib.items():
            check_matrix("calib.txt", key, np.asarray(m, dtype=np.float64))


# ----------------------------------------------------------------------------- unlabelled data
def test_all_unlabelled_training_data_names_the_data_and_the_setting(tmp_path):
    for i in range(2):
        write_frame(tmp_path, frame=f"{i:06d}", semantic=np.zeros(2000, np.uint32), seed=i)  # raw 0: unlabelled
    ds = dataset(tmp_path)
    with pytest.raises(KittiDataError) as info:
        ds.label_counts()
    msg = str(info.value)
    assert info.value.path == str(tmp_path) and "no labelled point in the training data (sequences 00, 2 frames)" in msg
    assert "loss.class_weights: frequency" in msg
    with pytest.raises(KittiDataError, match=r"no labelled point .* loss.class_weights: null has nothing to learn"):
        ds.check_has_labels("loss.class_weights: null")


def test_one_labelled_frame_is_enough(tmp_path):
    write_frame(tmp_path, frame="000000", semantic=np.zeros(2000, np.uint32))
    write_frame(tmp_path, frame="000001", seed=1)  # road
    ds = dataset(tmp_path)
    ds.check_has_labels()
    counts = ds.label_counts()
    assert counts.sum() == 2000 and counts[ds.class_names.index("road")] == 2000


def test_unlabelled_in_view_but_labelled_behind_is_unlabelled_under_fov(tmp_path):
    rng = np.random.default_rng(0)
    ahead = np.c_[rng.uniform(8, 30, 500), rng.uniform(-3, 3, 500), rng.uniform(-1.5, 0.5, 500), rng.uniform(0, 1, 500)]
    behind = ahead * [-1, 1, 1, 1]
    sem = np.r_[np.zeros(500), np.full(500, 40)].astype(np.uint32)  # in view: unlabelled; behind: road
    write_frame(tmp_path, points=np.r_[ahead, behind], semantic=sem)
    dataset(tmp_path).check_has_labels()  # the full scan has labels
    with pytest.raises(KittiDataError, match=r"every label of their in-view points maps to ignore"):
        dataset(tmp_path, fov_only=True).check_has_labels()
