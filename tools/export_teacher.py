#!/usr/bin/env python
"""Export a trained teacher's per-point logits over the training set (the teacher cache).

    python tools/export_teacher.py configs/kitti/quickstart.yaml                 # -> WORK_DIR/teacher_cache
    python tools/export_teacher.py CONFIG --out /fast/disk/cache --chunk-frames 128
    torchrun --nproc_per_node=8 tools/export_teacher.py configs/kitti_fusion_pssm.yaml

Runs the teacher (WORK_DIR/teacher/final.pt, or teacher_checkpoint) once per training scan,
in eval mode on the unaugmented scan and the whole image, and writes float16 logits for
every in-view point, keyed by frame and raw point index (format:
pcseg_kd/data/kitti/teacher_cache.py, docs/training_kitti.md). A killed export resumes at
the first missing chunk. Train the student on it with distiller.teacher_source=cache (the
student stage also exports it itself when it is missing).
"""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, parse_args  # noqa: E402


def options(p):
    p.add_argument("--out", default=None, help="cache folder (default: distiller.teacher_cache or WORK_DIR/teacher_cache)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="scans per chunk file, the unit a resume redoes (default: an unfinished cache's own, else 64)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="scans per teacher forward pass (default: teacher.optim.batch_size)")


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=options)
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.data import generate_synthetic_if_missing
    from pcseg_kd.engine.kitti.export import export_teacher
    from pcseg_kd.utils.lock import work_dir_lock

    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    cfg = load_kitti_experiment(args.config, args.overrides)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    env = init_distributed(cfg["device"])
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
