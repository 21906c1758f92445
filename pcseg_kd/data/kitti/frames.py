"""Listing the frames of a SemanticKITTI root, by sequence."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import KittiDataError

DEFAULT_SPLITS: Dict[str, List[str]] = {
    "train": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"],
    "val": ["08"],
    "test": [f"{i:02d}" for i in range(11, 22)],
}
SPLIT_ALIASES = {"valid": "val", "validation": "val"}


@dataclass(frozen=True)
class Frame:
    """Paths of one frame. ``label``/``image`` are where the files should be; they may be missing."""

    sequence: str
    frame: str
    scan: Path
    label: Path
    image: Path
    calib: Path

    @property
    def frame_id(self) -> str:
        return f"{self.sequence}/{self.frame}"


def normalise_sequence(seq) -> str:
    s = str(seq).strip()
    if not s.isdigit():
        raise ValueError(f"sequence names are numbers like '08', got {seq!r}")
    return f"{int(s):02d}"


def split_sequences(split: str, overrides: Optional[Dict[str, Sequence]] = None) -> List[str]:
    """Sequences of ``split`` (train | val | test | trainval), defaults overridden by ``overrides``."""
    splits = {k: [normalise_sequence(s) for s in v] for k, v in DEFAULT_SPLITS.items()}
    for k, v in (overrides or {}).items():
        splits[SPLIT_ALIASES.get(k, k)] = [normalise_sequence(s) for s in v]
    if split == "trainval":
        return splits["train"] + splits["val"]
    key = SPLIT_ALIASES.get(split, split)
    if key not in splits:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(sorted(splits))}, trainval")
    return splits[key]


def list_frames(root: Path, sequences: Sequence[str]) -> List[Frame]:
    """All frames of ``sequences`` under ``root/sequences``, in (sequence, frame) order."""
    frames: List[Frame] = []
    for seq in sequences:
        seq = normalise_sequence(seq)
        seq_dir = Path(root) / "sequences" / seq
        velo = seq_dir / "velodyne"
        if not velo.is_dir():
            raise KittiDataError(velo, f"sequence {seq}: velodyne folder not found "
                                       f"(expected {root}/sequences/{seq}/velodyne/NNNNNN.bin)")
        names = sorted(p.stem for p in velo.glob("*.bin"))
        if not names:
            raise KittiDataError(velo, f"sequence {seq}: no .bin scans")
        frames += [Frame(seq, n, velo / f"{n}.bin", seq_dir / "labels" / f"{n}.label",
                         seq_dir / "image_2" / f"{n}.png", seq_dir / "calib.txt") for n in names]
    return frames
