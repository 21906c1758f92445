"""Checkpoints that survive a kill, cannot run code and cannot be silently damaged.

* **Atomic**: written to a temporary file and renamed into place (``os.replace`` is atomic on
  POSIX and Windows), so a run killed while writing leaves the previous checkpoint intact;
  a run killed between checkpoints resumes from the last one, RNG states included, so the
  resumed epochs draw the same augmentations and shuffles.
* **Safe to load**: every file is read with ``torch.load(weights_only=True)``, which rebuilds
  only tensors and plain containers (dict, list, tuple, str, int, float, bool, None). A file
  holding anything else (a pickle that would import or call something: a crafted
  ``teacher_checkpoint`` could otherwise run a shell command) is refused with
  :class:`CheckpointError` naming the file. RNG states are therefore stored as tensors, ints
  and lists (:func:`rng_state`) and rebuilt by :func:`set_rng_state`.
* **Checksummed**: :func:`save_checkpoint` stores a sha256 of the whole content (every
  tensor's dtype, shape and bytes, and every other value) under :data:`CHECKSUM_KEY`;
  :func:`load_checkpoint` recomputes it and refuses a file whose content changed (a disk
  or copy error zeroing bytes in the middle of a tensor loads without any torch error).
  Files without a checksum (a bare ``state_dict`` saved with ``torch.save``) load unchecked.
* **Previous kept for last.pt**: saving over ``last.pt`` first hard-links (or copies) the
  old file to ``last.prev.pt``; if ``last.pt`` is found damaged, the error says that
  ``last.prev.pt`` can be used instead (and whether it verifies).
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..utils.io import atomic_write, remove_stale_temporaries

CHECKSUM_KEY = "_pcseg_kd_sha256"


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file cannot be used: unreadable, damaged (checksum mismatch), or holding
    objects ``weights_only`` loading refuses. The message names the file."""


def previous_path(path: os.PathLike | str) -> Path:
    """``.../last.pt`` -> ``.../last.prev.pt``: where :func:`save_checkpoint` keeps the previous one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: os.PathLike | str, state: Dict[str, Any],
                    keep_previous: Optional[bool] = None) -> Path:
    """Write ``state`` (a dict of tensors and plain values) atomically with its checksum.

    ``keep_previous`` (default: for files named ``last.pt``): an existing file is kept as
    :func:`previous_path` once the new one is complete, at no moment leaving ``path`` absent.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint {path}: state must be a dict, got {type(state).__name__}")
    payload = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = content_digest(payload)
    if keep_previous is None:
        keep_previous = path.name == "last.pt"
    before_replace = (lambda: _keep_previous(path)) if keep_previous else None

    def write(f) -> None:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch's zip writer turns a failed f.write (disk full) into
            if isinstance(e.__context__, OSError):  # "[enforce fail ...] unexpected pos": say what failed
                raise e.__context__ from None
            raise

    return atomic_write(path, write, binary=True, before_replace=before_replace)


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` the current ``path`` (atomically; ``path`` stays in place)."""
    if not path.is_file():
        return
    prev = previous_path(path)
    remove_stale_temporaries(prev)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(path, tmp)  # no copy: the old file's blocks simply get a second name
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: os.PathLike | str, map_location: Any = "cpu", mmap: bool = False,
                    verify: Optional[bool] = None) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and verify its checksum.

    ``mmap=True``: tensors are mapped, not read (for a checkpoint's metadata: a fingerprint,
    metrics), so looking into a large final.pt costs no more than its small entries; the
    checksum is then verified only when ``verify=True`` (it reads every tensor). Default:
    ``verify = not mmap``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if verify is None:
        verify = not mmap
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            numpy_globals = _numpy_array_globals(path)
            if not numpy_globals:
                raise
            # a checkpoint of an older pcseg_kd keeps numpy RNG states as arrays: allow exactly
            # what rebuilding a numpy array takes (no call of anything else), and nothing more
            with torch.serialization.safe_globals(numpy_globals):
                state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} is refused: it holds objects other than tensors and plain values "
                f"({_unsafe_globals(path, e)}), and loading them could run code; only load it with "
                f"torch.load(weights_only=False) if you trust its source") from None
        raise _unreadable(path, e) from e
    except Exception as e:  # truncated, zeroed headers, or not a torch file
        raise _unreadable(path, e) from e
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        stored = state.pop(CHECKSUM_KEY)
        if verify:
            actual = content_digest(state)
            if actual != stored:
                raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the checksum "
                                      f"it was written with (sha256 {str(stored)[:12]}..., now {actual[:12]}...)"
                                      + _fallback_hint(path))
    return state


_NUMPY_ARRAY_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                        "numpy.core.multiarray._reconstruct")


def _numpy_array_globals(path: Path) -> list:
    """The objects to allowlist when the only non-plain globals ``path`` refers to are those of
    numpy arrays (older checkpoints' RNG states); else ``[]``."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint
        return []
    if not names or not set(names) <= set(_NUMPY_ARRAY_GLOBALS):
        return []
    import importlib

    out = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return []
    # a dtype is rebuilt through its class (numpy.dtypes.UInt32DType ...): the numeric ones
    out += [type(np.dtype(t)) for t in ("bool", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")]
    return out


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                           + _fallback_hint(path))


def _fallback_hint(path: Path) -> str:
    prev = previous_path(path)
    if path.name != "last.pt" or not prev.is_file():
        return f"; delete it to start the stage again"
    try:
        load_checkpoint(prev, verify=True)
        ok = "it verifies"
    except (CheckpointError, OSError) as e:
        ok = f"but it is damaged too ({str(e)[:80]}...)"
    return (f"; the previous checkpoint {prev} can be used ({ok}): `mv {prev} {path}` resumes from it, "
            f"or delete {path} to start the stage again")


def _unsafe_globals(path: Path, e: BaseException) -> str:
    """The importable names the file's pickle refers to beyond tensors and plain containers,
    read with ``pickletools`` (which only parses, never imports or calls)."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
        unsafe = sorted({n for n in names if not n.startswith(("torch.", "collections.OrderedDict",
                                                                "builtins.set", "builtins.frozenset"))})
        if unsafe:
            return "refers to " + ", ".join(unsafe[:5]) + (" ..." if len(unsafe) > 5 else "")
    except Exception:  # unparsable: fall back to torch's own words
        pass
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:200]
    return "unsupported pickle content"


# -- checksum ------------------------------------------------------------------------------
def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: the same before ``torch.save`` and after
    ``torch.load(weights_only=True)`` (dict order, tensors' dtype/shape/bytes, exact floats)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        h.update(f"X{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"T%d" if isinstance(obj, tuple) else b"L%d") % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (set, frozenset)):
        subs = sorted(content_digest(v) for v in obj)
        h.update(b"S%d" % len(subs) + "".join(subs).encode())
    elif obj is None or isinstance(obj, bool):
        h.update(b"B" + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + (struct.pack("<d", obj) if not math.isnan(obj) else b"nan"))
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"U%d:" % len(b) + b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d:" % len(obj) + bytes(obj))
    else:  # torch.dtype, torch.device, torch.Size elements, ...
        h.update(b"R" + f"{type(obj).__name__}:{obj!r}".encode() + b";")


# -- RNG states (stored as tensors / ints / floats, which weights_only accepts) -------------
def rng_state() -> Dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` returned (also the tuple form older versions stored)."""
    if not state:
        return
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    nps = state["numpy"]
    if isinstance(nps, dict):
        nps = (nps["bit_generator"], np.asarray(nps["key"].numpy(), dtype=np.int64).astype(np.uint32),
               nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
