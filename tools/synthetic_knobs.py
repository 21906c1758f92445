#!/usr/bin/env python
"""What the synthetic generator's scene knobs do to the LiDAR scans (no files written).

    python tools/synthetic_knobs.py --density 0.5 1 2 4 --contrast 0 0.5 1 2

For each ``data.synthetic.scene.density``: per scan, the points and the visible objects
(instances with at least one return) of the rare classes, and the share of scans in which each
appears. For each ``data.synthetic.scene.ground_remission_contrast``: the mean reported
remission of road, parking, sidewalk and terrain, and how well remission alone tells those four
apart: the accuracy of the best classifier that sees only the remission (each of 64 remission
bins predicts its most frequent class, fitted on the same points, so an upper bound), beside
the majority class's share. The image sees the classes' colours whatever the contrast.
The defaults are the quickstart's LiDAR (512 columns) and scene length (32 frames), sequences
00, 01, 02 and 08 (00 and 08 have no parking lane at seed 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.data.kitti.synthetic import LidarModel, SceneConfig, SyntheticConfig, SyntheticSequence  # noqa: E402
from pcseg_kd.data.kitti.synthetic.materials import MOVING_TO_STATIC  # noqa: E402
from pcseg_kd.data.kitti.synthetic.scene import GROUND_CLASSES  # noqa: E402
from pcseg_kd.utils.cli import run_main  # noqa: E402

RARE = {10: "car", 18: "truck", 30: "person", 31: "bicyclist", 11: "bicycle", 80: "pole", 81: "traffic-sign"}
GROUND = {40: "road", 44: "parking", 48: "sidewalk", 72: "terrain"}


def scans(args, scene: SceneConfig):
    cfg = SyntheticConfig(frames=args.frames, seed=args.seed, lidar=LidarModel(azimuth_steps=args.azimuth_steps),
                          write_images=False, scene=scene)
    for seq in args.sequences:
        s = SyntheticSequence(seq, cfg)
        for i in range(0, args.frames, args.every):
            points, sem, inst = s.frame_lidar_only(i)
            static = np.array([MOVING_TO_STATIC.get(int(r), int(r)) for r in np.unique(sem)], dtype=sem.dtype)
            yield points[:, 3], static[np.searchsorted(np.unique(sem), sem)], inst  # moving and parked: one class


def density_table(args) -> None:
    print("| density | " + " | ".join(f"{n} pts / objs / scans with" for n in RARE.values()) + " |")
    print("|---" * (len(RARE) + 1) + "|")
    for d in args.density:
        pts = {c: [] for c in RARE}
        objs = {c: [] for c in RARE}
        for _, sem, inst in scans(args, SceneConfig(density=d)):
            for c in RARE:
                m = sem == c
                pts[c].append(int(m.sum()))
                objs[c].append(len(np.unique(inst[m])) if c not in (80, 81) else 0)  # poles, signs: no instance ids
        cells = []
        for c in RARE:
            with_ = 100 * np.mean(np.array(pts[c]) > 0)
            o = f"{np.mean(objs[c]):.1f}" if c not in (80, 81) else "–"
            cells.append(f"{np.mean(pts[c]):.0f} / {o} / {with_:.0f} %")
        print(f"| {d:g} | " + " | ".join(cells) + " |")


def contrast_table(args) -> None:
    print("| contrast | " + " | ".join(f"{n} remission" for n in GROUND.values())
          + " | remission-only accuracy (4 ground classes) |")
    print("|---" * (len(GROUND) + 2) + "|")
    for c in args.contrast:
        rem, lab = [], []
        for r, sem, _ in scans(args, SceneConfig(ground_remission_contrast=c)):
            m = np.isin(sem, GROUND_CLASSES)
            rem.append(r[m])
            lab.append(sem[m])
        rem, lab = np.concatenate(rem), np.concatenate(lab)
        present = [g for g in GROUND if (lab == g).any()]
        bins = np.minimum((rem * 64).astype(int), 63)
        counts = np.stack([np.bincount(bins[lab == g], minlength=64) for g in present])
        best = counts.max(0).sum() / len(lab)  # every bin says its most frequent class
        cells = [f"{rem[lab == g].mean():.3f} ± {rem[lab == g].std():.3f}" if g in present else "–" for g in GROUND]
        print(f"| {c:g} | " + " | ".join(cells) + f" | {100 * best:.1f} % |")
    print(f"\n(majority class alone: {100 * max((lab == g).mean() for g in GROUND):.1f} %)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    ap.add_argument("--contrast", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--sequences", nargs="+", default=["00", "01", "02", "08"])
    ap.add_argument("--frames", type=int, default=32, help="frames per sequence (the scene's length follows it)")
    ap.add_argument("--every", type=int, default=4, help="measure every N-th frame")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--azimuth-steps", type=int, default=512)
    args = ap.parse_args(argv)
    if args.frames < 1 or args.every < 1:
        raise ValueError("--frames and --every must be >= 1")
    if args.density:
        density_table(args)
        print()
    if args.contrast:
        contrast_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
