"""kd_loss, dkd_loss and pssm_weights against independent float64 formulas, gradients,
edge cases and golden values."""
import math

import pytest
import torch

from pcseg_kd.distill import dkd_loss, kd_loss, pssm_weights

torch.set_default_dtype(torch.float32)


def make_logits(n, c, scale=3.0, phase=0.0, dtype=torch.float64):
    # deterministic, RNG-free inputs for golden values
    k = torch.arange(n * c, dtype=torch.float64).reshape(n, c)
    return (torch.sin(k * 0.37 + phase) * scale + torch.cos(k * 0.11 + 2 * phase)).to(dtype)


def rand_case(n=64, c=7, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


# ------------------------------------------------------------------ independent references
def ref_kd_rows(s, t, T):
    s, t = s.double() / T, t.double() / T
    p_t = torch.softmax(t, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s, 1))).sum(1) * T * T


def ref_dkd_rows(s, t, y, alpha, beta, T):
    """mdistiller's formula, written out in float64 (exact for moderate logits)."""
    s, t = s.double(), t.double()
    gt = torch.nn.functional.one_hot(y, s.shape[1]).double()
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (torch.log(bt) - torch.log(bs))).sum(1)
    qt = torch.softmax(t / T - 1000.0 * gt, 1)
    log_qs = torch.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = torch.where(gt.bool(), torch.zeros_like(qt), qt * (torch.log(qt) - log_qs)).sum(1)
    return (alpha * tckd + beta * nckd) * T * T


def ref_pssm_reference(s, t, y):
    """The authors' pd_diff: teacher gate, cos >= 0.996 on raw logits, else 0."""
    omega = []
    for si, ti, yi in zip(s.double(), t.double(), y):
        if int(ti.argmax()) == int(yi):
            omega.append(1.0)
            continue
        cos = float(si @ ti / (si.norm() * ti.norm()))
        omega.append((cos + 1) / 2 if cos >= 0.996 else 0.0)
    return torch.tensor(omega, dtype=torch.float64)


# ------------------------------------------------------------------ KD
@pytest.mark.parametrize("T", [1.0, 0.7, 4.0])
def test_kd_matches_reference(T):
    s, t, _ = rand_case()
    ref = ref_kd_rows(s, t, T)
    torch.testing.assert_close(kd_loss(s, t, T, reduction="none"), ref)
    torch.testing.assert_close(kd_loss(s, t, T, reduction="sum"), ref.sum())
    torch.testing.assert_close(kd_loss(s, t, T), ref.mean())
    torch.testing.assert_close(kd_loss(s, t, T, scale_by_t2=False), ref.mean() / T ** 2)


def test_kd_batchmean_is_not_elementwise_mean():
    s, t, _ = rand_case(n=8, c=5)
    torch_mean = torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.softmax(t, 1), reduction="mean")
    assert not math.isclose(float(kd_loss(s, t)), float(torch_mean), rel_tol=1e-3)
    torch.testing.assert_close(kd_loss(s, t) / 5, torch_mean)


def test_kd_weight_and_logit_scale():
    s, t, _ = rand_case(n=16, c=4)
    w = torch.linspace(0, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(kd_loss(s, t, 2.0, reduction="none", weight=w), ref_kd_rows(s, t, 2.0) * w)
    scaled = kd_loss(s, t, 2.0, reduction="none", logit_scale=w)
    torch.testing.assert_close(scaled, ref_kd_rows(s * w[:, None], t * w[:, None], 2.0))
    assert scaled[0] == 0  # Ω = 0 makes both distributions uniform


def test_kd_gradcheck():
    s, t, _ = rand_case(n=6, c=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 2.0), (s,))


# ------------------------------------------------------------------ DKD
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 1.0, 0.7), (16.0, 1.0, 0.7), (0.0, 2.0, 1.0)])
def test_dkd_matches_mdistiller_formula(alpha, beta, T):
    s, t, y = rand_case(n=50, c=9, seed=1)
    ref = ref_dkd_rows(s, t, y, alpha, beta, T)
    torch.testing.assert_close(dkd_loss(s, t, y, alpha, beta, T, reduction="none"), ref)
    torch.testing.assert_close(dkd_loss(s, t, y, alpha, beta, T), ref.mean())


def test_dkd_ignore_index_rows_give_zero_and_are_not_counted():
    s, t, y = rand_case(n=40, c=6, seed=2)
    y = y.clone()
    y[::3] = 255
    keep = y != 255
    rows = dkd_loss(s, t, y, 1.0, 8.0, 4.0, reduction="none", ignore_index=255)
    assert torch.all(rows[~keep] == 0)
    torch.testing.assert_close(rows[keep], ref_dkd_rows(s[keep], t[keep], y[keep], 1.0, 8.0, 4.0))
    torch.testing.assert_close(dkd_loss(s, t, y, ignore_index=255), rows[keep].mean())


def test_dkd_all_rows_ignored_is_zero_not_nan():
    s, t, _ = rand_case(n=5, c=4)
    y = torch.full((5,), -1)
    s.requires_grad_(True)
    out = dkd_loss(s, t, y, ignore_index=-1)
    out.backward()
    assert out == 0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_dkd_binary_nckd_is_zero():
    s, t, y = rand_case(n=30, c=2, seed=3)
    s.requires_grad_(True)
    nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, reduction="none")
    assert torch.all(nckd == 0)
    full = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    full.backward()
    torch.testing.assert_close(full, ref_dkd_rows(s.detach(), t, y, 1.0, 0.0, 4.0).mean())
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_dkd_huge_logits_and_confident_rows_are_finite(scale):
    s, t, y = rand_case(n=32, c=5, seed=4, dtype=torch.float32)
    s = (s.sign() * scale).requires_grad_(True)          # p_gt -> 0 or 1 exactly in float32
    t = t.sign() * scale
    out = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    out.backward()
    assert torch.isfinite(out) and out >= 0
    assert torch.isfinite(s.grad).all()


def test_dkd_confident_student_matches_log_space_reference():
    # student certain of the target: mdistiller's log(1 - p_gt) underflows in float32
    n, c = 16, 6
    y = torch.arange(n) % c
    s = torch.zeros(n, c)
    s[torch.arange(n), y] = 120.0
    t = make_logits(n, c, dtype=torch.float32)
    out = dkd_loss(s, t, y, 1.0, 8.0, 1.0, reduction="none")
    # float64 reference through logsumexp (independent of the implementation's masking)
    s64, t64 = s.double(), t.double()
    gt = torch.nn.functional.one_hot(y, c).bool()
    lse_s, lse_t = torch.logsumexp(s64, 1), torch.logsumexp(t64, 1)
    lnt_s = torch.logsumexp(s64.masked_fill(gt, -math.inf), 1)
    lnt_t = torch.logsumexp(t64.masked_fill(gt, -math.inf), 1)
    ls_b = torch.stack([s64[gt] - lse_s, lnt_s - lse_s], 1)
    lt_b = torch.stack([t64[gt] - lse_t, lnt_t - lse_t], 1)
    tckd = (lt_b.exp() * (lt_b - ls_b)).sum(1)
    q_t = torch.softmax(t64.masked_fill(gt, -math.inf), 1)
    lq_s = torch.log_softmax(s64.masked_fill(gt, -1e30), 1)
    lq_t = torch.log_softmax(t64.masked_fill(gt, -1e30), 1)
    nckd = (q_t * (lq_t - lq_s)).masked_fill(gt, 0).sum(1)
    torch.testing.assert_close(out.double(), tckd + 8 * nckd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dkd_half_precision_inputs_compute_in_float32(dtype):
    s, t, y = rand_case(n=40, c=20, seed=5, dtype=dtype)
    out = dkd_loss(s, t, y, 1.0, 8.0, 4.0, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_dkd_rows(s.double(), t.double(), y, 1.0, 8.0, 4.0),
                               rtol=1e-4, atol=1e-5)
    s = s.clone().requires_grad_(True)
    dkd_loss(s, t, y).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_dkd_gradcheck_with_ignore_and_weight():
    s, t, y = rand_case(n=8, c=5, seed=6)
    y[1] = 255
    w = torch.linspace(0.1, 1, 8, dtype=torch.float64)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, t, y, 1.0, 8.0, 2.0, ignore_index=255, weight=w), (s,))


def test_dkd_leading_dims_are_independent_rows():
    s, t, y = rand_case(n=24, c=5, seed=7)
    rows = dkd_loss(s, t, y, reduction="none")
    torch.testing.assert_close(dkd_loss(s.view(3, 8, 5), t.view(3, 8, 5), y.view(3, 8), reduction="none"),
                               rows.view(3, 8))


def test_dkd_bad_shapes_raise():
    s, t, y = rand_case(n=4, c=3)
    with pytest.raises(ValueError, match="differ in shape"):
        dkd_loss(s, t[:, :2], y)
    with pytest.raises(ValueError, match="target shape"):
        dkd_loss(s, t, y[:3])
    with pytest.raises(ValueError, match="reduction"):
        dkd_loss(s, t, y, reduction="mean")


# ------------------------------------------------------------------ PSSM
def test_pssm_reference_preset_matches_authors_rule():
    # build rows where teacher is wrong and student is close to the teacher, so both branches occur
    s, t, y = rand_case(n=200, c=4, seed=8)
    s = torch.where(torch.arange(200)[:, None] % 2 == 0, t + 0.02 * s, s)
    ref = ref_pssm_reference(s, t, y)
    assert (ref == 1).any() and (ref == 0).any() and ((ref > 0) & (ref < 1)).any()
    torch.testing.assert_close(pssm_weights(s, t, y), ref)


def test_pssm_paper_preset_eq_5_to_8():
    s, t, y = rand_case(n=100, c=5, seed=9)
    s = torch.where(torch.arange(100)[:, None] % 2 == 0, t + 0.01 * s, s)
    ps, pt = torch.softmax(s, 1), torch.softmax(t, 1)
    d = 0.5 * (torch.nn.functional.cosine_similarity(pt, ps, dim=1) + 1)
    mask = torch.where(d < 0.998, torch.ones_like(d), d)
    expected = torch.where(s.argmax(1) == y, torch.ones_like(d), mask)
    torch.testing.assert_close(pssm_weights(s, t, y, preset="paper"), expected)


def test_pssm_knobs():
    s, t, y = rand_case(n=100, c=5, seed=10)
    s = torch.where(torch.arange(100)[:, None] % 2 == 0, t + 0.01 * s, s)
    base = pssm_weights(s, t, y)
    keep = pssm_weights(s, t, y, below=1.0)
    assert torch.all(keep >= base) and torch.all(keep[base == 0] == 1)
    ones = pssm_weights(s, t, y, above="1")
    assert set(ones.unique().tolist()) <= {0.0, 1.0}
    both = pssm_weights(s, t, y, gate="both")
    teacher_right = t.argmax(1) == y
    student_right = s.argmax(1) == y
    assert torch.all(both[teacher_right & student_right] == 1)
    d_scale = pssm_weights(s, t, y, tau=0.998, tau_scale="d")
    torch.testing.assert_close(d_scale, base)  # cos >= 0.996  <=>  d >= 0.998
    y_ign = y.clone()
    y_ign[:10] = 255
    assert torch.all(pssm_weights(s, t, y_ign, ignore_index=255)[:10] == 0)
    with pytest.raises(ValueError, match="gate"):
        pssm_weights(s, t, y, gate="nobody")
    with pytest.raises(ValueError, match="unknown PSSM option"):
        pssm_weights(s, t, y, tua=0.5)


def test_pssm_tau_scale_distinguishes_cos_from_d():
    # a wrong teacher whose output has cos = 0.997 with the student's: d = 0.9985
    theta = math.acos(0.997)
    t = torch.tensor([[3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = 3.0 * torch.tensor([[math.cos(theta), math.sin(theta), 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2])
    on_cos = pssm_weights(s, t, y, tau=0.998, tau_scale="cos")   # 0.997 < 0.998: below -> 0
    on_d = pssm_weights(s, t, y, tau=0.998, tau_scale="d")       # 0.9985 >= 0.998: d
    assert on_cos.item() == 0.0
    assert on_d.item() == pytest.approx(0.9985, abs=1e-9)


def test_pssm_detach_controls_gradient():
    s, t, y = rand_case(n=64, c=4, seed=11)
    s = (t + 0.01 * s).requires_grad_(True)
    wrong = t.argmax(1) != y
    assert wrong.any()
    assert not pssm_weights(s, t, y).requires_grad  # detached by default
    pssm_weights(s, t, y, detach=False).sum().backward()
    assert s.grad is not None and s.grad[wrong].abs().sum() > 0


# ------------------------------------------------------------------ golden values
GOLDEN_KD_T4 = 0.8207437736839411
GOLDEN_DKD_1_8_4 = 6.574519693913366
GOLDEN_DKD_16_1_07 = 2.589666483545825
GOLDEN_PSSM = 11.224565815915243


def golden_inputs():
    s = make_logits(12, 5, phase=0.0)
    t = make_logits(12, 5, phase=1.3)
    y = torch.arange(12) % 5
    return s, t, y


def test_golden_values():
    s, t, y = golden_inputs()
    got = {
        "kd_T4": float(kd_loss(s, t, 4.0)),
        "dkd_1_8_4": float(dkd_loss(s, t, y, 1.0, 8.0, 4.0)),
        "dkd_16_1_07": float(dkd_loss(s, t, y, 16.0, 1.0, 0.7)),
        "pssm_ref_sum": float(pssm_weights(s, t, y, below=1.0, tau=0.5).sum()),
    }
    # values of the float64 reference formulas above, pinned so that any change shows
    expected = {"kd_T4": GOLDEN_KD_T4, "dkd_1_8_4": GOLDEN_DKD_1_8_4, "dkd_16_1_07": GOLDEN_DKD_16_1_07,
                "pssm_ref_sum": GOLDEN_PSSM}
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-10, abs=1e-12), k
    assert got["kd_T4"] == pytest.approx(float(ref_kd_rows(s, t, 4.0).mean()), rel=1e-12)
    assert got["dkd_1_8_4"] == pytest.approx(float(ref_dkd_rows(s, t, y, 1.0, 8.0, 4.0).mean()), rel=1e-12)
