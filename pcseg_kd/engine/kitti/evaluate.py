"""Validation mIoU of a SemanticKITTI model, on the rows its logits cover and on the in-view points."""
from __future__ import annotations

import sys
from typing import Any, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...metrics.miou import SegmentationIoU
from ..distributed import DistEnv, all_reduce_sum
from .data import to_device
from .objective import in_view, rows_of


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, num_classes: int, ignore_index: int,
             class_names: List[str], progress: bool = False, confusion: bool = False) -> Dict[str, Any]:
    """mIoU of ``logits`` over the rows they cover (``all``: every point of the student's
    scans; with the ``fov`` protocol those are the in-view points) and over the in-view
    points (``in_view``: the rows where student and teacher compare). A labelled point
    without a voxel (``out_of_range: drop``) is a miss of its class, as the official tool
    counts the "unlabeled" that a prediction file holds for it. Confusion matrices are
    summed over ranks; ``confusion``: each result also holds its matrix (label rows,
    prediction columns, the last one the misses) as ``confusion``."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    rows = rows_of(model)
    metrics = {"all": SegmentationIoU(num_classes, ignore_index, class_names),
               "in_view": SegmentationIoU(num_classes, ignore_index, class_names)}
    skipped: List[str] = []
    for batch in tqdm(loader, desc="val", leave=False, disable=not (progress and env.is_main and sys.stderr.isatty())):
        skipped += batch.get("skipped_frames", [])
        batch = to_device(batch, env.device)
        out = model(batch)
        pred = out["logits"].argmax(-1)
        if rows == "points" and "point_valid" in out:
            pred = torch.where(out["point_valid"], pred, torch.full_like(pred, -1))  # a miss
        labels = batch["labels"] if rows == "points" else batch["labels"][batch["img_point_idx"]]
        if rows == "points":
            metrics["all"].update(pred, labels)
        if "img_point_idx" in batch:  # scans read without images have no in-view rows
            metrics["in_view"].update(in_view(pred, rows, batch), in_view(labels, rows, batch))
    out = {}
    for key, m in metrics.items():
        if m.conf is None:
            m.conf = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=env.device)
        all_reduce_sum(m.conf, env)
        if m.conf.sum() > 0:
            out[key] = m.compute()
            if confusion:
                out[key]["confusion"] = m.conf.tolist()
    skipped = gather_lists(skipped, env)
    if skipped:  # bad frames that skip_bad_frames replaced: scored nowhere, said here
        for key in out:
            out[key]["skipped_frames"] = sorted(set(skipped))
    model.train(was_training)
    return out


def gather_lists(items: List[str], env: DistEnv) -> List[str]:
    if not env.distributed:
        return items
    import torch.distributed as dist
    parts: List[Any] = [None] * env.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
