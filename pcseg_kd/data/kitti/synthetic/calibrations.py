"""Camera calibrations for synthetic sequences, chosen by sequence number like the real ones.

``KITTI_00_02`` is the public KITTI odometry calibration of sequences 00-02 (image_2 is
1241x376), the same as the real fixture's calib.txt. ``KITTI_04_12`` follows the public
calibration of sequences 04-12 (1226x370). Sequences 00-02 and 13-21 get the first, the
others the second, so a synthetic 08 has the same image size as the real val sequence.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def _m(values) -> np.ndarray:
    return np.array(values, dtype=np.float64).reshape(3, 4)


KITTI_00_02: Dict[str, np.ndarray] = {
    "P0": _m([718.856, 0, 607.1928, 0, 0, 718.856, 185.2157, 0, 0, 0, 1, 0]),
    "P1": _m([718.856, 0, 607.1928, -386.1448, 0, 718.856, 185.2157, 0, 0, 0, 1, 0]),
    "P2": _m([718.856, 0, 607.1928, 45.38225, 0, 718.856, 185.2157, -0.1130887, 0, 0, 1, 0.003779761]),
    "P3": _m([718.856, 0, 607.1928, -337.2877, 0, 718.856, 185.2157, 2.369057, 0, 0, 1, 0.004915215]),
    "Tr": _m([4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02,
              -7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02,
              9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01]),
}
KITTI_04_12: Dict[str, np.ndarray] = {
    "P0": _m([707.0912, 0, 601.8873, 0, 0, 707.0912, 183.1104, 0, 0, 0, 1, 0]),
    "P1": _m([707.0912, 0, 601.8873, -379.8145, 0, 707.0912, 183.1104, 0, 0, 0, 1, 0]),
    "P2": _m([707.0912, 0, 601.8873, 46.88783, 0, 707.0912, 183.1104, 0.1178601, 0, 0, 1, 0.006203223]),
    "P3": _m([707.0912, 0, 601.8873, -334.6377, 0, 707.0912, 183.1104, 1.930130, 0, 0, 1, 0.003318498]),
    "Tr": _m([-1.857739385241e-03, -9.999659513510e-01, -8.039975204516e-03, -4.784029760483e-03,
              -6.481465826011e-03, 8.051860151134e-03, -9.999466081774e-01, -7.337429464231e-02,
              9.999773098287e-01, -1.805528627661e-03, -6.496203536139e-03, -3.339968064433e-01]),
}


def calibration_for(sequence: str) -> Tuple[Dict[str, np.ndarray], Tuple[int, int]]:
    """(calib dict, image (H, W)) for a sequence number."""
    if int(sequence) <= 2 or int(sequence) >= 13:
        return KITTI_00_02, (376, 1241)
    return KITTI_04_12, (370, 1226)
