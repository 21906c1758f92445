"""A simulated Velodyne HDL-64E, as mounted on the KITTI car (1.73 m above the road).

64 lasers: the upper block of 32 spans +2.0 deg .. -8.33 deg (1/3 deg apart), the lower
block of 32 spans -8.83 deg .. -24.33 deg (1/2 deg apart), with small fixed per-laser
offsets; ``azimuth_steps`` columns per revolution (2048 gives ~110-125k points in a
street, like a KITTI scan). Returns lose range with distance and dark surfaces; range noise
grows on rough surfaces (vegetation); a few returns are spurious outliers (raw id 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .materials import material_of
from .raycast import cast
from .scene import GROUND_CLASSES, GROUND_REMISSION_MEAN, Scene

SENSOR_HEIGHT = 1.73


@dataclass
class LidarModel:
    azimuth_steps: int = 2048
    max_range: float = 120.0
    min_range: float = 2.5        # KITTI drops returns from the car itself
    range_noise: float = 0.02
    dropout: float = 0.03
    outlier_rate: float = 5e-4

    def beam_elevations(self, rng: np.random.Generator) -> np.ndarray:
        upper = np.linspace(2.0, -8.33, 32)
        lower = np.linspace(-8.83, -24.33, 32)
        return np.deg2rad(np.concatenate([upper, lower]) + rng.normal(0, 0.03, 64))

    def rays(self, rng: np.random.Generator) -> np.ndarray:
        """(64 * azimuth_steps, 3) unit directions in the sensor frame."""
        el = self.beam_elevations(rng)
        az = (np.arange(self.azimuth_steps) + rng.uniform(0, 1)) * (2 * np.pi / self.azimuth_steps) - np.pi
        az = az[None, :] + rng.normal(0, 2e-4, (64, self.azimuth_steps))  # encoder jitter
        el = np.broadcast_to(el[:, None], az.shape)
        return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)


def _materials_table(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(labels, return_inverse=True)
    rough = np.array([material_of(int(u)).roughness if u else 0.0 for u in uniq])
    rem = np.array([material_of(int(u)).remission if u else 0.0 for u in uniq])
    return rough[inv], rem[inv]


def scan(scene: Scene, sensor_pose: np.ndarray, time: float, rng: np.random.Generator,
         model: LidarModel = LidarModel()) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One revolution from ``sensor_pose`` (4x4 world <- velodyne).

    Returns (N, 4) float32 points in the velodyne frame (x, y, z, remission), raw semantic
    ids (N,) uint32 and instance ids (N,) uint32.
    """
    rot, origin = sensor_pose[:3, :3], sensor_pose[:3, 3]
    dirs_sensor = model.rays(rng)
    hits = cast(scene, origin, dirs_sensor @ rot.T, time, model.max_range)
    ok = np.isfinite(hits.t) & (hits.t > model.min_range)
    idx = np.flatnonzero(ok)
    t = hits.t[idx]
    label, inst = hits.label[idx], hits.instance[idx]
    rough, _ = _materials_table(label)

    # remission: the object's (or ground class's) reflectivity, times incidence falloff
    obj = hits.obj[idx]
    refl = np.where(obj >= 0, scene.remissions[np.maximum(obj, 0)], _materials_table(label)[1])
    cos_inc = np.abs((hits.normal[idx] * dirs_sensor[idx] @ rot.T).sum(1))
    noise = rng.normal(0, 0.02, idx.size)
    remission = np.clip(refl * (0.45 + 0.55 * cos_inc) + noise, 0.0, 0.99)
    reported = remission
    contrast = scene.ground_remission_contrast
    if contrast != 1.0:  # skipped at 1: m + 1 * (r - m) need not round back to r
        # only what the sensor reports moves; returns are still lost on the surface's own
        # reflectivity below, so the knob changes one cue and leaves the geometry alone
        ground = np.isin(label, GROUND_CLASSES)
        refl_c = np.clip(GROUND_REMISSION_MEAN + contrast * (refl - GROUND_REMISSION_MEAN), 0.02, 0.99)
        reported = np.where(ground, np.clip(refl_c * (0.45 + 0.55 * cos_inc) + noise, 0.0, 0.99), remission)

    # lost returns: random, plus dark surfaces at long range
    p_drop = model.dropout + 0.5 * (t / model.max_range) ** 2 * (1 - remission)
    keep = rng.random(idx.size) >= p_drop
    t = t[keep] + rng.normal(0, 1, keep.sum()) * (model.range_noise + rough[keep])
    idx, label, inst, remission = idx[keep], label[keep], inst[keep], reported[keep]

    # spurious returns somewhere along the ray
    outlier = rng.random(idx.size) < model.outlier_rate
    t = np.where(outlier, rng.uniform(model.min_range, np.maximum(t, model.min_range + 0.1)), t)
    label = np.where(outlier, 1, label)
    inst = np.where(outlier, 0, inst)

    xyz = dirs_sensor[idx] * t[:, None]
    points = np.concatenate([xyz, remission[:, None]], axis=1).astype(np.float32)
    return points, label.astype(np.uint32), inst.astype(np.uint32)
