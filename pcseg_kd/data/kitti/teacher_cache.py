"""The teacher-output cache: a teacher's per-point logits for every scan, written once and
read by the student stage instead of running the teacher each step.

Format (version 1), a folder ``CACHE/``::

    meta.json                    format, version, num_classes, class_names, logits dtype,
                                 chunk_frames, frames (every frame id, in order), fingerprint
    chunk_00000.json             the chunk's frames, row offsets, scan sizes and the fingerprint
                                 of the teacher that wrote it (written last: a chunk is complete
                                 when its .json exists)
    chunk_00000.logits.npy       [R, C] float16: one row per cached point of the chunk's scans
    chunk_00000.point_index.npy  [R] int32: each row's point index in its scan's .bin file

Chunk ``k`` holds frames ``k·chunk_frames .. (k+1)·chunk_frames - 1`` of ``meta.frames``;
in ``chunk_k.json``, ``frames[i]``'s rows are ``offsets[i]:offsets[i+1]`` (ascending,
distinct point indices) and ``num_scan_points[i]`` is the number of points in its .bin.
Plain ``.npy`` files, so any teacher that can write numpy arrays can be distilled, and the
student reads one scan's rows through a memory map without reading the chunk.

Rows are keyed by the raw point index, which point augmentations (rotation, flips, scaling,
jitter) do not change: a training sample's row ``i`` pairs with the cached row of
``point_index[i]`` exactly, whatever was drawn for it that epoch. ``fingerprint`` says
what produced the logits (``teacher``: the teacher's settings and weights; ``inputs``: the
dataset settings it saw); a cache that does not match the run is refused, naming the file.
Every chunk's json repeats meta.json's fingerprint: a chunk of another teacher put under this
meta.json is refused, naming the chunk, as is a chunk without one (written before chunks
carried it: whose logits it holds cannot be told, so it is exported again, not trusted).
A chunk is checked once, when a process first maps it: its point indices within the scan,
its logits finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ...utils.io import atomic_write, read_json, write_json

FORMAT = "pcseg_kd.teacher_cache"
VERSION = 1


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete or does not match the run (names the file).

    Raised in a DataLoader worker (a damaged chunk is found when a worker maps it), torch
    re-raises it in the main process as ``Caught TeacherCacheError in DataLoader worker ...
    Original Traceback ...``; the original message is put back first, the worker's traceback
    kept in ``worker_traceback``."""

    def __init__(self, message: str = ""):
        self.worker_traceback: Optional[str] = None
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            self.worker_traceback = message
            message = message[message.rindex(marker) + len(marker):].rstrip("\n")
        super().__init__(message)


def chunk_stem(root: Path, k: int) -> Path:
    return Path(root) / f"chunk_{k:05d}"


def new_meta(frames: Sequence[str], num_classes: int, class_names: Sequence[str], fingerprint: Dict[str, Any],
             chunk_frames: int) -> Dict[str, Any]:
    if not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
        raise ValueError(f"chunk_frames must be a whole number >= 1, got {chunk_frames!r}")
    return {"format": FORMAT, "version": VERSION, "num_classes": int(num_classes),
            "class_names": list(class_names), "logits_dtype": "float16", "chunk_frames": chunk_frames,
            "frames": list(frames), "fingerprint": fingerprint}


def num_chunks(meta: Dict[str, Any]) -> int:
    return -(-len(meta["frames"]) // meta["chunk_frames"])


def chunk_frames_of(meta: Dict[str, Any], k: int) -> List[str]:
    n = meta["chunk_frames"]
    return meta["frames"][k * n:(k + 1) * n]


def write_chunk(root: Path, k: int, frames: Sequence[str], logits: Sequence[np.ndarray],
                point_index: Sequence[np.ndarray], num_scan_points: Sequence[int], *,
                fingerprint: Dict[str, Any]) -> None:
    """Write chunk ``k`` of a cache: per frame ``[R_i, C]`` logits (stored as float16) and
    ``[R_i]`` point indices (sorted here), signed with ``fingerprint`` (meta.json's: the
    teacher that computed them). The arrays go first, the .json last and each atomically, so a
    killed writer leaves the chunk incomplete, never wrong."""
    if not isinstance(fingerprint, dict):
        raise TypeError(f"write_chunk: fingerprint must be meta.json's fingerprint dict, got {fingerprint!r}")
    stem = chunk_stem(root, k)
    rows, idx, offsets = [], [], [0]
    for f, lg, pi, n in zip(frames, logits, point_index, num_scan_points):
        # the write path checks what the read path would refuse, before anything is written
        pi = np.asarray(pi, dtype=np.int64)
        order = np.argsort(pi, kind="stable")
        pi = pi[order]
        if len(pi) and (pi[0] < 0 or pi[-1] >= n or (np.diff(pi) == 0).any()):
            raise ValueError(f"{stem}.point_index.npy: frame {f}: point indices must be distinct and in [0, {n})")
        lg = np.asarray(lg, dtype=np.float16)
        if not np.isfinite(lg).all():
            raise ValueError(f"{stem}.logits.npy: frame {f}: non-finite teacher logits (NaN/inf, or beyond float16's 65504): "
                             "the teacher diverged or overflowed; not cached")
        rows.append(lg[order])
        idx.append(pi.astype(np.int32))
        offsets.append(offsets[-1] + len(pi))
    num_classes = rows[0].shape[1] if rows else 0
    atomic_write(f"{stem}.logits.npy", lambda fh: np.save(fh, np.concatenate(rows) if rows else
                                                         np.zeros((0, num_classes), np.float16)), binary=True)
    atomic_write(f"{stem}.point_index.npy", lambda fh: np.save(fh, np.concatenate(idx) if idx else
                                                              np.zeros(0, np.int32)), binary=True)
    write_json(f"{stem}.json", {"frames": list(frames), "offsets": offsets,
                                "num_scan_points": [int(n) for n in num_scan_points], "fingerprint": fingerprint})


def read_meta(root: Path) -> Dict[str, Any]:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise TeacherCacheError(f"{path}: no teacher cache here (export one with tools/export_teacher.py CONFIG)")
    try:
        meta = read_json(path)
    except ValueError as e:  # read_json names the file
        raise TeacherCacheError(f"not a teacher cache's meta.json: {e}") from e
    if not isinstance(meta, dict):
        raise TeacherCacheError(f"{path}: not a {FORMAT} meta.json (a {type(meta).__name__})")
    missing = [k for k in ("format", "version", "num_classes", "class_names", "chunk_frames", "frames",
                           "fingerprint") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise TeacherCacheError(f"{path}: not a {FORMAT} meta.json (missing {missing or ['format']})")
    if meta["version"] != VERSION:
        raise TeacherCacheError(f"{path}: format version {meta['version']}, this pcseg_kd reads {VERSION}")
    # each field is used as a number or a list further on (a 0 chunk_frames divided by zero, a
    # "19" num_classes made "19 classes ..., the student has 19"): checked here, naming the file
    problems = []
    for key in ("num_classes", "chunk_frames"):
        if not _whole(meta[key]) or meta[key] < 1:
            problems.append(f"{key} must be a whole number >= 1, got {meta[key]!r}")
    for key in ("class_names", "frames"):
        if not (isinstance(meta[key], list) and all(isinstance(x, str) for x in meta[key])):
            problems.append(f"{key} must be a list of strings, got {_short(meta[key])}")
    if not problems and len(meta["class_names"]) != meta["num_classes"]:
        problems.append(f"{len(meta['class_names'])} class_names for num_classes {meta['num_classes']}")
    if not problems and len(set(meta["frames"])) != len(meta["frames"]):
        problems.append("frames lists a frame twice")
    if not isinstance(meta["fingerprint"], dict):
        problems.append(f"fingerprint must be a mapping, got {_short(meta['fingerprint'])}")
    if meta.get("logits_dtype", "float16") != "float16":
        problems.append(f"logits_dtype {meta['logits_dtype']!r}: this format stores float16")
    if problems:
        raise TeacherCacheError(f"{path}: damaged teacher cache meta.json: {'; '.join(problems)}")
    return meta


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def check_chunk_fingerprint(path: Path, chunk: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Refuse chunk json ``path`` unless it says it was written by meta.json's teacher."""
    meta_path = Path(path).parent / "meta.json"
    if "fingerprint" not in chunk:
        raise TeacherCacheError(f"{path}: the chunk does not say which teacher wrote it (no 'fingerprint': "
                                "written before chunks carried one, or by another tool), so its logits cannot "
                                f"be matched to {meta_path}: delete the cache folder and export it again "
                                "(tools/export_teacher.py)")
    if chunk["fingerprint"] != meta["fingerprint"]:
        detail = _first_difference(chunk["fingerprint"], meta["fingerprint"], "fingerprint", ("chunk", "meta.json"))
        raise TeacherCacheError(f"{path}: the chunk was written by another teacher than {meta_path}'s ("
                                f"{detail}): "
                                "delete the cache folder and export it again (tools/export_teacher.py)")


def read_chunk_json(root: Path, k: int, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Chunk ``k``'s json, checked against ``meta``: its frames, its teacher, its offsets."""
    path = Path(f"{chunk_stem(root, k)}.json")
    try:
        chunk = read_json(path)
    except ValueError as e:  # read_json names the file
        raise TeacherCacheError(str(e)) from e
    n = len(chunk_frames_of(meta, k))
    if not isinstance(chunk, dict) or chunk.get("frames") != chunk_frames_of(meta, k):
        raise TeacherCacheError(f"{path}: its frames do not match chunk {k} of {Path(root) / 'meta.json'}")
    check_chunk_fingerprint(path, chunk, meta)
    offsets, sizes = chunk.get("offsets"), chunk.get("num_scan_points")
    if not (isinstance(offsets, list) and len(offsets) == n + 1 and isinstance(sizes, list) and len(sizes) == n
            and all(map(_whole, offsets)) and all(_whole(x) and x >= 0 for x in sizes)
            and offsets[0] == 0 and all(b >= a for a, b in zip(offsets, offsets[1:]))):
        raise TeacherCacheError(f"{path}: needs 'offsets' ({n + 1} ascending row offsets from 0) and "
                                f"'num_scan_points' ({n} scan sizes, whole numbers >= 0)")
    return chunk


def complete_chunks(root: Path, meta: Dict[str, Any]) -> List[int]:
    """The chunks whose three files are there (a killed export leaves the others to redo)."""
    return [k for k in range(num_chunks(meta)) if all(
        Path(f"{chunk_stem(root, k)}{ext}").is_file() for ext in (".json", ".logits.npy", ".point_index.npy"))]


@dataclass
class FrameRows:
    chunk: int
    start: int
    end: int
    num_scan_points: int


class TeacherCache:
    """A complete cache opened for reading: ``rows(frame_id)`` -> (point_index, logits)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.num_classes = self.meta["num_classes"]
        done = set(complete_chunks(self.root, self.meta))
        todo = [k for k in range(num_chunks(self.meta)) if k not in done]
        if todo:
            raise TeacherCacheError(f"{self.root}: incomplete teacher cache, {len(todo)} of {num_chunks(self.meta)} "
                                    f"chunks missing (first: {chunk_stem(self.root, todo[0]).name}.json); "
                                    "run tools/export_teacher.py again to finish it")
        self.index: Dict[str, FrameRows] = {}
        self._chunk_rows: Dict[int, int] = {}
        for k in range(num_chunks(self.meta)):
            chunk = read_chunk_json(self.root, k, self.meta)
            self._chunk_rows[k] = chunk["offsets"][-1]
            for i, f in enumerate(chunk["frames"]):
                self.index[f] = FrameRows(k, chunk["offsets"][i], chunk["offsets"][i + 1],
                                          chunk["num_scan_points"][i])
        self._arrays: Dict[int, Any] = {}  # opened lazily: memory maps must not cross a fork

    def __getstate__(self) -> Dict[str, Any]:  # to spawned loader workers: no mapped data
        return {**self.__dict__, "_arrays": {}}

    def _chunk(self, k: int):
        if k not in self._arrays:
            stem = chunk_stem(self.root, k)
            logits = _map(f"{stem}.logits.npy", np.floating)
            index = _map(f"{stem}.point_index.npy", np.integer)
            total = self._chunk_rows[k]
            if logits.shape != (total, self.num_classes) or index.shape != (total,):
                raise TeacherCacheError(f"{stem}.logits.npy / .point_index.npy: shapes {logits.shape} / {index.shape}, "
                                        f"{stem.name}.json says {total} rows of {self.num_classes} classes")
            # checked once per chunk and process, when it is first mapped (not per step): rows
            # pair by binary search, so each scan's indices must ascend (another writer may not
            # have sorted them) and lie within the scan (an index beyond it never matches a
            # point: KD silently lost on its row); the logits must be finite
            idx = np.asarray(index, dtype=np.int64)
            step = np.diff(idx)
            frames = [self.index[f] for f in chunk_frames_of(self.meta, k)]
            starts = [w.start for w in frames][1:]
            boundary = np.zeros(len(step), bool)
            boundary[[i - 1 for i in starts if 0 < i <= len(step)]] = True
            if ((step <= 0) & ~boundary).any():
                raise TeacherCacheError(f"{stem}.point_index.npy: a scan's point indices are not distinct and "
                                        "ascending (the format asks for them sorted)")
            for f, w in zip(chunk_frames_of(self.meta, k), frames):
                if w.end > w.start and (idx[w.start] < 0 or idx[w.end - 1] >= w.num_scan_points):
                    bad = idx[w.start] if idx[w.start] < 0 else idx[w.end - 1]
                    raise TeacherCacheError(f"{stem}.point_index.npy: frame {f} has point index {bad}, its scan has "
                                            f"{w.num_scan_points} points ({stem.name}.json): indices must be in "
                                            f"[0, {w.num_scan_points})")
            # a float32 sum of float16 rows cannot overflow, and a NaN or inf anywhere makes it
            # non-finite: one pass, no [R, C] mask unless there is something to report
            if total and not np.isfinite(logits.sum(dtype=np.float32)):
                bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
                f = next(f for f, w in zip(chunk_frames_of(self.meta, k), frames) if w.start <= bad[0] < w.end)
                raise TeacherCacheError(f"{stem}.logits.npy: non-finite logits (NaN/inf) in {len(bad)} of {total} "
                                        f"rows (first: row {bad[0]}, frame {f}): a damaged chunk or a diverged "
                                        "teacher; export the cache again")
            self._arrays[k] = (index, logits)
        return self._arrays[k]

    def check_chunks(self) -> None:
        """Map and check every chunk now (what a read does lazily, chunk by chunk)."""
        for k in range(num_chunks(self.meta)):
            self._chunk(k)

    def rows(self, frame_id: str, num_scan_points: int):
        """(point_index [R] int64, logits [R, C] float16) of ``frame_id``, whose .bin must
        hold ``num_scan_points`` points."""
        where = self.index.get(frame_id)
        if where is None:
            raise TeacherCacheError(f"{self.root / 'meta.json'}: no rows for frame {frame_id}")
        if where.num_scan_points != num_scan_points:  # (0: a bad frame the export skipped)
            self._other_scan(frame_id, num_scan_points)
        index, logits = self._chunk(where.chunk)
        return (np.asarray(index[where.start:where.end], dtype=np.int64),
                np.asarray(logits[where.start:where.end]))

    def _other_scan(self, frame_id: str, points: int, scan: Optional[Path] = None) -> None:
        where = self.index[frame_id]
        raise TeacherCacheError(f"{chunk_stem(self.root, where.chunk)}.json: frame {frame_id} was cached with "
                                f"{where.num_scan_points} points, its scan{f' {scan}' if scan else ''} now has "
                                f"{points}: the cache belongs to another dataset; export it again")

    def check_run(self, frames: Sequence[str], num_classes: int, class_names: Sequence[str],
                  fingerprint: Optional[Dict[str, Any]] = None) -> None:
        """Refuse a cache that cannot serve this run: frames it lacks, another label set, or
        (when the run knows its teacher) another teacher or other teacher inputs."""
        path = self.root / "meta.json"
        frames = list(frames)
        scans = {}
        if frames and not isinstance(frames[0], str):  # Frame objects: their scans' sizes are checked too
            scans = {f.frame_id: f.scan for f in frames}
            frames = [f.frame_id for f in frames]
        missing = [f for f in frames if f not in self.index]
        if missing:
            raise TeacherCacheError(f"{path}: {len(missing)} training frame(s) are not in the cache "
                                    f"(first: {missing[0]}); export it for this training set")
        for f, scan in scans.items():  # a .bin holds 16 bytes a point: a stat per scan, at the start
            cached = self.index[f].num_scan_points
            try:
                now = Path(scan).stat().st_size // 16
            except OSError:
                continue  # a missing scan is the dataset's error, when (and if) it is read
            if cached and now != cached:
                self._other_scan(f, now, scan)
        if self.num_classes != num_classes or list(self.meta["class_names"]) != list(class_names):
            raise TeacherCacheError(f"{path}: {self.num_classes} classes {self.meta['class_names'][:3]}..., the "
                                    f"student has {num_classes} {list(class_names)[:3]}...")
        if fingerprint is not None:
            saved = self.meta["fingerprint"]
            diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            if diff:
                detail = "; ".join(_first_difference(saved.get(k), fingerprint.get(k), k) for k in diff)
                raise TeacherCacheError(f"{path}: the cache was exported from another teacher or other inputs "
                                        f"({detail}): export it again (tools/export_teacher.py) or point "
                                        "distiller.teacher_cache elsewhere")


def _map(path: str, kind) -> np.ndarray:
    """A chunk array, memory-mapped; numpy's complaints about a damaged file name it."""
    try:
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # mmap length > file size, object arrays, bad header
        raise TeacherCacheError(f"{path}: not a readable .npy array ({e}): a damaged or truncated chunk; "
                                "export the cache again") from e
    if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, kind):
        raise TeacherCacheError(f"{path}: holds {getattr(a, 'dtype', type(a).__name__)}, expected "
                                f"{'float16 logits' if kind is np.floating else 'integer point indices'}")
    return a


def _first_difference(saved: Any, now: Any, key: str, names=("cached", "now")) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in sorted(set(saved) | set(now)):
            if saved.get(k) != now.get(k):
                return _first_difference(saved.get(k), now.get(k), f"{key}.{k}", names)
    return f"{key}: {names[0]} {_short(saved)}, {names[1]} {_short(now)}"


class TeacherCacheDataset(torch.utils.data.Dataset):
    """A training dataset whose samples also carry the cached teacher's rows:
    ``kd_point_idx [K]`` (the sample's rows that have cached logits) and
    ``teacher_logits [K, C]`` float16 in that order. Everything else is the dataset's."""

    def __init__(self, dataset, cache: TeacherCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # frames, ignore_index, set_epoch, label_counts, ...
        if name in ("dataset", "cache"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def without_pixels(self) -> "TeacherCacheDataset":
        return TeacherCacheDataset(self.dataset.without_pixels(), self.cache)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = self.dataset[index]
        cached_idx, logits = self.cache.rows(sample["frame_id"], int(sample["num_scan_points"]))
        point_index = sample["point_index"].numpy()
        pos = np.searchsorted(cached_idx, point_index).clip(max=max(len(cached_idx) - 1, 0))
        hit = (cached_idx[pos] == point_index) if len(cached_idx) else np.zeros(len(point_index), bool)
        sample["kd_point_idx"] = torch.from_numpy(np.flatnonzero(hit))
        sample["teacher_logits"] = torch.from_numpy(np.ascontiguousarray(logits[pos[hit]]))
        return sample
