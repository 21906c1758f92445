"""Samples -> one flat batch dict (the contract between loader, models, distiller, metrics).

Points of all samples are concatenated (``offsets`` delimit them); voxels likewise, with
the batch column of ``voxel_coords`` set and ``point2voxel`` shifted to index the
concatenated voxels; in-view point indices are made global (index into ``points``).
Images are zero-padded at the bottom/right to the largest size in the batch, which leaves
pixel indices valid. The key table is in docs/data_semantickitti.md.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def _offsets(counts: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.as_tensor(list(counts), dtype=torch.int64), 0)
    return out


def _batch_index(counts: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(list(counts), dtype=torch.int64))


def collate_kitti(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not samples:
        raise ValueError("collate_kitti: empty batch")
    shapes = {tuple(s["spatial_shape"]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_kitti: samples voxelized on different grids {shapes}")
    bsz = len(samples)
    n_pts = [len(s["points"]) for s in samples]
    n_vox = [len(s["voxel_coords"]) for s in samples]
    pt_off, vox_off = _offsets(n_pts), _offsets(n_vox)

    coords = torch.cat([s["voxel_coords"] for s in samples]).clone()
    coords[:, 0] = _batch_index(n_vox).to(coords.dtype)
    p2v = torch.cat([torch.where(s["point2voxel"] >= 0, s["point2voxel"] + vox_off[b], s["point2voxel"])
                     for b, s in enumerate(samples)])
    batch: Dict[str, Any] = {
        "batch_size": bsz,
        "frame_ids": [s["frame_id"] for s in samples],
        "has_labels": torch.tensor([bool(s["has_labels"]) for s in samples]),
        "points": torch.cat([s["points"] for s in samples]),
        "batch_idx": _batch_index(n_pts),
        "offsets": pt_off,
        "labels": torch.cat([s["labels"] for s in samples]),
        "point_index": torch.cat([s["point_index"] for s in samples]),
        "num_scan_points": [int(s["num_scan_points"]) for s in samples],
        "skipped_frames": [s["skipped_frame"] for s in samples if "skipped_frame" in s],
        "voxel_features": torch.cat([s["voxel_features"] for s in samples]),
        "voxel_coords": coords,
        "voxel_num_points": torch.cat([s["voxel_num_points"] for s in samples]),
        "voxel_offsets": vox_off,
        "point2voxel": p2v,
        "spatial_shape": list(samples[0]["spatial_shape"]),
    }
    if all("kd_point_idx" in s for s in samples):  # rows of a teacher cache (data/kitti/teacher_cache.py)
        batch["kd_point_idx"] = torch.cat([s["kd_point_idx"] + pt_off[b] for b, s in enumerate(samples)])
        batch["teacher_logits"] = torch.cat([s["teacher_logits"] for s in samples])
    if all("img_point_idx" in s for s in samples):  # read with images (or their sizes only: without_pixels)
        n_img = [len(s["img_point_idx"]) for s in samples]
        batch.update(
            image_hw=torch.tensor([list(s["image_hw"]) for s in samples], dtype=torch.int64),
            img_point_idx=torch.cat([s["img_point_idx"] + pt_off[b] for b, s in enumerate(samples)]),
            img_pixel_vu=torch.cat([s["img_pixel_vu"].reshape(-1, 2) for s in samples]),
            img_batch_idx=_batch_index(n_img),
            img_offsets=_offsets(n_img),
        )
    elif any("img_point_idx" in s for s in samples):
        raise ValueError("collate_kitti: some samples have an image and some do not")
    if all("image" in s for s in samples):
        h = max(s["image"].shape[1] for s in samples)
        w = max(s["image"].shape[2] for s in samples)
        images = torch.zeros(bsz, samples[0]["image"].shape[0], h, w, dtype=samples[0]["image"].dtype)
        for b, s in enumerate(samples):
            images[b, :, :s["image"].shape[1], :s["image"].shape[2]] = s["image"]
        batch["images"] = images
    elif any("image" in s for s in samples):
        raise ValueError("collate_kitti: some samples have image pixels and some do not")
    return batch
