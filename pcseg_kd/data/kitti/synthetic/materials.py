"""How each raw SemanticKITTI class looks to the LiDAR (remission) and to the camera (colour).

Colours are RGB in [0, 1]; ``palette`` lists alternatives drawn per object (cars come in
many colours; roads do not). ``texture`` is the amplitude of the world-space noise that
modulates the colour; ``roughness`` is the range noise (m) of LiDAR returns on the surface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

RGB = Tuple[float, float, float]


@dataclass(frozen=True)
class Material:
    palette: Sequence[RGB]
    remission: float
    remission_std: float = 0.05
    texture: float = 0.15
    texture_freq: float = 2.0
    roughness: float = 0.0


def _c(r: int, g: int, b: int) -> RGB:
    return (r / 255.0, g / 255.0, b / 255.0)


CAR_PAINT = [_c(200, 200, 205), _c(30, 30, 35), _c(150, 20, 25), _c(20, 50, 120), _c(120, 125, 130),
             _c(235, 235, 230), _c(60, 90, 60), _c(180, 150, 60)]
CLOTHES = [_c(40, 40, 60), _c(150, 30, 30), _c(30, 80, 150), _c(200, 190, 160), _c(60, 60, 60), _c(90, 120, 40)]

MATERIALS: Dict[int, Material] = {
    40: Material([_c(85, 85, 90)], 0.22, 0.04, 0.12, 3.0),                      # road
    60: Material([_c(225, 225, 215)], 0.65, 0.08, 0.05, 3.0),                   # lane-marking
    44: Material([_c(105, 100, 100)], 0.25, 0.04, 0.12, 3.0),                   # parking
    48: Material([_c(165, 155, 145)], 0.30, 0.05, 0.20, 1.0),                   # sidewalk
    72: Material([_c(115, 135, 60), _c(135, 120, 70)], 0.40, 0.08, 0.30, 1.5, 0.03),   # terrain
    50: Material([_c(200, 180, 150), _c(160, 70, 50), _c(150, 150, 150), _c(225, 220, 210)], 0.32, 0.06, 0.10, 0.5),
    51: Material([_c(140, 115, 80), _c(120, 120, 125)], 0.30, 0.06, 0.25, 4.0),  # fence
    70: Material([_c(40, 105, 35), _c(60, 120, 40), _c(30, 85, 45)], 0.45, 0.10, 0.45, 3.0, 0.12),  # vegetation
    71: Material([_c(85, 62, 40)], 0.35, 0.05, 0.25, 6.0, 0.01),                 # trunk
    80: Material([_c(125, 125, 130)], 0.38, 0.05, 0.05, 2.0),                    # pole
    81: Material([_c(200, 30, 30), _c(30, 70, 170), _c(235, 235, 235), _c(240, 190, 20)], 0.92, 0.04, 0.05, 2.0),
    10: Material(CAR_PAINT, 0.18, 0.06, 0.05, 1.0),                              # car
    18: Material([_c(220, 220, 220), _c(180, 40, 40), _c(40, 80, 140), _c(90, 90, 90)], 0.24, 0.06, 0.06, 1.0),
    30: Material(CLOTHES, 0.28, 0.06, 0.15, 5.0),                                # person
    31: Material(CLOTHES, 0.30, 0.06, 0.15, 5.0),                                # bicyclist
    11: Material([_c(30, 30, 30), _c(150, 30, 30), _c(40, 40, 120)], 0.30, 0.06, 0.10, 5.0),  # bicycle
    99: Material([_c(60, 70, 60), _c(100, 100, 100), _c(50, 50, 120)], 0.40, 0.08, 0.10, 2.0),  # other-object
    1: Material([_c(128, 128, 128)], 0.10, 0.05, 0.0, 1.0),                      # outlier (never rendered)
}
MOVING_TO_STATIC = {252: 10, 253: 31, 254: 30, 255: 32, 256: 16, 257: 13, 258: 18, 259: 20}
SKY_TOP = np.array(_c(110, 150, 205))
SKY_HORIZON = np.array(_c(200, 215, 230))


def material_of(raw_id: int) -> Material:
    return MATERIALS[MOVING_TO_STATIC.get(raw_id, raw_id)]


def class_colour_table(raw_ids: Sequence[int]) -> np.ndarray:
    """Mean palette colour per raw id (used for colour confusion)."""
    return np.array([np.mean(material_of(r).palette, axis=0) for r in raw_ids])
