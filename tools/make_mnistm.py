#!/usr/bin/env python
"""Build an index-aligned MNIST-M from MNIST (raw IDX) and a folder of colour photos.

    python tools/make_mnistm.py --mnist-root data/mnist \\
        --photos data/BSR/BSDS500/data/images/train --out data/mnist_m/mnist_m_data.pkl [--seed 0]

Image i of each split is MNIST image i blended by MNIST-M's rule (binarise the digit,
RGB, |random 28x28 photo crop - digit|; pcseg_kd.data.mnistm). The output pickle holds
``train``, ``train_label``, ``test``, ``test_label`` (uint8 [N,28,28,3] / int64 [N]) and
``meta``. Reproducible: the same MNIST, photos (read in sorted path order) and seed give
byte-identical arrays; train and test use separate streams (seed, 0) and (seed, 1).
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.data.mnist import load_mnist  # noqa: E402
from pcseg_kd.data.mnistm import blend_mnistm, load_photos, save_mnistm_pickle  # noqa: E402


def build(mnist_root, photos_dir, seed: int = 0, threshold: int = 0, check_size: bool = True):
    photos, names = load_photos(photos_dir)
    splits = {}
    for k, split in enumerate(("train", "test")):
        images, labels = load_mnist(mnist_root, split, check_size)
        blended = blend_mnistm(images, photos, np.random.default_rng([seed, k]), threshold,
                               progress=True, desc=f"MNIST-M {split}")
        splits[split] = (blended, labels)
    meta = {"mnist_root": str(mnist_root), "photos": str(photos_dir), "num_photos": len(photos),
            "seed": seed, "threshold": threshold, "rule": "|crop - 255*(digit > threshold)|",
            "first_photos": ", ".join(names[:5])}
    return splits, meta


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist-root", required=True, help="folder with MNIST's raw IDX files (or torchvision's root)")
    p.add_argument("--photos", required=True, help="folder of colour photos, e.g. BSDS500 BSR/BSDS500/data/images/train")
    p.add_argument("--out", required=True, help="output pickle, e.g. data/mnist_m/mnist_m_data.pkl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=int, default=0, help="digit pixels > threshold are ink (default 0)")
    p.add_argument("--allow-subset", action="store_true", help="accept IDX files smaller than MNIST (tests)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    splits, meta = build(args.mnist_root, args.photos, args.seed, args.threshold, not args.allow_subset)
    out = Path(args.out)
    save_mnistm_pickle(out, splits, meta)
    sizes = ", ".join(f"{k} {len(v[0])}" for k, v in splits.items())
    print(f"wrote {out} ({sizes}; {meta['num_photos']} photos, seed {args.seed}) in {time.perf_counter() - t0:.1f}s")
    return out


if __name__ == "__main__":
    main()
