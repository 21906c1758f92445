"""Image teacher: pixel sampling against grid_sample and direct indexing, and ResNetFCN's
per-point outputs, sizes, gradients, batch independence and ability to fit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcseg_kd.models.image import ResNetFCN, sample_at_pixels
from pcseg_kd.registry import MODELS

TINY = dict(widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), decoder_channels=16)


def pixels(k, h, w, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    vu = torch.stack([torch.randint(0, h, (k,), generator=g), torch.randint(0, w, (k,), generator=g)], 1)
    return torch.randint(0, b, (k,), generator=g), vu


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_sampling_matches_grid_sample_per_point(stride):
    B, C, H, W = 3, 5, 24, 40
    fmap = torch.randn(B, C, H // stride, W // stride, dtype=torch.float64)
    bidx, vu = pixels(200, H, W, B)
    got = sample_at_pixels(fmap, bidx, vu, (H, W))
    gx = (vu[:, 1].double() + 0.5) / W * 2 - 1
    gy = (vu[:, 0].double() + 0.5) / H * 2 - 1
    want = torch.stack([F.grid_sample(fmap[b:b + 1], torch.stack([x, y]).view(1, 1, 1, 2), mode="bilinear",
                                      padding_mode="border", align_corners=False)[0, :, 0, 0]
                        for b, x, y in zip(bidx.tolist(), gx, gy)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sampling_at_full_resolution_is_indexing_and_has_gradient():
    fmap = torch.randn(2, 4, 9, 13, dtype=torch.float64, requires_grad=True)
    bidx, vu = pixels(60, 9, 13, 2, seed=1)
    got = sample_at_pixels(fmap, bidx, vu, (9, 13))
    torch.testing.assert_close(got, fmap[bidx, :, vu[:, 0], vu[:, 1]], rtol=0, atol=0)
    torch.autograd.gradcheck(lambda f: sample_at_pixels(f, bidx, vu, (18, 26)), (fmap,))


def test_sampling_bad_shapes():
    with pytest.raises(ValueError, match="fmap must be"):
        sample_at_pixels(torch.zeros(3, 4, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2), (4, 5))
    with pytest.raises(ValueError, match="pixel_vu must be"):
        sample_at_pixels(torch.zeros(1, 3, 4, 5), torch.zeros(2, dtype=torch.long), torch.zeros(3, 2), (4, 5))


def image_batch(b=2, h=45, w=70, k=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    bidx, vu = pixels(k, h, w, b, seed)
    return {"images": torch.randn(b, 3, h, w, generator=g), "img_batch_idx": bidx, "img_pixel_vu": vu}


@pytest.mark.parametrize("out_stride", [1, 2, 4])
def test_fcn_outputs_and_head_commutes_with_sampling(out_stride):
    """Odd image sizes (45 x 70: not multiples of 32); per-point logits are the linear head
    applied to the bilinearly sampled map, so they equal sampling the dense logit map."""
    torch.manual_seed(0)
    model = ResNetFCN(out_stride=out_stride, **TINY).eval()
    batch = image_batch()
    out = model(batch)
    h, w = -(-45 // out_stride), -(-70 // out_stride)
    assert out["fmap"].shape == (2, 16, h, w)
    assert out["logits"].shape == (80, 19) and out["feats"].shape == (80, 16)
    dense = torch.einsum("bchw,kc->bkhw", out["fmap"], model.head.weight) + model.head.bias.view(1, -1, 1, 1)
    want = sample_at_pixels(dense, batch["img_batch_idx"], batch["img_pixel_vu"], (h * out_stride, w * out_stride))
    torch.testing.assert_close(out["logits"], want, rtol=1e-5, atol=1e-5)


def test_fcn_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ResNetFCN(**TINY).train()
    out = model(image_batch())
    (out["logits"] * torch.randn_like(out["logits"])).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fcn_batch_items_are_independent_in_eval():
    torch.manual_seed(0)
    model = ResNetFCN(**TINY).eval()
    batch = image_batch(b=2, k=40)
    both = model(batch)["logits"]
    for b in range(2):
        sel = batch["img_batch_idx"] == b
        alone = {"images": batch["images"][b:b + 1], "img_batch_idx": torch.zeros(int(sel.sum()), dtype=torch.long),
                 "img_pixel_vu": batch["img_pixel_vu"][sel]}
        torch.testing.assert_close(model(alone)["logits"], both[sel], rtol=1e-5, atol=1e-5)


def test_fcn_fits_a_colour_rule():
    """Points take the class of their pixel's dominant colour channel: a few steps fit it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    images = torch.zeros(2, 3, 32, 48)
    cls = torch.randint(0, 3, (2, 4, 6), generator=g)  # 8x8 blocks of one colour
    images.scatter_(1, cls.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1), 1.0)
    bidx, vu = pixels(300, 32, 48, 2, seed=4)
    target = cls[bidx, vu[:, 0] // 8, vu[:, 1] // 8]
    batch = {"images": images, "img_batch_idx": bidx, "img_pixel_vu": vu}
    model = ResNetFCN(num_classes=3, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(batch)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_fcn_registry_bad_configs_and_encoder_loading():
    model = MODELS.build({"type": "resnet_fcn", **TINY, "num_classes": 4})
    assert model.num_classes == 4 and model.out_channels == 16
    with pytest.raises(ValueError, match="same length"):
        ResNetFCN(widths=(8, 8), depths=(1,))
    with pytest.raises(ValueError, match="out_stride"):
        ResNetFCN(out_stride=3, **TINY)
    with pytest.raises(ValueError, match="images must be"):
        model.feature_map(torch.zeros(3, 8, 8))
    # a torchvision-style state dict (encoder names, plus an fc that is ignored) loads
    state = {k: torch.full_like(v, 0.5) for k, v in model.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 16)
    result = model.load_encoder_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert (model.encoder.conv1.weight == 0.5).all()
