"""Test-time augmentation (TTA): a vote over fixed, deterministic views of each scan.

The practice of 2DPASS and Pointcept: score each scan as several rotated / mirrored copies and
average the per-point class probabilities, so the prediction depends less on the one
orientation the voxel grid happened to cut the scan in. :class:`TTAModel` wraps a trained
model; for every view it transforms ``batch["points"]``, voxelizes the batch again with the
dataset's own grid (:func:`~pcseg_kd.data.kitti.voxelize.voxelize`) and runs the model on it.
Images and pixel correspondences are left as they are: a point transform changes no row, so
``img_point_idx`` and ``img_pixel_vu`` still pair the same points with the same pixels.

The views are those the training augmentation (:class:`~pcseg_kd.data.kitti.augment.PointAugmentor`,
full turns about z and x/y flips by default) draws from, so every view is one the model was
trained on; only their random scale and jitter are left out.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ...data.kitti.voxelize import grid_shape, voxelize
from .objective import rows_of


class View(NamedTuple):
    """One view: ``p' = R(angle) · F · p`` on x, y (z unchanged), ``F = diag(±1, ±1)`` the flips
    applied first, then the counter-clockwise rotation about z, as the training augmentor does."""

    angle: float   # radians, in [0, 2π)
    flip_x: bool   # x -> -x
    flip_y: bool   # y -> -y (the schedule never sets it: an x-flip and a half turn already make it)


def check_tta(n: Any) -> int:
    """``n`` as the number of views, or a ValueError that says what ``--tta`` takes."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"--tta must be a whole number of views >= 1 (1 = no test-time augmentation), got {n!r}")
    return int(n)


def tta_views(n: int) -> List[View]:
    """The ``n`` views of ``--tta n``, always the same, view 0 the identity.

    ``r = ceil(n / 2)`` rotations about z by ``2πk / r`` (k = 0 .. r-1), first without a flip,
    then the same rotations after an x-flip, cut at ``n``:

    * ``n = 1``: the scan as it is (no TTA);
    * ``n = 2``: identity, x-flip;
    * ``n = 4``: identity, half turn, x-flip, x-flip + half turn (= y-flip);
    * ``n = 8``: the four quarter turns, each with and without an x-flip (every symmetry of the
      square x-y range, so no point leaves the default ±51.2 m grid).

    The views are distinct for every ``n``: rotations differ in angle, and a flipped view is a
    reflection (determinant -1), never a rotation. Angles that are not quarter turns move the
    corners of a square range out of it: those points fall in a border voxel (``out_of_range:
    clip``) or in no voxel for that view (``drop``; :class:`TTAModel` then averages over the
    views that have one).
    """
    n = check_tta(n)
    turns = -(-n // 2)
    angles = [2 * math.pi * k / turns for k in range(turns)]
    views = [View(a, False, False) for a in angles] + [View(a, True, False) for a in angles]
    return views[:n]


def is_identity(view: View) -> bool:
    return view.angle == 0 and not view.flip_x and not view.flip_y


def _cos_sin(angle: float):
    # exact at quarter turns: cos(π) = -1 and sin(π) = 0, not 1.2e-16, so a view that is a
    # symmetry of the grid maps its voxel faces onto voxel faces instead of nudging points across
    quarter = angle / (math.pi / 2)
    if abs(quarter - round(quarter)) < 1e-9:
        return [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][round(quarter) % 4]
    return math.cos(angle), math.sin(angle)


def view_matrix(view: View) -> List[List[float]]:
    """The 2 x 2 map of x, y: ``R(angle) @ diag(flip x, flip y)``."""
    c, s = _cos_sin(view.angle)
    fx, fy = (-1.0 if view.flip_x else 1.0), (-1.0 if view.flip_y else 1.0)
    return [[c * fx, -s * fy], [s * fx, c * fy]]


def transform_points(points: Tensor, view: View) -> Tensor:
    """``points`` ([N, 3 + C]: x, y, z, remission...) seen in ``view``; computed in float64 and
    rounded once to the points' dtype, so the result does not depend on the device's arithmetic."""
    (a, b), (c, d) = view_matrix(view)
    x, y = points[:, 0].double(), points[:, 1].double()
    xy = torch.stack([a * x + b * y, c * x + d * y], dim=1).to(points.dtype)
    return torch.cat([xy, points[:, 2:]], dim=1)


def apply_view(batch: Dict[str, Any], view: View, voxel_size: Sequence[float], point_range: Sequence[float],
               out_of_range: str = "clip") -> Dict[str, Any]:
    """A copy of a collated batch (:func:`~pcseg_kd.data.kitti.collate.collate_kitti`) whose points
    are seen in ``view``, with the voxel keys rebuilt as collating the transformed scans would
    give them (``voxel_coords`` with the batch column, ``point2voxel`` into the concatenated
    voxels, ``voxel_offsets``). Every other key (labels, images, pixel indices) is shared."""
    points = transform_points(batch["points"], view)
    bsz = int(batch["batch_size"])
    # one voxelize over the whole batch: its key sorts by [batch, z, y, x], the order in which
    # collate concatenates per-scan voxels, so rows and point2voxel come out the same
    vox = voxelize(points, voxel_size, point_range, batch_idx=batch["batch_idx"], batch_size=bsz,
                   out_of_range=out_of_range)
    # the batch column is sorted: searchsorted gives each scan's first voxel without a host sync
    # (bincount on CUDA would read the maximum back)
    scans = torch.arange(bsz + 1, dtype=vox.coords.dtype, device=vox.coords.device)
    voxel_offsets = torch.searchsorted(vox.coords[:, 0].contiguous(), scans)
    return {**batch, "points": points, "voxel_features": vox.features, "voxel_coords": vox.coords,
            "voxel_num_points": vox.num_points, "voxel_offsets": voxel_offsets,
            "point2voxel": vox.point2voxel, "spatial_shape": list(vox.spatial_shape)}


class TTAModel(nn.Module):
    """``model`` voted over :func:`tta_views` ``(n)``: ``logits = log(mean over views of softmax)``.

    Same ``rows`` and ``num_classes`` as ``model``, and the output keys evaluation and
    prediction files read: ``logits`` and, when the model returns it, ``point_valid`` (the point
    has a voxel in at least one view). For a per-point model (``rows = "points"``) the mean of a
    point runs over the views in which it had a voxel; a point with none gets zero logits, as
    the model itself gives it. Image and fusion teachers (``rows = "in_view"``) predict every
    in-view row in every view, so their mean is over all views. ``voxel_size``, ``point_range``
    and ``out_of_range`` must be the dataset's: the views are voxelized as it voxelizes scans.
    """

    def __init__(self, model: nn.Module, n: int, voxel_size: Sequence[float], point_range: Sequence[float],
                 out_of_range: str = "clip"):
        super().__init__()
        if out_of_range not in ("clip", "drop"):
            raise ValueError(f"out_of_range must be 'clip' or 'drop', got {out_of_range!r}")
        grid_shape(voxel_size, point_range)  # a bad grid fails here, not on the first batch
        self.model = model
        self.rows = rows_of(model)
        self.num_classes = model.num_classes
        self.views = tta_views(n)
        self.voxel_size, self.point_range, self.out_of_range = list(voxel_size), list(point_range), out_of_range
        self.train(model.training)  # the wrapper reports the wrapped model's mode (evaluate restores it)

    def view_batch(self, batch: Dict[str, Any], view: View) -> Dict[str, Any]:
        # the identity view is the batch as loaded: --tta n starts from exactly the --tta 1 input
        if is_identity(view):
            return batch
        return apply_view(batch, view, self.voxel_size, self.point_range, self.out_of_range)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Tensor]:
        total: Optional[Tensor] = None  # log of the summed probabilities of the views that count
        hits: Optional[Tensor] = None   # how many views count, per row
        valid_any: Optional[Tensor] = None
        for view in self.views:
            out = self.model(self.view_batch(batch, view))
            logp = out["logits"].float().log_softmax(-1)
            valid = out.get("point_valid")
            counts = valid if self.rows == "points" and valid is not None else \
                torch.ones(logp.shape[0], dtype=torch.bool, device=logp.device)
            if total is None:
                total = torch.where(counts.unsqueeze(1), logp, torch.full_like(logp, -math.inf))
                hits = counts.long()
            else:
                # summed in log space: a class whose probability underflows in every view stays
                # finite instead of becoming log(0) = -inf
                total = torch.where(counts.unsqueeze(1), torch.logaddexp(total, logp), total)
                hits = hits + counts.long()
            if valid is not None:
                valid_any = valid if valid_any is None else valid_any | valid
        seen = (hits > 0).unsqueeze(1)
        logits = torch.where(seen, total - hits.clamp_min(1).to(total.dtype).log().unsqueeze(1),
                             torch.zeros_like(total))
        return {"logits": logits} if valid_any is None else {"logits": logits, "point_valid": valid_any}
