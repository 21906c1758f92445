"""Projection P2 @ Tr: brute force, the real fixture (~16 % in view), image size from the file."""
import shutil

import cv2
import numpy as np
import pytest

from pcseg_kd.data.kitti import SemanticKITTIDataset, lidar_to_image_matrix, project_to_image, read_calib
from pcseg_kd.data.kitti.testing import FIXTURE_SEQ, write_frame

needs_fixture = pytest.mark.skipif(not FIXTURE_SEQ.is_dir(),
                                   reason=f"real SemanticKITTI fixture not found at {FIXTURE_SEQ}")


def brute_force_projection(xyz, p2, tr, h, w):
    """One point at a time, with the 4x4 homogeneous velodyne->camera matrix spelt out."""
    tr44 = np.vstack([tr, [0, 0, 0, 1]])
    out = []
    for x in xyz:
        c = p2 @ (tr44 @ np.array([x[0], x[1], x[2], 1.0]))
        if c[2] <= 0:
            out.append(None)
            continue
        u, v = c[0] / c[2], c[1] / c[2]
        out.append((int(np.floor(v)), int(np.floor(u))) if (0 <= u < w and 0 <= v < h) else None)
    return out


def test_projection_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    xyz = np.concatenate([rng.uniform(-40, 40, (600, 3)), rng.uniform([2, -10, -2], [60, 10, 2], (400, 3))])
    paths = write_frame(tmp_path, image=False)
    calib = read_calib(paths["calib"])
    proj = project_to_image(xyz, lidar_to_image_matrix(calib), (376, 1241))
    ref = brute_force_projection(xyz, calib["P2"], calib["Tr"], 376, 1241)
    np.testing.assert_array_equal(proj.in_view, [r is not None for r in ref])
    np.testing.assert_array_equal(proj.pixel_indices(), [r for r in ref if r is not None])
    assert 100 < proj.in_view.sum() < 1000


def _real_frame_dataset(tmp_path, hw):
    seq = tmp_path / "sequences" / "00"
    (seq / "image_2").mkdir(parents=True)
    shutil.copytree(FIXTURE_SEQ / "velodyne", seq / "velodyne")
    shutil.copytree(FIXTURE_SEQ / "labels", seq / "labels")
    shutil.copy(FIXTURE_SEQ / "calib.txt", seq / "calib.txt")
    # no public image exists for this scan: a synthetic one of the real size stands in
    cv2.imwrite(str(seq / "image_2" / "000000.png"), np.full((*hw, 3), 128, np.uint8))
    return SemanticKITTIDataset(str(tmp_path), split="train", sequences=["00"], augment=False)


@needs_fixture
def test_real_scan_about_16_percent_in_view(tmp_path):
    ds = _real_frame_dataset(tmp_path, (376, 1241))
    s = ds[0]
    frac = len(s["img_point_idx"]) / len(s["points"])
    assert 0.15 < frac < 0.175, frac
    assert s["image"].shape == (3, 376, 1241)
    vu = s["img_pixel_vu"].numpy()
    assert vu[:, 0].min() >= 0 and vu[:, 0].max() < 376 and vu[:, 1].min() >= 0 and vu[:, 1].max() < 1241
    # all in-view points are in front of the car (x > 0 in the velodyne frame)
    assert (s["points"][s["img_point_idx"], 0] > 0).all()


@needs_fixture
def test_image_size_is_read_from_the_image(tmp_path):
    # 1226 x 370 (sequences 04-10) still fits the 00 calibration's principal point; a much
    # smaller image is refused (tests/test_kitti_bad_input.py), so use the other real size
    other = _real_frame_dataset(tmp_path, (370, 1226))[0]
    calib = read_calib(FIXTURE_SEQ / "calib.txt")
    proj = project_to_image(other["points"][:, :3].numpy(), lidar_to_image_matrix(calib), (370, 1226))
    full = project_to_image(other["points"][:, :3].numpy(), lidar_to_image_matrix(calib), (376, 1241))
    assert len(other["img_point_idx"]) == proj.in_view.sum() < full.in_view.sum()
