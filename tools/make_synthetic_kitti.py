#!/usr/bin/env python
"""Write a synthetic SemanticKITTI dataset in the official layout.

    python tools/make_synthetic_kitti.py --out data/synthetic_kitti --sequences 00 08 --frames 50 --seed 0

A failure (an unwritable --out, a bad option value) is one ``error: ...`` line and exit
status 1; add --debug for the traceback.

The result loads through the same reader as the real dataset:
``SemanticKITTIDataset(root=OUT, sequences=["00"])``. ``--degradation`` (0..1) controls how
well the image reveals the classes (colour confusion + noise + blur), i.e. the size of the
distribution shift between an image teacher and a LiDAR student.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.data.kitti.synthetic import ImageQuality, LidarModel, SyntheticConfig, generate_dataset  # noqa: E402
from pcseg_kd.utils.cli import run_main  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset root (sequences/ is created inside)")
    ap.add_argument("--sequences", nargs="+", default=["00", "08"], help="sequence numbers, e.g. 00 08 11")
    ap.add_argument("--frames", type=int, default=10, help="frames per sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed", type=float, default=8.0, help="ego speed, m/s")
    ap.add_argument("--azimuth-steps", type=int, default=2048, help="LiDAR columns per revolution")
    ap.add_argument("--max-range", type=float, default=120.0, help="LiDAR range, m")
    ap.add_argument("--degradation", type=float, default=0.0,
                    help="0..1: how badly the image reveals the classes (sets the three below)")
    ap.add_argument("--colour-confusion", type=float, default=None, help="0..1 blend of class colours to one colour")
    ap.add_argument("--noise-std", type=float, default=None, help="pixel noise std, 0..255 units")
    ap.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur, pixels")
    ap.add_argument("--render-scale", type=float, default=0.5, help="camera rays per pixel side")
    ap.add_argument("--no-images", action="store_true", help="skip image_2 (LiDAR only)")
    ap.add_argument("--test-labels", action="store_true", help="write labels for test sequences 11-21 too")
    args = ap.parse_args(argv)
    if args.frames < 1:
        ap.error("--frames must be >= 1")

    cfg = SyntheticConfig(
        frames=args.frames, seed=args.seed, speed=args.speed,
        lidar=LidarModel(azimuth_steps=args.azimuth_steps, max_range=args.max_range),
        quality=ImageQuality(args.degradation, args.colour_confusion, args.noise_std, args.blur_sigma),
        render_scale=args.render_scale, write_images=not args.no_images, test_labels=args.test_labels)
    t0 = time.time()
    written = generate_dataset(args.out, args.sequences, cfg)
    n = sum(len(v) for v in written.values())
    dt = time.time() - t0
    print(f"wrote {n} frames of {len(written)} sequences to {Path(args.out) / 'sequences'} "
          f"in {dt:.1f} s ({dt / max(n, 1):.2f} s/frame)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
