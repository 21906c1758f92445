"""The MNIST → MNIST-M task (paper Sec. 4.4, Tables 5 and 10) and its embedded stand-in.

``mnist``   teacher: real MNIST (784 inputs), student: MNIST-M (3·784), from files on disk
            (pcseg_kd.data.mnist / mnistm; nothing is downloaded).
``digits``  teacher: scikit-learn's 8×8 digits upsampled to 28×28 ("digits"), student: those
            blended with crops of scikit-learn's two sample photos ("digits-m"); no files.

Teacher-input noise, level L in 0..5 (``task.noise_level``), applied in the [0, 1] pixel
domain, clipped to [0, 1], before the normalisation (x - 0.5) / 0.5 of the authors'
transforms, with amplitude A(L):

``noise: gaussian``  clip(x + A(L)·N(0, 1))  (the paper's wording; the default)
``noise: uniform``   clip(x + A(L)·U[0, 1])  (the authors' code)

A(L) = L·``noise_scale`` (gaussian 0.2, uniform 1 by default; the authors' released dataset
code uses uniform with scale 3 on MNIST, see docs/mnist.md), or ``noise_amplitudes[L]``
when that per-level table is given (L must then be an integer index into it). The
``digits`` stand-in defaults to a Gaussian table calibrated so that its teacher follows
the paper's Table 5 teacher curve (:data:`DIGITS_GAUSSIAN_AMPLITUDES`).

Noise is a function of (run seed, noise_seed, epoch, modality, sample index, pixel) through
a counter-based hash, so it is fresh for every sample in every epoch, identical whatever
batch a sample lands in or which other seeds train beside it, and the same on CPU and
CUDA. Test inputs use epoch 0: one fixed noisy test set per seed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..registry import TASKS
from .digits import load_digits_split, make_digits_m
from .mnist import load_mnist
from .mnistm import images_to_rows, load_mnistm_folder, load_mnistm_pickle, pair_by_class
from .toy import ToyTask

NOISE_KINDS = ("gaussian", "uniform")
DEFAULT_NOISE_SCALE = {"uniform": 1.0, "gaussian": 0.2}
#: the paper's Table 5 teacher accuracy (%) on noisy MNIST, levels 0..5
PAPER_TEACHER_CURVE = (92.98, 81.10, 70.42, 62.58, 46.37, 38.85)
#: Gaussian σ per level for ``digits``, calibrated against PAPER_TEACHER_CURVE (docs/mnist.md)
DIGITS_GAUSSIAN_AMPLITUDES = (0.0, 0.55, 0.8, 0.9, 1.2, 1.4)
STREAMS = {"a": 0x5EED_A, "b": 0x5EED_B}
_MASK = 0xFFFFFFFF


# ----------------------------------------------------------------------------- counter-based noise
def pcg_hash(v: Tensor) -> Tensor:
    """PCG-RXS-M-XS 32-bit hash of int64 values in [0, 2^32) (products stay below 2^62)."""
    state = (v * 747796405 + 2891336453) & _MASK
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK
    return ((word >> 22) ^ word) & _MASK


def noise_keys(seeds: Tensor, epoch: int, stream: int, rows: Tensor) -> Tensor:
    """Per-(seed, row) 32-bit keys ``[S, B]``: hash chain over seed, stream, epoch, row."""
    k = pcg_hash((seeds.unsqueeze(1) & _MASK) ^ stream)
    k = pcg_hash((k + epoch) & _MASK)
    return pcg_hash((k + (rows & _MASK)) & _MASK)


def uniform_noise(keys: Tensor, num: int, offset: int = 0) -> Tensor:
    """float32 ``[S, B, num]`` in (0, 1) from keys ``[S, B]``: counter ``offset + j`` per value
    (24 random bits, so every value is exact in float32)."""
    counters = torch.arange(offset, offset + num, device=keys.device, dtype=torch.int64)
    h = pcg_hash((keys.unsqueeze(-1) + pcg_hash(counters)) & _MASK)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gaussian_noise(keys: Tensor, num: int) -> Tensor:
    """Standard normal ``[S, B, num]`` by Box-Muller from two uniform streams."""
    u1, u2 = uniform_noise(keys, num, 0), uniform_noise(keys, num, num)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def add_pixel_noise(x01: Tensor, kind: str, amplitude: float, seeds: Tensor, epoch: int, stream: int,
                    rows: Tensor, chunk: int = 2048) -> Tensor:
    """clip(x01 + amplitude · noise, 0, 1) for ``x01`` ``[S, B, D]``; rows processed in chunks to
    bound the hash's int64 temporaries."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    out = torch.empty_like(x01)
    for start in range(0, x01.shape[1], chunk):
        sl = slice(start, start + chunk)
        keys = noise_keys(seeds, epoch, stream, rows[:, sl])
        n = uniform_noise(keys, x01.shape[-1]) if kind == "uniform" else gaussian_noise(keys, x01.shape[-1])
        out[:, sl] = (x01[:, sl] + amplitude * n.to(x01.dtype)).clamp_(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- tasks
class DigitPairTask(ToyTask):
    """Common part of ``mnist`` and ``digits``: modality A grey digits (784), modality B the
    MNIST-M-style colour images (2352, channel-first), noise on A (and optionally B)."""

    num_classes = 10
    init_mode = "stream"
    init_offset = 0
    shift_name = "noise level"
    name_a, name_b = "MNIST", "MNIST-M"

    def __init__(self, noise_level: float = 0.0, noise: str = "gaussian", noise_scale: Optional[float] = None,
                 student_noise_level: float = 0.0, normalize: bool = True, noise_seed: int = 0,
                 n_train: Optional[int] = None, n_test: Optional[int] = None,
                 noise_amplitudes: Optional[List[float]] = None):
        if noise not in NOISE_KINDS:
            raise ValueError(f"task.noise must be one of {NOISE_KINDS}, got {noise!r}")
        if noise_level < 0 or student_noise_level < 0:
            raise ValueError(f"task.noise_level and task.student_noise_level must be >= 0, got "
                             f"{noise_level}, {student_noise_level}")
        if noise_amplitudes is not None:
            noise_amplitudes = [float(a) for a in noise_amplitudes]
            if any(a < 0 for a in noise_amplitudes):
                raise ValueError(f"task.noise_amplitudes must be >= 0, got {noise_amplitudes}")
            for name, lv in (("noise_level", noise_level), ("student_noise_level", student_noise_level)):
                if lv != int(lv) or int(lv) >= len(noise_amplitudes):
                    raise ValueError(f"task.{name} = {lv} with task.noise_amplitudes = {noise_amplitudes}: "
                                     f"the level must be an integer index 0..{len(noise_amplitudes) - 1}")
        self.noise_level, self.noise, self.student_noise_level = noise_level, noise, student_noise_level
        self.noise_scale = DEFAULT_NOISE_SCALE[noise] if noise_scale is None else noise_scale
        self.noise_amplitudes = noise_amplitudes
        self.normalize, self.noise_seed = normalize, noise_seed
        self.n_train, self.n_test = n_train, n_test

    # subclasses: uint8 images and labels per split
    def load_splits(self) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``split -> (grey [N,28,28], colour [N,28,28,3], labels [N])``, row i of both paired."""
        raise NotImplementedError

    def _to_input(self, rows01: np.ndarray) -> Tensor:
        x = torch.from_numpy(rows01)
        return ((x - 0.5) / 0.5 if self.normalize else x).unsqueeze(0)

    def make_data(self, seeds: List[int]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        limits = {"train": self.n_train, "test": self.n_test}
        for split, (grey, colour, labels) in self.load_splits().items():
            n = limits[split] if limits[split] is not None else len(labels)
            out[f"x_a_{split}"] = self._to_input(images_to_rows(grey[:n]))
            out[f"x_b_{split}"] = self._to_input(images_to_rows(colour[:n]))
            out[f"y_{split}"] = torch.from_numpy(labels[:n].astype(np.int64)).unsqueeze(0)
        return out

    def amplitude(self, level: float) -> float:
        """Noise amplitude A(level): ``noise_amplitudes[level]`` or ``level · noise_scale``."""
        if self.noise_amplitudes is not None:
            return self.noise_amplitudes[int(level)]
        return level * self.noise_scale

    def augment(self, x: Tensor, modality: str, epoch: int, seeds: List[int], rows) -> Tensor:
        level = self.noise_level if modality == "a" else self.student_noise_level
        amplitude = self.amplitude(level)
        if not amplitude:
            return x
        s = torch.as_tensor(list(seeds), dtype=torch.int64, device=x.device) + self.noise_seed
        if rows is None:  # test time: the whole split, every seed
            rows = torch.arange(x.shape[1], device=x.device).expand(len(seeds), -1)
        x = x.expand(len(seeds), -1, -1) if x.shape[0] == 1 else x
        x01 = x * 0.5 + 0.5 if self.normalize else x
        noisy = add_pixel_noise(x01, self.noise, amplitude, s, epoch, STREAMS[modality],
                                rows.to(x.device).long())
        return (noisy - 0.5) / 0.5 if self.normalize else noisy

    def input_cmd(self, data: Dict[str, Tensor], seeds: List[int], k: int = 5, max_rows: int = 10000) -> Tensor:
        """CMD_k ``[S]`` between the teacher's training inputs (with the noise it sees at test
        time) and the student's, in [0, 1] pixels; the widths differ (784 vs 3·784), so the
        student's colour image is compared through its channel mean. At most ``max_rows``
        rows (the first ones) keep the cost bounded on full MNIST."""
        from ..metrics.cmd import cmd

        x_a = data["x_a_train"][:, :max_rows]
        x_b = data["x_b_train"][:, :max_rows]
        x_a = self.augment(x_a, "a", 0, seeds, None)
        x_b = self.augment(x_b, "b", 0, seeds, None)
        to01 = (lambda v: v * 0.5 + 0.5) if self.normalize else (lambda v: v)
        grey_b = to01(x_b).reshape(*x_b.shape[:-1], 3, -1).mean(-2)
        return cmd(to01(x_a), grey_b, k=k).expand(len(seeds))


@TASKS.register_module("digits")
class DigitsTask(DigitPairTask):
    """The embedded default: digits (teacher) / digits-m (student); see pcseg_kd.data.digits.
    Gaussian noise with the calibrated per-level table :data:`DIGITS_GAUSSIAN_AMPLITUDES`
    unless ``noise``, ``noise_scale`` or ``noise_amplitudes`` say otherwise."""

    name_a, name_b = "digits", "digits-m"

    def __init__(self, test_size: float = 0.3, split_seed: int = 0, blend_seed: int = 0, threshold: int = 127,
                 **common):
        calibrated = (common.get("noise", "gaussian") == "gaussian" and common.get("noise_scale") is None
                      and common.get("noise_amplitudes") is None)
        if calibrated:
            common["noise_amplitudes"] = list(DIGITS_GAUSSIAN_AMPLITUDES)
        super().__init__(**common)
        self.test_size, self.split_seed, self.blend_seed, self.threshold = test_size, split_seed, blend_seed, threshold

    def load_splits(self):
        grey = load_digits_split(self.test_size, self.split_seed)
        colour = make_digits_m(grey, self.blend_seed, self.threshold)
        return {split: (grey[split][0], colour[split], grey[split][1]) for split in ("train", "test")}


@TASKS.register_module("mnist")
class MnistTask(DigitPairTask):
    """Real MNIST (teacher) / MNIST-M (student) from disk.

    ``root``: MNIST's raw IDX folder (or torchvision's data root); ``mnistm``: an index-aligned
    pickle (tools/make_mnistm.py) or the folder holding ``mnist_m_train/`` and the labels
    files; ``mnistm_format``: "auto" (pickle if ``mnistm`` is a file), "pickle" or "folders".
    The PNG release is not index-aligned with MNIST: each MNIST-M sample is paired with an
    MNIST image of the same class (``pairing_seed``).
    """

    def __init__(self, root: str = "data/mnist", mnistm: str = "data/mnist_m/mnist_m_data.pkl",
                 mnistm_format: str = "auto", pairing_seed: int = 0, check_size: bool = True, **common):
        super().__init__(**common)
        self.check_size = check_size  # False accepts IDX files with fewer than 60000/10000 images
        if mnistm_format not in ("auto", "pickle", "folders"):
            raise ValueError(f"task.mnistm_format must be 'auto', 'pickle' or 'folders', got {mnistm_format!r}")
        self.root, self.mnistm, self.mnistm_format, self.pairing_seed = root, mnistm, mnistm_format, pairing_seed

    def load_splits(self):
        from pathlib import Path

        fmt = self.mnistm_format
        if fmt == "auto":
            fmt = "folders" if Path(self.mnistm).is_dir() else "pickle"
        mnist = {split: load_mnist(self.root, split, self.check_size) for split in ("train", "test")}
        out = {}
        if fmt == "pickle":
            mm = load_mnistm_pickle(self.mnistm)
            for split, (grey, labels) in mnist.items():
                colour, mm_labels = mm[split]
                if len(colour) != len(grey):
                    raise ValueError(f"{self.mnistm}: MNIST-M {split} has {len(colour)} images, MNIST {split} has "
                                     f"{len(grey)}: not index-aligned (use mnistm_format: folders for the PNG release)")
                if mm_labels is not None and not np.array_equal(mm_labels, labels):
                    raise ValueError(f"{self.mnistm}: MNIST-M {split} labels differ from MNIST's at "
                                     f"{int((mm_labels != labels).sum())} rows: not index-aligned with {self.root}")
                out[split] = (grey, colour, labels)
        else:
            for k, (split, (grey, labels)) in enumerate(mnist.items()):
                colour, mm_labels = load_mnistm_folder(self.mnistm, split)
                pair = pair_by_class(labels, mm_labels, np.random.default_rng([self.pairing_seed, k]))
                out[split] = (grey[pair], colour, mm_labels)
        return out
