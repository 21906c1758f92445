"""tools/bench_loss.py: the CPU run end to end on a tiny N, and its CUDA-only timing code
with CUDA's events replaced by wall-clock fakes (so that a GPU session does not spend its
device time discovering a typo). Timings are not checked; plumbing and parity are."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from pcseg_kd.distill.kernels import pssm_dkd_triton as tk

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_loss", ROOT / "tools/bench_loss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_run_prints_every_impl(capsys):
    bench = load_bench()
    bench.main(["--sizes", "2000", "--dtypes", "fp32", "--impls", "naive", "reference", "eager",
                "--repeats", "2", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    for impl in ("copy", "naive", "reference", "eager"):
        assert f" {impl} |" in out
    # every pcseg_kd path agrees with the naive loss on these inputs
    rel = [float(line.rsplit("rel.diff", 1)[1]) for line in out.splitlines() if "rel.diff" in line]
    assert len(rel) == 3 and max(rel) < 1e-5
    assert "CPU acceptance N=2e+03 fp32: best CPU path = eager" in out


class FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


@pytest.mark.skipif(not tk.HAVE_TRITON, reason="triton is not installed: the Triton rows cannot run")
def test_cuda_steady_state_code_runs_with_fake_events(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run tools/bench_loss.py itself")
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tk._fused_kernel, InterpretedFunction):
        pytest.skip("the kernel was compiled without TRITON_INTERPRET=1")
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    s, t, y = bench.make_inputs(256, 20, torch.float32, torch.device("cpu"))
    fns = {k: bench.impl_fn(k) for k in ("eager", "triton")}
    summary = {}
    bench.cuda_steady_report(["eager", "triton"], fns, s, t, y, 256, "fp32", 1e-3, 1e-3, 1, [64], summary)
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert set(summary) == {(256, "fp32", "eager"), (256, "fp32", "triton"), (256, "fp32", "kernels BR=64")}
    # the kernel-only launches compute the same loss as the library path
    p = bench_params(bench)
    _, part, cnt, _, _ = tk._launch(s.detach(), t, y, None, p, fwd=True, reduce=True, bwd=False, block_rows=64)
    want = fns["eager"](s, t, y)
    torch.testing.assert_close(part.sum() / cnt.sum(), want.detach(), rtol=1e-5, atol=1e-6)


def bench_params(bench):
    from pcseg_kd.distill.kernels import dispatch
    return dispatch._params("dkd", bench.ALPHA, bench.BETA, bench.T, bench.IGNORE,
                            bench.pssm_config("reference"), "weight", True)
