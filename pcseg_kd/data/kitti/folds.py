"""Out-of-fold teacher targets: the training scans split into K folds, each a contiguous
block of frames within every sequence (``block``), or whole sequences (``sequence``).

Neighbouring LiDAR frames overlap almost entirely (the car moves ~1 m between scans), so a
random split would put a near-copy of each scan into the training set of the teacher meant
not to have seen it. Contiguous blocks leak only at the blocks' edges, but the blocks of one
sequence still show the same street (buildings, poles, parked cars) from nearby positions;
whole-sequence folds leave each fold teacher no view of its fold's streets at all.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Sequence

import torch


FOLD_UNITS = ("block", "sequence")


def contiguous_folds(frames: Sequence[Any], k: int, by: str = "block") -> List[int]:
    """The fold (0..k-1) of each frame. ``block``: within each sequence, in frame order, the
    j-th of n frames goes to fold ``j * k // n``; ``sequence``: the i-th sequence (sorted) goes
    to fold ``i % k``. ``frames``: objects with ``sequence`` and ``frame`` (the dataset's
    :class:`Frame` s) in any order."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"teacher.folds must be a whole number >= 2 (0: off), got {k!r}")
    if by not in FOLD_UNITS:
        raise ValueError(f"teacher.fold_by must be one of {list(FOLD_UNITS)}, got {by!r}")
    by_seq: Dict[str, List[int]] = {}
    for i, f in enumerate(frames):
        by_seq.setdefault(f.sequence, []).append(i)
    if by == "sequence" and len(by_seq) < k:
        raise ValueError(f"teacher.fold_by=sequence: {k} folds of {len(by_seq)} training sequence(s) "
                         f"({', '.join(sorted(by_seq))}) leave folds empty: use fewer folds, more sequences, "
                         "or fold_by=block")
    fold = [0] * len(frames)
    for s_index, (seq, idx) in enumerate(sorted(by_seq.items())):
        idx = sorted(idx, key=lambda i: frames[i].frame)
        for j, i in enumerate(idx):
            fold[i] = s_index % k if by == "sequence" else j * k // len(idx)
    empty = sorted(set(range(k)) - set(fold))
    if empty:
        raise ValueError(f"teacher.folds: {k} folds of {len(frames)} training scans leave fold(s) {empty} empty: "
                         "use fewer folds or more scans")
    return fold


def fold_assignment(cfg: Dict[str, Any], frames: Sequence[Any]) -> List[int]:
    """Each training frame's fold under an experiment's ``teacher.folds`` / ``teacher.fold_by``."""
    return contiguous_folds(frames, cfg["teacher"]["folds"], cfg["teacher"].get("fold_by") or "block")


def folds_digest(folds: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, folds)).encode()).hexdigest()


class FrameSubset(torch.utils.data.Dataset):
    """The frames ``indices`` of a dataset (a fold teacher's training set): sample i is the
    dataset's sample ``indices[i]`` (its augmentation seeded by that index, as in the full set);
    every other attribute is the dataset's, but ``frames`` lists the subset's own."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str):  # ignore_index, set_epoch, class_names, ...
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def frames(self) -> List[Any]:
        return [self.dataset.frames[i] for i in self.indices]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.dataset[self.indices[index]]
