"""Ray / primitive intersections, vectorised over rays.

Each function takes one ray origin ``o`` (3,) and unit directions ``d`` (R, 3) and returns
``(t, normal)``: the nearest positive hit distance (``inf`` where the ray misses) and the
outward unit surface normal there.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

EPS = 1e-6
Hit = Tuple[np.ndarray, np.ndarray]


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def intersect_box(o: np.ndarray, d: np.ndarray, centre: np.ndarray, half: np.ndarray, yaw: float) -> Hit:
    """Box with half-extents ``half`` (x, y, z), rotated by ``yaw`` about z (slab method)."""
    rot = _rot_z(yaw)
    ol = (o - centre) @ rot            # into the box frame: R^T (o - c)
    dl = d @ rot
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-half - ol) * inv
        t2 = (half - ol) * inv
    # fmin/fmax skip the NaN of a ray lying exactly on a slab plane
    tlo, thi = np.fmin(t1, t2), np.fmax(t1, t2)
    tmin = tlo.max(axis=1)
    tmax = thi.min(axis=1)
    hit = (tmax >= tmin) & (tmin > EPS)
    t = np.where(hit, tmin, np.inf)
    normal = np.zeros_like(d)
    rows = np.flatnonzero(hit)
    if rows.size:
        axis = np.argmax(tlo[rows], axis=1)
        n_local = np.zeros((rows.size, 3))
        n_local[np.arange(rows.size), axis] = -np.sign(dl[rows, axis])
        normal[rows] = n_local @ rot.T
    return t, normal


def intersect_vcylinder(o: np.ndarray, d: np.ndarray, cx: float, cy: float, radius: float,
                        z0: float, z1: float) -> Hit:
    """Vertical cylinder (axis along z) between heights z0 and z1, with a top cap."""
    ox, oy = o[0] - cx, o[1] - cy
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2.0 * (ox * d[:, 0] + oy * d[:, 1])
    c = ox * ox + oy * oy - radius * radius
    disc = b * b - 4 * a * c
    ok = (disc >= 0) & (a > EPS)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = np.where(ok, (-b - sq) / (2 * a), np.inf)
    z = o[2] + t_side * d[:, 2]
    t_side = np.where((t_side > EPS) & (z >= z0) & (z <= z1), t_side, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (z1 - o[2]) / d[:, 2]
    px, py = ox + t_cap * d[:, 0], oy + t_cap * d[:, 1]
    t_cap = np.where((t_cap > EPS) & (px * px + py * py <= radius * radius) & (d[:, 2] < 0), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    normal = np.zeros_like(d)
    side = t_side <= t_cap
    ts = np.where(np.isfinite(t), t, 0.0)
    normal[:, 0] = np.where(side, (ox + ts * d[:, 0]) / radius, 0.0)
    normal[:, 1] = np.where(side, (oy + ts * d[:, 1]) / radius, 0.0)
    normal[:, 2] = np.where(side, 0.0, 1.0)
    return t, normal


def intersect_ellipsoid(o: np.ndarray, d: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> Hit:
    ol = (o - centre) / radii
    dl = d / radii
    a = (dl * dl).sum(1)
    b = 2.0 * (dl @ ol)
    c = ol @ ol - 1.0
    disc = b * b - 4 * a * c
    ok = disc >= 0
    t = np.where(ok, (-b - np.sqrt(np.where(ok, disc, 0.0))) / (2 * a), np.inf)
    t = np.where(t > EPS, t, np.inf)
    ts = np.where(np.isfinite(t), t, 0.0)
    n = (o + ts[:, None] * d - centre) / (radii * radii)
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
    return t, n


def intersect_ground(o: np.ndarray, d: np.ndarray, height: float = 0.0) -> Hit:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (height - o[2]) / d[:, 2]
    t = np.where((d[:, 2] < -EPS) & (t > EPS), t, np.inf)
    n = np.zeros_like(d)
    n[:, 2] = 1.0
    return t, n
