"""Export a trained teacher's per-point logits over the training set: the teacher cache that
the student stage reads with ``distiller.teacher_source: cache`` (format:
:mod:`pcseg_kd.data.kitti.teacher_cache`).

The teacher runs once per scan in eval mode on unaugmented inputs and the whole image, so
the cache holds a logit row for every in-view point of every scan, where an online teacher
sees only the points inside that step's image crop. Chunks are written atomically and
sharded over ranks; a killed export resumes at the first missing chunk.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ...data.kitti import teacher_cache as tc
from ...registry import DATASETS
from ..distributed import DistEnv, barrier, broadcast_object
from .data import to_device
from .objective import rows_of

# dataset settings that decide what the teacher sees (augmentation and frame selection aside)
TEACHER_INPUT_KEYS = ("voxel_size", "point_range", "out_of_range", "fov_only", "image_scale", "camera",
                      "image_mean", "image_std", "load_image")
ENGINE_KEYS = {"teacher_source": str, "teacher_cache": Optional[str]}  # distiller keys the engine reads


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
    from ...data.kitti.augment import IMAGENET_MEAN, IMAGENET_STD
    from ...data.kitti.dataset import DEFAULT_POINT_RANGE, DEFAULT_VOXEL_SIZE, SemanticKITTIDataset

    params = inspect.signature(SemanticKITTIDataset).parameters
    defaults = {k: params[k].default for k in TEACHER_INPUT_KEYS}
    defaults.update(voxel_size=DEFAULT_VOXEL_SIZE, point_range=DEFAULT_POINT_RANGE,
                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    out = {}
    for k in TEACHER_INPUT_KEYS:
        v = data_cfg.get(k)
        v = defaults[k] if v is None else v
        out[k] = [float(x) for x in v] if isinstance(v, (list, tuple)) else v
    return out


def export_dataset_cfg(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The training set as the teacher sees it for the cache: no augmentation, the whole
    image, no substituted frames (a cached row must belong to its own scan)."""
    return {**cfg["data"]["train"], "augment": False, "image_crop_hw": None, "skip_bad_frames": False}


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_weights_path(cfg: Dict[str, Any], work_dir: Path) -> Path:
    return Path(cfg["teacher_checkpoint"]) if cfg.get("teacher_checkpoint") else Path(work_dir) / "teacher" / "final.pt"


def cache_fingerprint(cfg: Dict[str, Any], work_dir: Path, teacher: Optional[torch.nn.Module] = None,
                      device: torch.device = torch.device("cpu")) -> Optional[Dict[str, Any]]:
    """What a cache exported from this run's teacher depends on: the teacher (its settings
    and a digest of its weights) and its inputs. None when the run has no teacher weights
    (a cache written by another teacher, e.g. another framework's, is then taken as it is)."""
    from .train import load_teacher, teacher_fingerprint

    if teacher is None:
        if not teacher_weights_path(cfg, work_dir).is_file():
            return None
        teacher = load_teacher(cfg, work_dir, device)
    return {"teacher": {"settings": teacher_fingerprint(cfg, work_dir), "weights_sha256": weights_digest(teacher)},
            "inputs": teacher_inputs(cfg["data"]["train"])}


def export_teacher(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, out: Optional[Path] = None,
                   chunk_frames: int = 64, batch_size: Optional[int] = None, progress: bool = True,
                   num_workers: Optional[int] = None) -> Dict[str, Any]:
    """Write (or finish) the teacher cache at ``out`` (default: the run's cache folder);
    ``batch_size``: scans per forward pass (default: the teacher's training batch, a size known
    to fit); ``num_workers``: loader processes (default: ``data.num_workers``, and at least one
    when a CPU core is left over by torch's threads, so that loading overlaps the forward pass
    instead of taking cores from it).
    Returns {cache, frames, chunks, written, rows, bytes, seconds, startup_seconds (until the
    first batch arrived)}; the written chunks' figures are this rank's."""
    from tqdm import tqdm

    from ...data.kitti.collate import collate_kitti
    from .train import load_teacher

    out = Path(out) if out is not None else teacher_source(cfg, work_dir)[1]
    device = env.device
    teacher = load_teacher(cfg, work_dir, device)
    ds = DATASETS.build(export_dataset_cfg(cfg))
    meta = tc.new_meta([f.frame_id for f in ds.frames], teacher.num_classes, ds.class_names,
                       cache_fingerprint(cfg, work_dir, teacher), chunk_frames)
    error = None
    if env.is_main:
        try:
            if (out / "meta.json").is_file():
                saved = tc.read_meta(out)
                diff = sorted(k for k in meta if saved.get(k) != meta[k])
                if diff:
                    raise tc.TeacherCacheError(
                        f"{out / 'meta.json'}: a teacher cache exported with other settings is there ({', '.join(diff)} "
                        "differ): delete that folder to export again, or export elsewhere (--out)")
            else:
                from ...utils.io import write_json
                write_json(out / "meta.json", meta)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
    failed = broadcast_object(None if error is None else str(error), env)
    if error is not None:
        raise error
    if failed:
        raise tc.TeacherCacheError(failed)
    done = set(tc.complete_chunks(out, meta))
    todo = [k for k in range(tc.num_chunks(meta)) if k not in done][env.rank::env.world_size]
    use_amp = device.type == "cuda" and cfg["student"]["optim"].get("amp", False)
    t0 = time.perf_counter()
    rows = written_bytes = 0
    bar = tqdm(total=sum(len(tc.chunk_frames_of(meta, k)) for k in todo), desc="export teacher", unit="scan",
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    # one loader over every scan still to do, in chunk order (its workers start once)
    indices = [i for k in todo for i in range(k * chunk_frames, k * chunk_frames + len(tc.chunk_frames_of(meta, k)))]
    if num_workers is None:
        spare = (os.cpu_count() or 1) > torch.get_num_threads()
        num_workers = max(int(spare), cfg["data"]["num_workers"])
    batch_size = batch_size or cfg["teacher"]["optim"]["batch_size"]
    loader = DataLoader(Subset(ds, indices), batch_size=batch_size, collate_fn=collate_kitti, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    pending = iter(todo)
    k, buffer = None, ([], [], [])  # the chunk being filled: logits, point indices, scan sizes
    startup = None  # until the first batch arrives: worker start-up, the first scan's loading
    with torch.no_grad():
        for batch in loader:
            if startup is None:
                startup = time.perf_counter() - t0
            got = _teacher_rows(teacher, to_device(batch, device), use_amp)
            for scan in zip(*got, batch["num_scan_points"]):
                if k is None:
                    k = next(pending)
                for part, value in zip(buffer, scan):
                    part.append(value)
                if len(buffer[0]) == len(tc.chunk_frames_of(meta, k)):
                    tc.write_chunk(out, k, tc.chunk_frames_of(meta, k), *buffer)
                    rows += sum(len(p) for p in buffer[1])
                    written_bytes += sum(Path(f"{tc.chunk_stem(out, k)}{e}").stat().st_size
                                         for e in (".json", ".logits.npy", ".point_index.npy"))
                    k, buffer = None, ([], [], [])
            bar.update(batch["batch_size"])
    bar.close()
    barrier(env)
    return {"cache": str(out), "frames": len(meta["frames"]), "chunks": tc.num_chunks(meta), "written": len(todo),
            "rows": rows, "bytes": written_bytes, "seconds": time.perf_counter() - t0,
            "startup_seconds": startup or 0.0}


def _teacher_rows(teacher: torch.nn.Module, batch: Dict[str, Any], use_amp: bool):
    """Per scan of ``batch``: the teacher's logits [R, C] (CPU, float32) and the raw point
    index of each row."""
    with torch.autocast(batch["points"].device.type, dtype=torch.float16, enabled=use_amp):
        logits = teacher(batch)["logits"].float()
    if rows_of(teacher) == "in_view":
        rows, offsets = batch["img_point_idx"], batch["img_offsets"]
    else:
        rows, offsets = torch.arange(len(batch["points"]), device=logits.device), batch["offsets"]
    raw = batch["point_index"][rows].cpu().numpy()
    logits = logits.cpu().numpy()
    offsets = offsets.tolist()
    return ([logits[offsets[b]:offsets[b + 1]] for b in range(batch["batch_size"])],
            [raw[offsets[b]:offsets[b + 1]] for b in range(batch["batch_size"])])
