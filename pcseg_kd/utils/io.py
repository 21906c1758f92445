"""Atomic file writes (a temporary file in the target's folder, fsync'd, renamed into place)
and strict JSON output (no bare ``NaN`` / ``Infinity``).

* A write killed half-way leaves the old file (or none) and a ``.NAME.PID.RANDOM.tmp`` beside
  it; the next write to the same path removes such leftovers of processes that are gone.
* The file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` minus the umask),
  not ``mkstemp``'s ``0o600``.
* An ``OSError`` with an errno (disk full, read-only folder, permission denied) is re-raised
  as the same ``OSError`` subclass naming the target file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Optional

STALE_FOREIGN_TMP_S = 600  # a temporary file without our pid tag is a leftover after this long


def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, in every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_ACTIVE: set = set()  # temporary files this process is writing right now


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave its file alone
    return True


def remove_stale_temporaries(path: os.PathLike | str) -> list:
    """Remove ``.NAME.*.tmp`` files beside ``path`` left by killed writes: those tagged with the
    pid of a process that no longer runs, and untagged ones older than 10 minutes."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix):-len(".tmp")]
        tag = middle.split(".", 1)[0]
        try:
            if tag.isdigit() and int(tag) == os.getpid():
                # ours but not being written: left by a killed process that had our pid (pids
                # repeat across container restarts) or by an earlier failed write
                stale = os.path.abspath(entry.path) not in _ACTIVE
            elif tag.isdigit():
                stale = not _pid_alive(int(tag))
            else:
                stale = now - entry.stat().st_mtime > STALE_FOREIGN_TMP_S
            if stale:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
    return removed


def atomic_write(path: os.PathLike | str, write: Callable[[IO], None], binary: bool = False,
                 before_replace: Optional[Callable[[], None]] = None) -> Path:
    """Call ``write(f)`` on a temporary file and rename it to ``path``: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one.
    ``before_replace()`` runs once the new file is complete, just before the rename (e.g. to
    keep the old file under another name)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        tmp = os.path.abspath(tmp)
        _ACTIVE.add(tmp)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        except (AttributeError, OSError):  # no fchmod (Windows) or a filesystem without modes
            pass
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        _ACTIVE.discard(tmp)
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno is not None and e.filename != str(path):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}", str(path)) from e
        raise
    _ACTIVE.discard(tmp)
    return path


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


# -- JSON --------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf; Python, numpy or 0-d tensor) replaced by
    ``None``, numpy/torch scalars and arrays turned into Python numbers and lists, tuples into lists."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    mod = type(obj).__module__
    if mod == "numpy" or mod.startswith("numpy."):
        import numpy as np
        if isinstance(obj, np.ndarray):
            return json_safe(obj.tolist())
        if isinstance(obj, np.generic):
            return json_safe(obj.item())
    if mod.startswith("torch"):
        import torch
        if isinstance(obj, torch.Tensor):
            return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "items"):  # Mapping types such as omegaconf's DictConfig
        return {k: json_safe(v) for k, v in obj.items()}
    return obj  # json.dumps raises TypeError naming the type


def dumps_json(obj: Any, indent: Optional[int] = 2, **kw: Any) -> str:
    """``json.dumps`` that writes ``null`` for non-finite floats (strict JSON: jq, JavaScript)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **kw)


def write_json(path: os.PathLike | str, obj: Any, indent: Optional[int] = 2, **kw: Any) -> Path:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``) atomically, with a final newline."""
    return atomic_write_text(path, dumps_json(obj, indent=indent, **kw) + "\n")


_RAISE = object()


def read_json(path: os.PathLike | str, default: Any = _RAISE) -> Any:
    """Read a JSON file. With ``default`` given, a missing file returns it and a damaged one
    (truncated by a kill, not JSON) warns naming the file and returns it (e.g. a cache entry
    to recompute); without, a damaged file raises ``ValueError`` naming the file."""
    import warnings

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if default is _RAISE:
            raise
        return default
    try:
        return json.loads(text)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        if default is _RAISE:
            raise ValueError(f"{path}: not valid JSON ({e}); delete it or write it again") from None
        warnings.warn(f"{path}: not valid JSON ({e}): ignoring it (it is recomputed)", stacklevel=2)
        return default
