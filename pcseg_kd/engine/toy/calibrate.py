"""Teacher accuracy against teacher-input noise amplitude, for calibrating a task's noise
levels (e.g. the digits stand-in against the paper's Table 5 teacher curve).

    python -m pcseg_kd.engine.toy.calibrate configs/digits/none.yaml --amplitudes 0 0.1 0.2 0.3

For each amplitude A it trains the teacher of every seed at a noise level whose amplitude
is A (``task.noise_amplitudes=[0, A]``, ``task.noise_level=1``; see pcseg_kd.data.mnist_task),
exactly as a sweep cell trains it, and prints the mean ± std test accuracy over seeds on
the noisy test set. ``--levels`` evaluates the config's own levels instead: the teacher
curve a sweep will see.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Sequence

import torch

from ...registry import DISTILLERS
from .schema import OptimConfig, load_experiment, seed_list
from .train import _TeacherView, accuracy, batched_models, build_task, fit, predict


def teacher_accuracy(cfg) -> torch.Tensor:
    """Per-seed test accuracy ``[S]`` of the teacher ``cfg`` trains (modality A, its noise)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seeds = seed_list(cfg["seeds"])
    task = build_task(cfg)
    data = task.make_data(seeds)
    dims = {"a": data["x_a_train"].shape[-1], "b": data["x_b_train"].shape[-1]}
    models = batched_models(task, dict(cfg["model"]), cfg.get("teacher_model"), dims, seeds)
    teacher = fit(models["teacher"], data["x_a_train"], data["y_train"], OptimConfig(**cfg["teacher"]), seeds,
                  DISTILLERS.build({"type": "none"}), task=_TeacherView(task))
    return accuracy(predict(teacher, data["x_a_test"], task, "a", seeds), data["y_test"])


def main(argv: Sequence[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--amplitudes", type=float, nargs="*", default=None,
                   help="noise amplitudes to try (one teacher per amplitude and seed)")
    p.add_argument("--levels", type=int, nargs="*", default=None,
                   help="the config's noise levels to evaluate (default 0..5 when --amplitudes is not given)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    runs: List[tuple] = []
    if args.amplitudes:
        runs += [(f"amplitude {a:g}", [f"task.noise_amplitudes=[0.0,{a}]", "task.noise_level=1"])
                 for a in args.amplitudes]
    if args.levels is not None or not args.amplitudes:
        runs += [(f"level {lv}", [f"task.noise_level={lv}"]) for lv in (args.levels or range(6))]
    print(f"{args.config} {' '.join(args.overrides)}")
    print("| setting | teacher accuracy (%), mean ± std over seeds | seconds |")
    print("|---|---|---|")
    for name, extra in runs:
        cfg = load_experiment(args.config, [*args.overrides, *extra])
        t0 = time.perf_counter()
        acc = teacher_accuracy(cfg)
        print(f"| {name} | {float(acc.mean()):.2f} ± {float(acc.std(unbiased=False)):.2f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
