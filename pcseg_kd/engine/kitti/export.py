"""Export a trained teacher's per-point logits over the training set: the teacher cache that
the student stage reads with ``distiller.teacher_source: cache`` (format:
:mod:`pcseg_kd.data.kitti.teacher_cache`).

The teacher runs once per scan in eval mode on unaugmented inputs and the whole image, so
the cache holds a logit row for every in-view point of every scan, where an online teacher
sees only the points inside that step's image crop. Chunks are written atomically and
sharded over ranks; a killed export resumes at the first missing chunk.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from ...data.kitti import teacher_cache as tc
from ...registry import DATASETS
from ...utils.lock import work_dir_lock
from ...utils.workers import worker_init
from ..distributed import DistEnv, barrier, broadcast_object
from .data import to_device
from .objective import rows_of

from .teacher import cache_fingerprint, load_cache_teachers, teacher_source
# their home before the teacher module: kept importable from here
from .teacher import ENGINE_KEYS, teacher_inputs, without_engine_keys  # noqa: F401,E402


def export_dataset_cfg(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The training set as the teacher sees it for the cache: no augmentation, the whole
    image, no substituted frames (a cached row must belong to its own scan)."""
    return {**cfg["data"]["train"], "augment": False, "image_crop_hw": None, "skip_bad_frames": False}


def export_teacher(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, out: Optional[Path] = None,
                   chunk_frames: Optional[int] = None, batch_size: Optional[int] = None, progress: bool = True,
                   num_workers: Optional[int] = None, fingerprint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write (or finish) the teacher cache at ``out`` (default: the run's cache folder).

    ``chunk_frames``: scans per chunk (default: an unfinished cache's own, else 64);
    ``batch_size``: scans per forward pass (default: the teacher's training batch, a size known
    to fit); ``num_workers``: loader processes (default: ``data.num_workers``, and at least one
    when a CPU core is left over by torch's threads, so that loading overlaps the forward pass
    instead of taking cores from it). With ``data.train.skip_bad_frames`` a bad scan is kept
    in the cache with no rows (training skips it too); otherwise it is an error naming it.
    Returns {cache, frames, chunks, written, rows, bytes, seconds, startup_seconds (until the
    first batch arrived)}; the written chunks' figures are this rank's. ``fingerprint``: the
    teacher's :func:`cache_fingerprint` when the caller has computed it already."""
    out = Path(out) if out is not None else teacher_source(cfg, work_dir)[1]
    teachers = load_cache_teachers(cfg, work_dir, env.device)
    ds = DATASETS.build(export_dataset_cfg(cfg))
    fingerprint = fingerprint or cache_fingerprint(cfg, work_dir, teachers if len(teachers) > 1 else teachers[0])
    # which teacher answers for each scan: with folds, the fold teacher that did not see it
    frame_folds = None
    if cfg["teacher"].get("folds"):
        from ...data.kitti.folds import fold_assignment
        frame_folds = fold_assignment(cfg, ds.frames)
    # one exporter per cache folder: two runs with different teachers must not both pass the
    # meta.json check and then write chunks under one meta
    with (work_dir_lock(out) if env.is_main else contextlib.nullcontext()):
        meta, todo = _plan(out, ds, teachers[0].num_classes, fingerprint, chunk_frames, env, frame_folds)
        return _export(cfg, env, out, teachers, frame_folds, ds, meta, todo, batch_size, num_workers, progress)


def _plan(out: Path, ds, num_classes: int, fingerprint, chunk_frames: Optional[int], env: DistEnv,
          frame_folds: Optional[List[int]] = None):
    """(meta, this rank's chunks to write): decided on rank 0 and shared, so that every rank
    splits the same list even if another has already written a chunk."""
    error, plan = None, None
    if env.is_main:
        try:
            saved = tc.read_meta(out) if (out / "meta.json").is_file() else None
            if saved is None:
                # chunks are written after meta.json: chunks without one came from elsewhere, and
                # writing this teacher's meta.json over them would make them pass as its own
                strays = sorted(p.name for p in out.glob("chunk_*") if p.is_file())
                if strays:
                    raise tc.TeacherCacheError(
                        f"{out}: holds {len(strays)} chunk file(s) ({strays[0]}, ...) but no meta.json, so "
                        "whose logits they are is unknown: delete them (or the folder) to export here, or "
                        "export elsewhere (--out)")
            if chunk_frames is None:  # finishing an export: its own chunking
                chunk_frames = saved["chunk_frames"] if saved else 64
            elif not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
                raise ValueError(f"--chunk-frames (chunk_frames) must be a whole number >= 1, got {chunk_frames!r}")
            meta = tc.new_meta([f.frame_id for f in ds.frames], num_classes, ds.class_names, fingerprint,
                               chunk_frames)
            if frame_folds is not None:  # out-of-fold targets: the fold (teacher) of each frame
                meta["frame_folds"] = frame_folds
            if saved is not None:
                diff = sorted(k for k in meta if saved.get(k) != meta[k])
                if diff:
                    raise tc.TeacherCacheError(
                        f"{out / 'meta.json'}: a teacher cache exported with other settings is there "
                        f"({', '.join(diff)} differ): delete that folder to export again, or export "
                        "elsewhere (--out)")
            else:
                from ...utils.io import write_json
                write_json(out / "meta.json", meta)
            done = set(tc.complete_chunks(out, meta))
            for k in sorted(done):  # kept as done only when this teacher wrote them (names the chunk)
                tc.read_chunk_json(out, k, meta)
            plan = (meta, [k for k in range(tc.num_chunks(meta)) if k not in done])
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
    shared = broadcast_object({"error": None if error is None else str(error), "plan": plan}, env)
    if error is not None:
        raise error
    if shared["error"]:
        raise tc.TeacherCacheError(shared["error"])
    meta, todo = shared["plan"]
    return meta, todo[env.rank::env.world_size]


def _export(cfg, env: DistEnv, out: Path, teachers, frame_folds, ds, meta, todo, batch_size, num_workers,
            progress: bool) -> Dict[str, Any]:
    """``teachers``: [the teacher], or the fold teachers with ``frame_folds`` (each scan's fold)."""
    from tqdm import tqdm

    device = env.device
    chunk_frames = meta["chunk_frames"]
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
    skip_bad = bool(cfg["data"]["train"].get("skip_bad_frames"))
    # its workers die with the export: an orphan would hold the work folder's and the cache's locks
    loader = DataLoader(_Scans(ds, indices, skip_bad), batch_size=batch_size, collate_fn=list,
                        num_workers=num_workers, worker_init_fn=worker_init())
    num_classes = teachers[0].num_classes
    position = 0  # of the next loaded scan in ``indices``
    pending = iter(todo)
    k, buffer = None, ([], [], [])  # the chunk being filled: logits, point indices, scan sizes
    startup = None  # until the first batch arrives: worker start-up, the first scan's loading
    with torch.no_grad():
        for items in loader:
            if startup is None:
                startup = time.perf_counter() - t0
            frames = indices[position:position + len(items)]
            position += len(items)
            good = [(i, x) for i, x in zip(frames, items) if "bad_frame" not in x]
            got = iter(_rows_per_scan(teachers, frame_folds, good, device, use_amp))
            # a bad frame keeps its place with no rows: training never reads it (it substitutes
            # the next good frame, whose own rows are cached)
            for item in items:
                scan = _NO_ROWS(num_classes) if "bad_frame" in item else next(got)
                if k is None:
                    k = next(pending)
                for part, value in zip(buffer, scan):
                    part.append(value)
                if len(buffer[0]) == len(tc.chunk_frames_of(meta, k)):
                    tc.write_chunk(out, k, tc.chunk_frames_of(meta, k), *buffer, fingerprint=meta["fingerprint"])
                    rows += sum(len(p) for p in buffer[1])
                    written_bytes += sum(Path(f"{tc.chunk_stem(out, k)}{e}").stat().st_size
                                         for e in (".json", ".logits.npy", ".point_index.npy"))
                    k, buffer = None, ([], [], [])
            bar.update(len(items))
    bar.close()
    barrier(env)
    return {"cache": str(out), "frames": len(meta["frames"]), "chunks": tc.num_chunks(meta), "written": len(todo),
            "rows": rows, "bytes": written_bytes, "seconds": time.perf_counter() - t0,
            "startup_seconds": startup or 0.0}


def _rows_per_scan(teachers, frame_folds, good, device, use_amp) -> List[Tuple[Any, Any, int]]:
    """(logits, raw point index, scan size) of each (frame index, sample) in ``good``, in order:
    one forward pass per teacher over the scans it answers for."""
    from ...data.kitti.collate import collate_kitti
    groups: Dict[int, List[int]] = {}
    for j, (i, _) in enumerate(good):
        groups.setdefault(frame_folds[i] if frame_folds is not None else 0, []).append(j)
    out: List[Any] = [None] * len(good)
    for t, js in groups.items():
        samples = [good[j][1] for j in js]
        logits, raw = _teacher_rows(teachers[t], to_device(collate_kitti(samples), device), use_amp)
        for j, lg, rw, x in zip(js, logits, raw, samples):
            out[j] = (lg, rw, x["num_scan_points"])
    return out


def _NO_ROWS(num_classes: int):
    """A bad frame's entry: no logits, no points (its scan size unknown: 0)."""
    return np.zeros((0, num_classes), np.float32), np.zeros(0, np.int64), 0


class _Scans(torch.utils.data.Dataset):
    """The export's scans in order; with ``skip_bad``, a bad frame becomes a marker instead of
    an error (the training set skips it too)."""

    def __init__(self, ds, indices: List[int], skip_bad: bool):
        self.ds, self.indices, self.skip_bad = ds, indices, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from ...data.kitti.errors import KittiDataError
        try:
            return self.ds[self.indices[i]]
        except KittiDataError:
            if not self.skip_bad:
                raise
            return {"bad_frame": self.ds.frames[self.indices[i]].frame_id}


def _teacher_rows(teacher: torch.nn.Module, batch: Dict[str, Any], use_amp: bool):
    """Per scan of ``batch``: the teacher's logits [R, C] (CPU, float32) and the raw point
    index of each row, for the rows where the teacher had its full input."""
    with torch.autocast(batch["points"].device.type, dtype=torch.float16, enabled=use_amp):
        out = teacher(batch)
    logits = out["logits"].float()
    if rows_of(teacher) == "in_view":
        rows, offsets = batch["img_point_idx"], batch["img_offsets"]
    else:
        rows, offsets = torch.arange(len(batch["points"]), device=logits.device), batch["offsets"]
    raw = batch["point_index"][rows].cpu().numpy()
    logits = logits.cpu().numpy()
    parts = [slice(a, b) for a, b in zip(offsets.tolist(), offsets.tolist()[1:])]
    if out.get("point_valid") is None:
        return [logits[p] for p in parts], [raw[p] for p in parts]
    # a point without a voxel here (out_of_range: drop) got no point feature, so its row is not
    # the teacher's answer; augmentation may give it a student voxel later: not cached
    keep = out["point_valid"][rows].cpu().numpy()
    return [logits[p][keep[p]] for p in parts], [raw[p][keep[p]] for p in parts]
