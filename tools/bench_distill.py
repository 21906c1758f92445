#!/usr/bin/env python
"""What distillation costs on top of training: student-stage step time with no KD, with the
online teacher and with the exported teacher cache, and the export itself.

    python tools/bench_distill.py configs/kitti/quickstart.yaml
    python tools/bench_distill.py configs/kitti_fusion_pssm.yaml data.train.root=data/synthetic_kitti_quickstart \\
        data.train.sequences=[00] data.num_workers=0 --steps 4      # full-size models on the synthetic scans

All three modes go through the training loop itself (``train_stage``): one epoch of
``--warmup + --steps`` steps per run, ``--repeats`` runs of each, interleaved (no KD, online,
cache, no KD, ...) so that a slow spell of the machine falls on every mode alike. A step's time
is the wall time between two consecutive optimiser steps (data loading included, as a user
sees it). Step i trains on the same batch in every run of every mode, and a busy machine only
ever adds time: each mode's figure is the median over steps of each step's fastest run (the
plain median of all its steps is printed beside it). The teacher is the config's
teacher model at its random initialisation (its cost does not depend on its weights). The
export is timed once over the whole training set, beside a teacher forward pass alone on the
same scans. Ends with ``cache/no-KD step ratio: R``.
"""
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.engine.runner import parse_args  # noqa: E402


def options(p):
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="runs of each mode, interleaved")
    p.add_argument("--device", default=None, help="default: the config's")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(stage, cfg, env, work_dir, train_ds, class_weights, warmup):
    from pcseg_kd.engine.kitti.train import train_stage

    stamps = []

    def on_step(_):
        sync(env.device)
        stamps.append((time.perf_counter(), time.process_time()))

    train_stage(stage, cfg, env, work_dir, train_ds, None, progress=False, class_weights=class_weights,
                on_step=on_step)
    skip = max(warmup - 1, 0)
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][skip:]
    return wall, cpu


def teacher_forward_per_scan(cfg, work_dir, env, batches: int = 3):
    """Median seconds per scan of the teacher's forward pass alone (with the read-back of its
    logits, as the export does it) on unaugmented scans loaded beforehand, in batches of the
    export's default size (``teacher.optim.batch_size``)."""
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.engine.kitti.data import to_device
    from pcseg_kd.engine.kitti.export import _teacher_rows, export_dataset_cfg
    from pcseg_kd.engine.kitti.train import load_teacher
    from pcseg_kd.registry import DATASETS

    teacher = load_teacher(cfg, work_dir, env.device)
    ds = DATASETS.build(export_dataset_cfg(cfg))
    size = cfg["teacher"]["optim"]["batch_size"]
    use_amp = env.device.type == "cuda" and cfg["student"]["optim"].get("amp", False)
    loaded = [collate_kitti([ds[j] for j in range(i, min(i + size, len(ds)))])
              for i in range(0, min(len(ds), (batches + 1) * size), size)]
    times = []
    with torch.no_grad():
        for batch in loaded:
            batch = to_device(batch, env.device)
            sync(env.device)
            t0 = time.perf_counter()
            _teacher_rows(teacher, batch, use_amp)
            sync(env.device)
            times.append((time.perf_counter() - t0) / batch["batch_size"])
    return statistics.median(times[1:] if len(times) > 2 else times)  # the first pass warms up


def median_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def breakdown(cfg, cache_dir, train_ds, env):
    """Where the cached step's extra time goes, and what a scan costs to read: ms of reading
    one scan (the dataset's whole load), of its cache lookup, and of the distiller's KD term
    forward + backward on one batch's cached rows (PSSM statistics on, as in training)."""
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.data.kitti.teacher_cache import TeacherCache, TeacherCacheDataset
    from pcseg_kd.engine.kitti.export import without_engine_keys
    from pcseg_kd.registry import DISTILLERS

    cached = TeacherCacheDataset(train_ds, TeacherCache(cache_dir))
    load = median_ms(lambda: train_ds[1])
    lookup = median_ms(lambda: cached[1]) - load
    size = cfg["student"]["optim"]["batch_size"]
    batch = collate_kitti([cached[i] for i in range(size)])
    d = DISTILLERS.build({**without_engine_keys(cfg["distiller"]), "ignore_index": train_ds.ignore_index})
    if hasattr(d, "track_omega"):
        d.track_omega()
    rows = batch["kd_point_idx"]
    logits = torch.randn(len(batch["points"]), batch["teacher_logits"].shape[1], requires_grad=True)

    def kd():
        d.kd_loss(logits[rows], batch["teacher_logits"].float(), batch["labels"][rows],
                  d.warmup_epochs + 1).backward()
    return load, lookup, median_ms(kd, 10), len(rows)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=options)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        raise SystemExit("error: --steps, --warmup and --repeats must be >= 1")
    from pcseg_kd.data.kitti.teacher_cache import read_meta
    from pcseg_kd.engine.distributed import DistEnv, resolve_device
    from pcseg_kd.engine.kitti.data import generate_synthetic_if_missing
    from pcseg_kd.engine.kitti.export import export_teacher
    from pcseg_kd.engine.kitti.train import resolve_class_weights, without_pretrained
    from pcseg_kd.registry import DATASETS, MODELS

    cfg = load_kitti_experiment(args.config, args.overrides)
    env = DistEnv(device=resolve_device(args.device or cfg["device"]))
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_distill_"))
    work.mkdir(parents=True, exist_ok=True)
    generate_synthetic_if_missing([cfg["data"]["train"]["root"]], cfg["data"].get("synthetic"), env)
    torch.manual_seed(0)
    teacher_pt = work / "teacher_init.pt"
    torch.save(MODELS.build(without_pretrained(cfg["teacher"]["model"])).state_dict(), teacher_pt)
    cfg["teacher_checkpoint"] = str(teacher_pt)
    cfg["student"]["optim"].update(epochs=1, max_steps_per_epoch=args.warmup + args.steps)
    train_ds = DATASETS.build(cfg["data"]["train"])
    class_weights = resolve_class_weights(cfg, train_ds, work, env)
    print(f"{args.config}: {len(train_ds)} training scans, batch {cfg['student']['optim']['batch_size']}, "
          f"device {env.device}, {torch.get_num_threads()} thread(s), {cfg['distiller']['type']}; "
          f"{args.repeats} runs x {args.steps} timed steps per mode, after {args.warmup} untimed", flush=True)

    modes = (("no KD", "baseline", None), ("online teacher", "student", "online"), ("teacher cache", "student", "cache"))
    times = {name: [] for name, _, _ in modes}
    cpu_times = {name: [] for name, _, _ in modes}
    exported = None
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every mode alike
        for name, stage, source in modes:
            c = copy.deepcopy(cfg)
            if source:
                c["distiller"]["teacher_source"] = source
            wd = work / name.replace(" ", "_")
            if source == "cache" and exported is None:
                shutil.rmtree(wd, ignore_errors=True)
                t0 = time.perf_counter()
                exported = export_teacher(c, wd, env, progress=not args.no_progress)
                export_s = time.perf_counter() - t0
            shutil.rmtree(wd / stage, ignore_errors=True)  # a finished stage would be skipped, not timed
            wall, cpu = time_stage(stage, c, env, wd, train_ds, class_weights, args.warmup)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    # step i trains on the same batch in every run of every mode; a busy machine only ever adds
    # time, so each step's fastest run is its cost, and the median over the steps the figure
    runs = {name: statistics.median(map(min, zip(*t))) for name, t in times.items()}
    cpu_runs = {name: statistics.median(map(min, zip(*t))) for name, t in cpu_times.items()}
    for name in runs:
        every = [x for run in times[name] for x in run]
        print(f"  {name:<15} {runs[name] * 1e3:8.1f} ms/step   ({runs[name] / runs['no KD']:.2f}x no KD; "
              f"median of all {len(every)} steps {statistics.median(every) * 1e3:.0f} ms; CPU time "
              f"{cpu_runs[name] * 1e3:.1f} ms, {cpu_runs[name] / cpu_runs['no KD']:.2f}x)", flush=True)
    scans = exported["frames"]
    forward = teacher_forward_per_scan(cfg, work, env)
    steady = (exported["seconds"] - exported["startup_seconds"]) / scans
    print(f"  export          {export_s / scans * 1e3:8.1f} ms/scan  ({scans} scans in {export_s:.1f} s; "
          f"{steady * 1e3:.1f} ms/scan after the {exported['startup_seconds']:.2f} s until the first batch)")
    print(f"  teacher forward {forward * 1e3:8.1f} ms/scan  (alone, on loaded batches of "
          f"{cfg['teacher']['optim']['batch_size']}); export/forward "
          f"{export_s / scans / forward:.2f}x, {steady / forward:.2f}x after start-up")
    print(f"  cache on disk   {exported['bytes'] / scans / 1e6:8.2f} MB/scan  ({exported['rows'] / scans:.0f} rows x "
          f"{read_meta(exported['cache'])['num_classes']} classes, float16, + int32 index)")
    load, lookup, kd, kd_rows = breakdown(cfg, exported["cache"], train_ds, env)
    print(f"  breakdown       reading a scan {load:.1f} ms, its cache lookup {lookup:.2f} ms; KD term forward + "
          f"backward on a batch's {kd_rows} cached rows {kd:.1f} ms (alone, CPU tensors)")
    print(f"online/no-KD step ratio: {runs['online teacher'] / runs['no KD']:.3f}")
    print(f"cache/no-KD step ratio: {runs['teacher cache'] / runs['no KD']:.3f}")
    return runs


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))
