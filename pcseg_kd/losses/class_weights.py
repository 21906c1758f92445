"""Class weights for the segmentation cross entropy, from class frequencies.

2DPASS's rule (``network/*.py``: ``np.power(np.amax(f) / f, 1 / 3.0)`` on the per-class point
counts): w_c = (max_k f_k / f_c)^(1/3), so the most frequent class weighs 1 and rarer ones
more, but only as the cube root. Frequencies come from the label map's ``content`` section
(semantic-kitti-api's ratios of the training points per raw id, summed per train class:
:meth:`pcseg_kd.data.kitti.labels.LabelMap.train_frequencies`) or are counted once on the
training labels (``SemanticKITTIDataset.label_counts``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def inverse_frequency_weights(frequencies: Sequence[float] | Tensor, power: float = 1.0 / 3.0) -> Tensor:
    """``[C]`` float32 weights (max f / f_c)^power; a class that never occurs (f_c = 0) gets
    the largest finite weight (it is never a target, so the value only matters if it appears)."""
    f = torch.as_tensor(frequencies, dtype=torch.float64)
    if f.dim() != 1 or f.numel() == 0:
        raise ValueError(f"class frequencies must be a non-empty 1-D list, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all() or (f < 0).any() or not (f > 0).any():
        raise ValueError(f"class frequencies must be finite, >= 0 and not all 0, got {f.tolist()}")
    w = torch.where(f > 0, (f.max() / f.clamp_min(1e-300)) ** power, torch.zeros_like(f))
    w = torch.where(f > 0, w, w.max())
    return w.float()
