"""Nearest-hit ray casting against a :class:`Scene`, vectorised over rays.

Rays are sorted by azimuth once; each object near enough is tested only against the rays
whose azimuth falls inside the angle its bounding sphere subtends, so the cost follows the
objects' angular size rather than rays x objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .primitives import intersect_box, intersect_ellipsoid, intersect_ground, intersect_vcylinder
from .scene import Scene

GROUND = -1
MISS = -2


@dataclass
class Hits:
    t: np.ndarray        # (R,) distance along the ray, inf for a miss
    obj: np.ndarray      # (R,) index into scene.prims, GROUND, or MISS
    normal: np.ndarray   # (R, 3)
    point: np.ndarray    # (R, 3) world coordinates (undefined for misses)
    label: np.ndarray    # (R,) raw semantic id (0 for misses)
    instance: np.ndarray  # (R,)


def _ranges(az_sorted: np.ndarray, lo: float, hi: float):
    """Index ranges of sorted azimuths in [lo, hi], with wrap-around at +-pi."""
    if hi - lo >= 2 * np.pi:
        return [(0, len(az_sorted))]
    out = []
    for a, b in ((lo, hi), (lo + 2 * np.pi, hi + 2 * np.pi), (lo - 2 * np.pi, hi - 2 * np.pi)):
        a, b = max(a, -np.pi), min(b, np.pi)
        if a < b:
            out.append((int(np.searchsorted(az_sorted, a)), int(np.searchsorted(az_sorted, b, side="right"))))
    return out


def cast(scene: Scene, origin: np.ndarray, dirs: np.ndarray, time: float, max_range: float) -> Hits:
    origin = np.asarray(origin, dtype=np.float64)
    n = len(dirs)
    t_best, normal = intersect_ground(origin, dirs, 0.0)
    t_best = np.where(t_best <= max_range, t_best, np.inf)
    obj = np.where(np.isfinite(t_best), GROUND, MISS)

    az = np.arctan2(dirs[:, 1], dirs[:, 0])
    order = np.argsort(az, kind="stable")
    az_sorted = az[order]
    centres = scene.centres_at(time)
    dist = np.linalg.norm(centres[:, :2] - origin[:2], axis=1)
    near = np.flatnonzero(dist - scene.radii < max_range)
    near = near[np.argsort(dist[near] - scene.radii[near])]  # near first: they occlude the rest
    for k in near:
        p = scene.prims[k]
        r = scene.radii[k]
        if dist[k] <= r + 0.05:
            idx = np.arange(n)
        else:
            half = np.arcsin(min(1.0, r / dist[k])) + 1e-3
            a0 = np.arctan2(centres[k, 1] - origin[1], centres[k, 0] - origin[0])
            parts = [order[a:b] for a, b in _ranges(az_sorted, a0 - half, a0 + half)]
            idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        # rays that already hit something nearer than this object's bounding sphere cannot change
        idx = idx[t_best[idx] > dist[k] - r - 0.05] if dist[k] > r + 0.05 else idx
        if idx.size == 0:
            continue
        d = dirs[idx]
        c = centres[k]
        if p.kind == "box":
            t, nrm = intersect_box(origin, d, c, p.size, p.yaw)
        elif p.kind == "cyl":
            t, nrm = intersect_vcylinder(origin, d, c[0], c[1], p.size[0], c[2] - p.size[2], c[2] + p.size[2])
        else:
            t, nrm = intersect_ellipsoid(origin, d, c, p.size)
        better = t < t_best[idx]
        if better.any():
            sel = idx[better]
            t_best[sel] = t[better]
            normal[sel] = nrm[better]
            obj[sel] = k
    t_best = np.where(t_best <= max_range, t_best, np.inf)
    obj = np.where(np.isfinite(t_best), obj, MISS)
    point = origin + np.where(np.isfinite(t_best), t_best, 0.0)[:, None] * dirs
    label = np.zeros(n, dtype=np.int64)
    inst = np.zeros(n, dtype=np.int64)
    is_obj = obj >= 0
    label[is_obj] = scene.labels[obj[is_obj]]
    inst[is_obj] = scene.instances[obj[is_obj]]
    g = obj == GROUND
    label[g] = scene.layout.ground_label(point[g, 0], point[g, 1])
    return Hits(t_best, obj, normal, point, label, inst)
