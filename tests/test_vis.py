"""Rendering: the PNG shows the classes' official colours where their points are, errors are
clear, the CLI reads labels, predictions, image and calib, and open3d's absence is explained."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcseg_kd.data.kitti import LabelMap
from pcseg_kd.vis import class_colours, open3d_or_reason, render_scan

ROOT = Path(__file__).resolve().parents[1]


def png_pixels(path):
    import matplotlib.image
    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(int)


def test_colours_follow_the_label_map_and_ignored_is_grey():
    lm = LabelMap()
    cols = class_colours(np.array([0, 8, 255, -1]), lm.train_colors_rgb)
    np.testing.assert_allclose(cols[0], lm.train_colors_rgb[0] / 255)   # car
    np.testing.assert_allclose(cols[1], lm.train_colors_rgb[8] / 255)   # road
    np.testing.assert_allclose(cols[2], cols[3])


def test_render_draws_each_class_in_its_colour(tmp_path):
    lm = LabelMap()
    g = np.random.default_rng(0)
    pts = np.c_[g.uniform(-20, 20, (4000, 2)), g.uniform(-1, 1, 4000), np.zeros(4000)].astype(np.float32)
    road, car = 8, 0
    labels = np.where(pts[:, 0] > 0, road, car)
    out = render_scan(pts, {"labels": labels, "prediction": np.full(4000, road)}, lm.train_colors_rgb,
                      lm.class_names, tmp_path / "a.png", bev_range=25)
    px = png_pixels(out).reshape(-1, 3)
    have = {tuple(p) for p in px[::7]}
    for cls in (road, car):  # matplotlib draws the exact RGB of the class somewhere
        assert tuple(int(c) for c in lm.train_colors_rgb[cls]) in have, lm.class_names[cls]
    with pytest.raises(ValueError, match="prediction has 3 entries for 4000 points"):
        render_scan(pts, {"prediction": np.zeros(3)}, lm.train_colors_rgb, lm.class_names, tmp_path / "b.png")
    with pytest.raises(ValueError, match="nothing to draw"):
        render_scan(pts, {}, lm.train_colors_rgb, lm.class_names, tmp_path / "c.png")


def test_cli_on_a_synthetic_frame_with_predictions(tmp_path):
    from pcseg_kd.data.kitti.reader import read_scan, write_label
    from pcseg_kd.data.kitti.testing import tiny_synthetic

    root = tiny_synthetic(tmp_path / "d", sequences=("08",), frames=1, seed=2)
    n = len(read_scan(root / "sequences" / "08" / "velodyne" / "000000.bin"))
    pred_dir = tmp_path / "p" / "sequences" / "08" / "predictions"
    pred_dir.mkdir(parents=True)
    write_label(pred_dir / "000000.label", np.full(n, 40, dtype=np.uint32), np.zeros(n, dtype=np.uint32))  # road
    out = subprocess.run([sys.executable, str(ROOT / "tools/visualize_kitti.py"), "--root", str(root), "--frame",
                          "08/000000", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "v.png"),
                          "--open3d"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "v.png").stat().st_size > 10_000
    o3d, why = open3d_or_reason()
    if o3d is None:
        assert "pcseg_kd[vis]" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools/visualize_kitti.py"), "--root", str(root), "--frame",
                          "08/000009"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "000009.bin" in bad.stderr
