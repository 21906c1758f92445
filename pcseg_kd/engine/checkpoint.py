"""Checkpoints that survive a kill: written to a temporary file and renamed into place.

A run killed while writing leaves the previous checkpoint intact (``os.replace`` is atomic
on POSIX and Windows); a run killed between checkpoints resumes from the last one, RNG
states included, so the resumed epochs draw the same augmentations and shuffles.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..utils.io import atomic_write


def save_checkpoint(path: os.PathLike | str, state: Dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: os.PathLike | str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """``mmap=True``: tensors are mapped, not read (for a checkpoint's metadata: a fingerprint,
    metrics), so looking into a large final.pt costs no more than its small entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated or not a torch file
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to "
                           "start the stage again") from e


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
