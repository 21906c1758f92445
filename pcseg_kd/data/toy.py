"""Base class of the paper's small cross-modal tasks (Gaussian, sklearn, MNIST/digits).

A task builds, for a list of seeds, the two modalities of one data set:

``x_a_*``  teacher input (modality A), ``x_b_*`` student input (modality B), ``y_*``
labels; each with a leading dim of S (one per seed, data that differ by seed) or 1
(data shared by every seed). Tensors are float32 / int64 on the CPU.

It also states how models are initialised, so that the seed-batched engine reproduces
the per-seed code exactly:

``init_mode = "stream"``  ``torch.manual_seed(seed + init_offset)`` once, then the
    teacher, the KD student and the no-KD baseline are created in that order (the
    authors' Gaussian code).
``init_mode = "shared"``  every role is created right after
    ``torch.manual_seed(seed + init_offset)``, so teacher, student and baseline start
    from the same weights when their shapes agree (the authors' sklearn code).
"""
from __future__ import annotations

from typing import Dict, List

from torch import Tensor

ROLES = ("teacher", "student", "baseline")


class ToyTask:
    num_classes: int = 2
    init_mode: str = "stream"
    init_offset: int = 0
    #: short description of the shift knob, for tables
    shift_name: str = "shift"

    def make_data(self, seeds: List[int]) -> Dict[str, Tensor]:
        raise NotImplementedError

    def augment(self, x: Tensor, modality: str, epoch: int, seeds: List[int], rows) -> Tensor:
        """Per-epoch input transform (e.g. teacher-input noise); identity by default."""
        return x
