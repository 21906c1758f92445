"""Readers for one SemanticKITTI frame's files, with checks that name the file.

A ``.bin`` scan is float32 rows (x, y, z, remission); a ``.label`` file is one uint32 per
point (semantic id in the low 16 bits, instance id in the high 16). Sizes are checked
against each other before anything is reshaped, so a truncated download fails here with
the file name, not later as a shape error in numpy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np

from .errors import KittiDataError, PathLike

POINT_BYTES = 16  # 4 x float32


def read_scan(path: PathLike) -> np.ndarray:
    """``velodyne/NNNNNN.bin`` -> (N, 4) float32 x, y, z, remission."""
    path = Path(path)
    size = _file_size(path, "scan")
    if size == 0:
        raise KittiDataError(path, "empty scan (0 bytes)")
    if size % POINT_BYTES:
        raise KittiDataError(path, f"size {size} bytes is not a multiple of {POINT_BYTES} "
                                   f"(4 float32 per point): truncated or not a KITTI scan")
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise KittiDataError(path, f"non-finite values (NaN/inf) in {bad.size} of {len(points)} points "
                                   f"(first at row {bad[0]})")
    return points


def read_label(path: PathLike, num_points: int) -> Tuple[np.ndarray, np.ndarray]:
    """``labels/NNNNNN.label`` -> (semantic uint32, instance uint32), checked against ``num_points``."""
    path = Path(path)
    size = _file_size(path, "label file")
    if size % 4:
        raise KittiDataError(path, f"size {size} bytes is not a multiple of 4 (one uint32 per point)")
    if size // 4 != num_points:
        raise KittiDataError(path, f"label count mismatch: {size // 4} labels for a scan of {num_points} points")
    words = np.fromfile(path, dtype=np.uint32)
    return words & np.uint32(0xFFFF), words >> np.uint32(16)


def read_image(path: PathLike) -> np.ndarray:
    """``image_2/NNNNNN.png`` -> (H, W, 3) uint8 RGB."""
    import cv2  # imported here so that scan-only users do not pay for OpenCV

    path = Path(path)
    _file_size(path, "image")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise KittiDataError(path, "unreadable image (OpenCV could not decode it)")
    return np.ascontiguousarray(img[:, :, ::-1])


def _file_size(path: Path, what: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise KittiDataError(path, f"{what} not found") from None
    except OSError as e:
        raise KittiDataError(path, f"cannot stat {what}: {e}") from None


def write_scan(path: PathLike, points: np.ndarray) -> None:
    np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 4).tofile(path)


def write_label(path: PathLike, semantic: np.ndarray, instance: np.ndarray) -> None:
    words = (np.asarray(instance, dtype=np.uint32) << np.uint32(16)) | (np.asarray(semantic, dtype=np.uint32) & np.uint32(0xFFFF))
    words.astype(np.uint32).tofile(path)
