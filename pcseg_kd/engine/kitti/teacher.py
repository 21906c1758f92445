"""The frozen teacher the student stage learns from: where its weights are, loading them,
and the fingerprints that say which teacher (settings, weights, inputs) a student or a teacher
cache depends on. The trainer (:mod:`.train`) and the cache export (:mod:`.export`) both use it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
from torch import Tensor, nn

from ...registry import MODELS
from ..checkpoint import load_checkpoint

# dataset settings that decide what the teacher sees (augmentation and frame selection aside)
TEACHER_INPUT_KEYS = ("voxel_size", "point_range", "out_of_range", "fov_only", "image_scale", "camera",
                      "image_mean", "image_std", "load_image")


class ResumeMismatch(ValueError):
    """A stage's checkpoint was written under a different configuration."""


# the distiller keys the engine reads (and the config schema checks): online runs the frozen
# teacher each step, cache reads its exported logits (default folder WORK/teacher_cache)
ENGINE_KEYS = {"teacher_source": Literal["online", "cache"], "teacher_cache": Optional[str]}


def teacher_source(cfg: Dict[str, Any], work_dir: Path) -> Tuple[str, Path]:
    """(``online`` | ``cache``, the cache folder: ``distiller.teacher_cache`` or WORK/teacher_cache)."""
    d = cfg["distiller"]
    path = Path(d["teacher_cache"]) if d.get("teacher_cache") else Path(work_dir) / "teacher_cache"
    return d.get("teacher_source", "online"), path


def without_engine_keys(distiller_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The distiller config its constructor takes (the teacher source is the engine's)."""
    return {k: v for k, v in distiller_cfg.items() if k not in ENGINE_KEYS}


def teacher_inputs(data_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """:data:`TEACHER_INPUT_KEYS` of a dataset config, with the dataset's defaults filled in."""
    from ...data.kitti.dataset import input_settings
    return input_settings(data_cfg, TEACHER_INPUT_KEYS)


def load_teacher(cfg: Dict[str, Any], work_dir: Path, device: torch.device) -> nn.Module:
    path = Path(cfg["teacher_checkpoint"]) if cfg.get("teacher_checkpoint") else work_dir / "teacher" / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {path} do not exist: run the teacher stage first "
                                "(stages: [teacher, student]) or set teacher_checkpoint")
    return load_frozen(path, cfg["teacher"]["model"], device, "teacher.model")


def load_frozen(path: Path, configured: Dict[str, Any], device: torch.device, key: str = "model") -> nn.Module:
    """A trained model (a stage's final.pt, or a bare state_dict of ``configured``), in eval
    mode with frozen parameters."""
    state = load_checkpoint(path)
    weights = state.get("model", state)  # a final.pt, or a bare state_dict
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"weights {path}: neither a pcseg_kd final.pt nor a state_dict")
    stored = state.get("model_cfg")
    if stored and stored.get("type") != configured.get("type"):
        raise ValueError(f"weights {path} hold a {stored.get('type')!r} model, but {key} is a "
                         f"{configured.get('type')!r}: point teacher_checkpoint at a teacher's final.pt")
    # the trained weights replace any pretrained backbone: do not read that file again
    model = MODELS.build(without_pretrained(stored or configured))
    load_weights(model, weights, path)
    model.to(device).eval()  # eval for good: BatchNorm statistics stay as trained
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def without_pretrained(model_cfg: Any) -> Any:
    """A model config with every ``pretrained`` entry (at any depth) removed."""
    if isinstance(model_cfg, dict):
        return {k: without_pretrained(v) for k, v in model_cfg.items() if k != "pretrained"}
    return model_cfg


def load_weights(model: nn.Module, weights: Dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ResumeMismatch(f"{path}: weights do not fit the configured {type(model).__name__} "
                             f"({str(e).splitlines()[0]} ...): the model config changed since it was "
                             "written; use the config it was trained with, or another --work-dir") from e


def teacher_fingerprint(cfg: Dict[str, Any], work_dir: Path) -> Dict[str, Any]:
    """What the student stage depends on of its teacher: the teacher stage's fingerprint, or
    the identity (path, size, mtime) of an external ``teacher_checkpoint``."""
    if cfg.get("teacher_checkpoint"):
        p = Path(cfg["teacher_checkpoint"])
        if not p.is_file():
            return {"path": str(p.resolve()), "missing": True}
        stored = load_checkpoint(p, mmap=True).get("fingerprint") if p.suffix == ".pt" else None
        if stored:  # a pcseg_kd final.pt: its settings, wherever the file has been moved or copied
            return stored
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
    final = work_dir / "teacher" / "final.pt"
    return load_checkpoint(final, mmap=True).get("fingerprint", {}) if final.is_file() else {}


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_weights_path(cfg: Dict[str, Any], work_dir: Path) -> Path:
    return Path(cfg["teacher_checkpoint"]) if cfg.get("teacher_checkpoint") else Path(work_dir) / "teacher" / "final.pt"


def fold_teacher_paths(cfg: Dict[str, Any], work_dir: Path) -> List[Path]:
    """The fold teachers' weights (``teacher.folds`` = K > 0), else []: ``WORK/teacher_fold_k/final.pt``
    of the run, or, with ``teacher_checkpoint: OTHER/teacher/final.pt``, of the run that trained
    that teacher (``OTHER/teacher_fold_k/final.pt``)."""
    base = Path(cfg["teacher_checkpoint"]).parent.parent if cfg.get("teacher_checkpoint") else Path(work_dir)
    return [base / f"teacher_fold_{k}" / "final.pt" for k in range(cfg["teacher"].get("folds") or 0)]


def load_cache_teachers(cfg: Dict[str, Any], work_dir: Path, device: torch.device) -> List[nn.Module]:
    """The teachers whose logits the run's cache holds: the K fold teachers (out-of-fold
    targets), else the one teacher."""
    paths = fold_teacher_paths(cfg, work_dir)
    if not paths:
        return [load_teacher(cfg, work_dir, device)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"fold teacher weights {missing[0]} do not exist: run the teacher stage "
                                f"(teacher.folds={len(paths)} trains them beside the teacher)")
    return [load_frozen(p, cfg["teacher"]["model"], device, "teacher.model") for p in paths]


def cache_fingerprint(cfg: Dict[str, Any], work_dir: Path, teacher=None,
                      device: torch.device = torch.device("cpu")) -> Optional[Dict[str, Any]]:
    """What a cache exported from this run's teacher depends on: the teacher (its settings
    and a digest of its weights) and its inputs; with ``teacher.folds``, every fold teacher's
    (their settings hold their fold and a digest of every scan's fold). None when the run has
    no teacher weights (a cache written by another teacher, e.g. another framework's, is then
    taken as it is). ``teacher``: the loaded teacher, or the list of fold teachers."""
    inputs = teacher_inputs(cfg["data"]["train"])
    paths = fold_teacher_paths(cfg, work_dir)
    if paths:
        if not all(p.is_file() for p in paths):
            return None
        teachers = teacher if isinstance(teacher, list) else load_cache_teachers(cfg, work_dir, device)
        return {"teacher": {"folds": len(paths),
                            "fold_teachers": [{"settings": load_checkpoint(p, mmap=True).get("fingerprint", {}),
                                               "weights_sha256": weights_digest(t)} for p, t in zip(paths, teachers)]},
                "inputs": inputs}
    if teacher is None:
        if not teacher_weights_path(cfg, work_dir).is_file():
            return None
        teacher = load_teacher(cfg, work_dir, device)
    if isinstance(teacher, list):
        teacher = teacher[0]
    return {"teacher": {"settings": teacher_fingerprint(cfg, work_dir), "weights_sha256": weights_digest(teacher)},
            "inputs": inputs}
