"""Augmentation keeps the point <-> pixel correspondence right."""
import numpy as np
import pytest
import torch

from pcseg_kd.data.kitti import (ImageAugmentor, PointAugmentor, SemanticKITTIDataset, lidar_to_image_matrix,
                                 project_to_image, read_calib, read_image, read_scan)
from pcseg_kd.data.kitti.testing import tiny_synthetic


def unique_colour_image(h, w):
    """Every pixel a different colour, so a wrong index cannot match by accident."""
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    return np.stack([idx % 256, (idx // 256) % 256, (idx // 65536) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("crop_mode", ["random", "bottom"])
def test_geometric_correspondence(seed, crop_mode):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(300, 380)), int(rng.integers(900, 1250))
    img = unique_colour_image(h, w)
    vu = np.stack([rng.integers(0, h, 3000), rng.integers(0, w, 3000)], 1)
    crop = (int(rng.integers(100, 400)), int(rng.integers(200, 1300)))  # may exceed the image: padded
    aug = ImageAugmentor(crop_hw=crop, crop_mode=crop_mode, flip_prob=0.5)
    out, new_vu, keep, params = aug.geometric(img, vu, rng)
    assert out.shape == (*crop, 3)
    np.testing.assert_array_equal(out[new_vu[:, 0], new_vu[:, 1]], img[vu[keep, 0], vu[keep, 1]])
    # dropped points really were outside the crop window
    top, left = params["crop_top"], params["crop_left"]
    inside = (vu[:, 0] >= top) & (vu[:, 0] < top + crop[0]) & (vu[:, 1] >= left) & (vu[:, 1] < left + crop[1])
    np.testing.assert_array_equal(keep, inside)
    if crop_mode == "bottom" and h >= crop[0]:
        assert top == h - crop[0]


def test_flip_formula():
    img = unique_colour_image(4, 7)
    aug = ImageAugmentor(crop_hw=None, flip_prob=1.0)
    out, vu, keep, params = aug.geometric(img, np.array([[0, 0], [3, 2]]), np.random.default_rng(0))
    assert params["flip"] == 1 and vu.tolist() == [[0, 6], [3, 4]]
    assert (out[0, 6] == img[0, 0]).all()


@pytest.mark.parametrize("seed", range(8))
def test_full_image_augmentation_replays_on_original(seed):
    """Colour at each stored pixel of the augmented image == jitter + normalise of the
    colour at its original pixel in the original image."""
    rng = np.random.default_rng(100 + seed)
    img = unique_colour_image(376, 1241)
    vu = np.stack([rng.integers(0, 376, 5000), rng.integers(0, 1241, 5000)], 1)
    aug = ImageAugmentor(crop_hw=(320, 480), crop_mode="random", flip_prob=0.5,
                         brightness=0.4, contrast=0.4, saturation=0.4)
    res = aug(img, vu, rng)
    assert res.params["brightness"] != 1.0
    expected = aug.normalize(aug.photometric(img[vu[res.keep, 0], vu[res.keep, 1]][None].astype(np.float32) / 255,
                                             res.params))[:, 0]  # (3, K')
    got = res.image[:, res.pixel_vu[:, 0], res.pixel_vu[:, 1]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_point_augmentation_changes_only_coordinates():
    rng = np.random.default_rng(0)
    xyz = rng.normal(0, 10, (1000, 3)).astype(np.float32)
    aug = PointAugmentor(rotate_z=np.pi, flip_x_prob=0.5, flip_y_prob=0.5, scale_range=(0.9, 1.1), jitter_std=0.0)
    for _ in range(5):
        out, m = aug(xyz, rng)
        np.testing.assert_allclose(out, xyz @ m.T, rtol=1e-5, atol=1e-4)
        scale = np.cbrt(abs(np.linalg.det(m)))
        np.testing.assert_allclose(np.linalg.norm(out[:, :2], axis=1), scale * np.linalg.norm(xyz[:, :2], axis=1),
                                   rtol=1e-4)
        np.testing.assert_allclose(out[:, 2], scale * xyz[:, 2], rtol=1e-4, atol=1e-4)  # z only scales
    jit = PointAugmentor(rotate_z=0, flip_x_prob=0, flip_y_prob=0, scale_range=(1, 1), jitter_std=1.0, jitter_clip=0.05)
    out, _ = jit(xyz, rng)
    assert 0 < np.abs(out - xyz).max() <= 0.05 + 1e-6


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth_aug"), sequences=("00",), frames=2)


def test_dataset_correspondence_end_to_end(synth_root):
    """Through the dataset: the augmented image at img_pixel_vu equals the original image at
    the original projection of the same point, after the recorded colour jitter."""
    ds = SemanticKITTIDataset(str(synth_root), split="train", sequences=["00"], augment=True,
                              image_crop_hw=[200, 400], image_crop_mode="random", seed=3)
    frame = ds.frames[1]
    scan = read_scan(frame.scan)
    image = read_image(frame.image)
    proj = project_to_image(scan[:, :3], lidar_to_image_matrix(read_calib(frame.calib)), image.shape[:2])
    orig_vu = np.full((len(scan), 2), -1)
    orig_vu[proj.in_view] = proj.pixel_indices()
    for epoch in range(3):
        ds.set_epoch(epoch)
        s = ds[1]
        idx = s["img_point_idx"].numpy()
        vu = s["img_pixel_vu"].numpy()
        assert len(idx) > 50 and proj.in_view[idx].all()
        # replay the recorded jitter: regenerate the params by re-running with the same rng
        rng = np.random.default_rng((ds.seed, epoch, 1))
        res = ds.image_aug(image, proj.pixel_indices(), rng)
        np.testing.assert_array_equal(res.image, s["image"].numpy())
        expected = ds.image_aug.normalize(ds.image_aug.photometric(
            image[orig_vu[idx, 0], orig_vu[idx, 1]][None].astype(np.float32) / 255, res.params))[:, 0]
        np.testing.assert_allclose(s["image"].numpy()[:, vu[:, 0], vu[:, 1]], expected, atol=1e-5)
        # the voxel network sees augmented coordinates; the remission is untouched
        assert not torch.allclose(s["points"][:, :3], torch.from_numpy(scan[:, :3]))
        np.testing.assert_array_equal(s["points"][:, 3].numpy(), scan[:, 3])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("train, crop, scale", [(True, (320, 480), 1.0), (True, (300, 1400), 0.5),
                                               (True, None, 1.0), (False, (320, 480), 0.5)])
def test_correspondences_without_pixels_equal_the_full_augmentation(seed, train, crop, scale):
    """``correspondences`` (an image's size only) gives the pixels, rows kept and size of the
    full augmentation and leaves the generator where it does, so that the point augmentation
    drawn next is the same whether or not the image was decoded."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(300, 380)), int(rng.integers(900, 1250))
    img = unique_colour_image(h, w)
    vu = np.stack([rng.integers(0, h, 2000), rng.integers(0, w, 2000)], 1)
    aug = ImageAugmentor(crop_hw=crop, crop_mode="random", flip_prob=0.5, scale=scale,
                         brightness=0.4, contrast=0.4, saturation=0.0, train=train)
    full_rng, size_rng = np.random.default_rng(seed + 50), np.random.default_rng(seed + 50)
    full = aug(img, vu, full_rng)
    only = aug.correspondences((h, w), vu, size_rng)
    assert only.image is None and only.hw == full.image.shape[1:] == full.hw
    np.testing.assert_array_equal(only.pixel_vu, full.pixel_vu)
    np.testing.assert_array_equal(only.keep, full.keep)
    assert {k: v for k, v in only.params.items() if k != "contrast_mean"} == \
           {k: v for k, v in full.params.items() if k != "contrast_mean"}
    assert full_rng.random() == size_rng.random()


def test_dataset_without_pixels_is_the_dataset_but_its_images(synth_root):
    from pcseg_kd.data.kitti import collate_kitti

    ds = SemanticKITTIDataset(str(synth_root), split="train", sequences=["00"], augment=True,
                              image_crop_hw=[200, 400], image_crop_mode="random", seed=3)
    free = ds.without_pixels()
    assert ds.read_pixels and not free.read_pixels  # a copy: the original still decodes
    for epoch in range(2):
        ds.set_epoch(epoch)
        free.set_epoch(epoch)
        a, b = [ds[i] for i in range(2)], [free[i] for i in range(2)]
        for x, y in zip(a, b):
            assert "image" in x and "image" not in y and set(x) - {"image"} == set(y)
            for k in y:
                if torch.is_tensor(y[k]):
                    assert torch.equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k], k
        ba, bb = collate_kitti(a), collate_kitti(b)
        assert "images" in ba and "images" not in bb and set(ba) - {"images"} == set(bb)
        for k in ("img_point_idx", "img_pixel_vu", "img_batch_idx", "img_offsets", "image_hw", "points"):
            assert torch.equal(ba[k], bb[k]), k
