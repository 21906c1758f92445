"""Points -> sparse voxels in the form spconv's ``SparseConvTensor`` takes.

Vectorised with torch (``unique`` over a linear voxel key, then ``index_add_``), so it runs
on whatever device the points are on: in a DataLoader worker on CPU, or on the GPU on a
whole batch at once (pass ``batch_idx``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Voxels:
    """Result of :func:`voxelize`.

    ``coords`` rows are ``[batch, z, y, x]`` int32, sorted by that key; ``features`` rows are
    ``[mean x, mean y, mean z, mean of each extra channel (e.g. remission), mean x - centre x,
    mean y - centre y, mean z - centre z]``; ``point2voxel[i]`` is the row of point ``i`` (-1
    when the point was dropped as out of range); ``spatial_shape`` is ``[Z, Y, X]``.
    ``SparseConvTensor(features, coords, spatial_shape, batch_size)`` takes these as they are.
    """

    features: torch.Tensor
    coords: torch.Tensor
    num_points: torch.Tensor
    point2voxel: torch.Tensor
    spatial_shape: List[int]
    batch_size: int


def grid_shape(voxel_size: Sequence[float], point_range: Sequence[float]) -> List[int]:
    """[Z, Y, X] number of voxels covering ``point_range = [xmin, ymin, zmin, xmax, ymax, zmax]``."""
    lo, hi, size = np.asarray(point_range[:3], float), np.asarray(point_range[3:], float), np.asarray(voxel_size, float)
    if (hi <= lo).any() or (size <= 0).any():
        raise ValueError(f"bad voxel grid: range {list(point_range)}, voxel size {list(voxel_size)}")
    xyz = np.ceil((hi - lo) / size - 1e-6).astype(int)
    return [int(xyz[2]), int(xyz[1]), int(xyz[0])]


def voxelize(points: ArrayLike, voxel_size: Sequence[float], point_range: Sequence[float],
             batch_idx: Optional[ArrayLike] = None, batch_size: Optional[int] = None,
             out_of_range: str = "clip") -> Voxels:
    """Group (N, 3 + C) points ``[x, y, z, extra...]`` into voxels of ``voxel_size`` (x, y, z).

    ``out_of_range="clip"`` puts points outside ``point_range`` into the border voxel, so
    every point keeps a voxel and can be scored through ``point2voxel`` (validation scores
    the full scan); their x, y, z are clipped into the range for the features as well, so
    features stay bounded by the range whatever the input. ``"drop"`` gives them
    ``point2voxel = -1`` and no voxel. Voxel indices are ``floor((p - min) / size)`` in float64.
    """
    pts = torch.as_tensor(points)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must be (N, >=3), got {tuple(pts.shape)}")
    pts = pts.float()
    dev = pts.device
    n = pts.shape[0]
    if batch_idx is None:
        b = torch.zeros(n, dtype=torch.int64, device=dev)
    else:
        b = torch.as_tensor(batch_idx, device=dev).long()
        if b.shape != (n,):
            raise ValueError(f"batch_idx must be ({n},), got {tuple(b.shape)}")
    if batch_size is None:
        batch_size = int(b.max().item()) + 1 if n and batch_idx is not None else 1
    shape_zyx = grid_shape(voxel_size, point_range)
    dims_xyz = torch.tensor(shape_zyx[::-1], dtype=torch.int64, device=dev)
    lo = torch.tensor(point_range[:3], dtype=torch.float32, device=dev)
    size = torch.tensor(voxel_size, dtype=torch.float32, device=dev)
    hi = torch.tensor(point_range[3:6], dtype=torch.float32, device=dev)
    # voxel indices in float64: in float32, (x - min) / size rounds a few points per scan across
    # a voxel face (11 of 119,850 in-range points of a real scan were one voxel off)
    lo64, size64 = lo.new_tensor(point_range[:3], dtype=torch.float64), size.new_tensor(voxel_size, dtype=torch.float64)
    gridf = torch.floor((pts[:, :3].double() - lo64) / size64)

    if out_of_range == "clip":
        grid = torch.minimum(gridf.clamp_min(0), (dims_xyz - 1).double()).long()  # clamped as floats: no overflow at 1e30
        kept = torch.ones(n, dtype=torch.bool, device=dev)
        # the coordinates too, not only the index: a border voxel's features stay inside the
        # range instead of carrying a stray point's raw coordinates (e.g. 1e8 m) to the network
        pts = torch.cat([torch.maximum(torch.minimum(pts[:, :3], hi), lo), pts[:, 3:]], dim=1)
    elif out_of_range == "drop":
        kept = ((gridf >= 0) & (gridf < dims_xyz)).all(dim=1)  # compared as floats: no overflow at 1e30
        grid = torch.where(kept.unsqueeze(1), gridf, torch.zeros_like(gridf)).long()
    else:
        raise ValueError(f"out_of_range must be 'clip' or 'drop', got {out_of_range!r}")

    gx, gy, gz = grid[kept].unbind(1)
    nx, ny, nz = (int(d) for d in dims_xyz.tolist())
    key = ((b[kept] * nz + gz) * ny + gy) * nx + gx  # sorted key order = [batch, z, y, x] order
    uniq, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    m = uniq.numel()

    sums = torch.zeros(m, pts.shape[1], dtype=torch.float64 if dev.type == "cpu" else torch.float32, device=dev)
    sums.index_add_(0, inverse, pts[kept].to(sums.dtype))
    mean = (sums / counts.unsqueeze(1).to(sums.dtype)).float()

    coords = torch.stack([uniq // (nz * ny * nx), (uniq // (ny * nx)) % nz, (uniq // nx) % ny, uniq % nx], dim=1)
    centre = lo + (coords[:, [3, 2, 1]].float() + 0.5) * size
    features = torch.cat([mean, mean[:, :3] - centre], dim=1)

    point2voxel = torch.full((n,), -1, dtype=torch.int64, device=dev)
    point2voxel[kept] = inverse
    return Voxels(features=features, coords=coords.int(), num_points=counts,
                  point2voxel=point2voxel, spatial_shape=shape_zyx, batch_size=int(batch_size))
