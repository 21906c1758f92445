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

    def input_cmd(self, data: Dict[str, Tensor], seeds: List[int], k: int = 5) -> Tensor:
        """The "input CMD" ``[S]``: CMD_k of the raw training inputs of the two modalities.
        Tasks whose modalities differ in width (MNIST 784 vs MNIST-M 3x784) override it."""
        from ..metrics.cmd import cmd
        return cmd(data["x_a_train"], data["x_b_train"], k=k).expand(len(seeds))
