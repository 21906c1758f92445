"""World-space value noise, so a surface's texture stays put as the camera moves."""
from __future__ import annotations

import numpy as np


def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    h = (ix.astype(np.uint64) * np.uint64(73856093)) ^ (iy.astype(np.uint64) * np.uint64(19349663)) \
        ^ (iz.astype(np.uint64) * np.uint64(83492791)) ^ np.uint64(seed * 2654435761 % (1 << 32))
    h ^= h >> np.uint64(13)
    h *= np.uint64(0x5BD1E995)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(0xFFFFFF)


def value_noise(p: np.ndarray, freq: float, seed: int = 0) -> np.ndarray:
    """Smooth noise in [0, 1] at (N, 3) world points, trilinear between lattice values."""
    q = p * freq
    base = np.floor(q)
    f = q - base
    f = f * f * (3 - 2 * f)  # smoothstep, no lattice creases
    i = base.astype(np.int64)
    out = np.zeros(len(p))
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                out += wx * wy * wz * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def fractal_noise(p: np.ndarray, freq: float, seed: int = 0, octaves: int = 2) -> np.ndarray:
    """Sum of ``octaves`` value noises at doubling frequencies, in [0, 1]."""
    total, amp, norm = np.zeros(len(p)), 1.0, 0.0
    for o in range(octaves):
        total += amp * value_noise(p, freq * 2 ** o, seed + o)
        norm += amp
        amp *= 0.5
    return total / norm
