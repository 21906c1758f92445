#!/usr/bin/env python
"""Export a trained teacher's per-point logits over the training set (the teacher cache).

    python tools/export_teacher.py --work-dir work_dirs/kitti/quickstart         # the run's own config.yaml
    python tools/export_teacher.py configs/kitti/quickstart.yaml                 # -> WORK_DIR/teacher_cache
    python tools/export_teacher.py CONFIG --out /fast/disk/cache --chunk-frames 128
    torchrun --nproc_per_node=8 tools/export_teacher.py configs/kitti_fusion_pssm.yaml

Runs the teacher (WORK_DIR/teacher/final.pt, or teacher_checkpoint) once per training scan,
in eval mode on the unaugmented scan and the whole image, and writes float16 logits for
every in-view point, keyed by frame and raw point index (format:
pcseg_kd/data/kitti/teacher_cache.py, docs/training_kitti.md). A killed export resumes at
the first missing chunk. Train the student on it with distiller.teacher_source=cache (the
student stage also exports it itself when it is missing). With --work-dir alone the config is
WORK_DIR/config.yaml, the one tools/train.py saved, so no training override is repeated; a
CONFIG argument and dotted overrides win over it (the tool says which it read).
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.kitti.run_config import resolve_run_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (default: WORK_DIR/config.yaml, the run's own)")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. data.train.root=/data/semantic_kitti teacher.optim.batch_size=4 "
                        "data.num_workers=8 teacher_checkpoint=path/to/final.pt")
    p.add_argument("--work-dir", default=None,
                   help="the run's folder (default: work_dirs/<config's parent folder>/<config stem>); "
                        "alone, its config.yaml is the config")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    options(p)
    return p.parse_intermixed_args(argv)  # options may come before, between or after overrides


def options(p):
    p.add_argument("--out", default=None, help="cache folder (default: distiller.teacher_cache or WORK_DIR/teacher_cache)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="scans per chunk file, the unit a resume redoes (default: an unfinished cache's own, else 64)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="scans per teacher forward pass (default: teacher.optim.batch_size)")


def main(argv=None):
    args = parse_args(argv)
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.data import generate_synthetic_if_missing
    from pcseg_kd.engine.kitti.export import export_teacher
    from pcseg_kd.utils.lock import work_dir_lock

    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    try:
        cfg, work_dir, note = resolve_run_config(args.config, args.overrides, args.work_dir, "tools/export_teacher.py")
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    env = init_distributed(cfg["device"])
    if env.is_main:
        print(note)
    try:
        if cfg["threads"]:
            import torch
            torch.set_num_threads(cfg["threads"])
        generate_synthetic_if_missing([cfg["data"]["train"]["root"]], cfg["data"].get("synthetic"), env)
        with (work_dir_lock(work_dir) if env.is_main else contextlib.nullcontext()):
            out = export_teacher(cfg, work_dir, env, Path(args.out) if args.out else None, args.chunk_frames,
                                 args.batch_size, progress=not args.no_progress)
        if env.is_main:
            done = out["chunks"] - out["written"]
            print(f"teacher cache {out['cache']}: {out['frames']} scans in {out['chunks']} chunks "
                  f"({out['written']} written now{f', {done} already there' if done else ''}); "
                  f"{out['seconds']:.1f} s, {out['bytes'] / 1e6:.1f} MB written on rank 0")
        return out
    finally:
        cleanup(env)


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
