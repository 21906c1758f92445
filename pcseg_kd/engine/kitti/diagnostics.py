"""SSDH diagnostics of a student/teacher pair on SemanticKITTI validation scans.

* :func:`output_cmd`: the central moment discrepancy (paper Table 1, :func:`pcseg_kd.metrics.cmd`)
  between the teacher's and the student's softmax outputs on the in-view points both
  predict: how far apart the two distributions are, the shift the paper's thesis is about.
* :func:`frame_omega`: PSSM's Ω for every in-view point of one batch, with both models'
  predictions, for the picture of where the mask switches the teacher off.

Both run the models in eval mode on one process; they are diagnostics, not training code.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import torch
from torch import Tensor, nn

from ...losses.pssm import PSSMConfig, pssm_weights
from ...metrics.cmd import cmd
from .data import to_device
from .objective import in_view, rows_of


def student_in_view(student: nn.Module, batch: Dict[str, Any]) -> Dict[str, Tensor]:
    """The student's in-view logits on one batch and which of those rows it predicts (a point
    without a voxel has no student output)."""
    s_out = student(batch)
    s_rows = rows_of(student)
    logits = in_view(s_out["logits"], s_rows, batch)
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if "point_valid" in s_out:
        valid = in_view(s_out["point_valid"], s_rows, batch)
    return {"logits": logits, "valid": valid}


def paired_in_view(student: nn.Module, teacher: nn.Module, batch: Dict[str, Any]) -> Dict[str, Tensor]:
    """Both models' in-view logits on one batch, the labels, and which in-view rows the
    student predicts."""
    s = student_in_view(student, batch)
    return {"student": s["logits"], "teacher": in_view(teacher(batch)["logits"], rows_of(teacher), batch),
            "labels": in_view(batch["labels"], "points", batch), "valid": s["valid"]}


@torch.no_grad()
def teacher_in_view_logits(teacher: nn.Module, loader: Iterable[Dict[str, Any]], device: torch.device) -> List[Tensor]:
    """The teacher's in-view logits of every batch of ``loader`` (CPU): what :func:`output_cmd`
    needs of the teacher, computed once and shared by every student distilled from it."""
    was = teacher.training
    teacher.eval()
    out = []
    for batch in loader:
        batch = to_device(batch, device)
        out.append(in_view(teacher(batch)["logits"], rows_of(teacher), batch).cpu())
    teacher.train(was)
    return out


@torch.no_grad()
def output_cmd(student: nn.Module, teacher_logits: Sequence[Tensor], loader: Iterable[Dict[str, Any]],
               device: torch.device, k: int = 5) -> float:
    """CMD_k between the student's and the teacher's softmax outputs over every in-view
    point of ``loader`` the student predicts (float64 moments, no bounds: the reference
    code's convention, as Table 1). ``teacher_logits``: :func:`teacher_in_view_logits` on the
    same batches (so the student's loader needs no pixels)."""
    was = student.training
    student.eval()
    s_all, t_all = [], []
    for i, batch in enumerate(loader):
        if i >= len(teacher_logits):
            raise ValueError(f"output_cmd: the loader gave more batches than the {len(teacher_logits)} "
                             "of the teacher's logits")
        s = student_in_view(student, to_device(batch, device))
        s_all.append(s["logits"][s["valid"]].double().softmax(-1).cpu())
        t_all.append(teacher_logits[i].to(device)[s["valid"]].double().softmax(-1).cpu())
    student.train(was)
    if len(s_all) != len(teacher_logits):
        raise ValueError(f"output_cmd: the loader gave {len(s_all)} batches, the teacher's logits are of "
                         f"{len(teacher_logits)}")
    if sum(len(x) for x in s_all) == 0:
        raise ValueError("output_cmd: the loader gave no in-view points")
    return float(cmd(torch.cat(s_all), torch.cat(t_all), k=k))


@torch.no_grad()
def frame_omega(student: nn.Module, teacher: nn.Module, batch: Dict[str, Any], pssm: PSSMConfig,
                ignore_index: int = 255) -> Dict[str, Tensor]:
    """Ω (``pssm``) and both predictions for every in-view point of ``batch`` (CPU tensors);
    unlabelled points get Ω = 0, points without a student voxel Ω = NaN."""
    student.eval()
    teacher.eval()
    pair = paired_in_view(student, teacher, batch)
    omega = pssm_weights(pair["student"].float(), pair["teacher"].float(), pair["labels"], config=pssm,
                         ignore_index=ignore_index)
    omega = torch.where(pair["valid"], omega, torch.full_like(omega, float("nan")))
    return {"omega": omega.cpu(), "student_pred": pair["student"].argmax(-1).cpu(),
            "teacher_pred": pair["teacher"].argmax(-1).cpu(), "labels": pair["labels"].cpu()}
