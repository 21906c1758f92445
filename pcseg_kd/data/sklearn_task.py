"""The sklearn task (paper Sec. 4.3, Tables 2-4 and 9), as the authors run it.

``make_classification`` (10000 samples, 4 classes, 50 informative features), standard
scaling, a 60/40 split. Modalities (``split="blocks"``, the authors' code): the student
sees N(0,1) noise of 50 dims whose columns 0:20 are the real features 0:20; the teacher
sees noise whose columns [20-v, 40-v) are the real features of the same columns, so
v features are shared. ``split="random"`` (our reading of the paper's "random split"):
the same construction over a seeded random permutation of the 50 feature columns.
The data are fixed across runs; only the initialisation seed varies.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from ..registry import TASKS
from .toy import ToyTask


@TASKS.register_module("sklearn")
class SklearnTask(ToyTask):
    num_classes = 4
    init_mode = "shared"
    init_offset = 0
    shift_name = "shared features"

    def __init__(self, shared: int = 20, split: str = "blocks", n_samples: int = 10000, n_features: int = 50,
                 n_classes: int = 4, student_features: int = 20, test_size: float = 0.4,
                 random_state: int = 42, noise_seed: int = 42):
        if split not in ("blocks", "random"):
            raise ValueError(f"task.split must be 'blocks' or 'random', got {split!r}")
        if not 0 <= shared <= student_features or 2 * student_features > n_features:
            raise ValueError(f"task.shared must be in [0, {student_features}] and 2*student_features <= n_features")
        self.shared, self.split = shared, split
        self.n_samples, self.n_features, self.n_classes = n_samples, n_features, n_classes
        self.num_classes = n_classes
        self.student_features, self.test_size = student_features, test_size
        self.random_state, self.noise_seed = random_state, noise_seed

    def make_data(self, seeds: List[int]) -> Dict[str, Tensor]:
        from sklearn.datasets import make_classification
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        x, y = make_classification(n_samples=self.n_samples, n_classes=self.n_classes, n_features=self.n_features,
                                   n_informative=self.n_features, n_redundant=0, n_clusters_per_class=1,
                                   random_state=self.random_state)
        x = StandardScaler().fit_transform(x)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=self.test_size, random_state=self.random_state)
        cols = np.arange(self.n_features)
        if self.split == "random":
            cols = np.random.RandomState(self.random_state).permutation(self.n_features)
        f = self.student_features
        b_cols = cols[:f]
        a_cols = cols[f - self.shared: 2 * f - self.shared]
        rng = np.random.RandomState(self.noise_seed)
        out = {}
        for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            x_b = rng.randn(len(xs), self.n_features)
            x_a = rng.randn(len(xs), self.n_features)
            # real features keep their own column positions, so shared ones coincide
            x_b[:, b_cols] = xs[:, b_cols]
            x_a[:, a_cols] = xs[:, a_cols]
            out[f"x_a_{split}"] = torch.tensor(x_a[None], dtype=torch.float32)
            out[f"x_b_{split}"] = torch.tensor(x_b[None], dtype=torch.float32)
            out[f"y_{split}"] = torch.tensor(ys[None], dtype=torch.int64)
        return out
