"""forbid_host_sync() catches each way of reading device values on the host (forward and
backward), lets device-side code through, and every distiller's forward + backward runs
under it on the torch and reference loss backends: the sync-free property checked on CPU."""
from __future__ import annotations

import pytest
import torch

import pcseg_kd.distill  # noqa: F401  (registers the distillers)
from pcseg_kd.distill.kernels import dispatch
from pcseg_kd.registry import DISTILLERS
from pcseg_kd.utils.sync_guard import HostSyncError, forbid_host_sync

X = torch.tensor([0.5, -1.0, 2.0, 0.0])

SYNCS = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "if": lambda x: 1 if x.max() > 0 else 0,
    "float": lambda x: float(x[0]),
    "int": lambda x: int(x[2]),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),
    "mask_index": lambda x: x[x > 0],
    "mask_assign": lambda x: x.clone().__setitem__(x > 0, 0.0),
    "nonzero": lambda x: torch.nonzero(x),
    "equal": lambda x: torch.equal(x, x),
    "unique": lambda x: torch.unique(x),
    "masked_select": lambda x: x.masked_select(x > 0),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    "bincount": lambda x: torch.bincount(torch.tensor([0, 2, 2]), minlength=4),
    "histc_no_range": lambda x: torch.histc(x, bins=4),
    "np_asarray": lambda x: __import__("numpy").asarray(x),
}

ALLOWED = {
    "arith": lambda x: (x * 2 + 1).exp().log1p(),
    "where": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "reductions": lambda x: (x.sum(), x.amax(), x.argmax(), (x > 0).sum()),
    "gather_scatter": lambda x: torch.zeros(4).scatter_add(0, torch.tensor([0, 0, 1, 3]), x).gather(0, torch.tensor([1])),
    "int_index": lambda x: x[torch.tensor([0, 2])],
    "masked_fill": lambda x: x.masked_fill(x < 0, 0.0),
    "repeat_interleave_sized": lambda x: torch.repeat_interleave(torch.tensor([1, 2]), output_size=3),
    "histc_with_range": lambda x: torch.histc(x, bins=4, min=-2.0, max=2.0),
    "scatter_add_counts": lambda x: torch.zeros(4, dtype=torch.long).scatter_add_(0, torch.tensor([0, 2, 2]),
                                                                                 torch.ones(3, dtype=torch.long)),
    "shape_python": lambda x: x.reshape(2, 2)[:, 0] if x.shape[0] == 4 else x,
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_guard_catches_host_reads(name):
    with pytest.raises(HostSyncError, match="host-device synchronisation"):
        with forbid_host_sync():
            SYNCS[name](X.clone())
    SYNCS[name](X.clone())  # outside the guard the same code runs


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_guard_lets_device_side_code_run(name):
    with forbid_host_sync():
        ALLOWED[name](X.clone())


def test_guard_sees_syncs_in_backward():
    class Leaky(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            scale = 2.0 if g.sum() > 0 else 1.0  # the kind of branch the rule forbids
            return g * scale

    x = X.clone().requires_grad_()
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            Leaky.apply(x).sum().backward()


def _rows(n=300, c=20, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*lead, n, c, generator=g) * 3
    s = (t + torch.randn(*lead, n, c, generator=g) * 0.05).requires_grad_()  # many rows above τ
    y = torch.randint(0, c, (*lead, n), generator=g)
    y = torch.where(torch.rand(*lead, n, generator=g) < 0.1, torch.full_like(y, 255), y)
    return s, t, y


LOGIT_DISTILLERS = [
    {"type": "kd"},
    {"type": "kd_pssm"},
    {"type": "kd_pssm", "apply": "weight", "normalize": "kept"},
    {"type": "kd_pssm", "pssm": {"preset": "paper"}},
    {"type": "dkd", "warmup_epochs": 5},
    {"type": "dkd_pssm"},
    {"type": "dkd_pssm", "normalize": "kept", "pssm": {"gate": "both", "space": "probs"}},
    {"type": "dkd_pssm", "pssm": {"detach": False}},
    {"type": "kd_pssm", "pssm": {"detach": False}},
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("cfg", LOGIT_DISTILLERS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_logit_distillers_do_not_sync(cfg, backend):
    dist = DISTILLERS.build({**cfg, "ignore_index": 255, "loss_backend": backend})
    s, t, y = _rows(lead=(2,))
    with forbid_host_sync():
        losses = dist(s, t, y, epoch=2)
        sum(v.sum() for v in losses.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["fitnet", "rkd", "pkt", "sp", "crd"])
def test_feature_distillers_do_not_sync(name):
    dist = DISTILLERS.build({"type": name, **({"num_negatives": 16, "feat_dim": 8} if name == "crd" else {})})
    dist.build_modules(7, 4, num_models=2, num_samples=40, num_classes=10)
    fs = torch.randn(2, 5, 7, requires_grad=True)
    ft = torch.randn(2, 5, 4)
    logits = torch.randn(2, 5, 10, requires_grad=True)
    target = torch.randint(0, 10, (2, 5))
    index = torch.randperm(40)[:5].expand(2, 5)
    with forbid_host_sync():
        losses = dist(logits, logits.detach() + 1, target, epoch=1, student_feats=fs, teacher_feats=ft, index=index)
        sum(v.sum() for v in losses.values()).backward()
    assert torch.isfinite(fs.grad).all()


def test_dispatch_entry_points_do_not_sync():
    s, t, y = _rows()
    with forbid_host_sync():
        for reduction in ("none", "sum", "batchmean"):
            for kind in ("dkd", "kd"):
                dispatch.distill_loss(kind, s, t, y, reduction=reduction, ignore_index=255,
                                      backend="torch").sum().backward()
        dispatch.pssm_weights(s, t, y, ignore_index=255, backend="torch")
