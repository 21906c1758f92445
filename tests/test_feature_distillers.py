"""Feature distillers (FitNet, RKD, PKT, SP, CRD) against independent float64 formulas
written here with numpy loops, plus gradients, batches of one, different widths,
per-seed independence and CRD's memory banks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcseg_kd.config import accepted_params
from pcseg_kd.distill.feature import (CRD, FitNet, crd_loss, fitnet_loss, momentum_update, pkt_loss,
                                      rkd_loss, sp_loss, triplet_angles)
from pcseg_kd.registry import DISTILLERS

FEATURE_METHODS = ["fitnet", "rkd", "pkt", "sp", "crd"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- references
def smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d * d, d - 0.5)


def ref_rkd(fs, ft, wd=25.0, wa=50.0):
    n = fs.shape[0]

    def dist(f):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.linalg.norm(f[i] - f[j])
        mean = d.sum() / (n * (n - 1)) if n > 1 else 0.0
        return d / mean if mean > 0 else d

    def angles(f):
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j == i or k == i:
                        continue
                    u, v = f[j] - f[i], f[k] - f[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:  # zero-length differences (duplicate rows): 0, as F.normalize
                        a[i, j, k] = u @ v / (nu * nv)
        return a

    return wd * smooth_l1(dist(fs), dist(ft)).mean() + wa * smooth_l1(angles(fs), angles(ft)).mean()


def ref_pkt(fs, ft, eps=1e-7):
    def dist(f):
        u = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        s = (u @ u.T + 1) / 2
        return s / s.sum(1, keepdims=True)

    ps, pt = dist(fs), dist(ft)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def ref_sp(fs, ft):
    def gram(f):
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    n = fs.shape[0]
    return ((gram(ft) - gram(fs)) ** 2).sum() / (n * n)


def ref_nce(scores, n_data, eps=1e-7):
    """scores [N, K+1], column 0 positive; mean over rows of -(log D1 + Σ log D0)."""
    k = scores.shape[1] - 1
    pn = k / n_data
    total = 0.0
    for row in scores:
        total -= math.log(row[0] / (row[0] + pn + eps))
        for q in row[1:]:
            total -= math.log(pn / (q + pn + eps))
    return total / scores.shape[0]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- plain losses
@pytest.mark.parametrize("n", [1, 2, 6])
def test_rkd_matches_reference(n):
    fs, ft = rand(n, 5, seed=1), rand(n, 3, seed=2)  # different widths
    got = rkd_loss(fs, ft).item()
    assert math.isfinite(got)
    assert got == pytest.approx(ref_rkd(fs.numpy(), ft.numpy()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_pkt_matches_reference(n):
    fs, ft = rand(n, 5, seed=3), rand(n, 8, seed=4)
    assert pkt_loss(fs, ft).item() == pytest.approx(ref_pkt(fs.numpy(), ft.numpy()), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_sp_matches_reference(n):
    fs, ft = rand(n, 5, seed=5), rand(n, 8, seed=6)
    assert sp_loss(fs, ft).item() == pytest.approx(ref_sp(fs.numpy(), ft.numpy()), rel=1e-9, abs=1e-14)


def test_fitnet_loss_is_mse():
    a, b = rand(4, 3, seed=7), rand(4, 3, seed=8)
    assert fitnet_loss(a, b).item() == pytest.approx(((a.numpy() - b.numpy()) ** 2).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        fitnet_loss(a, rand(4, 5))


def test_relational_losses_are_not_trivially_zero():
    """Guards against references and implementations that agree because both return 0."""
    fs, ft = rand(6, 5, seed=9), rand(6, 3, seed=10)
    for fn in (rkd_loss, pkt_loss, sp_loss):
        assert fn(fs, ft).item() > 1e-6
        assert fn(ft[:, :3], ft).item() == pytest.approx(0.0, abs=1e-12)  # identical features: 0


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss, sp_loss, lambda s, t: fitnet_loss(s, t[..., :4])])
def test_gradcheck_float64(fn):
    fs = rand(5, 4, seed=11).requires_grad_(True)
    ft = rand(5, 6, seed=12)
    assert torch.autograd.gradcheck(lambda x: fn(x, ft), (fs,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss, sp_loss])
def test_leading_dims_are_independent_models(fn):
    fs, ft = rand(3, 6, 5, seed=13), rand(3, 6, 2, seed=14)
    batched = fn(fs, ft)
    assert batched.shape == (3,)
    for s in range(3):
        assert batched[s].item() == pytest.approx(fn(fs[s], ft[s]).item(), rel=1e-12)


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss, sp_loss])
def test_invalid_rows_are_dropped(fn):
    fs, ft = rand(7, 5, seed=15), rand(7, 3, seed=16)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert fn(fs, ft, valid=valid).item() == pytest.approx(fn(fs[valid], ft[valid]).item(), rel=1e-10)


def test_rkd_duplicate_samples_have_finite_gradients():
    fs = rand(4, 3, seed=17)
    fs[1] = fs[0]  # zero-length difference off the diagonal
    fs.requires_grad_(True)
    rkd_loss(fs, rand(4, 5, seed=18)).backward()
    assert torch.isfinite(fs.grad).all()


# ----------------------------------------------------------------------------- CRD
def test_crd_loss_matches_reference():
    n, k, d, n_data, T = 4, 5, 6, 20, 0.07
    e_s, e_t = torch.tensor(unit(rand(n, d, seed=19).numpy())), torch.tensor(unit(rand(n, d, seed=20).numpy()))
    rows_s = torch.tensor(unit(rand(n, k + 1, d, seed=21).numpy()))
    rows_t = torch.tensor(unit(rand(n, k + 1, d, seed=22).numpy()))
    z_s, z_t = 3.0, 5.0
    got = crd_loss(e_s, e_t, rows_s, rows_t, torch.tensor(z_s, dtype=torch.float64),
                   torch.tensor(z_t, dtype=torch.float64), T, n_data).mean().item()
    es, et, rs, rt = e_s.numpy(), e_t.numpy(), rows_s.numpy(), rows_t.numpy()
    out_s = np.array([[math.exp(rt[i, j] @ es[i] / T) / z_s for j in range(k + 1)] for i in range(n)])
    out_t = np.array([[math.exp(rs[i, j] @ et[i] / T) / z_t for j in range(k + 1)] for i in range(n)])
    assert got == pytest.approx(ref_nce(out_s, n_data) + ref_nce(out_t, n_data), rel=1e-10)


def test_crd_loss_gradcheck():
    n, k, d = 3, 4, 5
    e_s = torch.tensor(unit(rand(n, d, seed=23).numpy()), requires_grad=True)
    e_t = torch.tensor(unit(rand(n, d, seed=24).numpy()), requires_grad=True)
    rows_s, rows_t = rand(n, k + 1, d, seed=25) * 0.3, rand(n, k + 1, d, seed=26) * 0.3
    z = torch.tensor(2.0, dtype=torch.float64)
    fn = lambda a, b: crd_loss(a, b, rows_s, rows_t, z, z, 0.5, 50).sum()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (e_s, e_t), eps=1e-6, atol=1e-5)


def test_momentum_update_rule():
    bank = torch.tensor(unit(rand(2, 10, 4, seed=27).numpy()))
    before = bank.clone()
    index = torch.tensor([[3, 7], [0, 3]])
    embed = torch.tensor(unit(rand(2, 2, 4, seed=28).numpy()))
    momentum_update(bank, index, embed, 0.5, keep=torch.tensor([[True, True], [True, False]]))
    for s in range(2):
        for r in range(10):
            hit = [c for c in range(2) if index[s, c] == r and not (s == 1 and c == 1)]
            if hit:
                c = hit[0]
                want = unit(0.5 * before[s, r].numpy() + 0.5 * embed[s, c].numpy())
                np.testing.assert_allclose(bank[s, r].numpy(), want, rtol=1e-12)
            else:  # untouched rows, including the row whose update was masked out
                np.testing.assert_array_equal(bank[s, r].numpy(), before[s, r].numpy())


def make_crd(num_models=2, n_data=30, ds=6, dt=4, k=8):
    crd = CRD(feat_dim=5, num_negatives=k, seed=3)
    crd.build_modules(ds, dt, num_models=num_models, num_samples=n_data, num_classes=10)
    return crd


def test_crd_banks_and_normalisers_update_during_training():
    crd = make_crd()
    S, N = 2, 4
    fs, ft = rand(S, N, 6, seed=29).float(), rand(S, N, 4, seed=30).float()
    index = torch.tensor([[0, 5, 9, 29], [1, 2, 3, 4]])
    logits, target = torch.zeros(S, N, 10), torch.zeros(S, N, dtype=torch.long)
    bank_s, bank_t = crd.bank_s.clone(), crd.bank_t.clone()
    assert (crd.z_s < 0).all()
    crd.train()
    loss = crd(logits, logits, target, student_feats=fs, teacher_feats=ft, index=index)["loss_kd"]
    assert loss.shape == (S,) and torch.isfinite(loss).all()
    z_s = crd.z_s.clone()
    assert (z_s > 0).all()
    with torch.no_grad():
        e_s = crd.embed_s(fs)
        e_s = e_s / e_s.norm(dim=-1, keepdim=True)
    for s in range(S):
        touched = set(index[s].tolist())
        for r in range(30):
            if r in touched:
                c = index[s].tolist().index(r)
                want = unit(0.5 * bank_s[s, r].numpy() + 0.5 * e_s[s, c].numpy())
                np.testing.assert_allclose(crd.bank_s[s, r].numpy(), want, rtol=1e-5, atol=1e-6)
                assert not torch.equal(crd.bank_t[s, r], bank_t[s, r])
            else:
                assert torch.equal(crd.bank_s[s, r], bank_s[s, r])
                assert torch.equal(crd.bank_t[s, r], bank_t[s, r])
    crd(logits, logits, target, student_feats=fs, teacher_feats=ft, index=index)
    assert torch.equal(crd.z_s, z_s)  # Z is fixed after the first batch
    crd.eval()
    banks = crd.bank_s.clone()
    crd(logits, logits, target, student_feats=fs, teacher_feats=ft, index=index)
    assert torch.equal(crd.bank_s, banks)  # no bank update outside training


def test_crd_seeds_do_not_share_banks():
    S, N = 2, 4
    fs, ft = rand(S, N, 6, seed=31).float(), rand(S, N, 4, seed=32).float()
    fs2 = fs.clone()
    fs2[1] += 3.0  # change model 1's features only
    index = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    logits, target = torch.zeros(S, N, 10), torch.zeros(S, N, dtype=torch.long)
    out = []
    for f in (fs, fs2):
        torch.manual_seed(0)
        crd = make_crd()
        loss = crd(logits, logits, target, student_feats=f, teacher_feats=ft, index=index)["loss_kd"]
        out.append((loss.detach(), crd.bank_s.clone()))
    assert out[0][0][0] == out[1][0][0] and torch.equal(out[0][1][0], out[1][1][0])
    assert out[0][0][1] != out[1][0][1]


def test_crd_needs_indices_and_sample_count():
    with pytest.raises(ValueError, match="number of training samples"):
        CRD().build_modules(4, 4, 1, num_samples=0)
    crd = make_crd(num_models=1)
    with pytest.raises(ValueError, match="index"):
        crd(torch.zeros(3, 10), torch.zeros(3, 10), torch.zeros(3, dtype=torch.long),
            student_feats=torch.randn(3, 6), teacher_feats=torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="out of range"):  # device-side assert (raises at once on CPU)
        crd(torch.zeros(3, 10), torch.zeros(3, 10), torch.zeros(3, dtype=torch.long),
            student_feats=torch.randn(3, 6), teacher_feats=torch.randn(3, 4), index=torch.tensor([0, 1, 30]))


# ----------------------------------------------------------------------------- distillers
def build(name, ds, dt, num_models, n_data=40):
    dist = DISTILLERS.build({"type": name, **({"num_negatives": 16, "feat_dim": 8} if name == "crd" else {})})
    dist.build_modules(ds, dt, num_models=num_models, num_samples=n_data, num_classes=10)
    return dist


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FEATURE_METHODS)
@pytest.mark.parametrize("leading", [(), (3,)])
@pytest.mark.parametrize("n", [1, 5])
def test_distiller_trains_on_device(name, leading, n, device):
    """Batch of 1 and of 5, with and without a leading seed dim, widths 7 vs 4: finite loss,
    finite gradients for the student and the distiller's own parameters, none for the teacher."""
    torch.manual_seed(0)
    S = leading[0] if leading else 1
    dist = build(name, 7, 4, S).to(device)
    fs = torch.randn(*leading, n, 7, device=device, requires_grad=True)
    ft = torch.randn(*leading, n, 4, device=device, requires_grad=True)
    logits = torch.randn(*leading, n, 10, device=device, requires_grad=True)
    target = torch.randint(0, 10, (*leading, n), device=device)
    index = torch.randperm(40, device=device)[:n].expand(*leading, n)
    losses = dist(logits, logits.detach() + 1, target, epoch=1, student_feats=fs, teacher_feats=ft, index=index)
    assert losses["loss_kd"].shape == leading
    total = sum(v.sum() for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all()
    assert ft.grad is None  # the teacher's features are detached inside the distiller
    for p in dist.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", ["fitnet", "crd"])
def test_trainable_parts_are_per_model_and_reach_the_optimizer(name):
    dist = build(name, 7, 4, 3)
    params = list(dist.parameters())
    assert params and all(p.shape[0] == 3 for p in params)
    opt = torch.optim.SGD(dist.parameters(), lr=0.1)
    fs, ft = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    fs2 = fs.clone()
    fs2[2] += 1.0
    before = [p.detach().clone() for p in params]
    logits, target = torch.randn(3, 5, 10), torch.randint(0, 10, (3, 5))
    loss = dist(logits, logits, target, student_feats=fs2, teacher_feats=ft, index=torch.arange(5).expand(3, 5))
    opt.zero_grad()
    loss["loss_kd"][0].backward()  # only model 0's loss
    opt.step()
    for p, b in zip(params, before):
        assert not torch.equal(p[0], b[0])
        assert torch.equal(p[1:], b[1:])  # other models' regressors/embeddings untouched


def test_fitnet_regressor_matches_linear_map():
    fit = FitNet()
    fit.build_modules(5, 3, num_models=1)
    fs, ft = rand(4, 5, seed=33).float(), rand(4, 3, seed=34).float()
    W, b = fit.regressor.weight[0].detach().double().numpy(), fit.regressor.bias[0, 0].detach().double().numpy()
    want = ((fs.double().numpy() @ W + b - ft.double().numpy()) ** 2).mean()
    got = fit.kd_term(None, None, None, None, student_feats=fs, teacher_feats=ft)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert fit(torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(4, dtype=torch.long),
               student_feats=fs, teacher_feats=ft)["loss_kd"].item() == pytest.approx(100 * want, rel=1e-5)


def test_mdistiller_default_weights_and_config_schema():
    want = {"fitnet": 100.0, "pkt": 30000.0, "sp": 3000.0, "crd": 0.8, "rkd": 1.0}
    for name, weight in want.items():
        params, _, _ = accepted_params(DISTILLERS.get(name))
        assert params["kd_weight"].default == weight, name
        assert DISTILLERS.build({"type": name}).kd_weight == weight
    rkd = DISTILLERS.build({"type": "rkd"})
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    crd = DISTILLERS.build({"type": "crd"})
    assert (crd.temperature, crd.momentum, crd.feat_dim) == (0.07, 0.5, 128)


def test_missing_features_error_names_them():
    with pytest.raises(ValueError, match="student_feats"):
        build("pkt", 4, 4, 1)(torch.zeros(3, 10), torch.zeros(3, 10), torch.zeros(3, dtype=torch.long))


def test_rkd_float32_is_accurate_for_offset_features():
    """Differences are translation invariant: a large common offset must not cost accuracy."""
    fs, ft = rand(16, 32, seed=35) + 50.0, rand(16, 8, seed=36) - 30.0
    want = rkd_loss(fs, ft).item()
    assert rkd_loss(fs.float(), ft.float()).item() == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------------------- RKD in float32 (issue 10.1)
def _f32_pair(fs, ft):
    """float32 inputs and the float64 numpy reference computed from exactly those values."""
    fs32, ft32 = fs.float(), ft.float()
    return fs32, ft32, ref_rkd(fs32.double().numpy(), ft32.double().numpy())


def torch_ref_angles(f):
    """Brute-force float64 angles [N, N, N] with autograd: u_ij = (f_j - f_i)/|f_j - f_i|, 0 (and
    a constant) where the difference is exactly 0."""
    diff = f.unsqueeze(0) - f.unsqueeze(1)
    norm = diff.norm(dim=-1)
    nz = norm > 0
    u = torch.where(nz.unsqueeze(-1), diff / torch.where(nz, norm, torch.ones_like(norm)).unsqueeze(-1), 0.0)
    return torch.einsum("ijd,ikd->ijk", u, u)


def torch_ref_rkd(fs, ft, wd=25.0, wa=50.0):
    def dist(f):
        diff = f.unsqueeze(0) - f.unsqueeze(1)
        sq = (diff * diff).sum(-1)
        d = torch.where(sq > 0, sq.clamp_min(1e-300).sqrt(), 0.0)
        n = f.shape[0]
        return d / (d.sum() / (n * (n - 1)))

    sl1 = lambda a, b: torch.nn.functional.smooth_l1_loss(a, b)  # noqa: E731
    return wd * sl1(dist(fs), dist(ft).detach()) + wa * sl1(torch_ref_angles(fs), torch_ref_angles(ft).detach())


@pytest.mark.parametrize("copies", [2, 3])
def test_rkd_float32_duplicate_rows_match_float64(copies):
    """Identical rows (repeated points, padded rows): the Gram expansion gave cosines of ~7e4."""
    fs, ft = rand(10, 16, seed=40) * 3.0, rand(10, 6, seed=41)
    fs[1:copies] = fs[0]
    fs32, ft32, want = _f32_pair(fs, ft)
    assert rkd_loss(fs32, ft32).item() == pytest.approx(want, rel=1e-5)
    cos = triplet_angles(fs32)
    assert cos.abs().max().item() <= 1.0 + 1e-6


@pytest.mark.parametrize("rel", [1e-2, 1e-3, 1e-4])
def test_rkd_float32_near_duplicate_rows_match_float64(rel):
    """Rows ``rel`` of their norm apart: cosines and the loss in float32 against float64."""
    fs, ft = rand(8, 16, seed=42) * 2.0, rand(8, 5, seed=43)
    step = rand(16, seed=44)
    fs[1] = fs[0] + rel * fs[0].norm() * step / step.norm()
    fs32, ft32, want = _f32_pair(fs, ft)
    got_cos = triplet_angles(fs32).double()
    want_cos = torch_ref_angles(fs32.double())
    assert (got_cos - want_cos).abs().max().item() < 1e-3
    assert rkd_loss(fs32, ft32).item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_rkd_float32_distance_term_is_centred(offset):
    """A common offset of 1e4 made the Gram-based distance term 16x wrong in float32."""
    fs, ft = rand(12, 8, seed=45) + offset, rand(12, 4, seed=46) - offset
    fs32, ft32 = fs.float(), ft.float()
    want = ref_rkd(fs32.double().numpy(), ft32.double().numpy(), wd=25.0, wa=0.0)
    assert rkd_loss(fs32, ft32, angle_weight=0.0).item() == pytest.approx(want, rel=1e-4)
    want_all = ref_rkd(fs32.double().numpy(), ft32.double().numpy())
    assert rkd_loss(fs32, ft32).item() == pytest.approx(want_all, rel=1e-4)


@pytest.mark.parametrize("case", ["duplicate", "near"])
def test_rkd_float32_gradients_match_float64_on_duplicates(case):
    """Finite gradients on duplicate rows (the degenerate entries are constants) and float32
    gradients equal to the brute-force float64 autograd gradient."""
    fs, ft = rand(7, 6, seed=47), rand(7, 3, seed=48)
    fs[2] = fs[0] if case == "duplicate" else fs[0] + 1e-2 * fs[0].norm() * rand(6, seed=49) / rand(6, seed=49).norm()
    fs[5] = fs[0]
    x32 = fs.float().requires_grad_(True)
    rkd_loss(x32, ft.float()).backward()
    assert torch.isfinite(x32.grad).all()
    x64 = x32.detach().double().requires_grad_(True)
    torch_ref_rkd(x64, ft.float().double()).backward()
    assert torch.isfinite(x64.grad).all()
    scale = x64.grad.abs().max().item()
    assert (x32.grad.double() - x64.grad).abs().max().item() < 1e-4 * scale


@pytest.mark.parametrize("keep", [True, False], ids=["kept-derivative", "recomputed"])
def test_rkd_gradcheck_float64_chunked_with_mask(keep, monkeypatch):
    """The chunked angle loss with several anchor chunks and masked rows, backward from the
    stored derivative or recomputed chunk by chunk: exact gradients, equal to the
    brute-force formula on the valid rows."""
    import pcseg_kd.distill.feature.rkd as rkd_mod
    from pcseg_kd.distill.feature.rkd import angle_loss

    monkeypatch.setattr(rkd_mod, "KEEP_ELEMENTS", 1 << 30 if keep else 0, raising=False)

    fs = rand(2, 7, 3, seed=37).requires_grad_(True)
    ft = rand(2, 7, 4, seed=38)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    fn = lambda x: angle_loss(x, ft, valid, chunk=2)  # noqa: E731  (4 chunks: 2, 2, 2, 1 anchors)
    assert torch.autograd.gradcheck(fn, (fs,), eps=1e-6, atol=1e-6)
    for s in range(2):
        v = valid[s]
        want = torch.nn.functional.smooth_l1_loss(torch_ref_angles(fs[s][v]), torch_ref_angles(ft[s][v]))
        assert fn(fs)[s].item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(angle_loss(fs, ft, valid, chunk=2), angle_loss(fs, ft, valid, chunk=7), rtol=1e-12)


def test_rkd_distiller_uses_the_chunked_path_with_masks(monkeypatch):
    """The distiller always passes a row mask; it must still take the memory-lean path
    (before: the mask sent every training step to the N³ autograd path)."""
    import pcseg_kd.distill.feature.rkd as rkd_mod

    calls = []
    real = rkd_mod._AngleLoss.apply
    monkeypatch.setattr(rkd_mod._AngleLoss, "apply", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(rkd_mod, "triplet_angles", lambda *a, **k: pytest.fail("N³ path used"))
    monkeypatch.setattr(rkd_mod, "CHUNK_ELEMENTS", 2 * 16 * 16, raising=False)  # several chunks
    dist = build("rkd", 16, 8, 2)
    fs = torch.randn(2, 16, 16, requires_grad=True)
    logits = torch.randn(2, 16, 10)
    target = torch.randint(0, 10, (2, 16))
    losses = dist(logits, logits + 1, target, student_feats=fs, teacher_feats=torch.randn(2, 16, 8))
    losses["loss_kd"].sum().backward()
    assert calls and calls[0] < 16
    assert torch.isfinite(fs.grad).all()


# ----------------------------------------------------------------------------- FitNet regressors (issue 10.3)
def test_fitnet_default_regressor_is_a_plain_linear_map_and_says_so():
    fit = FitNet()
    fit.build_modules(5, 3, num_models=2)
    assert fit.regressor_kind == "linear"
    assert [type(m).__name__ for m in fit.regressor.modules()] == ["BatchedLinear"]
    import pcseg_kd.distill.feature.fitnet as fitnet_mod
    doc = fitnet_mod.__doc__
    assert "plain" in doc and "linear" in doc and "ConvReg" in doc and "penultimate" in doc


@pytest.mark.parametrize("train", [True, False])
def test_fitnet_conv_bn_relu_regressor_matches_reference(train):
    """mdistiller's ConvReg on vector hints: relu(BatchNorm1d(x W + b)), per model, batch
    statistics over the valid rows only; checked against torch.nn.BatchNorm1d per model."""
    S, N, ds, dt = 2, 6, 5, 3
    fit = FitNet(regressor="conv_bn_relu")
    fit.build_modules(ds, dt, num_models=S)
    with torch.no_grad():
        fit.regressor.gamma.uniform_(0.5, 1.5)
        fit.regressor.beta.uniform_(-0.3, 0.3)
    fit.train(train)
    fs, ft = rand(S, N, ds, seed=50), rand(S, N, dt, seed=51)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    if not train:
        with torch.no_grad():
            fit.regressor.running_mean.normal_()
            fit.regressor.running_var.uniform_(0.5, 2.0)
    got = fit.kd_term(None, None, None, valid, student_feats=fs, teacher_feats=ft)
    reg = fit.regressor
    for s in range(S):
        v = valid[s]
        lin = fs[s][v] @ reg.linear.weight[s].detach().double() + reg.linear.bias[s].detach().double()
        bn = torch.nn.BatchNorm1d(dt, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(reg.gamma[s, 0])
            bn.bias.copy_(reg.beta[s, 0])
            if not train:
                bn.running_mean.copy_(reg.running_mean[s, 0])
                bn.running_var.copy_(reg.running_var[s, 0])
        bn.train(train)
        want = ((torch.relu(bn(lin)) - ft[s][v]) ** 2).mean()
        assert got[s].item() == pytest.approx(want.item(), rel=1e-10)
        if train:  # running statistics updated like BatchNorm1d's
            torch.testing.assert_close(reg.running_mean[s, 0].double(), bn.running_mean, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(reg.running_var[s, 0].double(), bn.running_var, rtol=1e-6, atol=1e-7)


def test_fitnet_regressor_choice_is_validated():
    with pytest.raises(ValueError, match="regressor"):
        FitNet(regressor="mlp")
    fit = FitNet(regressor=False)
    with pytest.raises(ValueError, match="equal widths"):
        fit.build_modules(5, 3)


def test_fitnet_conv_bn_relu_trains_without_host_sync():
    from pcseg_kd.utils.sync_guard import forbid_host_sync

    fit = DISTILLERS.build({"type": "fitnet", "regressor": "conv_bn_relu"})
    fit.build_modules(7, 4, num_models=2)
    fs = torch.randn(2, 5, 7, requires_grad=True)
    logits = torch.randn(2, 5, 10, requires_grad=True)
    with forbid_host_sync():
        losses = fit(logits, logits.detach() + 1, torch.randint(0, 10, (2, 5)), student_feats=fs,
                     teacher_feats=torch.randn(2, 5, 4))
        sum(v.sum() for v in losses.values()).backward()
    assert torch.isfinite(fs.grad).all()
    assert all(p.grad is not None for p in fit.parameters())
