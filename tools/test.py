#!/usr/bin/env python
"""Score a trained SemanticKITTI model and write benchmark prediction files.

    python tools/test.py --work-dir work_dirs/kitti/quickstart                 # the run's own config, student final.pt
    python tools/test.py --work-dir work_dirs/kitti/quickstart --checkpoint best --tta 4   # best epoch, vote over 4 views
    python tools/test.py configs/kitti_fusion_pssm.yaml                        # WORK_DIR from the config's path
    python tools/test.py --work-dir work_dirs/kitti/submission --split test --sequences 11 --predictions sub/  # dry run
    python tools/test.py --work-dir work_dirs/kitti/submission --split test --predictions sub/ --overwrite
    python tools/test.py CONFIG --checkpoint path/to/final.pt --stage teacher

With --work-dir alone, the config is WORK_DIR/config.yaml, the one tools/train.py saved (no
training override to repeat); a CONFIG argument and dotted overrides win over it (said in one
line). --checkpoint: final (default: WORK_DIR/<stage>/final.pt), best (WORK_DIR/<stage>/best.pt,
the best validation epoch) or a path. Prints the per-class IoU table (n/a: a class absent from
labels and predictions) with mIoU over all classes and over the present ones, and writes
WORK_DIR/test_<stage>_<split>.json (no mIoU for the test split, which has no labels).
--predictions DIR writes DIR/sequences/SS/predictions/NNNNNN.label (raw label ids, uint32, the
benchmark's format), each atomically and never through a symlink; a DIR that already holds
.label files is refused unless --overwrite, which also removes those of frames not written now.
--split test under protocol: fov is refused (the ~84 % of each scan outside the camera's view
would be written as raw 0): use a protocol: full model (configs/kitti/submission.yaml), or
--allow-fov-test. --sequences 11 12 scores / predicts only those sequences (a dry run of 11-21).
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
from pcseg_kd.engine.runner import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (default: WORK_DIR/config.yaml, the run's own)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--work-dir", default=None,
                   help="the run's folder (default: work_dirs/<config's parent folder>/<config stem>); "
                        "alone, its config.yaml is the config")
    p.add_argument("--stage", default="student", choices=["student", "baseline", "teacher"])
    p.add_argument("--checkpoint", default="final",
                   help="final (WORK_DIR/<stage>/final.pt, default), best (WORK_DIR/<stage>/best.pt) or a path")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--sequences", nargs="+", default=None, metavar="SS",
                   help="only these sequences (e.g. --split test --sequences 11 12: a dry run of the submission)")
    p.add_argument("--predictions", default=None, help="write .label prediction files under this folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the .label files already in --predictions and remove those of other frames")
    p.add_argument("--allow-fov-test", action="store_true",
                   help="write test-split predictions of a protocol: fov model (out-of-view points as raw 0)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time augmentation: vote over N rotated/flipped views of each scan (1 = off)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)

    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.distributed import resolve_device
    from pcseg_kd.engine.kitti.predict import test_checkpoint
    from pcseg_kd.engine.kitti.run_config import resolve_run_config
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.kitti.tta import check_tta
    from pcseg_kd.metrics.report import iou_table

    try:
        check_tta(args.tta)  # before the config and the checkpoint are read: a typo fails at once
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        cfg, work_dir, note = resolve_run_config(args.config, args.overrides, args.work_dir, "tools/test.py")
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(note)
    checkpoint = checkpoint_path(args.checkpoint, work_dir, args.stage)
    try:
        result = test_checkpoint(cfg, checkpoint, args.split, Path(args.predictions) if args.predictions else None,
                                 args.batch_size, not args.no_progress, resolve_device(args.device), args.stage,
                                 tta=args.tta, sequences=args.sequences, overwrite=args.overwrite,
                                 allow_fov_test=args.allow_fov_test)
    except (KittiDataError, FileNotFoundError, ResumeMismatch, ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    views = f", TTA over {args.tta} views" if args.tta > 1 else ""
    subset = f", sequences {' '.join(result['sequences'])} only" if result.get("sequences") else ""
    metrics = result.get("metrics") or {}
    scores = ""
    if metrics:  # one greppable line, then the per-class table
        miou = {k: round(v["miou"], 2) for k, v in metrics.items()}
        present = {k: None if v["miou_present"] != v["miou_present"] else round(v["miou_present"], 2)
                   for k, v in metrics.items()}
        scores = f": mIoU {json.dumps(miou)}, over the classes present {json.dumps(present)}"
    print(f"{checkpoint} on {args.split} ({result['scans']} scans{subset}{views}){scores}")
    if metrics:
        print(iou_table(metrics))
    if "written" in result:
        stale = f"; removed {result['removed_stale']} stale ones" if result.get("removed_stale") else ""
        print(f"wrote {result['written']} prediction files under {result['predictions']}{stale}")
        if args.split == "test" and result.get("sequences"):
            print("note: a dry run on a subset: a submission needs every scan of 11-21 (leave out --sequences)")
    # a TTA score gets a file of its own: it sits beside the plain one instead of replacing it
    suffix = f"_tta{args.tta}" if args.tta > 1 else ""
    if args.checkpoint == "best":
        suffix = "_best" + suffix
    out = work_dir / f"test_{args.stage}_{args.split}{suffix}.json"
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


def checkpoint_path(choice: str, work_dir: Path, stage: str) -> Path:
    """``final`` / ``best``: the stage's checkpoint in the work folder; anything else is a path."""
    if choice in ("final", "best"):
        path = work_dir / stage / f"{choice}.pt"
        if not path.is_file():
            why = (" (best.pt is written by runs that validate; this run has none: use --checkpoint final)"
                   if choice == "best" and (work_dir / stage / "final.pt").is_file() else "")
            raise SystemExit(f"error: {path} does not exist{why}")
        return path
    return Path(choice)

if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
