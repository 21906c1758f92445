"""Raw SemanticKITTI label ids -> train ids, through ``data/semantic-kitti.yaml``.

Train ids are 0..18 for the 19 evaluated classes (car ... traffic-sign), i.e. the official
learning id minus one; learning id 0 ("unlabeled", outliers, other-structure,
other-object) becomes ``ignore_index``. Predicting over 19 classes means a prediction can
never be "unlabeled", which is what the official evaluation assumes.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import yaml

from .errors import KittiDataError, PathLike

def _default_label_map_file() -> Path:
    """The repo's ``data/semantic-kitti.yaml`` (editable installs, checkouts), else the copy
    that ``setup.py`` installs under ``<prefix>/share/pcseg_kd/`` (wheel installs)."""
    in_repo = Path(__file__).resolve().parents[3] / "data" / "semantic-kitti.yaml"
    installed = Path(sys.prefix) / "share" / "pcseg_kd" / "semantic-kitti.yaml"
    return in_repo if in_repo.is_file() or not installed.is_file() else installed


DEFAULT_LABEL_MAP_FILE = _default_label_map_file()
NUM_CLASSES = 19
DEFAULT_IGNORE_INDEX = 255
UNKNOWN = -1  # marker in the lookup table for raw ids absent from the yaml


class LabelMap:
    """Vectorised raw-id <-> train-id maps built from a semantic-kitti.yaml file."""

    def __init__(self, path: Optional[PathLike] = None, ignore_index: int = DEFAULT_IGNORE_INDEX):
        self.path = Path(path) if path is not None else DEFAULT_LABEL_MAP_FILE
        cfg = _load_yaml(str(self.path))
        for key in ("labels", "color_map", "learning_map", "learning_map_inv", "learning_ignore"):
            if key not in cfg:
                raise KittiDataError(self.path, f"missing section {key!r}")
        if 0 <= ignore_index < NUM_CLASSES:
            raise ValueError(f"ignore_index {ignore_index} collides with a train id (0..{NUM_CLASSES - 1})")
        self.ignore_index = int(ignore_index)
        self.raw_names: Dict[int, str] = {int(k): str(v) for k, v in cfg["labels"].items()}
        self.learning_map: Dict[int, int] = {int(k): int(v) for k, v in cfg["learning_map"].items()}
        self.learning_map_inv: Dict[int, int] = {int(k): int(v) for k, v in cfg["learning_map_inv"].items()}
        ignored = {int(k) for k, v in cfg["learning_ignore"].items() if v}
        learning_ids = sorted(self.learning_map_inv)
        kept = [i for i in learning_ids if i not in ignored]
        if len(kept) != NUM_CLASSES:
            raise KittiDataError(self.path, f"{len(kept)} non-ignored learning ids, expected {NUM_CLASSES}")
        # learning id -> train id: the kept ids in order, the ignored ones to ignore_index
        learn_to_train = {lid: (kept.index(lid) if lid in kept else self.ignore_index) for lid in learning_ids}
        self.class_names: List[str] = [self.raw_names[self.learning_map_inv[lid]] for lid in kept]
        self.num_classes = NUM_CLASSES

        max_raw = max(self.learning_map)
        self._raw_to_train = np.full(max_raw + 1, UNKNOWN, dtype=np.int64)
        for raw, lid in self.learning_map.items():
            if lid not in learn_to_train:
                raise KittiDataError(self.path, f"learning_map sends raw id {raw} to {lid}, "
                                                f"which learning_map_inv does not define")
            self._raw_to_train[raw] = learn_to_train[lid]
        self._train_to_raw = np.array([self.learning_map_inv[lid] for lid in kept], dtype=np.uint32)
        # RGB colours per train id (the yaml stores BGR), for visualisation
        self.train_colors_rgb = np.array([cfg["color_map"][self.learning_map_inv[lid]][::-1] for lid in kept],
                                         dtype=np.uint8)
        self.raw_colors_bgr: Dict[int, Tuple[int, int, int]] = {int(k): tuple(v) for k, v in cfg["color_map"].items()}
        self.content: Optional[Dict[int, float]] = ({int(k): float(v) for k, v in cfg["content"].items()}
                                                    if cfg.get("content") else None)

    def train_frequencies(self) -> np.ndarray:
        """``[19]`` share of the training points per train id, from the ``content`` section
        (raw ids summed through ``learning_map``; ignored ids dropped), for class weights."""
        if not self.content:
            raise KittiDataError(self.path, "no 'content' section (class frequencies): use "
                                            "class_weights: frequency to count them on the training labels")
        freq = np.zeros(self.num_classes, dtype=np.float64)
        for raw, share in self.content.items():
            train = self._raw_to_train[raw] if 0 <= raw < len(self._raw_to_train) else UNKNOWN
            if 0 <= train < self.num_classes:
                freq[train] += share
        return freq

    @property
    def known_raw_ids(self) -> np.ndarray:
        return np.flatnonzero(self._raw_to_train != UNKNOWN)

    def to_train(self, raw_semantic: np.ndarray, source: PathLike = "<array>",
                 unknown: str = "error") -> np.ndarray:
        """Map raw semantic ids (``label & 0xFFFF``) to int64 train ids.

        ``unknown="error"`` raises naming ``source`` and the offending ids;
        ``unknown="ignore"`` maps them to ``ignore_index``.
        """
        raw = np.asarray(raw_semantic).astype(np.int64, copy=False)
        in_table = (raw >= 0) & (raw < len(self._raw_to_train))
        train = np.full(raw.shape, UNKNOWN, dtype=np.int64)
        train[in_table] = self._raw_to_train[raw[in_table]]
        bad = train == UNKNOWN
        if bad.any():
            if unknown == "error":
                ids, counts = np.unique(raw[bad], return_counts=True)
                shown = ", ".join(f"{i} (x{c})" for i, c in zip(ids[:10], counts[:10]))
                raise KittiDataError(source, f"unknown raw label ids: {shown}"
                                             f"{' ...' if len(ids) > 10 else ''}; "
                                             f"not in {self.path.name}")
            if unknown != "ignore":
                raise ValueError(f"unknown must be 'error' or 'ignore', got {unknown!r}")
            train[bad] = self.ignore_index
        return train

    def to_raw(self, train_ids: np.ndarray) -> np.ndarray:
        """Train ids (0..18) -> raw uint32 ids, as written in submission ``.label`` files."""
        train_ids = np.asarray(train_ids)
        if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= self.num_classes):
            raise ValueError(f"train ids must be in 0..{self.num_classes - 1}")
        return self._train_to_raw[train_ids]


@lru_cache(maxsize=8)
def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise KittiDataError(p, "label map file not found")
    try:
        with open(p) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise KittiDataError(p, f"not valid YAML: {e}") from None


def split_label_words(words: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint32 label words -> (semantic = low 16 bits, instance = high 16 bits)."""
    words = np.asarray(words, dtype=np.uint32)
    return words & np.uint32(0xFFFF), words >> np.uint32(16)
