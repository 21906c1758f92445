"""Readers for one SemanticKITTI frame's files, with checks that name the file.

A ``.bin`` scan is float32 rows (x, y, z, remission); a ``.label`` file is one uint32 per
point (semantic id in the low 16 bits, instance id in the high 16). Sizes are checked
against each other before anything is reshaped, so a truncated download fails here with
the file name, not later as a shape error in numpy.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Tuple

import numpy as np

from .errors import KittiDataError, PathLike

POINT_BYTES = 16  # 4 x float32


#: No KITTI LiDAR measures beyond ~120 m; a finite coordinate beyond this is a corrupt value
#: (one point at 1e8 m drives the stem's BatchNorm variance to 1e8 and the model to 0 mIoU).
MAX_ABS_COORD = 1000.0
#: KITTI remission lies in [0, 1] (other sensors: 0..255 or 0..65535).
MAX_ABS_REMISSION = 1e6


def read_scan(path: PathLike, max_abs_coord: float = MAX_ABS_COORD,
              max_abs_remission: float = MAX_ABS_REMISSION) -> np.ndarray:
    """``velodyne/NNNNNN.bin`` -> (N, 4) float32 x, y, z, remission.

    Rejected with :class:`KittiDataError` naming the file (never passed on): a size that is
    not whole points, NaN/inf values, any coordinate with ``|x|``, ``|y|`` or ``|z|`` above
    ``max_abs_coord`` metres, any ``|remission|`` above ``max_abs_remission``."""
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
    bad_xyz = np.abs(points[:, :3]).max(axis=1) > max_abs_coord
    if bad_xyz.any():
        bad = np.flatnonzero(bad_xyz)
        raise KittiDataError(path, f"coordinates beyond {max_abs_coord:g} m in {bad.size} of {len(points)} points "
                                   f"(first at row {bad[0]}: {points[bad[0], :3].tolist()}): not a LiDAR "
                                   f"measurement (corrupt file?); a scan is rejected whole, since dropping "
                                   f"points would misalign its labels")
    bad_rem = np.abs(points[:, 3]) > max_abs_remission
    if bad_rem.any():
        bad = np.flatnonzero(bad_rem)
        raise KittiDataError(path, f"remission beyond {max_abs_remission:g} in {bad.size} of {len(points)} points "
                                   f"(first at row {bad[0]}: {float(points[bad[0], 3])!r}): corrupt file?")
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


def read_image_size(path: PathLike) -> Tuple[int, int]:
    """``image_2/NNNNNN.png`` -> (H, W) from the PNG header, without decoding the pixels
    (another format: decoded)."""
    path = Path(path)
    size = _file_size(path, "image")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return read_image(path).shape[:2]
    if size < 33 or head[12:16] != b"IHDR":  # signature, IHDR (length, type, 13 bytes, CRC)
        raise KittiDataError(path, "damaged PNG: no IHDR header after the signature")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not (w and h):
        raise KittiDataError(path, f"damaged PNG: header says {w}x{h} pixels")
    return h, w


def _file_size(path: Path, what: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KittiDataError(path, f"{what} not found") from None
    except OSError as e:
        raise KittiDataError(path, f"cannot stat {what}: {e}") from None
    # a folder's st_size is its directory block (4096): read as data it looks like a wrong count
    if stat.S_ISDIR(st.st_mode):
        raise KittiDataError(path, f"{what} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise KittiDataError(path, f"{what} is not a regular file")
    return st.st_size


def write_scan(path: PathLike, points: np.ndarray) -> None:
    np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 4).tofile(path)


def write_label(path: PathLike, semantic: np.ndarray, instance: np.ndarray) -> None:
    words = (np.asarray(instance, dtype=np.uint32) << np.uint32(16)) | (np.asarray(semantic, dtype=np.uint32) & np.uint32(0xFFFF))
    words.astype(np.uint32).tofile(path)
