"""FusionTeacher on real pipeline batches (tiny synthetic SemanticKITTI frames -> dataset ->
collate_kitti): output contract, the fusion formula, gradients to both branches, and the
student and teachers reading the same batch dict."""
from __future__ import annotations

import pytest
import torch

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

pytestmark = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")

if HAVE_SPCONV:
    from pcseg_kd.data.kitti import collate_kitti
    from pcseg_kd.data.kitti.dataset import SemanticKITTIDataset
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    from pcseg_kd.models.fusion_teacher import FusionTeacher
    from pcseg_kd.models.image import ResNetFCN
    from pcseg_kd.models.sparse.spunet import SpUNet
    from pcseg_kd.registry import MODELS

POINT = dict(base_channels=8, channels=(8, 16, 16, 16, 16, 16, 8, 8), layers=(1,) * 8, stem_kernel=3)
IMAGE = dict(widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), decoder_channels=16)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tiny_synthetic(tmp_path_factory.mktemp("synth_fusion"), sequences=("00",), frames=2, seed=3)
    ds = SemanticKITTIDataset(str(root), split="train", sequences=["00"], voxel_size=[0.4, 0.4, 0.4],
                              image_crop_hw=[96, 320])
    return collate_kitti([ds[0], ds[1]])


def test_outputs_follow_the_batch_contract(batch):
    torch.manual_seed(0)
    model = FusionTeacher(num_classes=19, point=POINT, image=IMAGE, fusion_channels=12).eval()
    out = model(batch)
    P, K = batch["points"].shape[0], batch["img_point_idx"].shape[0]
    assert 0 < K < P
    assert out["logits"].shape == (K, 19) and out["feats"].shape == (K, 12)
    assert out["point_logits"].shape == (P, 19) and out["image_logits"].shape == (K, 19)
    assert out["point_valid"].all()  # out_of_range "clip": every point has a voxel
    for v in out.values():
        assert torch.isfinite(v.float()).all()


def test_fusion_formula_and_branches_match_standalone_models(batch):
    """fused = W_i f_2d + σ(W_g [W_i f_2d, g]) ⊙ g with g = MLP(f_3d[img_point_idx]); the two
    branches are the standalone SpUNet / ResNetFCN (same seeds, same weights)."""
    torch.manual_seed(0)
    model = FusionTeacher(num_classes=19, point=POINT, image=IMAGE, fusion_channels=12).eval()
    torch.manual_seed(0)
    point = SpUNet(num_classes=19, **POINT).eval()
    image = ResNetFCN(num_classes=19, **IMAGE).eval()
    point.load_state_dict(model.point.state_dict())
    image.load_state_dict(model.image.state_dict())
    with torch.no_grad():
        out = model(batch)
        p, i = point(batch), image(batch)
        f2d = i["feats"] @ model.image_proj.weight.t() + model.image_proj.bias
        l1, l2 = model.point_learner[0], model.point_learner[2]
        g = torch.relu(p["feats"][batch["img_point_idx"]] @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
        gate = torch.sigmoid(torch.cat([f2d, g], 1) @ model.gate[0].weight.t() + model.gate[0].bias)
        fused = f2d + gate * g
    torch.testing.assert_close(out["point_logits"], p["logits"])
    torch.testing.assert_close(out["image_logits"], i["logits"])
    torch.testing.assert_close(out["feats"], fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"], fused @ model.head.weight.t() + model.head.bias, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_branches_through_the_fused_head(batch):
    torch.manual_seed(0)
    model = FusionTeacher(num_classes=19, point=POINT, image=IMAGE, fusion_channels=12).train()
    out = model(batch)
    out["logits"].square().mean().backward()  # the fused head only
    assert model.point.stem[0].weight.grad.abs().sum() > 0
    assert model.image.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.point.head.weight.grad is None  # the point branch's own head is not on this path


def test_registry_and_bad_configs():
    model = MODELS.build({"type": "fusion_teacher", "num_classes": 5, "point": POINT, "image": IMAGE,
                          "fusion_channels": 8})
    assert model.num_classes == 5 and model.point.num_classes == 5 and model.image.num_classes == 5
    with pytest.raises(ValueError, match="set num_classes once"):
        FusionTeacher(point={**POINT, "num_classes": 3}, image=IMAGE)
    with pytest.raises(ValueError, match="fusion_channels"):
        FusionTeacher(point=POINT, image=IMAGE, fusion_channels=0)
