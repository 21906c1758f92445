#!/usr/bin/env python
"""Seed-batched engine vs per-seed loops, measured in one run; optionally the full sweeps.

    python tools/bench_toy.py                      # each setting, the batched engine and the loops
    python tools/bench_toy.py --sweeps             # also time the Table 8 and Table 2 sweeps

For each setting it trains teacher, no-KD baseline and KD student for every seed, three
ways, on the same data and initial weights, one after the other in this process:

* **batched**: the engine (``engine.toy.train.fit``: all seeds as one stacked model);
* **lean loop** (linear full-batch settings, the Gaussian protocol): one seed at a time,
  an ``nn.Linear``, ``torch.optim.SGD``, ``F.cross_entropy`` and, for the student, the
  setting's KD / KD+PSSM / DKD / DKD+PSSM written out in a few plain torch ops below
  (:func:`lean_kd_term`; the PSSM ``reference`` preset): the shortest honest per-seed
  PyTorch loop, the reference of the ≥ 10x target. Its accuracies must match the
  engine's (last column), which checks that both train the same thing;
* **engine loop**: the engine's own per-seed reference (``fit_plain``: ordinary modules).

It prints the wall times, the speed-up of the batched engine over each loop and the
largest per-seed difference in final test accuracy between the batched engine and the
lean loop (the engine loop for the others).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pcseg_kd.engine.toy.schema import OptimConfig, load_experiment, seed_list  # noqa: E402
from pcseg_kd.engine.toy.train import (accuracy, batched_models, build_task, fit, fit_plain,  # noqa: E402
                                       linear_fast_path, plain_models, predict)
from pcseg_kd.registry import DISTILLERS  # noqa: E402

SETTINGS = {"gauss-kd_pssm": "configs/gauss/kd_pssm.yaml", "gauss-dkd_pssm": "configs/gauss/dkd_pssm.yaml",
            "sklearn-dkd_pssm": "configs/sklearn/dkd_pssm.yaml"}
SWEEPS = {"gauss": "configs/gauss/sweep_table8.yaml", "sklearn": "configs/sklearn/sweep_table2.yaml"}


def lean_omega(s, t, y):
    """PSSM ``reference``: 1 where the teacher is right, else d = (cos + 1)/2 if cos >= 0.996 else 0."""
    with torch.no_grad():
        cos = F.cosine_similarity(t, s, dim=-1, eps=1e-8)
        mask = torch.where(cos >= 0.996, 0.5 * (cos + 1.0), torch.zeros_like(cos))
        return torch.where(t.argmax(-1) == y, torch.ones_like(mask), mask)


def lean_kd_term(cfg, s, t, y):
    """The KD term of the Gaussian configs for one seed's [N, C] logits, in plain torch ops."""
    kind, T = cfg["type"], cfg.get("temperature", 4.0)
    if kind in ("kd", "kd_pssm"):
        if kind == "kd_pssm":  # the authors' form: both logits scaled by Ω
            if cfg.get("apply", "logit_scale") != "logit_scale":
                raise ValueError("lean loop: kd_pssm with apply=logit_scale only")
            omega = lean_omega(s, t, y).unsqueeze(-1)
            s, t = s * omega, t * omega
        kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
        return kd * (T * T if cfg.get("scale_by_t2", True) else 1.0)
    if kind in ("dkd", "dkd_pssm"):
        alpha, beta = cfg.get("alpha", 1.0), cfg.get("beta", 8.0)
        gt = F.one_hot(y, s.shape[-1]).to(s.dtype)
        p_s, p_t = F.softmax(s / T, -1), F.softmax(t / T, -1)
        ps_gt, pt_gt = (p_s * gt).sum(-1), (p_t * gt).sum(-1)
        b_s = torch.stack([ps_gt, 1.0 - ps_gt], -1)
        b_t = torch.stack([pt_gt, 1.0 - pt_gt], -1)
        tckd = (torch.xlogy(b_t, b_t) - b_t * torch.log(b_s.clamp_min(1e-30))).sum(-1)
        ls_nt = F.log_softmax(s / T - 1000.0 * gt, -1)
        p_t_nt = F.softmax(t / T - 1000.0 * gt, -1)
        nckd = (torch.xlogy(p_t_nt, p_t_nt) - p_t_nt * ls_nt).sum(-1)
        rows = (alpha * tckd + beta * nckd) * T * T
        if kind == "dkd_pssm":
            rows = rows * lean_omega(s, t, y)
        return rows.mean()
    raise ValueError(f"lean loop: no plain-torch form for distiller {kind!r}")


def lean_fit(layer: torch.nn.Linear, x, y, opt_cfg: OptimConfig, kd_cfg=None, t_logits=None):
    """One seed: nn.Linear + torch.optim.SGD, full batch; CE, plus the KD term for a student."""
    opt = torch.optim.SGD(layer.parameters(), lr=opt_cfg.lr)
    ce_w, kd_w = (kd_cfg or {}).get("ce_weight", 1.0), (kd_cfg or {}).get("kd_weight", 1.0)
    for _ in range(opt_cfg.epochs):
        z = layer(x)
        loss = F.cross_entropy(z, y)
        if kd_cfg is not None and kd_cfg["type"] != "none":
            loss = ce_w * loss + kd_w * lean_kd_term(kd_cfg, z, t_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layer


def bench_setting(path, overrides, engine_loop=True):
    cfg = load_experiment(path, overrides)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))  # every engine runs with the config's threads
    seeds = seed_list(cfg["seeds"])
    task = build_task(cfg)
    data = task.make_data(seeds)
    dims = {"a": data["x_a_train"].shape[-1], "b": data["x_b_train"].shape[-1]}
    t_opt, s_opt = OptimConfig(**cfg["teacher"]), OptimConfig(**cfg["student"])
    ce = DISTILLERS.build({"type": "none"})
    pick = lambda k, i: data[k][0] if data[k].shape[0] == 1 else data[k][i]  # noqa: E731
    out = {"seeds": len(seeds)}

    t0 = time.perf_counter()
    m = batched_models(task, cfg["model"], cfg.get("teacher_model"), dims, seeds)
    teacher = fit(m["teacher"], data["x_a_train"], data["y_train"], t_opt, seeds, ce)
    fit(m["baseline"], data["x_b_train"], data["y_train"], s_opt, seeds, ce)
    student = fit(m["student"], data["x_b_train"], data["y_train"], s_opt, seeds, DISTILLERS.build(cfg["distiller"]),
                  teacher, data["x_a_train"], task)
    out["batched"] = time.perf_counter() - t0
    out["fast_path"] = linear_fast_path(m["student"], s_opt, data["y_train"].shape[-1], task,
                                        DISTILLERS.build(cfg["distiller"]))
    acc_batched = accuracy(predict(student, data["x_b_test"]), data["y_test"]).tolist()

    def test_acc(model, i):
        with torch.no_grad():
            z = model(pick("x_b_test", i))
            z = z[0] if isinstance(z, tuple) else z
            return float((z.argmax(-1) == pick("y_test", i)).double().mean() * 100)

    linear = not cfg["model"].get("hidden") and not (s_opt.batch_size or t_opt.batch_size) \
        and s_opt.optimizer == t_opt.optimizer == "sgd" and not (s_opt.momentum or t_opt.momentum)
    if linear:
        t0 = time.perf_counter()
        acc_lean = []
        for i, s in enumerate(seeds):
            p = plain_models(task, cfg["model"], cfg.get("teacher_model"), dims, s)
            t = lean_fit(p["teacher"].layers[0], pick("x_a_train", i), pick("y_train", i), t_opt)
            lean_fit(p["baseline"].layers[0], pick("x_b_train", i), pick("y_train", i), s_opt)
            with torch.no_grad():
                t_logits = t(pick("x_a_train", i))
            st = lean_fit(p["student"].layers[0], pick("x_b_train", i), pick("y_train", i), s_opt,
                          dict(cfg["distiller"]), t_logits)
            acc_lean.append(test_acc(st, i))
        out["lean"] = time.perf_counter() - t0
        out["diff"] = max(abs(a - b) for a, b in zip(acc_batched, acc_lean))

    if not engine_loop:
        return out
    t0 = time.perf_counter()
    acc_loop = []
    for i, s in enumerate(seeds):
        p = plain_models(task, cfg["model"], cfg.get("teacher_model"), dims, s)
        t = fit_plain(p["teacher"], pick("x_a_train", i), pick("y_train", i), t_opt, s, ce)
        fit_plain(p["baseline"], pick("x_b_train", i), pick("y_train", i), s_opt, s, ce)
        st = fit_plain(p["student"], pick("x_b_train", i), pick("y_train", i), s_opt, s,
                       DISTILLERS.build(cfg["distiller"]), t, pick("x_a_train", i), task)
        acc_loop.append(test_acc(st, i))
    out["loop"] = time.perf_counter() - t0
    out.setdefault("diff", max(abs(a - b) for a, b in zip(acc_batched, acc_loop)))
    return out


def bench_rkd(seeds=5, rows=128, dims=64, steps=5):
    """ms per forward+backward of the RKD distiller (distance + angle terms) on a
    ``[seeds, rows, dims]`` batch, as a digits training step calls it (a row mask included)."""
    torch.set_num_threads(1)
    dist = DISTILLERS.build({"type": "rkd"})
    dist.build_modules(dims, dims, num_models=seeds)
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(seeds, rows, dims, generator=g, requires_grad=True)
    f_t = torch.randn(seeds, rows, dims, generator=g)
    logits = torch.randn(seeds, rows, 10, generator=g)
    y = torch.randint(0, 10, (seeds, rows), generator=g)
    run = lambda: dist(logits, logits, y, student_feats=f_s, teacher_feats=f_t)["loss_kd"].sum().backward()  # noqa: E731
    run()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--sweeps", action="store_true", help="also time the full Table 8 / Table 2 sweeps (batched)")
    p.add_argument("--rkd", action="store_true",
                   help="only time one RKD distiller step (5 seeds x 128 rows x 64 dims, 1 thread)")
    p.add_argument("--no-engine-loop", action="store_true",
                   help="skip the engine's per-seed loop (fit_plain, the slowest of the three)")
    p.add_argument("overrides", nargs="*", help="overrides applied to every setting, e.g. seeds.num=20")
    args = p.parse_args()
    if args.rkd:
        print(f"RKD distiller forward+backward, 5 seeds x 128 rows x 64 dims, 1 thread: {bench_rkd():.0f} ms per step")
        return
    print(f"torch {torch.__version__}; threads per the configs (threads: 1 unless overridden); "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    print("| setting | seeds | batched (s) | lean loop (s) | speed-up vs lean | engine loop (s) | "
          "speed-up vs engine loop | max acc diff (pts) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.settings:
        r = bench_setting(SETTINGS[name], args.overrides, engine_loop=not args.no_engine_loop)
        lean = f"{r['lean']:.2f} | **{r['lean'] / r['batched']:.1f}x**" if "lean" in r else "n/a | n/a"
        loop = f"{r['loop']:.2f} | {r['loop'] / r['batched']:.1f}x" if "loop" in r else "skipped | -"
        path = " (linear fast path)" if r["fast_path"] else ""
        print(f"| {name}{path} | {r['seeds']} | {r['batched']:.2f} | {lean} | {loop} | {r['diff']:.2f} |", flush=True)
    if args.sweeps:
        from pcseg_kd.engine.toy.sweep import run_sweep
        for name in ("gauss", "sklearn"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_sweep(SWEEPS[name], args.overrides, Path(tmp), progress=False)
                print(f"sweep {SWEEPS[name]}: {time.perf_counter() - t0:.0f} s (batched engine, all cells)", flush=True)


if __name__ == "__main__":
    main()
