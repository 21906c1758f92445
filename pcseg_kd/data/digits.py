"""The embedded stand-in for MNIST / MNIST-M: ``digits`` and ``digits-m``.

It needs no download and runs on a fresh machine, but it is *not* MNIST: scikit-learn's
bundled handwritten digits (UCI "optdigits": 1,797 images of 8×8 pixels with 17 grey
levels, 10 classes) are upsampled to 20×20 (bilinear) and centred in 28×28 like MNIST's
digits ("digits"); "digits-m" blends them, by MNIST-M's rule, with random crops of the
two colour photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``, 427×640)
instead of BSDS500. Numbers obtained on it are labelled digits/digits-m everywhere.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np

from .mnistm import blend_mnistm

SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


def upsample_digits(images8: np.ndarray, inner: int = 20, size: int = 28) -> np.ndarray:
    """``[N, 8, 8]`` grey levels 0..16 -> uint8 ``[N, size, size]``: bilinear resize to
    ``inner``×``inner`` (half-pixel centres, no antialias), zero padding around it."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images8, dtype=np.float64) / 16.0).unsqueeze(1)
    up = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)[:, 0].numpy()
    pad = (size - inner) // 2
    out = np.zeros((len(up), size, size), dtype=np.uint8)
    out[:, pad:pad + inner, pad:pad + inner] = np.clip(np.rint(up * 255.0), 0, 255).astype(np.uint8)
    return out


@lru_cache(maxsize=1)
def _sample_photos() -> Tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_image

    return tuple(np.ascontiguousarray(load_sample_image(name), dtype=np.uint8) for name in SAMPLE_PHOTOS)


def sample_photos() -> List[np.ndarray]:
    """scikit-learn's two bundled RGB photos (needs Pillow, as scikit-learn does)."""
    return list(_sample_photos())


def load_digits_split(test_size: float = 0.3, split_seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8 [N,28,28], int64 [N]), "test": ...}``: a stratified split of the
    1,797 upsampled digits (with the defaults: 1,257 train, 540 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = upsample_digits(d.images)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=labels)
    tr, te = np.sort(tr), np.sort(te)
    return {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}


def make_digits_m(digits: Dict[str, Tuple[np.ndarray, np.ndarray]], seed: int = 0,
                  threshold: int = 127) -> Dict[str, np.ndarray]:
    """Index-aligned digits-m for each split (``split -> uint8 [N, 28, 28, 3]``), one seeded
    stream per split. ``threshold``: binarisation of the upsampled digit (its bilinear edges
    are grey, unlike MNIST's strokes, so half-intensity rather than MNIST's > 0)."""
    photos = sample_photos()
    return {split: blend_mnistm(images, photos, np.random.default_rng([seed, k]), threshold)
            for k, (split, (images, _)) in enumerate(sorted(digits.items()))}
