"""Synchronized BatchNorm (pcseg_kd.engine.sync_bn) on CPU: two Gloo processes, each with half
of a global batch, against one process with plain BatchNorm on the whole batch.

All two-process scenarios run in one ``mp.spawn`` (starting processes is the slow part); the
workers save what they saw and the module-scoped fixture hands it to the tests, which compute
the single-process references themselves.
"""
from __future__ import annotations

import copy
import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kitti_common import needs_spconv
from pcseg_kd.engine.sync_bn import (SyncBatchNorm1d, SyncBatchNorm2d, all_reduce_sum_autograd,
                                     convert_sync_batchnorm)
from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

WORLD = 2
STEPS = 3
TINY_SPUNET = dict(in_channels=4, num_classes=3, base_channels=4, channels=(4, 4, 4, 4, 4, 4, 4, 4),
                   layers=(1, 1, 1, 1, 1, 1, 1, 1), stem_kernel=3)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def conv_net(dtype=torch.float32):
    """BatchNorm2d, BatchNorm1d with momentum=None (cumulative average), and an affine-free one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(),
                         nn.Linear(6, 3), nn.BatchNorm1d(3, affine=False)).to(dtype)


def row_net(dtype=torch.float32):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2),
                         nn.BatchNorm1d(2, momentum=None)).to(dtype)


def conv_data(dtype):
    g = torch.Generator().manual_seed(2)
    # far from zero mean, so a one-pass variance would show its cancellation
    return (3.0 + torch.randn(8, 3, 4, 4, generator=g)).to(dtype), torch.randn(8, 3, generator=g).to(dtype)


def row_data(n):
    g = torch.Generator().manual_seed(3)
    return 2.0 + torch.randn(n, 5, generator=g), torch.randn(n, 2, generator=g)


def mean_loss(out, t):
    return ((out - t) ** 2).mean()


def train(model, step_model, x, t, loss_fn, steps=STEPS):
    """SGD steps; per step the outputs, loss and gradients, then parameters and buffers."""
    opt = torch.optim.SGD(step_model.parameters(), lr=0.1, momentum=0.9)
    rec = {"out": [], "loss": [], "grad": []}
    step_model.train()
    for _ in range(steps):
        out = step_model(x)
        loss = loss_fn(out, t)
        opt.zero_grad()
        loss.backward()
        rec["out"].append(out.detach().clone())
        rec["loss"].append(loss.detach().clone())
        rec["grad"].append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    rec["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        rec["eval"] = model(x)
    return rec


def random_voxels(seed, n):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(16 * 16 * 16, generator=g)[:n]
    zyx = torch.stack([flat // 256, (flat // 16) % 16, flat % 16], 1)
    return torch.randn(n, 4, generator=g) + 1.0, zyx.int()


def spunet_batch(features, coords, batch_size):
    return {"voxel_features": features, "voxel_coords": coords, "spatial_shape": [16, 16, 16],
            "batch_size": batch_size, "point2voxel": torch.arange(len(features))}


def spunet_loss_weights(n):
    return torch.linspace(-1.0, 1.0, n * 3).reshape(n, 3)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    # a rank that skips a collective makes the other fail after this, instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ddp = nn.parallel.DistributedDataParallel
    res = {}

    # the autograd all-reduce: forward sums, backward sums the upstream gradients over ranks;
    # torch's deprecated torch.distributed.nn.functional.all_reduce must agree
    for name, fn in (("own", all_reduce_sum_autograd), ("torch", None)):
        x = (torch.arange(3.0) * (rank + 1)).requires_grad_()
        if fn is None:
            from torch.distributed.nn.functional import all_reduce
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                y = all_reduce(x)
        else:
            y = fn(x)
        (y * torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)).sum().backward()
        res[f"allreduce_{name}"] = (y.detach(), x.grad.clone())

    # equal halves, loss = local mean (DDP averages the two means: the global mean)
    for dtype in (torch.float32, torch.float64):
        x, t = conv_data(dtype)
        model = convert_sync_batchnorm(conv_net(dtype))
        sl = slice(rank * 4, rank * 4 + 4)
        res[f"equal_{dtype}"] = train(model, ddp(model), x[sl], t[sl], mean_loss)

    # unequal and empty local batches: each rank's loss scaled so the mean over ranks is the global mean
    for case, sizes in (("unequal", (7, 3)), ("empty", (6, 0))):
        x, t = row_data(sum(sizes))
        lo = sum(sizes[:rank])
        xs, ts = x[lo:lo + sizes[rank]], t[lo:lo + sizes[rank]]
        scale = WORLD / (sum(sizes) * t.shape[1])
        model = convert_sync_batchnorm(row_net())
        res[case] = train(model, ddp(model), xs, ts, lambda o, tt: ((o - tt) ** 2).sum() * scale)

    if HAVE_SPCONV:
        import spconv.pytorch as spconv
        from pcseg_kd.models.sparse.spunet import SpUNet

        # a rank with no voxels in a SparseSequential still joins the collectives
        torch.manual_seed(4)
        seq = convert_sync_batchnorm(spconv.SparseSequential(nn.BatchNorm1d(4)))
        f, c = random_voxels(5, 6)
        if rank == 1:
            f, c = f[:0], c[:0]
        sp = spconv.SparseConvTensor(f, torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), c], 1), [16, 16, 16], 1)
        res["sparse_empty"] = {"out": seq(sp).features.detach(), "state": copy.deepcopy(seq.state_dict())}

        # SpUNet: rank r holds scan r, the reference holds both scans in one batch
        torch.manual_seed(6)
        net = convert_sync_batchnorm(SpUNet(**TINY_SPUNET))
        f, c = random_voxels(10 + rank, 120)
        coords = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), c], 1)
        wrapped = ddp(net)
        wrapped.train()
        logits = wrapped(spunet_batch(f, coords, 1))["voxel_logits"]
        loss = (logits * spunet_loss_weights(240)[rank * 120:(rank + 1) * 120]).sum() * WORLD
        loss.backward()
        res["spunet"] = {"out": logits.detach(), "state": copy.deepcopy(net.state_dict()),
                         "grad": {k: p.grad.clone() for k, p in net.named_parameters()}}
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    d = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_autograd_all_reduce_sums_gradients_over_ranks(two_ranks):
    """y = x_0 + x_1 on both ranks; the loss of rank r weights y by (r + 1) * [1, 2, 3], so
    d(L_0 + L_1)/dx_r = 3 * [1, 2, 3] on each rank: the backward sums over ranks. torch's
    deprecated torch.distributed.nn.functional.all_reduce does the same."""
    for rank in range(WORLD):
        for name in ("own", "torch"):
            y, grad = two_ranks[rank][f"allreduce_{name}"]
            close(y, torch.arange(3.0) * 3, 0)
            close(grad, torch.tensor([3.0, 6.0, 9.0]), 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_two_ranks_with_equal_halves_match_one_process(two_ranks, dtype, tol):
    """DDP(convert_sync_batchnorm(model)), local-mean loss: outputs, loss, gradients,
    parameters and running statistics of one process with plain BN on the global batch."""
    x, t = conv_data(dtype)
    model = conv_net(dtype)
    ref = train(model, model, x, t, mean_loss)
    r0, r1 = (two_ranks[r][f"equal_{dtype}"] for r in range(WORLD))
    for s in range(STEPS):
        close(torch.cat([r0["out"][s], r1["out"][s]]), ref["out"][s], tol)
        close((r0["loss"][s] + r1["loss"][s]) / WORLD, ref["loss"][s], tol)
        for k, g in ref["grad"][s].items():
            close(r0["grad"][s][k], r1["grad"][s][k], 0)  # DDP's averaged gradient
            close(r0["grad"][s][k], g, tol)
    assert ref["state"]["5.num_batches_tracked"] == STEPS  # momentum=None: the cumulative average ran
    for r in (r0, r1):
        assert r["state"].keys() == ref["state"].keys()
        for k, v in ref["state"].items():
            close(r["state"][k], v, tol)
    # eval mode: per-rank, no synchronisation, running statistics as the reference's
    close(torch.cat([r0["eval"], r1["eval"]]), ref["eval"], tol)


@pytest.mark.parametrize("case,sizes", [("unequal", (7, 3)), ("empty", (6, 0))])
def test_unequal_and_empty_local_batches(two_ranks, case, sizes):
    """7 + 3 rows (and 6 + 0): statistics over the concatenated rows, each row once.

    Forward outputs and running statistics match whatever the losses. Gradients match only
    with a loss whose mean over ranks is the global loss: DDP averages the ranks' gradients,
    so with local means the 3-row rank's rows would weigh 7/3 times the others'. The workers
    use WORLD * local_sum / global_count instead."""
    x, t = row_data(sum(sizes))
    model = row_net()
    ref = train(model, model, x, t, mean_loss)
    r0, r1 = (two_ranks[r][case] for r in range(WORLD))
    assert r1["out"][0].shape == (sizes[1], 2)
    for s in range(STEPS):
        close(torch.cat([r0["out"][s], r1["out"][s]]), ref["out"][s], 1e-5)
        close((r0["loss"][s] + r1["loss"][s]) / WORLD, ref["loss"][s], 1e-5)
        for k, g in ref["grad"][s].items():
            assert torch.isfinite(r0["grad"][s][k]).all() and torch.isfinite(r1["grad"][s][k]).all()
            close(r0["grad"][s][k], g, 1e-5)
            close(r1["grad"][s][k], g, 1e-5)
    for r in (r0, r1):
        for k, v in ref["state"].items():
            close(r["state"][k], v, 1e-5)
    close(torch.cat([r0["eval"], r1["eval"]]), ref["eval"], 1e-5)


@needs_spconv
def test_sparse_sequential_rank_without_voxels_joins_the_statistics(two_ranks):
    """SparseSequential skips a plain module on a voxel-free tensor; the converted BN must not
    (rank 0 would wait in the collective): rank 0's output is plain BN over its own voxels."""
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(4)
    f, _ = random_voxels(5, 6)
    want = bn(f).detach()
    close(two_ranks[0]["sparse_empty"]["out"], want, 1e-6)
    assert two_ranks[1]["sparse_empty"]["out"].shape == (0, 4)
    for r in range(WORLD):
        for k, v in bn.state_dict().items():
            close(two_ranks[r]["sparse_empty"]["state"][f"0.{k}"], v, 1e-6)


@needs_spconv
def test_spunet_on_two_ranks_matches_one_batch_of_both_scans(two_ranks):
    """Rank r holds scan r (batch of one); the reference holds both in one batch of two. The
    BN statistics are over all active voxels of both ranks, count-weighted."""
    from pcseg_kd.models.sparse.spunet import SpUNet
    torch.manual_seed(6)
    net = SpUNet(**TINY_SPUNET).train()
    feats, coords = [], []
    for rank in range(WORLD):
        f, c = random_voxels(10 + rank, 120)
        feats.append(f)
        coords.append(torch.cat([torch.full((len(c), 1), rank, dtype=torch.int32), c], 1))
    logits = net(spunet_batch(torch.cat(feats), torch.cat(coords), WORLD))["voxel_logits"]
    (logits * spunet_loss_weights(240)).sum().backward()
    close(torch.cat([two_ranks[r]["spunet"]["out"] for r in range(WORLD)]), logits.detach(), 1e-4)
    for r in range(WORLD):
        for k, v in net.state_dict().items():
            close(two_ranks[r]["spunet"]["state"][k], v, 1e-4)
        for k, p in net.named_parameters():
            close(two_ranks[r]["spunet"]["grad"][k], p.grad, 1e-4)


def _train_pair(steps=2):
    """A plain model and a converted copy, trained side by side on the same batches."""
    plain = conv_net()
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    x, t = conv_data(torch.float32)
    recs = [train(m, m, x, t, mean_loss, steps) for m in (plain, synced)]
    return plain, synced, recs


def _assert_identical(recs):
    a, b = recs
    for s in range(len(a["out"])):
        close(a["out"][s], b["out"][s], 0)
        for k in a["grad"][s]:
            close(a["grad"][s][k], b["grad"][s][k], 0)
    for k in a["state"]:
        close(a["state"][k], b["state"][k], 0)
    close(a["eval"], b["eval"], 0)


def test_world_of_one_and_eval_mode_are_plain_batchnorm(tmp_path):
    """Without a process group and with a Gloo group of one: bit-identical to plain BN in
    training (outputs, gradients, running statistics) and in eval mode."""
    _assert_identical(_train_pair()[2])
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        _assert_identical(_train_pair()[2])
    finally:
        dist.destroy_process_group()


def test_conversion_keeps_tensors_settings_and_state_dict_keys():
    plain = conv_net()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    params = {k: p for k, p in plain.named_parameters()}
    bufs = {k: b for k, b in plain.named_buffers()}
    plain[5].eps, plain[8].train(False)
    synced = convert_sync_batchnorm(plain)
    assert type(synced[1]) is SyncBatchNorm2d and type(synced[5]) is SyncBatchNorm1d
    assert isinstance(synced[1], nn.BatchNorm2d) and not isinstance(synced[1], nn.SyncBatchNorm)
    assert synced[5].momentum is None and synced[8].affine is False and synced[8].weight is None
    assert synced[8].training is False and synced[1].training is True
    # the very same tensors: an optimizer built before the conversion still steps the model
    assert all(p is params[k] for k, p in synced.named_parameters())
    assert all(b is bufs[k] for k, b in synced.named_buffers())
    sd = synced.state_dict()
    assert sd.keys() == before.keys()
    fresh = conv_net()
    fresh.load_state_dict(sd, strict=True)  # a converted checkpoint loads into the plain model
    convert_sync_batchnorm(conv_net()).load_state_dict(before, strict=True)  # and back
    assert convert_sync_batchnorm(synced) is synced and type(synced[1]) is SyncBatchNorm2d  # idempotent
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=0.01, bias=False)
    root = convert_sync_batchnorm(bn)  # a BatchNorm root is replaced, not modified
    assert type(root) is SyncBatchNorm1d and (root.eps, root.momentum, root.bias) == (1e-3, 0.01, None)
    torch_sync = nn.Sequential(nn.SyncBatchNorm(3))
    assert type(convert_sync_batchnorm(torch_sync)[0]) is nn.SyncBatchNorm  # already synchronised

    class Custom(nn.BatchNorm1d):
        pass
    with pytest.raises(TypeError, match=r"cannot synchronise 1 of type .*Custom"):
        convert_sync_batchnorm(nn.Sequential(nn.ReLU(), Custom(3)))


@needs_spconv
def test_spunet_converts_every_batchnorm_and_runs():
    import spconv.pytorch as spconv
    from pcseg_kd.engine.sync_bn import SparseSyncBatchNorm1d
    from pcseg_kd.models.sparse.spunet import SpUNet
    torch.manual_seed(6)
    plain = SpUNet(**TINY_SPUNET).train()
    n_bn = sum(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    in_seq = sum(isinstance(c, nn.BatchNorm1d) for m in plain.modules() if isinstance(m, spconv.SparseSequential)
                 for c in m.children())
    assert n_bn > in_seq > 0
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    kinds = [type(m) for m in synced.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(kinds) == n_bn and set(kinds) == {SyncBatchNorm1d, SparseSyncBatchNorm1d}
    assert kinds.count(SparseSyncBatchNorm1d) == in_seq
    assert synced.state_dict().keys() == plain.state_dict().keys()
    feats, coords = zip(*(random_voxels(10 + b, 120) for b in range(2)))
    coords = [torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c], 1) for b, c in enumerate(coords)]
    # two scans: one alone reaches the coarsest level as a single voxel, too few for plain BN
    batch = spunet_batch(torch.cat(feats), torch.cat(coords), 2)
    close(synced(batch)["voxel_logits"], plain(batch)["voxel_logits"], 0)
    for k, v in plain.state_dict().items():
        close(synced.state_dict()[k], v, 0)
    # without synchronisation a voxel-free sparse tensor is passed on untouched, as spconv does
    seq = convert_sync_batchnorm(spconv.SparseSequential(nn.BatchNorm1d(4)))
    empty = spconv.SparseConvTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), [4, 4, 4], 1)
    assert seq(empty) is empty
