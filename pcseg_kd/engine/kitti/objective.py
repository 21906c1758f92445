"""What each SemanticKITTI stage minimises, on which rows.

Rows: a model's ``logits`` cover either every point of the batch (``rows = "points"``: the
student) or the in-view points in ``img_point_idx`` order (``rows = "in_view"``: image and
fusion teachers). With the ``fov`` protocol the dataset keeps only in-view points, so both
kinds cover the same rows; with ``full`` the student covers the whole scan.

* teacher: the segmentation loss on every head it returns (``logits`` and, for the fusion
  teacher, ``point_logits`` / ``image_logits``), each weighted by ``loss_weights``;
* baseline (no KD) and student: ``distiller.ce_weight`` x the segmentation loss on the
  student's rows, plus (student only) the distiller's KD term on the in-view rows with a
  voxel, where the teacher speaks. In-view points that fell in no voxel
  (``out_of_range: drop``) have no student logits and get no KD. With a teacher cache
  (``distiller.teacher_source: cache``) the teacher's rows come in the batch
  (``kd_point_idx``, ``teacher_logits``): every cached point of the scan, not only the
  points inside the step's image crop.

The segmentation loss is ``ce · CE + lovasz · Lovász-softmax`` (2DPASS's recipe), CE with
optional class weights (:mod:`pcseg_kd.losses.class_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ...losses.segmentation import lovasz_softmax, weighted_ce

HEAD_ROWS = {"point_logits": "points", "image_logits": "in_view"}  # other heads of a teacher's output
TEACHER_HEADS = ("logits",) + tuple(HEAD_ROWS)


def rows_of(model: nn.Module) -> str:
    rows = getattr(model, "rows", None)
    if rows not in ("points", "in_view"):
        raise ValueError(f"model {type(model).__name__} does not say which rows its logits cover "
                         "(class attribute rows = 'points' or 'in_view')")
    return rows


def in_view(x: Tensor, rows: str, batch: Dict[str, Any]) -> Tensor:
    """The in-view rows of a per-point (``rows = "points"``) or in-view output."""
    return x[batch["img_point_idx"]] if rows == "points" else x


def labels_for(rows: str, batch: Dict[str, Any], point_valid: Optional[Tensor] = None,
               ignore_index: int = 255) -> Tensor:
    """Labels of a model's rows; points without a voxel (``point_valid`` False, only with
    ``out_of_range: drop``) get ``ignore_index``: the model cannot predict them."""
    labels = batch["labels"]
    if point_valid is not None:
        labels = torch.where(point_valid, labels, torch.full_like(labels, ignore_index))
    return labels if rows == "points" else labels[batch["img_point_idx"]]


@dataclass
class SegLoss:
    """``ce · CE(class_weights) + lovasz · Lovász-softmax`` over the rows with a label."""

    ce: float = 1.0
    lovasz: float = 0.0
    class_weights: Optional[Tensor] = None
    ignore_index: int = 255

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = self.ce * weighted_ce(logits, labels, self.ignore_index, self.class_weights)
        if self.lovasz:
            loss = loss + self.lovasz * lovasz_softmax(logits, labels, self.ignore_index)
        return loss

    def to(self, device: torch.device) -> "SegLoss":
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(device)
        return self


def teacher_loss(model: nn.Module, out: Dict[str, Tensor], batch: Dict[str, Any], weights: Dict[str, float],
                 seg: SegLoss) -> Dict[str, Tensor]:
    losses = {}
    for head in TEACHER_HEADS:
        if head in out:
            rows = rows_of(model) if head == "logits" else HEAD_ROWS[head]
            labels = labels_for(rows, batch, out.get("point_valid") if rows == "points" else None,
                                seg.ignore_index)
            losses[f"loss_{head}"] = weights.get(head, 1.0) * seg(out[head], labels)
    return losses


def kd_rows(distiller, s_out: Dict[str, Tensor], t_out: Optional[Dict[str, Tensor]], s_rows: str, t_rows: str,
            batch: Dict[str, Any], labels: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """(student logits, teacher logits, labels) on the rows the KD term acts on, or None
    without KD: the cached teacher's rows (``kd_point_idx``) or the in-view points."""
    if not distiller.has_kd:
        return None
    if t_out is None and "teacher_logits" in batch:  # the exported teacher cache
        if s_rows != "points":
            raise ValueError("a teacher cache pairs rows by point: the student must predict every point")
        rows = batch["kd_point_idx"]
        return s_out["logits"][rows], batch["teacher_logits"].float(), labels[rows]
    if t_out is not None:
        # ignore_index where the student has no voxel
        return (in_view(s_out["logits"], s_rows, batch), in_view(t_out["logits"], t_rows, batch).detach(),
                in_view(labels, s_rows, batch))
    return None


def student_loss(distiller, seg: SegLoss, s_out: Dict[str, Tensor], t_out: Optional[Dict[str, Tensor]],
                 s_rows: str, t_rows: str, batch: Dict[str, Any], epoch: int) -> Dict[str, Tensor]:
    point_valid = s_out.get("point_valid")
    labels = labels_for(s_rows, batch, point_valid, seg.ignore_index)
    losses = {"loss_seg": distiller.ce_weight * seg(s_out["logits"], labels)}
    kd = kd_rows(distiller, s_out, t_out, s_rows, t_rows, batch, labels)
    if kd is not None:
        extras = {}
        if t_out is not None and distiller.uses_features:  # logit distillers: no [K, D] gathers per step
            extras = {"student_feats": in_view(s_out["feats"], s_rows, batch),
                      "teacher_feats": in_view(t_out["feats"], t_rows, batch).detach()}
        losses["loss_kd"] = distiller.kd_loss(*kd, epoch, **extras)
    return losses
