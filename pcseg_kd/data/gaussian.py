"""The synthetic Gaussian task (paper Sec. 4.2, Tables 1 and 8), as the authors run it.

Per seed s, with numpy's legacy global RNG: seed(s); a = randn(500); xs = randn(n, 20)
decisive features; y = 1[xs · a[:20] > 0]; x_b = randn(n, d_b) with columns 0:10 =
xs[:, 0:10] (student); x_a = randn(n, d_a) with columns [10-ov, 20-ov) =
xs[:, 10-ov:20-ov] (teacher), so ``overlap`` decisive features sit in the same columns of
both. Test data: seed(s+1) and the same draws with the same ``a``.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from ..registry import TASKS
from .toy import ToyTask


def gaussian_modalities(seed: int, n: int, overlap: int, a: np.ndarray, dim_a: int = 25, dim_b: int = 25,
                        decisive_a: int = 10, decisive_b: int = 10):
    """One seed's draws (``np.random.seed`` must have been called by the caller)."""
    xs = np.random.randn(n, decisive_a + decisive_b)
    y = (xs @ a[: decisive_a + decisive_b] > 0).astype(np.int64)
    x_b = np.random.randn(n, dim_b)
    x_b[:, :decisive_b] = xs[:, :decisive_b]
    x_a = np.random.randn(n, dim_a)
    lo = decisive_b - overlap
    x_a[:, lo:lo + decisive_a] = xs[:, lo:lo + decisive_a]
    return x_a, x_b, y


@TASKS.register_module("gaussian")
class GaussianTask(ToyTask):
    num_classes = 2
    init_mode = "stream"
    init_offset = 1  # the authors reseed with s+1 before the test draws, then build the models
    shift_name = "overlap"

    def __init__(self, overlap: int = 10, n_train: int = 200, n_test: int = 1000, dim_a: int = 25,
                 dim_b: int = 25, decisive: int = 10, hyperplane_dim: int = 500):
        if not 0 <= overlap <= decisive:
            raise ValueError(f"task.overlap must be in [0, {decisive}], got {overlap}")
        if n_train < 1 or n_test < 1:
            raise ValueError(f"task.n_train and task.n_test must be >= 1, got {n_train} and {n_test}")
        if dim_a < 2 * decisive or dim_b < decisive:
            raise ValueError(f"task.dim_a must be >= {2 * decisive} and task.dim_b >= {decisive}")
        self.overlap, self.n_train, self.n_test = overlap, n_train, n_test
        self.dim_a, self.dim_b, self.decisive, self.hyperplane_dim = dim_a, dim_b, decisive, hyperplane_dim

    def make_data(self, seeds: List[int]) -> Dict[str, Tensor]:
        parts: Dict[str, list] = {k: [] for k in ("x_a_train", "x_b_train", "y_train", "x_a_test", "x_b_test", "y_test")}
        state = np.random.get_state()
        try:
            for s in seeds:
                np.random.seed(s)
                a = np.random.randn(self.hyperplane_dim)
                for split, n, seed in (("train", self.n_train, s), ("test", self.n_test, s + 1)):
                    if split == "test":
                        np.random.seed(seed)
                    x_a, x_b, y = gaussian_modalities(seed, n, self.overlap, a, self.dim_a, self.dim_b,
                                                      self.decisive, self.decisive)
                    parts[f"x_a_{split}"].append(x_a)
                    parts[f"x_b_{split}"].append(x_b)
                    parts[f"y_{split}"].append(y)
        finally:
            np.random.set_state(state)
        # float32 like the authors' torch.Tensor(x) conversion
        return {k: torch.from_numpy(np.stack(v)).to(torch.int64 if k.startswith("y") else torch.float32)
                for k, v in parts.items()}
