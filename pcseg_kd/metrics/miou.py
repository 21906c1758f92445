"""Semantic segmentation IoU with the semantic-kitti-api conventions.

Predictions are over the 19 train ids (so "unlabeled" is never predicted); points whose
label is ``ignore_index`` are left out, which is the official "ground-truth 0 column
ignored". A labelled point without a prediction (a prediction outside ``0..C-1``, e.g. -1
for a point that fell in no voxel) is a miss of its true class: a false negative and no
false positive, as the official tool counts a predicted "unlabeled" (raw id 0). The
confusion matrix has a last column for those misses. IoU_c = tp / (tp + fp + fn) and ``miou`` is the mean over *all* classes, a class
absent from both labels and predictions counting as 0 (the API's ``tp / (tp + fp + fn +
1e-15)``); ``miou_present`` averages over the classes that occur only. The confusion
matrix accumulates on the tensors' device with one ``scatter_add_`` per batch (``bincount``
would size its output from the data, a host sync on CUDA); only
:meth:`SegmentationIoU.compute` reads it back.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int, ignore_index: Optional[int] = 255) -> Tensor:
    """``[num_classes, num_classes + 1]`` int64 counts, rows = ground truth, columns =
    prediction; the last column counts labelled points with no valid prediction (misses)."""
    if pred.shape != labels.shape:
        raise ValueError(f"confusion_matrix: predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")
    pred, labels = pred.reshape(-1).long(), labels.reshape(-1).long()
    keep = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    # labels outside 0..C-1 are counted nowhere rather than silently aliased into another cell
    keep &= (labels >= 0) & (labels < num_classes)
    cols = num_classes + 1
    pred = torch.where((pred >= 0) & (pred < num_classes), pred, torch.full_like(pred, num_classes))
    index = torch.where(keep, labels * cols + pred, num_classes * cols)
    counts = torch.zeros(num_classes * cols + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(num_classes, cols)


def iou_from_confusion(conf: Tensor) -> Tensor:
    """Per-class IoU (float64) from a ``[C, C]`` or ``[C, C + 1]`` (misses column) matrix;
    NaN for a class absent from both labels and predictions."""
    conf = conf.double()
    c = conf.shape[0]
    tp = conf[:, :c].diagonal()
    denom = conf[:, :c].sum(0) + conf.sum(1) - tp  # predicted as c + labelled c - both
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


class SegmentationIoU:
    """Accumulates a confusion matrix over batches; ``update(pred, batch)`` reads
    ``batch["labels"]`` of the flat batch dict."""

    def __init__(self, num_classes: int = 19, ignore_index: Optional[int] = 255,
                 class_names: Optional[Sequence[str]] = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.conf: Optional[Tensor] = None

    def reset(self) -> None:
        self.conf = None

    def update(self, pred: Tensor, batch_or_labels) -> None:
        labels = batch_or_labels["labels"] if isinstance(batch_or_labels, dict) else batch_or_labels
        conf = confusion_matrix(pred, labels.to(pred.device), self.num_classes, self.ignore_index)
        self.conf = conf if self.conf is None else self.conf + conf

    def compute(self) -> Dict[str, object]:
        if self.conf is None:
            raise RuntimeError("SegmentationIoU.compute() before any update()")
        iou = iou_from_confusion(self.conf).cpu()
        per_class: Dict[str, float] = {n: float(v) * 100 for n, v in zip(self.class_names, iou)}
        present = iou[~torch.isnan(iou)]
        miou = float(torch.nan_to_num(iou, nan=0.0).mean()) * 100  # semantic-kitti-api: absent = 0
        miou_present = float(present.mean()) * 100 if present.numel() else float("nan")
        total = self.conf.sum()
        acc = float(self.conf[:, : self.num_classes].diagonal().sum().double() / total.clamp_min(1)) * 100
        return {"miou": miou, "miou_present": miou_present, "accuracy": acc, "iou": per_class,
                "points": int(total)}
