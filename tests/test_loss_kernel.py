"""Fused PSSM+DKD/KD loss: the Triton kernel and the torch backends against an independent
float64 reference, gradients included, plus dispatch.

The kernel runs on CUDA tensors where there is a GPU, else on CPU tensors under Triton's
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
Triton). Kernel tests are skipped, with the reason, when Triton cannot be imported; the
torch backend tests always run. N stays small: the interpreter costs ~15 ms per program.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcseg_kd.distill import pssm_dkd_loss
from pcseg_kd.distill.kernels import dispatch
from pcseg_kd.distill.kernels import pssm_dkd_triton as tk
from pcseg_kd.losses.dkd import dkd_loss as dkd_loss_torch
from pcseg_kd.losses.pssm import PSSMConfig, pssm_config
from pcseg_kd.losses.pssm import pssm_weights as torch_pssm_weights

KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel_skip_reason():
    if not tk.HAVE_TRITON:
        return "triton is not installed: the Triton kernel cannot be tested (pip install 'pcseg_kd[triton]')"
    if KERNEL_DEVICE.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tk._fused_kernel, InterpretedFunction):
            return ("no GPU and the kernel was compiled without TRITON_INTERPRET=1 (set it before "
                    "importing pcseg_kd's kernels; tests/conftest.py does)")
    return None


needs_triton = pytest.mark.skipif(_kernel_skip_reason() is not None, reason=str(_kernel_skip_reason()))


def on_kernel_device(*tensors):
    return tuple(None if x is None else x.to(KERNEL_DEVICE) for x in tensors)


def device_for(backend):
    """Where a test's inputs live: the kernel's device for "triton", the CPU otherwise."""
    return KERNEL_DEVICE if backend == "triton" else torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_backend_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_loss_backend(None)
    yield
    dispatch.set_loss_backend(None)


IGN = 255
COSINES = [0.99, 0.995, 0.9955, 0.9966, 0.9975, 0.999, 0.99995]
BLOCK = 128  # rows per kernel program in these tests: several programs and a partial last one


# ----------------------------------------------------------------------------- reference (float64)
NEG = float("-inf")


def omega64(s, t, y, cfg, ignore_index=None):
    """PSSM Ω in float64 from the description (REFERENCE.md §1), argmax on the raw inputs."""
    s64, t64 = s.detach().double(), t.detach().double()
    if cfg.space == "probs":
        o_s, o_t = F.softmax(s64 / cfg.temperature, -1), F.softmax(t64 / cfg.temperature, -1)
    else:
        o_s, o_t = s64, t64
    cos = (o_s * o_t).sum(-1) / (o_s.norm(dim=-1).clamp_min(1e-8) * o_t.norm(dim=-1).clamp_min(1e-8))
    d = (cos + 1) / 2
    sim = d if cfg.tau_scale == "d" else cos
    val = torch.where(sim >= cfg.tau, d if cfg.above == "d" else torch.ones_like(d),
                      torch.full_like(d, cfg.below))
    t_ok, s_ok = t.argmax(-1) == y, s.argmax(-1) == y
    ok = {"teacher": t_ok, "student": s_ok, "both": t_ok & s_ok}[cfg.gate]
    om = torch.where(ok, torch.ones_like(val), val)
    if ignore_index is not None:
        om = om.masked_fill(y == ignore_index, 0.0)
    return om, sim


def _kl_terms(lp_t, lp_s):
    """Σ p_t (log p_t - log p_s) over the last dim, with 0·(anything) = 0 where p_t = 0."""
    p_t = lp_t.exp()
    return torch.where(p_t > 0, p_t * (lp_t - lp_s), torch.zeros_like(p_t)).sum(-1)


def dkd_rows64(s, t, y, alpha, beta, temperature, ignore_index=None):
    """Per-row (α·TCKD + β·NCKD)·T² in float64; s may require grad (float64 leaf)."""
    C = s.shape[-1]
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
    yy = torch.where(valid, y, torch.zeros_like(y))
    gt = F.one_hot(yy.long(), C).bool()
    zs, zt = s.double() / temperature, t.double() / temperature

    def binary(z):
        lse = torch.logsumexp(z, -1, keepdim=True)
        lg = torch.logsumexp(z.masked_fill(~gt, NEG), -1, keepdim=True) - lse
        lr = torch.logsumexp(z.masked_fill(gt, NEG), -1, keepdim=True) - lse
        return torch.cat([lg, lr], -1)

    tckd = _kl_terms(binary(zt), binary(zs))
    nckd = _kl_terms(F.log_softmax(zt.masked_fill(gt, NEG), -1),
                     F.log_softmax(zs.masked_fill(gt, NEG), -1).masked_fill(gt, 0.0))
    rows = (alpha * tckd + beta * nckd) * temperature ** 2
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def kd_rows64(s, t, y, temperature, ignore_index=None, logit_scale=None, t2=True):
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
    zs, zt = s.double() / temperature, t.double() / temperature
    if logit_scale is not None:
        zs, zt = zs * logit_scale.unsqueeze(-1), zt * logit_scale.unsqueeze(-1)
    rows = _kl_terms(F.log_softmax(zt, -1), F.log_softmax(zs, -1)) * (temperature ** 2 if t2 else 1.0)
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def reduce64(rows, valid, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


def loss64(kind, s, t, y, alpha=1.0, beta=8.0, temperature=4.0, reduction="batchmean",
           ignore_index=None, pssm=None, kd_apply="weight", weight=None):
    """The whole fused op in float64: returns (loss, Ω or None, similarity or None)."""
    om = sim = None
    if pssm is not None:
        om, sim = omega64(s, t, y, pssm, ignore_index)
    w = om
    if weight is not None:
        w = weight.double() if w is None else w * weight.double()
    if kind == "dkd":
        rows, valid = dkd_rows64(s, t, y, alpha, beta, temperature, ignore_index)
        rows = rows if w is None else rows * w
    else:
        scale = om if (om is not None and kd_apply == "logit_scale") else None
        rows, valid = kd_rows64(s, t, y, temperature, ignore_index, logit_scale=scale)
        if kd_apply == "logit_scale":
            w = None if weight is None else weight.double()
        rows = rows if w is None else rows * w
    return reduce64(rows, valid, reduction), om, sim


# ----------------------------------------------------------------------------- helpers
def make_rows(n=300, c=20, seed=0, scale=3.0, similar_every=3, ignore_every=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g) * scale
    t = torch.randn(n, c, generator=g) * scale
    # rows similar to the student with cosines chosen on both sides of τ = 0.996 (and
    # ≥ 5e-4 away from it): PSSM keeps some of them with Ω = d, drops the others
    idx = torch.arange(0, n, similar_every)
    cos = torch.tensor(COSINES, dtype=torch.float64).repeat(len(idx) // len(COSINES) + 1)[:len(idx)]
    s64 = s[idx].double()
    u = torch.randn(len(idx), c, generator=g, dtype=torch.float64)
    u = u - (u * s64).sum(-1, keepdim=True) / (s64 * s64).sum(-1, keepdim=True) * s64  # ⟂ s
    u = u / u.norm(dim=-1, keepdim=True) * s64.norm(dim=-1, keepdim=True)
    t[idx] = (cos.unsqueeze(1) * s64 + (1 - cos * cos).sqrt().unsqueeze(1) * u).float()
    y = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGN
    return s.to(dtype), t.to(dtype), y


def run(backend, kind, s, t, y, reduction="batchmean", pssm=None, ignore_index=IGN, kd_apply="weight",
        weight=None, alpha=1.0, beta=8.0, temperature=4.0, go_seed=1, block_rows=BLOCK):
    """(loss, d loss·g / d student) for one backend; g is a fixed random cotangent."""
    if backend == "triton":
        s, t, y, weight = on_kernel_device(s, t, y, weight)
    s = s.detach().clone().requires_grad_()
    if backend == "triton":
        loss = dispatch.fused_distill_loss("triton", kind, s, t, y, alpha, beta, temperature, reduction,
                                           ignore_index, weight, pssm, kd_apply, True, block_rows=block_rows)
    else:
        loss = dispatch.distill_loss(kind, s, t, y, alpha, beta, temperature, reduction, ignore_index,
                                     weight, pssm, kd_apply, backend=backend)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(go_seed), dtype=torch.float64)
    (loss.double() * g.to(loss.device)).sum().backward()
    return loss.detach().cpu(), s.grad.cpu()


def run64(kind, s, t, y, reduction="batchmean", pssm=None, ignore_index=IGN, kd_apply="weight",
          weight=None, alpha=1.0, beta=8.0, temperature=4.0, go_seed=1):
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double()
    loss, om, sim = loss64(kind, s64, t64, y, alpha, beta, temperature, reduction, ignore_index,
                           pssm, kd_apply, weight)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(go_seed), dtype=torch.float64)
    (loss * g).sum().backward()
    return loss.detach(), s64.grad, sim


def assert_close(got, want, rtol=2e-5, atol_scale=2e-6):
    got, want = got.double(), want.double()
    atol = atol_scale * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def near_threshold(sim, cfg, margin=1e-5):  # float32 cosines are good to ~1e-7
    return 0 if sim is None else int(((sim - cfg.tau).abs() < margin).sum())


PSSMS = {
    "none": None,
    "reference": pssm_config("reference"),
    "paper": pssm_config("paper"),
    "both-probs-T2-above1": PSSMConfig(space="probs", gate="both", tau=0.99, tau_scale="cos", below=0.5,
                                       above="1", temperature=2.0),
    "student-d-below1": PSSMConfig(space="logits", gate="student", tau=0.9, tau_scale="d", below=1.0,
                                   above="d"),
}
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


# ----------------------------------------------------------------------------- parity
# a logit scale needs Ω, so ("kd", "logit_scale") only runs with a PSSM config
CASES = [(p, k, a) for p in PSSMS for k, a in (("dkd", "weight"), ("kd", "weight"), ("kd", "logit_scale"))
         if not (a == "logit_scale" and PSSMS[p] is None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pssm,kind,kd_apply", CASES)
def test_random_rows_match_float64(backend, pssm, kind, kd_apply):
    cfg = PSSMS[pssm]
    s, t, y = make_rows()
    want_all = {}
    for reduction in ("none", "sum", "batchmean"):
        loss, grad = run(backend, kind, s, t, y, reduction, cfg, kd_apply=kd_apply)
        want, want_g, sim = run64(kind, s, t, y, reduction, cfg, kd_apply=kd_apply)
        assert near_threshold(sim, cfg) == 0 if cfg else True
        assert loss.dtype == torch.float32 and grad.dtype == torch.float32
        assert_close(loss, want)
        assert_close(grad, want_g)
        want_all[reduction] = want
    assert want_all["sum"] > 0  # the rows are not all dropped: the test exercises the loss


@needs_triton
def test_omega_kernel_matches_pssm_weights():
    s, t, y = make_rows(n=257)
    for name, cfg in PSSMS.items():
        if cfg is None:
            continue
        got = dispatch.pssm_weights(*on_kernel_device(s, t, y), ignore_index=IGN, config=cfg,
                                    backend="triton").cpu()
        want = torch_pssm_weights(s, t, y, config=cfg, ignore_index=IGN)
        om64, sim = omega64(s, t, y, cfg, IGN)
        assert near_threshold(sim, cfg) == 0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.double(), om64, rtol=0, atol=1e-6)
        assert 0 < int((got == 0).sum()) < 257 and int((got == 1).sum()) > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_rows(backend):
    """p_gt -> 1 for teacher and student: mdistiller's log(1 - p_gt) would be log 0."""
    s, t, y = make_rows(n=200, ignore_every=0, scale=1.0)
    onehot = F.one_hot(y, 20).float()
    s = s + 60.0 * onehot
    t = t + 80.0 * onehot
    for kind in ("dkd", "kd"):
        loss, grad = run(backend, kind, s, t, y, "none", pssm_config("reference"), temperature=1.0)
        want, want_g, _ = run64(kind, s, t, y, "none", pssm_config("reference"), temperature=1.0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert_close(loss, want, rtol=1e-4, atol_scale=1e-6)
        assert_close(grad, want_g, rtol=1e-4, atol_scale=1e-6)
    # NCKD carries information even though p_rest ~ e-60: compare with beta only
    loss_b, _ = run(backend, "dkd", s, t, y, "sum", None, alpha=0.0, beta=1.0, temperature=1.0)
    want_b, _, _ = run64("dkd", s, t, y, "sum", None, alpha=0.0, beta=1.0, temperature=1.0)
    assert want_b > 1.0
    assert_close(loss_b, want_b, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite(backend):
    s, t, y = make_rows(n=160, scale=1.0)
    s = s * 1e4
    t = torch.roll(t, 1, 0) * -1e4
    for kind in ("dkd", "kd"):
        for cfg in (None, pssm_config("paper")):
            loss, grad = run(backend, kind, s, t, y, "none", cfg)
            want, want_g, _ = run64(kind, s, t, y, "none", cfg)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            # logits of 1e4 in float32 carry ~1e-3 absolute error; the losses are ~1e5
            assert_close(loss, want, rtol=1e-4, atol_scale=1e-5)
            assert_close(grad, want_g, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    s, t, _ = make_rows(n=150)
    y = torch.full((150,), IGN)
    for kind in ("dkd", "kd"):
        for reduction in ("none", "sum", "batchmean"):
            loss, grad = run(backend, kind, s, t, y, reduction, pssm_config("reference"))
            assert torch.equal(loss, torch.zeros_like(loss))
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked(backend):
    """Teacher always wrong and dissimilar -> reference Ω = 0 everywhere -> loss 0, grad 0."""
    s, t, _ = make_rows(n=150, similar_every=10 ** 9, ignore_every=0)
    t = -s + 0.01 * t   # cos ~ -1, far below τ
    y = (t.argmax(-1) + 1) % 20  # never the teacher's argmax
    loss, grad = run(backend, "dkd", s, t, y, "batchmean", pssm_config("reference"))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    loss_nomask, _ = run(backend, "dkd", s, t, y, "batchmean", None)
    assert loss_nomask.item() > 1.0  # the same rows without PSSM do carry a loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_classes_nckd_is_zero(backend):
    s, t, y = make_rows(n=200, c=2)
    a, ga = run(backend, "dkd", s, t, y, "none", pssm_config("reference"), beta=8.0)
    b, gb = run(backend, "dkd", s, t, y, "none", pssm_config("reference"), beta=0.0)
    want, want_g, _ = run64("dkd", s, t, y, "none", pssm_config("reference"))
    assert torch.isfinite(a).all() and torch.isfinite(ga).all()
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert_close(a, want)
    assert_close(ga, want_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 7, 32, 33])
def test_class_counts(backend, c):
    s, t, y = make_rows(n=140, c=c)
    for kind in ("dkd", "kd"):
        loss, grad = run(backend, kind, s, t, y, "batchmean", pssm_config("paper"))
        want, want_g, _ = run64(kind, s, t, y, "batchmean", pssm_config("paper"))
        assert_close(loss, want)
        assert_close(grad, want_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    s, t, y = make_rows(n=200, dtype=dtype)
    for cfg in (pssm_config("reference"), pssm_config("paper")):
        loss, grad = run(backend, "dkd", s, t, y, "none", cfg)
        want, want_g, _ = run64("dkd", s, t, y, "none", cfg)  # on the same rounded inputs
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert_close(loss, want, rtol=1e-4, atol_scale=1e-5)   # float32 math
        eps = torch.finfo(dtype).eps
        assert_close(grad, want_g, rtol=2 * eps, atol_scale=eps)  # stored in the input dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_and_undetached_omega(backend):
    s, t, y = make_rows(n=200)
    w = torch.rand(200, generator=torch.Generator().manual_seed(3)) + 0.5
    dev = device_for(backend)
    # gradient w.r.t. a per-row weight
    w1 = w.clone().to(dev).requires_grad_()
    s1 = s.clone().to(dev).requires_grad_()
    loss = dispatch.distill_loss("dkd", s1, t.to(dev), y.to(dev), 1.0, 8.0, 4.0, "batchmean", IGN, w1,
                                 pssm_config("reference"), backend=backend)
    loss.backward()
    loss, w1, s1 = loss.cpu(), w1.cpu(), s1.cpu()
    w2 = w.double().requires_grad_()
    s2 = s.double().requires_grad_()
    want, _, _ = loss64("dkd", s2, t.double(), y, ignore_index=IGN, pssm=pssm_config("reference"), weight=w2)
    want.backward()
    assert_close(loss.detach(), want.detach())
    assert_close(w1.grad, w2.grad)
    assert_close(s1.grad, s2.grad)
    # Ω not detached (authors' code): its gradient reaches the student through d. Rows with
    # cos ≈ 0.9987 (above τ = 0.996, where ∂d/∂s is not ~0 as it is at cos = 1)
    noise = torch.randn(s.shape, generator=torch.Generator().manual_seed(4))
    t = t.clone()
    t[::3] = s[::3] + 0.05 * noise[::3] * s[::3].norm(dim=-1, keepdim=True) / 20 ** 0.5
    cfg = pssm_config("reference", detach=False)
    s3 = s.clone().to(dev).requires_grad_()
    dispatch.distill_loss("dkd", s3, t.to(dev), y.to(dev), 1.0, 8.0, 4.0, "sum", IGN, None, cfg,
                          backend=backend).backward()
    s4 = s.clone().requires_grad_()
    dispatch.distill_loss("dkd", s4, t, y, 1.0, 8.0, 4.0, "sum", IGN, None, cfg, backend="reference").backward()
    s5 = s.clone().requires_grad_()
    dispatch.distill_loss("dkd", s5, t, y, 1.0, 8.0, 4.0, "sum", IGN, None, pssm_config("reference"),
                          backend="reference").backward()
    assert_close(s3.grad.cpu(), s4.grad)
    assert (s4.grad - s5.grad).abs().max() > 1e-4  # the Ω gradient is really there


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_public_functions(backend):
    s, t, y = make_rows(n=240)
    s3, t3, y3 = s.view(2, 120, 20), t.view(2, 120, 20), y.view(2, 120)
    on = lambda *xs: [x.to(device_for(backend)) for x in xs]  # noqa: E731
    cfg = pssm_config("reference")
    a = pssm_dkd_loss(*on(s3, t3, y3), reduction="none", ignore_index=IGN, pssm=cfg, backend=backend).cpu()
    assert a.shape == (2, 120)
    b = pssm_dkd_loss(s3, t3, y3, reduction="none", ignore_index=IGN, pssm=cfg, backend="reference")
    assert_close(a, b)
    c = dispatch.distill_loss("dkd", *on(s3, t3, y3), 1.0, 8.0, 4.0, "batchmean", IGN, backend=backend).cpu()
    d = dkd_loss_torch(s3, t3, y3, 1.0, 8.0, 4.0, "batchmean", IGN)
    assert_close(c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_grad_teacher_fall_back(backend):
    s, t, y = on_kernel_device(*make_rows(n=64)) if backend == "triton" else make_rows(n=64)
    s64, t64 = s.double().requires_grad_(), t.double()
    out = pssm_dkd_loss(s64, t64, y, reduction="batchmean", ignore_index=IGN, backend=backend)
    assert out.dtype == torch.float64
    out.backward()
    s_ref = s.double().requires_grad_()
    want, _, _ = loss64("dkd", s_ref, t64, y, ignore_index=IGN, pssm=pssm_config("reference"))
    want.backward()
    torch.testing.assert_close(out.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s64.grad, s_ref.grad, rtol=1e-10, atol=1e-12)
    # a teacher that requires grad gets its gradient (autograd reference path)
    tt = t.clone().requires_grad_()
    dispatch.distill_loss("dkd", s, tt, y, ignore_index=IGN, backend=backend).backward()
    assert tt.grad is not None and tt.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- dispatch
def test_backend_selection(monkeypatch):
    s, t, _ = make_rows(n=8)
    assert dispatch.select_backend(s, t) == "torch"             # auto on CPU
    monkeypatch.setenv(dispatch.ENV_VAR, "compile")
    assert dispatch.select_backend(s, t) == "compile"           # env var
    with dispatch.loss_backend("torch"):
        assert dispatch.select_backend(s, t) == "torch"         # scoped override beats env
    assert dispatch.select_backend(s, t, backend="reference") == "reference"  # argument beats all
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="loss backend must be one of"):
        dispatch.select_backend(s, t)
    monkeypatch.delenv(dispatch.ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="forced but cannot run"):
        dispatch.select_backend(s, t, backend="triton")
    if tk.HAVE_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.select_backend(s, t, backend="triton") == "triton"
        assert dispatch.select_backend(s.double(), t.double(), backend="triton") == "torch"


def test_distiller_loss_backend_option():
    from pcseg_kd.distill import DKDPSSM
    s, t, y = make_rows(n=100)
    a = DKDPSSM(ignore_index=IGN, loss_backend="torch")(s, t, y)["loss_kd"]
    b = DKDPSSM(ignore_index=IGN, loss_backend="reference")(s, t, y)["loss_kd"]
    assert_close(a, b)
    with pytest.raises(ValueError):
        dispatch.distill_loss("dkd", s, t, y, backend="gpu")


def test_no_atomics_in_kernel():
    """The reduction is per-program partial sums summed by torch: bitwise reproducible."""
    import inspect
    src = inspect.getsource(tk)
    assert "atomic" not in src.replace("no atomics", "")


def test_compile_backend_matches_and_does_not_recompile():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    cfg = pssm_config("reference")
    for n in (300, 517):
        s, t, y = make_rows(n=n)
        loss, grad = run("compile", "dkd", s, t, y, "batchmean", cfg)
        want, want_g, _ = run64("dkd", s, t, y, "batchmean", cfg)
        assert_close(loss, want)
        assert_close(grad, want_g)
    frames = counters["stats"]["unique_graphs"]
    # one forward graph and one backward graph; a new N must not add graphs
    assert frames <= 2, dict(counters["stats"])


# ----------------------------------------------------------------------------- distillers
DISTILLER_CASES = [  # (config, kind, kd_apply, pssm, normalize)
    ({"type": "kd"}, "kd", "weight", None, "batch"),
    ({"type": "kd_pssm"}, "kd", "logit_scale", pssm_config("reference"), "batch"),
    ({"type": "kd_pssm", "apply": "weight", "normalize": "kept", "pssm": {"gate": "student"}},
     "kd", "weight", pssm_config("reference", gate="student"), "kept"),
    ({"type": "kd_pssm", "pssm": {"preset": "paper"}}, "kd", "logit_scale", pssm_config("paper"), "batch"),
    ({"type": "dkd"}, "dkd", "weight", None, "batch"),
    ({"type": "dkd_pssm"}, "dkd", "weight", pssm_config("reference"), "batch"),
    ({"type": "dkd_pssm", "normalize": "kept", "pssm": {"gate": "both", "space": "probs", "temperature": 2.0}},
     "dkd", "weight", pssm_config("reference", gate="both", space="probs", temperature=2.0), "kept"),
]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch", "reference"])
@pytest.mark.parametrize("case", DISTILLER_CASES, ids=lambda c: "-".join(f"{v}" for v in c[0].values()))
def test_distillers_match_float64_on_every_backend(case, backend):
    """A distiller's loss_kd over [2, N, C] (two seeds side by side, ignored rows) and its
    student gradient, on each backend, against the float64 formula reduced per seed."""
    cfg, kind, kd_apply, pssm, normalize = case
    rows = [make_rows(n=150, seed=k) for k in (0, 1)]
    s, t, y = (torch.stack([r[i] for r in rows]) for i in range(3))
    dev = device_for(backend)
    s_dev = s.to(dev).requires_grad_()
    dist = pcseg_kd_build({**cfg, "ignore_index": IGN, "temperature": 2.0, "loss_backend": backend})
    loss = dist(s_dev, t.to(dev), y.to(dev))["loss_kd"]
    assert loss.shape == (2,)
    g = torch.tensor([0.7, -1.3])
    (loss * g.to(dev)).sum().backward()
    loss, grad = loss.detach().cpu(), s_dev.grad.cpu()

    s64 = s.detach().double().requires_grad_()
    per_row, om, _ = loss64(kind, s64, t.double(), y, temperature=2.0, reduction="none", ignore_index=IGN,
                            pssm=pssm, kd_apply=kd_apply)
    valid = y != IGN
    count = valid.sum(-1) if normalize == "batch" else ((om > 0) & valid).sum(-1)
    want = per_row.sum(-1) / count.clamp_min(1)
    (want * g.double()).sum().backward()
    if pssm is not None:  # PSSM changes some rows and keeps others whole
        assert (om[valid] < 1).any() and (om[valid] == 1).any()
    if normalize == "kept":
        assert (count < valid.sum(-1)).all()  # the two normalisations differ here
    assert_close(loss, want.detach())
    assert_close(grad, s64.grad)


def pcseg_kd_build(cfg):
    import pcseg_kd.distill  # noqa: F401
    from pcseg_kd.registry import DISTILLERS
    return DISTILLERS.build(cfg)


def test_distiller_unknown_backend_fails_at_build():
    for name in ("kd", "kd_pssm", "dkd", "dkd_pssm"):
        with pytest.raises(ValueError, match="loss backend must be one of"):
            pcseg_kd_build({"type": name, "loss_backend": "cuda"})
