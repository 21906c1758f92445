#!/usr/bin/env python
"""Seed-batched engine vs the per-seed loop, measured in one run; optionally the full sweeps.

    python tools/bench_toy.py                      # one setting per task, both engines
    python tools/bench_toy.py --sweeps             # also time the Table 8 and Table 2 sweeps

For each task it trains teacher, no-KD baseline and DKD+PSSM student for every seed of
the setting, once as one stacked model and once seed by seed with ordinary modules, and
prints both wall times, their ratio and the largest per-seed accuracy difference.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pcseg_kd.engine.toy.schema import load_experiment  # noqa: E402
from pcseg_kd.engine.toy.schema import OptimConfig, seed_list  # noqa: E402
from pcseg_kd.engine.toy.train import (accuracy, batched_models, build_task, fit, fit_plain, plain_models,  # noqa: E402
                                 predict)
from pcseg_kd.registry import DISTILLERS  # noqa: E402

SETTINGS = {"gauss": "configs/gauss/dkd_pssm.yaml", "sklearn": "configs/sklearn/dkd_pssm.yaml"}
SWEEPS = {"gauss": "configs/gauss/sweep_table8.yaml", "sklearn": "configs/sklearn/sweep_table2.yaml"}


def bench_setting(path, overrides):
    cfg = load_experiment(path, overrides)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))  # both engines run with the config's threads
    seeds = seed_list(cfg["seeds"])
    task = build_task(cfg)
    data = task.make_data(seeds)
    dims = {"a": data["x_a_train"].shape[-1], "b": data["x_b_train"].shape[-1]}
    t_opt, s_opt = OptimConfig(**cfg["teacher"]), OptimConfig(**cfg["student"])
    ce = DISTILLERS.build({"type": "none"})

    t0 = time.perf_counter()
    m = batched_models(task, cfg["model"], cfg.get("teacher_model"), dims, seeds)
    teacher = fit(m["teacher"], data["x_a_train"], data["y_train"], t_opt, seeds, ce)
    fit(m["baseline"], data["x_b_train"], data["y_train"], s_opt, seeds, ce)
    student = fit(m["student"], data["x_b_train"], data["y_train"], s_opt, seeds, DISTILLERS.build(cfg["distiller"]),
                  teacher, data["x_a_train"], task)
    batched_s = time.perf_counter() - t0
    acc_batched = accuracy(predict(student, data["x_b_test"]), data["y_test"])

    pick = lambda k, i: data[k][0] if data[k].shape[0] == 1 else data[k][i]
    t0 = time.perf_counter()
    acc_loop = []
    for i, s in enumerate(seeds):
        p = plain_models(task, cfg["model"], cfg.get("teacher_model"), dims, s)
        t = fit_plain(p["teacher"], pick("x_a_train", i), pick("y_train", i), t_opt, s, ce)
        fit_plain(p["baseline"], pick("x_b_train", i), pick("y_train", i), s_opt, s, ce)
        st = fit_plain(p["student"], pick("x_b_train", i), pick("y_train", i), s_opt, s,
                       DISTILLERS.build(cfg["distiller"]), t, pick("x_a_train", i), task)
        with torch.no_grad():
            acc_loop.append(float((st(pick("x_b_test", i))[0].argmax(-1) == pick("y_test", i)).double().mean() * 100))
    loop_s = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(acc_batched.tolist(), acc_loop))
    return len(seeds), batched_s, loop_s, diff


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--sweeps", action="store_true", help="also time the full Table 8 / Table 2 sweeps (batched)")
    p.add_argument("overrides", nargs="*", help="overrides applied to every setting, e.g. seeds.num=20")
    args = p.parse_args()
    print(f"torch {torch.__version__}; threads per the configs (threads: 1 unless overridden)")
    print("| task | seeds | batched (s) | per-seed loop (s) | speed-up | max acc diff (pts) |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        n, b, l, d = bench_setting(SETTINGS[name], args.overrides)
        print(f"| {name} ({SETTINGS[name]}) | {n} | {b:.1f} | {l:.1f} | {l / b:.1f}x | {d:.2f} |", flush=True)
    if args.sweeps:
        from pcseg_kd.engine.toy.sweep import run_sweep
        for name in args.tasks:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_sweep(SWEEPS[name], args.overrides, Path(tmp), progress=False)
                print(f"sweep {SWEEPS[name]}: {time.perf_counter() - t0:.0f} s (batched engine, all cells)", flush=True)


if __name__ == "__main__":
    main()
