#!/usr/bin/env python
"""Benchmark the per-point distillation loss (PSSM-weighted DKD, ignore_index, batchmean).

For every N x dtype it times forward, backward and forward+backward (median and spread
over --repeats) of:

naive      mdistiller-style DKD (softmax, cat_mask, log, kl_div, "-1000·gt") with the
           authors' PSSM, ignored rows dropped by boolean indexing (a host sync)
reference  the autograd composition of pcseg_kd's reference functions (pssm_weights + dkd_loss)
eager      pcseg_kd's "torch" backend (fused op, analytic gradient, eager PyTorch)
compile    pcseg_kd's "compile" backend (the same under torch.compile, dynamic rows)
triton     pcseg_kd's "triton" backend (fused kernel; CUDA only)

and a device copy of the same number of bytes the fused op must move at least (read
student, teacher and labels, write the student gradient), so that
"x floor" = time / copy time and "BW %" = copy time / time. On CUDA each pcseg_kd path
also runs one step under ``torch.cuda.set_sync_debug_mode("error")`` to prove it never
synchronises with the host. Everything is measured in one run; the ratios printed at the
end come from the table above them.

    python tools/bench_loss.py                              # N = 1e5 1e6 4e6, fp32 + bf16
    python tools/bench_loss.py --sizes 1e5 1e6 --dtypes fp32 --repeats 5
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from contextlib import redirect_stdout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pcseg_kd.distill.dkd_pssm import pssm_dkd_loss  # noqa: E402
from pcseg_kd.distill.kernels import HAVE_TRITON  # noqa: E402
from pcseg_kd.losses.pssm import pssm_config  # noqa: E402

ALPHA, BETA, T, IGNORE = 1.0, 8.0, 4.0, 255
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- naive
def _gt_mask(logits, target):
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _other_mask(logits, target):
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def _cat_mask(t, mask1, mask2):
    return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)


def naive_pssm_dkd(logits_student, logits_teacher, target, alpha=ALPHA, beta=BETA, temperature=T,
                   ignore_index=IGNORE, tau=0.996):
    """mdistiller's dkd_loss per row, times the authors' PSSM Ω, mean over kept rows."""
    keep = target != ignore_index
    logits_student, logits_teacher, target = logits_student[keep], logits_teacher[keep], target[keep]
    logits_student, logits_teacher = logits_student.float(), logits_teacher.float()
    gt_mask = _gt_mask(logits_student, target)
    other_mask = _other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = _cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = _cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1)
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="none").sum(1)
    with torch.no_grad():
        cos = F.cosine_similarity(logits_teacher, logits_student, dim=1)
        teacher_right = logits_teacher.argmax(1) == target
        omega = torch.where(teacher_right, torch.ones_like(cos),
                            torch.where(cos >= tau, (cos + 1) / 2, torch.zeros_like(cos)))
    return ((alpha * tckd + beta * nckd) * omega).sum() * temperature ** 2 / max(target.shape[0], 1)


# ----------------------------------------------------------------------------- harness
def make_inputs(n, c, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(n, c, generator=g) * 3)
    t[::4] = s[::4].float().cpu() * 1.01 + 0.01 * t[::4]  # a quarter of rows similar: PSSM keeps them
    t = t.to(device=device, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = IGNORE
    return s.requires_grad_(), t, y.to(device)


def impl_fn(name):
    cfg = pssm_config("reference")
    if name == "naive":
        return lambda s, t, y: naive_pssm_dkd(s, t, y)
    backend = {"reference": "reference", "eager": "torch", "compile": "compile", "triton": "triton"}[name]
    return lambda s, t, y: pssm_dkd_loss(s, t, y, ALPHA, BETA, T, "batchmean", IGNORE, cfg, backend=backend)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _step(fn, s, t, y, timer):
    s.grad = None
    t0 = timer.now()
    loss = fn(s, t, y)
    t1 = timer.now()
    loss.backward()
    t2 = timer.now()
    return t1 - t0, t2 - t1, loss.detach().float()


def _fwd_bwd(fn, s, t, y, timer):
    s.grad = None
    t0 = timer.now()
    fn(s, t, y).backward()
    return timer.now() - t0


def bench_impls(fns, s, t, y, repeats, warmup, timer):
    """Round-robin over the implementations (a load spike on a shared machine hits all of
    them alike). Returns {name: (fwd, bwd, fwd+bwd times, loss)}; a failing one is dropped."""
    out, failed = {k: ([], [], [], None) for k in fns}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                _step(fn, s, t, y, timer)
        except Exception as e:  # e.g. out of memory for naive at 4e6
            failed[name] = f"{type(e).__name__}: {str(e)[:80]}"
    live = [k for k in fns if k not in failed]
    for _ in range(repeats):
        for name in live:
            f, b, loss = _step(fns[name], s, t, y, timer)
            out[name][0].append(f)
            out[name][1].append(b)
            out[name] = out[name][:3] + (loss,)
        for name in live:
            out[name][2].append(_fwd_bwd(fns[name], s, t, y, timer))
    return {k: v for k, v in out.items() if k in live}, failed


def cuda_steady(step, repeats, min_span_s=2e-3):
    """Seconds per call of ``step()`` run back to back between two CUDA events, with no host
    sync inside the span (what a training loop sees once the launch queue is full): the
    median-ready list over ``repeats`` spans, each long enough (>= ``min_span_s``) that event
    resolution and the one sync at its end do not matter."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    inner = max(5, min(10000, int(min_span_s / max(time.perf_counter() - t0, 1e-7))))
    out = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e-3 / inner)
    return out


def bench_copy(nbytes, device, repeats, timer):
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        return cuda_steady(lambda: dst.copy_(src), repeats)
    out = []
    for i in range(repeats + 2):
        t0 = timer.now()
        dst.copy_(src)
        t1 = timer.now()
        if i >= 2:
            out.append(t1 - t0)
    return out  # a copy of nbytes/2 reads and writes nbytes in all


def fwd_bwd_step(fn, s, t, y):
    def step():
        s.grad = None
        fn(s, t, y).backward()
    return step


def triton_kernel_steps(s, t, y, block_rows):
    """The two kernel launches of the Triton path alone (forward with per-program partial
    sums, backward writing the gradient), and the forward alone: device time without
    autograd or the tiny torch ops around them."""
    from pcseg_kd.distill.kernels import dispatch
    from pcseg_kd.distill.kernels import pssm_dkd_triton as tk
    p = dispatch._params("dkd", ALPHA, BETA, T, IGNORE, pssm_config("reference"), "weight", True)
    s2, t2 = s.detach(), t.detach()
    go = torch.ones(1, device=s.device, dtype=torch.float32)

    def fwd():
        tk._launch(s2, t2, y, None, p, fwd=True, reduce=True, bwd=False, block_rows=block_rows)

    def both():
        fwd()
        tk._launch(s2, t2, y, None, p, fwd=False, reduce=False, bwd=True, go=go, block_rows=block_rows)
    return fwd, both


def cuda_steady_report(impls, fns, s, t, y, n, dname, copy, read_copy, repeats, blocks, summary):
    """Rows of the steady-state table for one (N, dtype); fills ``summary``."""
    for impl in impls:
        try:
            xs = cuda_steady(fwd_bwd_step(fns[impl], s, t, y), repeats)
        except Exception as e:  # noqa: BLE001 - report and go on: one broken path must not hide the rest
            print(f"{n:>8} {dname:>5} {impl:>16} | failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        med = statistics.median(xs)
        summary[(n, dname, impl)] = med
        print(f"{n:>8} {dname:>5} {impl:>16} | {fmt_ms(xs):>22} | {med / copy:7.2f} {100 * copy / med:5.1f}")
    if "triton" not in impls:
        return
    for br in blocks:
        try:
            fwd, both = triton_kernel_steps(s, t, y, br)
            xb, xf = cuda_steady(both, repeats), cuda_steady(fwd, repeats)
        except Exception as e:  # noqa: BLE001
            print(f"{n:>8} {dname:>5} {'kernels BR=' + str(br):>16} | failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        mb, mf = statistics.median(xb), statistics.median(xf)
        summary[(n, dname, f"kernels BR={br}")] = mb
        print(f"{n:>8} {dname:>5} {'kernels BR=' + str(br):>16} | {fmt_ms(xb):>22} | {mb / copy:7.2f} "
              f"{100 * copy / mb:5.1f} | forward kernel alone {fmt_ms(xf).strip()}: "
              f"{mf / read_copy:.2f}x the read-only floor")


def check_no_sync(fn, s, t, y):
    """One step under set_sync_debug_mode('error'); returns 'none' or the error's first line."""
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(s, t, y).backward()
        verdict = "none"
    except RuntimeError as e:
        verdict = "SYNC: " + str(e).splitlines()[0][:60]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return verdict


def fmt_ms(xs):
    med = statistics.median(xs) * 1e3
    lo, hi = min(xs) * 1e3, max(xs) * 1e3
    if med >= 100:
        return f"{med:8.1f} [{lo:.0f}-{hi:.0f}]"
    if med >= 1:
        return f"{med:8.2f} [{lo:.2f}-{hi:.2f}]"
    return f"{med * 1e3:7.1f}us [{lo * 1e3:.0f}-{hi * 1e3:.0f}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "4e6"])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--impls", nargs="+", default=None,
                    help="subset of naive reference eager compile triton (default: all that run here)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--triton-blocks", nargs="+", type=int, default=[16, 32, 64],
                    help="CUDA: rows per Triton program to time the kernels with (default 16 32 64; "
                         "the library's default is 1024 elements per program, 32 rows at C = 20)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    impls = args.impls or ["naive", "reference", "eager", "compile"] + (["triton"] if cuda and HAVE_TRITON else [])
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {name}; torch {torch.__version__}; triton {'yes' if HAVE_TRITON else 'no'}; "
          f"C={args.classes}; PSSM reference preset, DKD a={ALPHA} b={BETA} T={T}, 10% rows ignored, "
          f"batchmean; {repeats} timed runs after {warmup} warm-up; ms median [min-max]")
    print(f"{'N':>8} {'dtype':>5} {'impl':>9} | {'forward':>22} | {'backward':>22} | {'fwd+bwd':>22} | "
          f"{'x floor':>7} {'BW %':>5} | {'vs naive':>8} | host sync")
    results, steady, steady_rows, floors = {}, {}, [], {}
    for size in args.sizes:
        n = int(float(size))
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            s, t, y = make_inputs(n, args.classes, dtype, device)
            elt = s.element_size()
            nbytes = n * args.classes * elt * 3 + n * y.element_size()  # read s, t, y; write grad
            copy = statistics.median(bench_copy(nbytes, device, max(repeats, 20), timer))
            print(f"{n:>8} {dname:>5} {'copy':>9} | {'':>22} | {'':>22} | {fmt_ms([copy]):>22} | "
                  f"{1.0:7.2f} {100.0:5.0f} | {'':>8} | ({nbytes / 1e6:.0f} MB moved, "
                  f"{nbytes / copy / 1e9:.0f} GB/s)")
            read_bytes = n * args.classes * elt * 2 + n * y.element_size()  # forward: read s, t, y
            read_copy = statistics.median(bench_copy(read_bytes, device, max(repeats, 20), timer)) if cuda else None
            fns = {impl: impl_fn(impl) for impl in impls}
            res, failed = bench_impls(fns, s, t, y, repeats, warmup, timer)
            ref_loss = None
            for impl in impls:
                if impl in failed:
                    print(f"{n:>8} {dname:>5} {impl:>9} | failed: {failed[impl]}")
                    continue
                fw, bw, fb, loss = res[impl]
                med = statistics.median(fb)
                results[(n, dname, impl)] = med
                naive = results.get((n, dname, "naive"))
                sync = check_no_sync(fns[impl], s, t, y) if cuda else "n/a (CPU)"
                if ref_loss is None:
                    ref_loss = loss
                agree = (loss - ref_loss).abs().item() / max(ref_loss.abs().item(), 1e-12)
                print(f"{n:>8} {dname:>5} {impl:>9} | {fmt_ms(fw):>22} | {fmt_ms(bw):>22} | {fmt_ms(fb):>22} | "
                      f"{med / copy:7.2f} {100 * copy / med:5.1f} | "
                      f"{(naive / med if naive else float('nan')):7.2f}x | {sync}; loss rel.diff {agree:.1e}")
            if cuda:  # printed after the main table, as a second table
                floors[(n, dname)] = copy
                buf = io.StringIO()
                with redirect_stdout(buf):
                    cuda_steady_report(impls, fns, s, t, y, n, dname, copy, read_copy, repeats,
                                       args.triton_blocks, steady)
                steady_rows.append(buf.getvalue())
                torch.cuda.empty_cache()
            del s, t, y
            if cuda:
                torch.cuda.empty_cache()

    if cuda:
        print("\n# CUDA steady state: seconds per fwd+bwd step with steps run back to back between two "
              "CUDA events (no host sync inside); x floor / BW % against the same copy, event-timed. "
              "'kernels BR=b' = the Triton path's two kernel launches alone with b rows per program")
        print(f"{'N':>8} {'dtype':>5} {'impl':>16} | {'fwd+bwd per step':>22} | {'x floor':>7} {'BW %':>5}")
        for block in steady_rows:
            print(block, end="")
    print("\n# ratios (fwd+bwd medians from the table above)")
    for (n, dname, impl), med in sorted(results.items()):
        if impl == "naive":
            continue
        naive = results.get((n, dname, "naive"))
        eager = results.get((n, dname, "eager"))
        parts = [f"N={n:.0e} {dname} {impl:>9}:"]
        if naive:
            parts.append(f"{naive / med:5.2f}x faster than naive")
        if eager and impl != "eager":
            parts.append(f"{eager / med:5.2f}x faster than eager")
        print("  " + "  ".join(parts))
    if cuda:
        for n in sorted({k[0] for k in steady}):
            for dname in args.dtypes:
                tri, eager = steady.get((n, dname, "triton")), steady.get((n, dname, "eager"))
                kern = {k[2]: v for k, v in steady.items() if k[:2] == (n, dname) and k[2].startswith("kernels")}
                if tri is None:
                    continue
                floor = floors[(n, dname)]
                parts = [f"  GPU N={n:.0e} {dname}: triton fwd+bwd {tri * 1e6:.1f} us = "
                         f"{tri / floor:.2f}x the copy floor {floor * 1e6:.1f} us (target <= 2)"]
                if eager:
                    parts.append(f"{eager / tri:.2f}x faster than eager (target >= 5)")
                if kern:
                    best = min(kern, key=kern.get)
                    parts.append(f"best {best} {kern[best] * 1e6:.1f} us = {kern[best] / floor:.2f}x floor")
                print("; ".join(parts))
    if not cuda:
        for n in sorted({k[0] for k in results}):
            for dname in args.dtypes:
                nv = results.get((n, dname, "naive"))
                cands = {k[2]: v for k, v in results.items() if k[0] == n and k[1] == dname and k[2] in ("eager", "compile")}
                if nv and cands:
                    best = min(cands, key=cands.get)
                    print(f"  CPU acceptance N={n:.0e} {dname}: best CPU path = {best} "
                          f"({nv / cands[best]:.2f}x vs naive, need >= 3); eager {nv / cands.get('eager', float('inf')):.2f}x "
                          f"vs naive (need >= 1)")


if __name__ == "__main__":
    main()
