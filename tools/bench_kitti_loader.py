#!/usr/bin/env python
"""Throughput of the SemanticKITTI loader: read + label map + projection + augmentation +
voxelization, per ~120k-point scan, and the share of a training step it would take.

    python tools/bench_kitti_loader.py                    # generates 8 synthetic frames first
    python tools/bench_kitti_loader.py --root /data/semantickitti --sequences 00

Stages are timed one by one in this process (one thread), then the whole ``__getitem__``
is timed through a DataLoader with ``--workers`` processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers must not oversubscribe the cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pcseg_kd.data.kitti import (SemanticKITTIDataset, collate_kitti, project_to_image, read_image,  # noqa: E402
                                 read_label, read_scan, voxelize)
from pcseg_kd.data.kitti.synthetic import SyntheticConfig, generate_dataset  # noqa: E402


def timed(fn, reps):
    out = fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t0) / reps, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="dataset root; default: generate synthetic frames in a temp dir")
    ap.add_argument("--sequences", nargs="+", default=["00"])
    ap.add_argument("--frames", type=int, default=8, help="synthetic frames to generate / frames to time")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--step-times", type=float, nargs="+", default=[12.0, 0.5, 0.15],
                    help="training step times (s per batch) to compare against; 12 s is REFERENCE.md's "
                         "CPU MinkUNet step, the others typical GPU steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        print(f"generating {args.frames} synthetic frames (~120k points each) ...", flush=True)
        generate_dataset(root, args.sequences, SyntheticConfig(frames=args.frames, seed=0), progress=False)

    ds = SemanticKITTIDataset(root, split="train", sequences=args.sequences, max_frames=args.frames,
                              voxel_size=[args.voxel_size] * 3)
    stage = {k: [] for k in ("read scan+label", "read image", "label map", "projection", "augmentation",
                             "voxelization", "whole __getitem__")}
    npts = []
    for i, f in enumerate(ds.frames):
        rng = np.random.default_rng(i)
        t, scan = timed(lambda: read_scan(f.scan), 3)
        t2, (sem, _) = timed(lambda: read_label(f.label, len(scan)), 3)
        stage["read scan+label"].append(t + t2)
        t, img = timed(lambda: read_image(f.image), 3)
        stage["read image"].append(t)
        t, _ = timed(lambda: ds.label_map.to_train(sem), 3)
        stage["label map"].append(t)
        m = ds.lidar_to_image(f)
        t, proj = timed(lambda: project_to_image(scan[:, :3], m, img.shape[:2]), 3)
        stage["projection"].append(t)
        vu = proj.pixel_indices()
        t, _ = timed(lambda: (ds.image_aug(img, vu, rng), ds.point_aug(scan[:, :3], rng)), 3)
        stage["augmentation"].append(t)
        pts = torch.from_numpy(scan)
        t, _ = timed(lambda: voxelize(pts, ds.voxel_size, ds.point_range), 3)
        stage["voxelization"].append(t)
        t, _ = timed(lambda: ds[i], 2)
        stage["whole __getitem__"].append(t)
        npts.append(len(scan))

    print(f"\n{len(ds)} scans, {np.mean(npts) / 1000:.1f}k points on average, voxel {args.voxel_size} m, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, 1 thread")
    for k, v in stage.items():
        print(f"  {k:<20s} {1000 * np.mean(v):7.1f} ms/scan")
    per_scan = float(np.mean(stage["whole __getitem__"]))
    print(f"  => {1 / per_scan:.1f} scans/s in one process")

    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate_kitti, persistent_workers=args.workers > 0)
    for _ in loader:  # warm up the workers
        pass
    t0 = time.perf_counter()
    reps = 2
    for _ in range(reps):
        for _ in loader:
            pass
    dt = (time.perf_counter() - t0) / (reps * len(ds))
    print(f"  => {1 / dt:.1f} scans/s through a DataLoader with {args.workers} workers, batch {args.batch_size}"
          f" (collate included)")
    per_batch = args.batch_size * per_scan
    print(f"\nshare of a training step (batch {args.batch_size}: {per_batch:.2f} s of loading in one process):")
    for st in args.step_times:
        print(f"  step {st:6.2f} s: {100 * per_batch / st:6.1f} % if loaded in the training process; "
              f"{100 * per_batch / (max(args.workers, 1) * st):6.1f} % of {max(args.workers, 1)} workers' time "
              f"(hidden behind the step when < 100 %)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
