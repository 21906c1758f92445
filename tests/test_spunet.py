"""SpUNet student on tiny scenes (REFERENCE §4: CPU spconv needs tiny widths and scenes).

The convolutions themselves are checked against dense conv3d in test_spconv_compat.py;
here the whole network is checked for the properties a sparse U-Net must have: it maps
voxels to points correctly, it is a function of the *set* of voxels (row order does not
matter), it is translation-equivariant by whole coarse voxels, batch items do not see
each other, gradients reach every parameter, and it can fit a scan.
"""
from __future__ import annotations

import pytest
import torch

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

pytestmark = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")

if HAVE_SPCONV:
    from pcseg_kd.data.kitti.voxelize import voxelize
    from pcseg_kd.models.sparse.spunet import SpUNet
    from pcseg_kd.registry import MODELS

TINY = dict(base_channels=8, channels=(8, 16, 16, 16, 16, 16, 8, 8), layers=(1, 1, 1, 1, 1, 1, 1, 1),
            stem_kernel=3)
VOXEL = [0.25, 0.25, 0.25]
RANGE = [0.0, 0.0, 0.0, 16.0, 16.0, 4.0]  # 64 x 64 x 16 voxels (x, y, z)


def scene(seed=0, n=3000):
    """Points on a ground plane, a wall and a box: surfaces, so voxels have neighbours."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)
    ground = torch.stack([u[:, 0] * 15.5, u[:, 1] * 15.5, 0.1 + 0.05 * u[:, 2]], 1)
    wall = torch.stack([2.0 + 0.05 * u[:, 2], u[:, 1] * 15.5, 0.2 + u[:, 0] * 3.5], 1)
    box = torch.stack([8.0 + 2.0 * u[:, 0], 6.0 + 2.0 * u[:, 1], 0.2 + 1.5 * u[:, 2]], 1)
    xyz = torch.where((kind == 0).unsqueeze(1), ground, torch.where((kind == 1).unsqueeze(1), wall, box))
    remission = torch.rand(n, 1, generator=g)
    return torch.cat([xyz, remission], 1), kind


def batch_of(points, point_range=RANGE, out_of_range="clip"):
    v = voxelize(points, VOXEL, point_range, out_of_range=out_of_range)
    return {"voxel_features": v.features, "voxel_coords": v.coords, "spatial_shape": v.spatial_shape,
            "batch_size": 1, "point2voxel": v.point2voxel}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return SpUNet(**{**TINY, **kw})


def trained_stats(model, batch):
    """Run a few training-mode forwards so eval-mode BN statistics are not the init ones."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(batch)
    return model.eval()


def test_forward_shapes_and_point_mapping():
    pts, _ = scene()
    pts[:5, 0] = 30.0  # outside the range: dropped, no voxel
    batch = batch_of(pts, out_of_range="drop")
    out = tiny().eval()(batch)
    n_vox = batch["voxel_coords"].shape[0]
    assert out["logits"].shape == (3000, 19) and out["feats"].shape == (3000, 8)
    assert out["voxel_logits"].shape == (n_vox, 19)
    assert torch.isfinite(out["logits"]).all()
    valid = out["point_valid"]
    assert valid.sum() == 2995 and not valid[:5].any()
    assert (out["logits"][:5] == 0).all()
    p2v = batch["point2voxel"]
    torch.testing.assert_close(out["logits"][valid], out["voxel_logits"][p2v[valid]], rtol=0, atol=0)


def test_backward_reaches_every_parameter():
    pts, _ = scene()
    model = tiny().train()
    out = model(batch_of(pts))
    g = torch.randn(out["logits"].shape, generator=torch.Generator().manual_seed(1))
    (out["logits"] * g).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_voxel_row_order_does_not_matter():
    pts, _ = scene(seed=2)
    batch = batch_of(pts)
    model = trained_stats(tiny(), batch)
    with torch.no_grad():
        want = model(batch)["logits"]
        perm = torch.randperm(batch["voxel_coords"].shape[0], generator=torch.Generator().manual_seed(3))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm))
        shuffled = {**batch, "voxel_features": batch["voxel_features"][perm],
                    "voxel_coords": batch["voxel_coords"][perm], "point2voxel": inv[batch["point2voxel"]]}
        got = model(shuffled)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_translation_by_whole_coarse_voxels():
    """Shifting every voxel by 16 (= 2^4, the coarsest stride) along x, features unchanged,
    gives the same logits: convolutions see relative positions only, and a whole coarse
    voxel keeps every strided conv's grid aligned."""
    pts, _ = scene(seed=4)
    batch = batch_of(pts)
    model = trained_stats(tiny(), batch)
    coords = batch["voxel_coords"].clone()
    coords[:, 3] += 16
    shape = list(batch["spatial_shape"])
    shape[2] += 16
    with torch.no_grad():
        want = model(batch)["logits"]
        got = model({**batch, "voxel_coords": coords, "spatial_shape": shape})["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and a shift by one voxel is not an identity (the test can tell networks apart)
    coords1 = batch["voxel_coords"].clone()
    coords1[:, 3] += 1
    shape1 = list(batch["spatial_shape"])
    shape1[2] += 1
    with torch.no_grad():
        moved = model({**batch, "voxel_coords": coords1, "spatial_shape": shape1})["logits"]
    assert (moved - want).abs().max() > 1e-3


def test_batch_items_do_not_see_each_other():
    a, _ = scene(seed=5)
    b, _ = scene(seed=6, n=2000)
    ba, bb = batch_of(a), batch_of(b)
    model = trained_stats(tiny(), ba)
    coords_b = bb["voxel_coords"].clone()
    coords_b[:, 0] = 1
    both = {"voxel_features": torch.cat([ba["voxel_features"], bb["voxel_features"]]),
            "voxel_coords": torch.cat([ba["voxel_coords"], coords_b]), "spatial_shape": ba["spatial_shape"],
            "batch_size": 2,
            "point2voxel": torch.cat([ba["point2voxel"], bb["point2voxel"] + ba["voxel_coords"].shape[0]])}
    with torch.no_grad():
        got = model(both)["logits"]
        want = torch.cat([model(ba)["logits"], model(bb)["logits"]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fits_one_scan():
    pts, kind = scene(seed=7, n=2000)
    batch = batch_of(pts)
    model = tiny(num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(batch)["logits"], kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_registry_and_bad_configs():
    model = MODELS.build({"type": "spunet", **TINY, "num_classes": 5})
    assert model.num_classes == 5 and model.out_channels == 8
    with pytest.raises(ValueError, match="same even length"):
        SpUNet(channels=(8, 8, 8), layers=(1, 1, 1))
    with pytest.raises(ValueError, match="same even length"):
        SpUNet(channels=(8, 8), layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SpUNet(**{**TINY, "num_classes": 1})
    with pytest.raises(ValueError, match="stem_kernel must be odd"):
        SpUNet(**{**TINY, "stem_kernel": 4})
