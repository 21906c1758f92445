"""Per-point image features: bilinear sampling of a feature map at the points' pixels."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def sample_at_pixels(fmap: Tensor, batch_idx: Tensor, pixel_vu: Tensor,
                     image_hw: Union[Sequence[int], Tensor]) -> Tensor:
    """Features of ``fmap [B, C, h, w]`` at pixels ``pixel_vu [K, 2]`` (row v, column u, in
    the grid of the *input images*, of padded size ``image_hw = (H, W)``) of images
    ``batch_idx [K]``. Returns ``[K, C]``.

    The map may be coarser than the images (``h = H / stride``): pixel centres are mapped to
    the map's continuous coordinates ``x = (u + 0.5) · w / W − 0.5`` (``grid_sample``'s
    ``align_corners=False`` convention, border padding) and interpolated bilinearly; at full
    resolution this is the pixel's own value. All points of all images are gathered from the
    flattened map at once: no per-image loop, no host sync.
    """
    if fmap.dim() != 4:
        raise ValueError(f"sample_at_pixels: fmap must be [B, C, h, w], got {tuple(fmap.shape)}")
    if pixel_vu.dim() != 2 or pixel_vu.shape[1] != 2 or batch_idx.shape != pixel_vu.shape[:1]:
        raise ValueError(f"sample_at_pixels: pixel_vu must be [K, 2] and batch_idx [K], got "
                         f"{tuple(pixel_vu.shape)} and {tuple(batch_idx.shape)}")
    B, C, h, w = fmap.shape
    H, W = int(image_hw[0]), int(image_hw[1])
    coord_dtype = torch.float64 if fmap.dtype == torch.float64 else torch.float32
    vu = pixel_vu.to(coord_dtype)
    x = (vu[:, 1] + 0.5) * (w / W) - 0.5
    y = (vu[:, 0] + 0.5) * (h / H) - 0.5
    x0f, y0f = torch.floor(x), torch.floor(y)
    wx, wy = (x - x0f).unsqueeze(1), (y - y0f).unsqueeze(1)
    x0, y0 = x0f.long(), y0f.long()
    flat = fmap.permute(0, 2, 3, 1).reshape(B * h * w, C)
    base = batch_idx.long() * (h * w)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        # border padding: a neighbour outside the map takes the edge value
        return flat[base + yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)].to(coord_dtype)

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).to(fmap.dtype)
