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
