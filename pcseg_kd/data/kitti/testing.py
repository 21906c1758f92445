"""Helpers for tests: tiny datasets on disk and hand-made frames (bad ones included)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .calib import write_calib
from .errors import PathLike
from .reader import write_label, write_scan
from .synthetic.calibrations import KITTI_00_02
from .synthetic.generate import SyntheticConfig, generate_dataset
from .synthetic.lidar import LidarModel

FIXTURES = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures"
FIXTURE_SEQ = FIXTURES / "semantickitti" / "sequences" / "00"


def tiny_synthetic(out: PathLike, sequences: Sequence[str] = ("00", "08", "11"), frames: int = 2,
                   seed: int = 0, azimuth_steps: int = 512, render_scale: float = 0.25, **kw) -> Path:
    """A small, fast synthetic dataset (~30k points a scan, low-res render upsampled)."""
    cfg = SyntheticConfig(frames=frames, seed=seed, lidar=LidarModel(azimuth_steps=azimuth_steps),
                          render_scale=render_scale, **kw)
    generate_dataset(out, sequences, cfg, progress=False)
    return Path(out)


def write_frame(root: PathLike, sequence: str = "00", frame: str = "000000", points: Optional[np.ndarray] = None,
                semantic: Optional[np.ndarray] = None, image_hw=(376, 1241), calib: Optional[Dict] = None,
                image: bool = True, seed: int = 0) -> Dict[str, Path]:
    """Write one frame by hand: points default to a ring in front of the car, labels to road."""
    import cv2

    rng = np.random.default_rng(seed)
    seq = Path(root) / "sequences" / sequence
    for sub in ("velodyne", "labels", "image_2"):
        (seq / sub).mkdir(parents=True, exist_ok=True)
    if points is None:
        n = 2000
        az = rng.uniform(-np.pi, np.pi, n)
        r = rng.uniform(5, 30, n)
        points = np.stack([r * np.cos(az), r * np.sin(az), rng.uniform(-1.7, 1.0, n), rng.uniform(0, 1, n)], 1)
    paths = {"scan": seq / "velodyne" / f"{frame}.bin", "label": seq / "labels" / f"{frame}.label",
             "image": seq / "image_2" / f"{frame}.png", "calib": seq / "calib.txt"}
    write_scan(paths["scan"], np.asarray(points, np.float32))
    if semantic is None:
        semantic = np.full(len(points), 40, np.uint32)
    write_label(paths["label"], semantic, np.zeros(len(semantic), np.uint32))
    if image:
        cv2.imwrite(str(paths["image"]), rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8))
    write_calib(paths["calib"], calib or KITTI_00_02)
    return paths
