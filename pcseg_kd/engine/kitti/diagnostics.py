"""SSDH diagnostics of a student/teacher pair on SemanticKITTI validation scans.

* :func:`output_cmd`: the central moment discrepancy (paper Table 1, :func:`pcseg_kd.metrics.cmd`)
  between the teacher's and the student's softmax outputs on the in-view points both
  predict: how far apart the two distributions are, the shift the paper's thesis is about.
* :func:`frame_omega`: PSSM's Ω for every in-view point of one batch, with both models'
  predictions, for the picture of where the mask switches the teacher off.

Both run the models in eval mode on one process; they are diagnostics, not training code.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ...losses.pssm import PSSMConfig, pssm_weights
from ...metrics.cmd import cmd
from .data import to_device
from .objective import in_view, rows_of


def paired_in_view(student: nn.Module, teacher: Optional[nn.Module], batch: Dict[str, Any],
                   teacher_logits: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Both models' in-view logits on one batch (the teacher's given, or computed), the
    labels, and which in-view rows the student predicts (a point without a voxel has no
    student output)."""
    s_out = student(batch)
    s_rows = rows_of(student)
    s_logits = in_view(s_out["logits"], s_rows, batch)
    t_logits = teacher_logits if teacher_logits is not None else in_view(teacher(batch)["logits"], rows_of(teacher), batch)
    valid = torch.ones(s_logits.shape[0], dtype=torch.bool, device=s_logits.device)
    if "point_valid" in s_out:
        valid = in_view(s_out["point_valid"], s_rows, batch)
    return {"student": s_logits, "teacher": t_logits, "labels": in_view(batch["labels"], "points", batch),
            "valid": valid}


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
def output_cmd(student: nn.Module, teacher: Union[nn.Module, Sequence[Tensor]], loader: Iterable[Dict[str, Any]],
               device: torch.device, k: int = 5) -> float:
    """CMD_k between the student's and the teacher's softmax outputs over every in-view
    point of ``loader`` the student predicts (float64 moments, no bounds: the reference
    code's convention, as Table 1). ``teacher``: the model, or its
    :func:`teacher_in_view_logits` on the same batches (then the loader needs no pixels)."""
    logits = None if isinstance(teacher, nn.Module) else list(teacher)
    was = student.training
    student.eval()
    if logits is None:
        was_t = teacher.training
        teacher.eval()
    s_all, t_all = [], []
    for i, batch in enumerate(loader):
        batch = to_device(batch, device)
        if logits is None:
            pair = paired_in_view(student, teacher, batch)
        else:
            if i >= len(logits):
                raise ValueError(f"output_cmd: the loader gave more batches than the {len(logits)} of the teacher's logits")
            pair = paired_in_view(student, None, batch, logits[i].to(device))
        s_all.append(pair["student"][pair["valid"]].double().softmax(-1).cpu())
        t_all.append(pair["teacher"][pair["valid"]].double().softmax(-1).cpu())
    student.train(was)
    if logits is None:
        teacher.train(was_t)
    elif len(s_all) != len(logits):
        raise ValueError(f"output_cmd: the loader gave {len(s_all)} batches, the teacher's logits are of {len(logits)}")
    if not s_all or sum(len(s) for s in s_all) == 0:
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
