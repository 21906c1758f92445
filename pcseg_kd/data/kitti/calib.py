"""KITTI odometry ``calib.txt`` and ``poses.txt``.

``calib.txt`` has lines ``P0: ..`` .. ``P3: ..`` and ``Tr: ..``, twelve numbers each (a
row-major 3x4 matrix). ``Tr`` takes velodyne coordinates to the rectified camera-0 frame,
``P2`` projects rectified camera-0 coordinates into the left colour camera (image_2), so
a LiDAR point projects with ``P2 @ [Tr; 0 0 0 1]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from .errors import KittiDataError, PathLike

REQUIRED_KEYS = ("P2", "Tr")


def read_calib(path: PathLike) -> Dict[str, np.ndarray]:
    """Return ``{"P0".."P3", "Tr": 3x4 float64}`` (whatever keys the file has; P2 and Tr required)."""
    path = Path(path)
    if not path.is_file():
        raise KittiDataError(path, "calibration file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KittiDataError(path, f"cannot read calibration: {e}") from None
    calib: Dict[str, np.ndarray] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise KittiDataError(path, f"line {lineno}: expected 'KEY: 12 numbers', got {line[:40]!r}")
        try:
            values = np.array([float(v) for v in rest.split()], dtype=np.float64)
        except ValueError:
            raise KittiDataError(path, f"line {lineno} ({key.strip()}): non-numeric value") from None
        if values.size != 12:
            raise KittiDataError(path, f"line {lineno} ({key.strip()}): {values.size} numbers, expected 12")
        if not np.isfinite(values).all():
            raise KittiDataError(path, f"line {lineno} ({key.strip()}): non-finite value")
        calib[key.strip()] = values.reshape(3, 4)
    missing = [k for k in REQUIRED_KEYS if k not in calib]
    if missing:
        raise KittiDataError(path, f"missing {', '.join(missing)} (has {', '.join(calib) or 'nothing'})")
    for key in calib:
        check_matrix(path, key, calib[key])
    return calib


#: KITTI's P matrices hold focal lengths and offsets of ~10^2..10^3 pixels and Tr a rotation
#: and a translation of < 1 m; an entry beyond this is a corrupt value (1e300 overflows the
#: projection to inf / NaN and every pixel index with it).
MAX_ABS_CALIB = 1e6


def check_matrix(path: PathLike, key: str, m: np.ndarray) -> None:
    """A 3x4 matrix that cannot be a camera projection or a rigid transform: an all-zero row
    (a projection or transform that loses a coordinate) or an absurd entry."""
    big = np.abs(m) > MAX_ABS_CALIB
    if big.any():
        r, c = np.argwhere(big)[0]
        raise KittiDataError(path, f"{key}: entry ({r}, {c}) = {m[r, c]:g} is beyond {MAX_ABS_CALIB:g} "
                                   "(corrupt calibration?)")
    zero = ~np.any(m[:, :3] != 0, axis=1)
    if zero.any():
        raise KittiDataError(path, f"{key}: row {int(np.flatnonzero(zero)[0])} of its 3x3 part is all zeros: "
                                   "not a camera projection or a rotation (corrupt calibration?)")


def to_homogeneous(m34: np.ndarray) -> np.ndarray:
    out = np.eye(4, dtype=np.float64)
    out[:3] = m34
    return out


def lidar_to_image_matrix(calib: Dict[str, np.ndarray], camera: str = "P2") -> np.ndarray:
    """3x4 matrix taking homogeneous velodyne points to homogeneous pixels: ``P @ [Tr; 0 0 0 1]``."""
    return calib[camera] @ to_homogeneous(calib["Tr"])


def write_calib(path: PathLike, calib: Dict[str, np.ndarray]) -> None:
    lines = [f"{k}: " + " ".join(f"{v:.12e}" for v in np.asarray(m, dtype=np.float64).reshape(-1))
             for k, m in calib.items()]
    Path(path).write_text("\n".join(lines) + "\n")


def read_poses(path: PathLike) -> np.ndarray:
    """``poses.txt``: one row-major 3x4 camera-0 pose per frame -> (F, 4, 4) float64."""
    path = Path(path)
    if not path.is_file():
        raise KittiDataError(path, "poses file not found")
    try:
        rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise KittiDataError(path, f"cannot parse poses: {e}") from None
    if rows.size == 0:
        return np.zeros((0, 4, 4))
    if rows.shape[1] != 12:
        raise KittiDataError(path, f"{rows.shape[1]} numbers per line, expected 12")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :] = rows.reshape(-1, 3, 4)
    return poses


def write_poses(path: PathLike, poses: np.ndarray) -> None:
    poses = np.asarray(poses, dtype=np.float64)[:, :3, :].reshape(len(poses), 12)
    np.savetxt(path, poses, fmt="%.12e")


def velodyne_poses(cam_poses: np.ndarray, calib: Dict[str, np.ndarray]) -> np.ndarray:
    """Camera-0 poses -> velodyne poses in the first velodyne frame: ``Tr^-1 @ P @ Tr``
    (the convention of the semantic-kitti-api)."""
    tr = to_homogeneous(calib["Tr"])
    return np.linalg.inv(tr) @ cam_poses @ tr
