"""Time the SemanticKITTI models' forward and backward on real pipeline batches.

    python tools/bench_models.py                       # synthetic frames, default widths
    python tools/bench_models.py --root data/semantic_kitti --sequence 08 --batch 2
    python tools/bench_models.py --tiny --steps 5      # the test-sized widths

Without ``--root`` it generates two small synthetic frames (~30k points each, nothing is
downloaded) in a temporary folder. Prints, per model: parameters, the batch's points /
voxels / in-view points, forward and backward medians [min-max] over ``--steps`` timed
steps after one warm-up, and on CUDA the peak memory. Training mode (batch-norm batch
statistics), loss = sum of squared logits (the cost of the loss itself is not measured).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from pcseg_kd.data.kitti import SemanticKITTIDataset, collate_kitti  # noqa: E402
from pcseg_kd.data.kitti.testing import tiny_synthetic  # noqa: E402
from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV, require_spconv  # noqa: E402
from pcseg_kd.registry import MODELS  # noqa: E402

TINY_POINT = dict(base_channels=8, channels=(8, 16, 16, 16, 16, 16, 8, 8), layers=(1,) * 8, stem_kernel=3)
TINY_IMAGE = dict(widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), decoder_channels=16)


def model_cfg(name: str, tiny: bool) -> dict:
    if name == "spunet":
        return {"type": "spunet", **(TINY_POINT if tiny else {})}
    if name == "resnet_fcn":
        return {"type": "resnet_fcn", **(TINY_IMAGE if tiny else {})}
    if name == "fusion_teacher":
        return {"type": "fusion_teacher", **({"point": TINY_POINT, "image": TINY_IMAGE, "fusion_channels": 16}
                                             if tiny else {})}
    raise ValueError(f"unknown model {name!r}")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(model, batch, steps: int, device: torch.device):
    fw, bw = [], []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        out = model(batch)
        sync(device)
        t1 = time.perf_counter()
        out["logits"].float().square().mean().backward()
        sync(device)
        t2 = time.perf_counter()
        if i:  # the first step is a warm-up
            fw.append(t1 - t0)
            bw.append(t2 - t1)
    return fw, bw


def fmt(xs) -> str:
    return f"{statistics.median(xs) * 1e3:9.1f} [{min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f}]"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="SemanticKITTI root (default: generate synthetic frames)")
    ap.add_argument("--sequence", default="00")
    ap.add_argument("--batch", type=int, default=2, help="scans per batch")
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--crop", type=int, nargs=2, default=[320, 480], metavar=("H", "W"), help="image crop")
    ap.add_argument("--models", nargs="+", default=["spunet", "resnet_fcn", "fusion_teacher"])
    ap.add_argument("--tiny", action="store_true", help="test-sized widths instead of the defaults")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if any(m in ("spunet", "fusion_teacher") for m in args.models):
        require_spconv("tools/bench_models.py (spunet, fusion_teacher)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or str(tiny_synthetic(tmp, sequences=(args.sequence,), frames=args.batch, seed=0))
        ds = SemanticKITTIDataset(root, split="train", sequences=[args.sequence], max_frames=args.batch,
                                  voxel_size=[args.voxel_size] * 3, image_crop_hw=list(args.crop))
        batch = to_device(collate_kitti([ds[i] for i in range(min(args.batch, len(ds)))]), device)
    P, V, K = batch["points"].shape[0], batch["voxel_coords"].shape[0], batch["img_point_idx"].shape[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; torch {torch.__version__}; spconv {'yes' if HAVE_SPCONV else 'no'}; batch of "
          f"{batch['batch_size']} scans: {P} points, {V} voxels ({args.voxel_size} m), {K} in view, images "
          f"{tuple(batch['images'].shape[-2:])}; {'tiny' if args.tiny else 'default'} widths; "
          f"{args.steps} timed steps after 1 warm-up; ms median [min-max]")
    print(f"{'model':>15} | {'params (M)':>10} | {'forward':>18} | {'backward':>18} | peak memory")
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS.build(model_cfg(name, args.tiny)).to(device).train()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fw, bw = time_model(model, batch, args.steps, device)
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        print(f"{name:>15} | {params:10.2f} | {fmt(fw):>18} | {fmt(bw):>18} | {mem}")
        del model


if __name__ == "__main__":
    main()
