#!/usr/bin/env python
"""Score a trained SemanticKITTI model and write benchmark prediction files.

    python tools/test.py configs/kitti_fusion_pssm.yaml                        # student final.pt, val mIoU
    python tools/test.py configs/kitti/quickstart.yaml --work-dir work_dirs/quickstart --predictions preds/   # as trained
    python tools/test.py configs/kitti_fusion_pssm.yaml --split test --predictions submission/
    python tools/test.py CONFIG --checkpoint path/to/final.pt --stage teacher
    python tools/test.py configs/kitti/quickstart.yaml --work-dir work_dirs/quickstart --tta 4   # vote over 4 views

Reads the checkpoint (default WORK_DIR/<stage>/final.pt, WORK_DIR as for tools/train.py),
prints and writes WORK_DIR/test_<stage>_<split>.json with the mIoU (full scans and in-view
points; none for the test split, which has no labels) and, with --predictions DIR, writes
DIR/sequences/SS/predictions/NNNNNN.label (raw label ids, uint32, the benchmark's format).
--tta N scores and predicts with test-time augmentation: the softmax averaged over N fixed
rotations / flips of each scan (pcseg_kd/engine/kitti/tta.py; N forward passes a scan); the
JSON then is WORK_DIR/test_<stage>_<split>_ttaN.json and says "tta": N.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--stage", default="student", choices=["student", "baseline", "teacher"])
    p.add_argument("--checkpoint", default=None, help="default: WORK_DIR/<stage>/final.pt")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--predictions", default=None, help="write .label prediction files under this folder")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time augmentation: vote over N rotated/flipped views of each scan (1 = off)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)

    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.distributed import resolve_device
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.kitti.predict import test_checkpoint
    from pcseg_kd.engine.kitti.tta import check_tta

    try:
        check_tta(args.tta)  # before the config and the checkpoint are read: a typo fails at once
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        cfg = load_kitti_experiment(args.config, args.overrides)
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    checkpoint = Path(args.checkpoint) if args.checkpoint else work_dir / args.stage / "final.pt"
    try:
        result = test_checkpoint(cfg, checkpoint, args.split, Path(args.predictions) if args.predictions else None,
                                 args.batch_size, not args.no_progress, resolve_device(args.device), args.stage,
                                 tta=args.tta)
    except (KittiDataError, FileNotFoundError, ResumeMismatch, ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    summary = {k: round(v["miou"], 2) for k, v in result.get("metrics", {}).items()}
    views = f", TTA over {args.tta} views" if args.tta > 1 else ""
    print(f"{checkpoint} on {args.split} ({result['scans']} scans{views}): mIoU {json.dumps(summary)}"
          + (f"; wrote {result['written']} prediction files under {result['predictions']}" if "written" in result else ""))
    # a TTA score gets a file of its own: it sits beside the plain one instead of replacing it
    suffix = f"_tta{args.tta}" if args.tta > 1 else ""
    out = work_dir / f"test_{args.stage}_{args.split}{suffix}.json"
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
