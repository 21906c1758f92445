"""LiDAR points -> pixels of image_2, vectorised."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass
class Projection:
    """Per point: continuous pixel (u = column, v = row), depth along the optical axis,
    and whether it lands inside the image in front of the camera."""

    uv: np.ndarray        # (N, 2) float64
    depth: np.ndarray     # (N,) float64
    in_view: np.ndarray   # (N,) bool

    def pixel_indices(self) -> np.ndarray:
        """(K, 2) int64 (row v, col u) of the in-view points, in point order."""
        return np.floor(self.uv[self.in_view][:, ::-1]).astype(np.int64)


def project_to_image(xyz: np.ndarray, lidar_to_image: np.ndarray, image_hw: Tuple[int, int]) -> Projection:
    """Project (N, 3) velodyne points with a 3x4 ``P2 @ Tr`` into an image of ``image_hw = (H, W)``.

    A point is in view when its depth is positive and ``0 <= u < W``, ``0 <= v < H``; its
    pixel is ``(floor(v), floor(u))``. Depth is the third homogeneous coordinate, which for
    KITTI's P2 is the camera-frame z up to the small baseline term.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    h, w = int(image_hw[0]), int(image_hw[1])
    m = np.asarray(lidar_to_image, dtype=np.float64)
    cam = xyz @ m[:, :3].T + m[:, 3]
    depth = cam[:, 2]
    in_front = depth > 1e-6
    uv = np.full((len(xyz), 2), -1.0)
    uv[in_front] = cam[in_front, :2] / depth[in_front, None]
    in_view = in_front & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    return Projection(uv=uv, depth=depth, in_view=in_view)


#: An image whose width or height is off by more than this factor from twice the principal
#: point (KITTI's principal point is within 2.5 % of the image centre) is not the image the
#: calibration describes: resized (half / double size), or another camera's or dataset's.
IMAGE_SIZE_TOLERANCE = 1.5


def principal_point(projection: np.ndarray) -> Tuple[float, float]:
    """(cx, cy) in pixels of a 3x4 camera matrix ``K [R | t]`` (e.g. ``P2`` or ``P2 @ Tr``):
    with rows m1, m2, m3 of its left 3x3 block and R orthonormal, ``cx = m1.m3 / |m3|^2``,
    ``cy = m2.m3 / |m3|^2`` (no decomposition needed)."""
    m = np.asarray(projection, dtype=np.float64)[:, :3]
    n3 = float(m[2] @ m[2])
    if not n3 > 0:
        raise ValueError("projection matrix has a zero third row")
    return float(m[0] @ m[2] / n3), float(m[1] @ m[2] / n3)


#: LiDAR points straight ahead of the car (x forward in the velodyne frame, KITTI's and the
#: synthetic data's convention): a calibration that maps none of them into the image maps
#: (almost) nothing there, and every scan would fail one by one with "no point in view".
_AHEAD = np.array([[d, 0.0, z] for d in (5.0, 10.0, 20.0, 40.0) for z in (-1.0, 0.0, 1.0)])


def check_maps_into_image(projection: np.ndarray, image_hw: Tuple[int, int], calib_path, camera: str = "P2") -> None:
    """Raise :class:`KittiDataError` naming ``calib_path`` when no point ahead of the LiDAR lands in
    an image of ``image_hw``: a calibration that looks nowhere near the road ahead."""
    from .errors import KittiDataError

    with np.errstate(all="ignore"):
        proj = project_to_image(_AHEAD, projection, image_hw)
    if not proj.in_view.any():
        raise KittiDataError(calib_path, f"{camera} @ Tr maps no point ahead of the LiDAR (x = 5..40 m) into the "
                                         f"{image_hw[1]}x{image_hw[0]} image: a degenerate or foreign calibration")


def check_image_size(image_path, image_hw: Tuple[int, int], projection: np.ndarray,
                     calib_path=None, camera: str = "P2", tolerance: float = IMAGE_SIZE_TOLERANCE) -> None:
    """Raise :class:`KittiDataError` naming ``image_path`` when the image's size does not fit the
    calibration: its width / height differ from ``2 cx`` / ``2 cy`` (the size the principal point
    implies) by more than ``tolerance`` times. KITTI's 1241x376 (00-02; 2 cx, 2 cy = 1214x370) and
    1226x370 (04-10; 1204x366) pass; an image of half or double the size is an error, instead of
    projecting every point to a wrong pixel."""
    from .errors import KittiDataError

    h, w = int(image_hw[0]), int(image_hw[1])
    where = f"calib {calib_path}'s {camera}" if calib_path is not None else f"the calibration's {camera}"
    with np.errstate(all="ignore"):  # a degenerate matrix is reported below, naming the calib file
        try:
            cx, cy = principal_point(projection)
        except ValueError as e:
            raise KittiDataError(calib_path if calib_path is not None else image_path,
                                 f"{camera} @ Tr: {e} (a degenerate calibration)") from None
        if not np.isfinite([cx, cy]).all():
            raise KittiDataError(calib_path if calib_path is not None else image_path,
                                 f"{camera} @ Tr: non-finite principal point ({cx}, {cy}) (a degenerate calibration)")
    iw, ih = 2.0 * cx, 2.0 * cy
    bad = not (iw > 0 and ih > 0) or any(not (1.0 / tolerance <= actual / implied <= tolerance)
                                         for actual, implied in ((w, iw), (h, ih)))
    if bad:
        raise KittiDataError(image_path, f"image size {w}x{h} does not fit {where}: its principal point "
                                         f"({cx:.1f}, {cy:.1f}) implies about {iw:.0f}x{ih:.0f} "
                                         f"(a resized image, or one of another camera or sequence?)")
