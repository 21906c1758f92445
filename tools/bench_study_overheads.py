#!/usr/bin/env python
"""What a study cell would spend besides training, measured in one run on one thread:
loading and validating the study's configs (what a submitted job skips by getting its cell
pickled) and one pass over the training scans with and without decoding the images (what
``SemanticKITTIDataset.without_pixels`` spares a LiDAR student with no teacher in its step).

    python tools/bench_study_overheads.py                                  # the shift study
    python tools/bench_study_overheads.py configs/kitti/table6_quickstart.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", default="configs/kitti/shift_study.yaml")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from pcseg_kd.engine.kitti.study import cells, load_study
    from pcseg_kd.registry import DATASETS

    all_cells = cells(load_study(args.study, []), Path("work_dirs/never_written"))
    print(f"load and validate the study ({len(all_cells)} cells): {time.perf_counter() - t0:.1f} s")
    student = next(c for c in all_cells if c["kind"] == "student")
    ds = DATASETS.build(student["cfg"]["data"]["train"])
    seconds = {}
    for name, d in (("decoding the images", ds), ("without_pixels", ds.without_pixels())):
        t0 = time.perf_counter()
        for i in range(len(d)):
            d[i]
        seconds[name] = time.perf_counter() - t0
        print(f"one pass over the {len(d)} training scans, {name}: {seconds[name]:.1f} s")
    saved = seconds["decoding the images"] - seconds["without_pixels"]
    epochs = student["cfg"]["student"]["optim"]["epochs"]
    print(f"ratio {seconds['decoding the images'] / seconds['without_pixels']:.1f}x; saved per student of "
          f"{epochs} epochs: {saved * epochs:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
