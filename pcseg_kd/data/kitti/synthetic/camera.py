"""Rendering image_2 from the same scene through the same calibration as the projection.

Each pixel's ray is cast from the left colour camera's centre through that pixel, using
``P2`` and ``Tr`` from calib.txt, so a scene point renders at exactly the pixel that
``P2 @ Tr`` projects it to: the LiDAR-camera correspondence is right by construction.
Ray casting gives the z-buffer for free. Colour = class material colour (varied per
object) x world-space texture x Lambert shading from a per-sequence sun, plus sky, haze,
exposure, and the degradation knobs of :class:`ImageQuality`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .materials import MATERIALS, SKY_HORIZON, SKY_TOP, material_of
from .raycast import GROUND, MISS, cast
from .scene import Scene
from .texture import fractal_noise


@dataclass
class ImageQuality:
    """How well the image reveals the classes (the teacher-student distribution shift knob).

    ``degradation`` in [0, 1] sets the three below when they are left ``None``:
    ``colour_confusion`` (0: class colours as designed, 1: every surface the same mean
    colour, so only shading and texture remain), ``noise_std`` (Gaussian pixel noise in
    0..255 units, 40 at 1) and ``blur_sigma`` (Gaussian blur in pixels, 3 at 1).
    """

    degradation: float = 0.0
    colour_confusion: Optional[float] = None
    noise_std: Optional[float] = None
    blur_sigma: Optional[float] = None

    def resolved(self) -> Tuple[float, float, float]:
        d = float(np.clip(self.degradation, 0.0, 1.0))
        return (d if self.colour_confusion is None else float(self.colour_confusion),
                40.0 * d if self.noise_std is None else float(self.noise_std),
                3.0 * d if self.blur_sigma is None else float(self.blur_sigma))


MEAN_SURFACE_COLOUR = np.mean([np.mean(m.palette, axis=0) for m in MATERIALS.values()], axis=0)


def pixel_rays(lidar_to_cam0: np.ndarray, p2: np.ndarray, uv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Camera centre and unit ray directions (velodyne frame) through image points ``uv`` (K, 2)."""
    k_inv = np.linalg.inv(p2[:, :3])
    centre_cam0 = -k_inv @ p2[:, 3]           # P2 = K [I | t], centre = -t
    cam0_to_velo = np.linalg.inv(lidar_to_cam0)
    pix = np.concatenate([np.asarray(uv, np.float64), np.ones((len(uv), 1))], axis=1)
    d_velo = pix @ k_inv.T @ cam0_to_velo[:3, :3].T
    d_velo /= np.linalg.norm(d_velo, axis=1, keepdims=True)
    origin = cam0_to_velo[:3, :3] @ centre_cam0 + cam0_to_velo[:3, 3]
    return origin, d_velo


def camera_rays(lidar_to_cam0: np.ndarray, p2: np.ndarray, hw: Tuple[int, int], scale: float
                ) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int]]:
    """Origin and unit directions (velodyne frame) of pixel centres at ``scale`` x resolution."""
    h, w = int(round(hw[0] * scale)), int(round(hw[1] * scale))
    uu, vv = np.meshgrid((np.arange(w) + 0.5) / scale, (np.arange(h) + 0.5) / scale)  # full-res units
    origin, dirs = pixel_rays(lidar_to_cam0, p2, np.stack([uu.ravel(), vv.ravel()], 1))
    return origin, dirs, (h, w)


def pixel_labels(scene: Scene, sensor_pose: np.ndarray, time: float, lidar_to_cam0: np.ndarray,
                 p2: np.ndarray, uv: np.ndarray, max_range: float = 250.0) -> np.ndarray:
    """Raw label of the surface the camera sees through each image point ``uv`` (0 for sky)."""
    origin_v, dirs_v = pixel_rays(lidar_to_cam0, p2, uv)
    rot, trans = sensor_pose[:3, :3], sensor_pose[:3, 3]
    return cast(scene, rot @ origin_v + trans, dirs_v @ rot.T, time, max_range).label


def _surface_colours(scene: Scene, hits, confusion: float) -> np.ndarray:
    n = len(hits.t)
    col = np.zeros((n, 3))
    obj = hits.obj
    is_obj = obj >= 0
    col[is_obj] = scene.colours[obj[is_obj]]
    g = obj == GROUND
    if g.any():
        glab = hits.label[g]
        table = {lab: np.array(material_of(lab).palette[0]) + scene.ground_colour_var for lab in np.unique(glab)}
        col[g] = _lookup(glab, table)
    hit = obj != MISS
    col[hit] = (1 - confusion) * col[hit] + confusion * MEAN_SURFACE_COLOUR
    return col


def _lookup(labels: np.ndarray, table: Dict[int, np.ndarray]) -> np.ndarray:
    keys = np.array(sorted(table))
    vals = np.stack([table[k] for k in keys])
    return vals[np.searchsorted(keys, labels)]


def _texture(scene: Scene, hits, seed: int) -> np.ndarray:
    hit = hits.obj != MISS
    lab = hits.label[hit]
    uniq, inv = np.unique(lab, return_inverse=True)
    amp = np.array([material_of(int(u)).texture for u in uniq])[inv]
    freq = np.array([material_of(int(u)).texture_freq for u in uniq])[inv]
    p = hits.point[hit]
    # two fixed frequencies blended by the material's, so one noise call serves all classes
    lo, hi = fractal_noise(p, 1.0, seed), fractal_noise(p, 6.0, seed + 7)
    mix = np.clip((freq - 1.0) / 5.0, 0, 1)
    tex = np.ones(len(hits.t))
    tex[hit] = 1 + amp * ((1 - mix) * lo + mix * hi - 0.5) * 2
    # windows: a regular dark pattern on building walls
    b = np.flatnonzero(hit)[lab == 50]
    if b.size:
        q = hits.point[b]
        n = hits.normal[b]
        along = q[:, 0] * np.abs(n[:, 1]) + q[:, 1] * np.abs(n[:, 0])
        win = (np.mod(along, 3.0) > 1.0) & (np.mod(along, 3.0) < 2.2) & (np.mod(q[:, 2], 3.2) > 1.0) \
            & (np.mod(q[:, 2], 3.2) < 2.4) & (np.abs(n[:, 2]) < 0.5) & (q[:, 2] > 0.8)
        tex[b[win]] *= 0.45
    return tex


def render(scene: Scene, sensor_pose: np.ndarray, time: float, lidar_to_cam0: np.ndarray, p2: np.ndarray,
           hw: Tuple[int, int], rng: np.random.Generator, quality: ImageQuality = ImageQuality(),
           scale: float = 0.5, max_range: float = 250.0, texture_seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB image_2 of ``scene`` seen from the car at ``sensor_pose``."""
    import cv2

    confusion, noise_std, blur_sigma = quality.resolved()
    origin_v, dirs_v, (h, w) = camera_rays(lidar_to_cam0, p2, hw, scale)
    rot, trans = sensor_pose[:3, :3], sensor_pose[:3, 3]
    origin = rot @ origin_v + trans
    dirs = dirs_v @ rot.T
    hits = cast(scene, origin, dirs, time, max_range)

    colour = _surface_colours(scene, hits, confusion) * _texture(scene, hits, texture_seed)[:, None]
    lambert = np.clip((hits.normal * scene.sun_dir).sum(1), 0, 1)
    shade = 0.45 + 0.75 * scene.sun_strength * lambert
    colour = colour * shade[:, None]
    haze = 1 - np.exp(-np.where(np.isfinite(hits.t), hits.t, 0) / 350.0)
    sky = SKY_HORIZON + (SKY_TOP - SKY_HORIZON) * np.clip(dirs[:, 2:3] * 4, 0, 1)
    colour = colour * (1 - haze[:, None]) + sky * haze[:, None]
    colour = np.where((hits.obj == MISS)[:, None], sky, colour)
    colour = colour * rng.uniform(0.85, 1.15)  # exposure varies frame to frame
    img = (np.clip(colour, 0, 1) * 255).reshape(h, w, 3).astype(np.float32)
    if (h, w) != tuple(hw):
        img = cv2.resize(img, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)
    if blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur_sigma)
    img += rng.normal(0, 2.0 + noise_std, img.shape).astype(np.float32)  # sensor noise, always a little
    return np.clip(img, 0, 255).astype(np.uint8)
