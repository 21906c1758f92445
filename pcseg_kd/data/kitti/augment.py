"""Augmentations that keep the point <-> pixel correspondence right.

The scan is projected first, on the original coordinates. Then:

* the image is cropped, flipped and colour-jittered; the stored pixel index of every
  in-view point moves with the geometry (crop: shift; flip: ``u <- W - 1 - u``) and points
  that leave the crop drop out of the in-view set;
* the 3-D augmentations (rotation about z, flips, scaling, jitter) change only the
  coordinates the voxel network sees; the pixel indices were fixed by the projection.

This is 2DPASS's scheme. The photometric part is a per-pixel function of the colour with
parameters recorded in ``params``, so a test can replay it on the original image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class ImageAugResult:
    image: Optional[np.ndarray]  # (3, H', W') float32, normalised; None from ``correspondences``
    pixel_vu: np.ndarray         # (K', 2) int64 row, col in the augmented image
    keep: np.ndarray             # (K,) bool: which of the input in-view points are still in view
    params: Dict[str, float] = field(default_factory=dict)
    hw: Tuple[int, int] = (0, 0)  # the augmented image's (H', W')


class ImageAugmentor:
    """Resize by ``scale``, random crop of fixed ``crop_hw`` (padded with zeros when the
    image is smaller), horizontal flip, colour jitter (brightness, contrast, saturation) and
    normalisation.

    ``scale`` (default 1) resizes the whole image first, in training and evaluation alike
    (area interpolation; pixel ``(v, u)`` goes to ``floor((v + 0.5) * s)``): a cheaper image
    for a CPU teacher that still sees the whole view, as PMF does. ``crop_mode="bottom"``
    takes the crop from the bottom rows (random column), where the LiDAR points are;
    ``"random"`` picks the row too. ``train=False`` only resizes and normalises.
    """

    def __init__(self, crop_hw: Optional[Sequence[int]] = None, crop_mode: str = "random",
                 flip_prob: float = 0.5, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, train: bool = True, scale: float = 1.0):
        if crop_mode not in ("random", "bottom"):
            raise ValueError(f"crop_mode must be 'random' or 'bottom', got {crop_mode!r}")
        self.crop_hw = tuple(int(c) for c in crop_hw) if crop_hw else None
        self.crop_mode = crop_mode
        self.flip_prob = flip_prob
        self.jitter = (brightness, contrast, saturation)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.train = train
        if not (isinstance(scale, (int, float)) and 0 < scale <= 4):
            raise ValueError(f"image_scale must be a number in (0, 4], got {scale!r}")
        self.scale = float(scale)

    def resize(self, image: np.ndarray, pixel_vu: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The image and the in-view pixels at ``scale`` (identity at 1)."""
        if self.scale == 1.0:
            return image, pixel_vu
        import cv2

        (nh, nw), vu = self._resize_vu(image.shape[:2], pixel_vu)
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR)
        return image, vu

    def _resize_vu(self, hw: Tuple[int, int], pixel_vu: np.ndarray) -> Tuple[Tuple[int, int], np.ndarray]:
        if self.scale == 1.0:
            return (int(hw[0]), int(hw[1])), pixel_vu
        h, w = hw
        nh, nw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        vu = np.floor((pixel_vu + 0.5) * np.array([nh / h, nw / w])).astype(np.int64)
        return (nh, nw), np.minimum(vu, np.array([nh - 1, nw - 1]))

    # -- geometry --------------------------------------------------------------------------
    def geometry(self, hw: Tuple[int, int], pixel_vu: np.ndarray, rng: np.random.Generator
                 ) -> Tuple[Tuple[int, int], np.ndarray, np.ndarray, Dict[str, float]]:
        """Draw the resize, crop and flip for an image of size ``hw`` and move the in-view
        pixels with them: (augmented (H', W'), pixels, keep, params). Needs no pixels."""
        (h, w), vu = self._resize_vu(hw, pixel_vu)
        params: Dict[str, float] = {"crop_top": 0, "crop_left": 0, "flip": 0}
        vu = vu.astype(np.int64, copy=True)
        keep = np.ones(len(vu), dtype=bool)
        out_hw = (h, w)
        if self.train and self.crop_hw is not None:
            ch, cw = self.crop_hw
            top = int(rng.integers(0, max(h - ch, 0) + 1)) if self.crop_mode == "random" else max(h - ch, 0)
            left = int(rng.integers(0, max(w - cw, 0) + 1))
            piece_h, piece_w = min(ch, h - top), min(cw, w - left)  # zero padding beyond
            vu -= (top, left)
            keep = (vu[:, 0] >= 0) & (vu[:, 0] < piece_h) & (vu[:, 1] >= 0) & (vu[:, 1] < piece_w)
            vu = vu[keep]
            params.update(crop_top=top, crop_left=left)
            out_hw = (ch, cw)
        if self.train and rng.random() < self.flip_prob:
            vu[:, 1] = out_hw[1] - 1 - vu[:, 1]
            params["flip"] = 1
        return out_hw, vu, keep, params

    def geometric(self, image: np.ndarray, pixel_vu: np.ndarray, rng: np.random.Generator
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, float]]:
        out_hw, vu, keep, params = self.geometry(image.shape[:2], pixel_vu, rng)
        image, _ = self.resize(image, pixel_vu[:0])
        if self.train and self.crop_hw is not None:
            top, left = params["crop_top"], params["crop_left"]
            out = np.zeros((*out_hw, 3), dtype=image.dtype)
            piece = image[top:top + out_hw[0], left:left + out_hw[1]]
            out[:piece.shape[0], :piece.shape[1]] = piece
            image = out
        if params["flip"]:
            image = image[:, ::-1]
        return np.ascontiguousarray(image), vu, keep, params

    # -- colour ----------------------------------------------------------------------------
    def draw_photometric(self, image01: np.ndarray, rng: np.random.Generator) -> Dict[str, float]:
        params = self.draw_jitter(rng)
        if not self.train:
            return params
        # contrast pivots on the mean grey level after brightness, fixed here so that the
        # transform stays a per-pixel function of colour (replayable on another image)
        params["contrast_mean"] = float((image01 @ _GRAY).mean() * params["brightness"])
        return params

    def draw_jitter(self, rng: np.random.Generator) -> Dict[str, float]:
        """The colour jitter's random factors (none in evaluation)."""
        params = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "contrast_mean": 0.0}
        if self.train:
            b, c, s = self.jitter
            params["brightness"] = float(rng.uniform(max(0.0, 1 - b), 1 + b)) if b else 1.0
            params["contrast"] = float(rng.uniform(max(0.0, 1 - c), 1 + c)) if c else 1.0
            params["saturation"] = float(rng.uniform(max(0.0, 1 - s), 1 + s)) if s else 1.0
        return params

    @staticmethod
    def photometric(image01: np.ndarray, params: Dict[str, float]) -> np.ndarray:
        """Apply recorded jitter to an (H, W, 3) float image in [0, 1]; per-pixel."""
        img = image01 * np.float32(params["brightness"])
        img = (img - params["contrast_mean"]) * np.float32(params["contrast"]) + params["contrast_mean"]
        grey = (img @ _GRAY)[..., None]
        img = (img - grey) * np.float32(params["saturation"]) + grey
        return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)

    def normalize(self, image01: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(((image01 - self.mean) / self.std).transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, image: np.ndarray, pixel_vu: np.ndarray, rng: np.random.Generator) -> ImageAugResult:
        """``image``: (H, W, 3) uint8 RGB; ``pixel_vu``: (K, 2) int64 of the in-view points."""
        image, vu, keep, params = self.geometric(image, pixel_vu, rng)
        img01 = image.astype(np.float32) * np.float32(1.0 / 255.0)
        photo = self.draw_photometric(img01, rng)
        if photo["brightness"] != 1 or photo["contrast"] != 1 or photo["saturation"] != 1:
            img01 = self.photometric(img01, photo)
        params.update(photo)
        return ImageAugResult(image=self.normalize(img01), pixel_vu=vu, keep=keep, params=params,
                              hw=(image.shape[0], image.shape[1]))

    def correspondences(self, hw: Tuple[int, int], pixel_vu: np.ndarray, rng: np.random.Generator) -> ImageAugResult:
        """What ``__call__`` gives an image of size ``hw`` but its pixels (``image`` None), with
        the same random draws: for a consumer that reads no pixels (a LiDAR student), whose
        point augmentation, drawn next from ``rng``, stays that of a run that decoded the image."""
        out_hw, vu, keep, params = self.geometry(hw, pixel_vu, rng)
        params.update(self.draw_jitter(rng))
        return ImageAugResult(image=None, pixel_vu=vu, keep=keep, params=params, hw=out_hw)


class PointAugmentor:
    """Random rotation about z (``rotate_z`` = max angle in radians, pi for full turns),
    flips of x and/or y, isotropic scaling in ``scale_range`` and clipped Gaussian jitter.
    Changes the (N, 3) coordinates only; the caller keeps remission and pixel indices."""

    def __init__(self, rotate_z: float = np.pi, flip_x_prob: float = 0.5, flip_y_prob: float = 0.5,
                 scale_range: Sequence[float] = (0.95, 1.05), jitter_std: float = 0.0,
                 jitter_clip: float = 0.05):
        self.rotate_z = float(rotate_z)
        self.flip_probs = (flip_x_prob, flip_y_prob)
        self.scale_range = tuple(scale_range)
        self.jitter_std = jitter_std
        self.jitter_clip = jitter_clip

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A random 3x3 linear map (rotation, flips, scale)."""
        a = rng.uniform(-self.rotate_z, self.rotate_z) if self.rotate_z else 0.0
        c, s = np.cos(a), np.sin(a)
        m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        flips = np.array([-1.0 if rng.random() < p else 1.0 for p in self.flip_probs] + [1.0])
        scale = rng.uniform(*self.scale_range) if self.scale_range[0] != self.scale_range[1] else self.scale_range[0]
        return (m * flips) * scale  # flip the input axes, then rotate, then scale

    def __call__(self, xyz: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        m = self.draw(rng)
        out = xyz.astype(np.float32) @ m.T.astype(np.float32)
        if self.jitter_std:
            out += np.clip(rng.normal(0.0, self.jitter_std, out.shape), -self.jitter_clip,
                           self.jitter_clip).astype(np.float32)
        return out, m
