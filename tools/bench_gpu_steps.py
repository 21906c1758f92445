#!/usr/bin/env python
"""Training-step throughput and peak memory of the SemanticKITTI stages, fp32 and AMP: the
student's no-KD step, cached-KD step and online-teacher step, and the fusion teacher's step.

    python tools/bench_gpu_steps.py configs/kitti_fusion_pssm.yaml data.train.root=R data.synthetic=null \\
        data.train.sequences=[00] student.model.backend=auto teacher.model.point.backend=auto --out steps.json

Every run goes through the training loop itself (``train_stage``, timed as
``tools/bench_distill.py`` times it: wall time between consecutive optimiser steps, data
loading included; the first ``--warmup`` steps untimed) in a fresh work folder, with the
config's models at their random initialisation (the online teacher and the cache's teacher
alike: their cost does not depend on their weights). Class weights are left out (they do not
change a step's cost). A mode's figure is the median step time over its timed steps; scans/s
is the batch size over it; peak memory is ``torch.cuda.max_memory_allocated`` over the run
(model, optimiser and the cache's export included; CUDA only). The cached-KD run exports its
cache before its first step, outside the timed steps.
"""
from __future__ import annotations

import copy
import gc
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_distill import time_stage  # noqa: E402
from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.engine.runner import parse_args  # noqa: E402

# (name, stage, the config section whose optimiser and batch it uses, teacher_source)
MODES = {"no_kd": ("baseline", "student", None), "cached_kd": ("student", "student", "cache"),
         "online_teacher": ("student", "student", "online"), "fusion_teacher": ("teacher", "teacher", None)}


def options(p):
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton compiles and autotunes)")
    p.add_argument("--batch", type=int, default=4, help="scans per step, every stage")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp"], choices=["fp32", "amp"])
    p.add_argument("--device", default=None, help="default: the config's")
    p.add_argument("--out", default=None, help="JSON with every figure")


def has_pretrained(cfg) -> bool:
    if isinstance(cfg, dict):
        return "pretrained" in cfg or any(has_pretrained(v) for v in cfg.values())
    return False


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=options)
    if args.steps < 1 or args.warmup < 1 or args.batch < 1:
        raise SystemExit("error: --steps, --warmup and --batch must be >= 1")
    from pcseg_kd.engine.distributed import DistEnv, resolve_device
    from pcseg_kd.engine.kitti.data import generate_synthetic_if_missing
    from pcseg_kd.registry import DATASETS, MODELS
    from pcseg_kd.utils.io import write_json

    cfg = load_kitti_experiment(args.config, args.overrides)
    if has_pretrained(cfg["teacher"]["model"]):
        raise SystemExit("error: teacher.model sets pretrained: this bench runs random initialisations; drop it")
    env = DistEnv(device=resolve_device(args.device or cfg["device"]))
    cuda = env.device.type == "cuda"
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_gpu_steps_"))
    work.mkdir(parents=True, exist_ok=True)
    generate_synthetic_if_missing([cfg["data"]["train"]["root"]], cfg["data"].get("synthetic"), env)
    torch.manual_seed(0)
    teacher_pt = work / "teacher_init.pt"
    torch.save(MODELS.build(cfg["teacher"]["model"]).state_dict(), teacher_pt)
    cfg["teacher_checkpoint"] = str(teacher_pt)
    for section in ("student", "teacher"):
        cfg[section]["optim"].update(epochs=1, max_steps_per_epoch=args.warmup + args.steps, batch_size=args.batch)
    train_ds = DATASETS.build(cfg["data"]["train"])
    gpu = torch.cuda.get_device_name(env.device) if cuda else None
    print(f"{args.config}: {len(train_ds)} training scans, batch {args.batch}, device {env.device}"
          f"{f' ({gpu})' if gpu else ''}, student backend {cfg['student']['model'].get('backend', 'spconv')}, "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    if not cuda and "amp" in args.precisions:
        print("  note: not on CUDA, the 'amp' runs are fp32 (train_stage uses AMP on CUDA only)", flush=True)
    if len(train_ds) < args.batch * (args.warmup + args.steps):
        print(f"  note: {len(train_ds)} scans < {args.batch * (args.warmup + args.steps)}: the steps revisit scans "
              "(the epoch is cut at max_steps_per_epoch, so runs may stop early)", flush=True)

    results = {"config": args.config, "overrides": list(args.overrides), "device": str(env.device), "gpu": gpu,
               "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
               "scans": len(train_ds), "runs": {}}
    for name in args.modes:
        stage, section, source = MODES[name]
        for prec in args.precisions:
            c = copy.deepcopy(cfg)
            c[section]["optim"]["amp"] = prec == "amp"
            if source:
                c["distiller"]["teacher_source"] = source
            wd = work / f"{name}_{prec}"
            shutil.rmtree(wd, ignore_errors=True)  # a finished stage left by an earlier run would be skipped, not timed
            gc.collect()  # the previous run's model and optimiser must not count in this run's peak
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(env.device)
            wall, _ = time_stage(stage, c, env, wd, train_ds, None, args.warmup)
            if not wall:
                raise SystemExit(f"error: {name} {prec}: no timed step (fewer than --warmup + 1 steps ran)")
            step = statistics.median(wall)
            run = {"ms_per_step": step * 1e3, "scans_per_s": args.batch / step, "timed_steps": len(wall),
                   "ms_min": min(wall) * 1e3, "ms_max": max(wall) * 1e3,
                   "peak_mib": torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else None}
            results["runs"][f"{name}/{prec}"] = run
            peak = f"{run['peak_mib']:8.0f} MiB peak" if cuda else "  (peak memory: CUDA only)"
            print(f"  {name:<15} {prec:<5} {run['ms_per_step']:8.1f} ms/step  {run['scans_per_s']:7.2f} scans/s  "
                  f"{peak}   (min {run['ms_min']:.1f}, max {run['ms_max']:.1f} ms over {len(wall)} steps)", flush=True)
    if args.out:
        write_json(Path(args.out), results)
    return results


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))
