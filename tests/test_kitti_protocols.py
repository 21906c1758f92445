"""The two SemanticKITTI protocols (``fov``: in-view points only; ``full``: the whole scan),
the resized image, the KD rows with ``out_of_range: drop``, the frozen teacher, the
pretrained image backbone, and prediction files scored by an independent implementation of
semantic-kitti-api's rules."""
from __future__ import annotations


import numpy as np
import pytest
from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides, tiny_root
import torch
import yaml




@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "kitti_protocols", frames=3, seed=4)


def overrides(root, **extra):
    return tiny_overrides(root, student_epochs=1, steps=1, **extra)


# ----------------------------------------------------------------------------- datasets
def test_fov_only_keeps_exactly_the_in_view_points_in_file_order(data_root):
    from pcseg_kd.data.kitti import SemanticKITTIDataset
    from pcseg_kd.data.kitti.projection import project_to_image
    from pcseg_kd.data.kitti.reader import read_image, read_label, read_scan

    full = SemanticKITTIDataset(str(data_root), split="val", sequences=["08"], voxel_size=[0.2] * 3)
    fov = SemanticKITTIDataset(str(data_root), split="val", sequences=["08"], voxel_size=[0.2] * 3, fov_only=True)
    frame = fov.frames[1]
    scan = read_scan(frame.scan)
    proj = project_to_image(scan[:, :3], fov.lidar_to_image(frame), read_image(frame.image).shape[:2])
    expect = np.flatnonzero(proj.in_view)
    a, b = full[1], fov[1]
    assert b["point_index"].numpy().tolist() == expect.tolist()
    assert torch.equal(b["points"], torch.from_numpy(scan[expect]))
    sem, _ = read_label(frame.label, len(scan))
    assert torch.equal(b["labels"], torch.from_numpy(fov.label_map.to_train(sem, frame.label)[expect]))
    assert b["num_scan_points"] == a["num_scan_points"] == len(scan)
    # without a crop every kept point is in view, at the pixel the full dataset gives it
    assert b["img_point_idx"].tolist() == list(range(len(expect)))
    assert torch.equal(b["img_pixel_vu"], a["img_pixel_vu"])
    assert torch.equal(a["point_index"], torch.arange(len(scan)))
    counts = fov.label_counts()
    all_labels = np.concatenate([fov[i]["labels"].numpy() for i in range(len(fov))])
    assert counts.tolist() == np.bincount(all_labels[all_labels != 255], minlength=19).tolist()
    with pytest.raises(ValueError, match="fov_only needs load_image"):
        SemanticKITTIDataset(str(data_root), split="val", fov_only=True, load_image=False)


def test_image_scale_resizes_the_image_and_moves_the_pixels(data_root):
    from pcseg_kd.data.kitti import SemanticKITTIDataset
    from pcseg_kd.data.kitti.augment import IMAGENET_MEAN, IMAGENET_STD
    from pcseg_kd.data.kitti.reader import read_image

    full = SemanticKITTIDataset(str(data_root), split="val", sequences=["08"], voxel_size=[0.2] * 3)
    half = SemanticKITTIDataset(str(data_root), split="val", sequences=["08"], voxel_size=[0.2] * 3,
                                image_scale=0.5)
    a, b = full[0], half[0]
    h, w = read_image(full.frames[0].image).shape[:2]
    assert tuple(b["images"].shape[1:] if "images" in b else b["image"].shape[1:]) == (round(h / 2), round(w / 2))
    assert torch.equal(b["img_pixel_vu"], torch.floor((a["img_pixel_vu"] + 0.5) * torch.tensor(
        [round(h / 2) / h, round(w / 2) / w])).long().minimum(torch.tensor([round(h / 2) - 1, round(w / 2) - 1])))
    # area interpolation at 1/2: a pixel of the small image is the mean of its 2x2 block
    img = read_image(full.frames[0].image).astype(np.float64) / 255.0
    v, u = 10, 20
    block = img[2 * v:2 * v + 2, 2 * u:2 * u + 2].mean((0, 1))
    got = b["image"][:, v, u].numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(got, block, atol=1 / 255)


# ----------------------------------------------------------------------------- configs
def test_protocol_sets_fov_only_on_both_datasets_and_is_validated(data_root):
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    fov = load_kitti_experiment(QUICK, overrides(data_root))
    assert fov["protocol"] == "fov" and fov["data"]["train"]["fov_only"] and fov["data"]["val"]["fov_only"]
    full = load_kitti_experiment(QUICK, overrides(data_root, protocol="full"))
    assert not full["data"]["train"]["fov_only"] and not full["data"]["val"]["fov_only"]
    with pytest.raises(ConfigError, match="protocol: must be one of"):
        load_kitti_experiment(QUICK, overrides(data_root, protocol="range"))
    with pytest.raises(ConfigError, match="fov_only contradicts protocol"):
        load_kitti_experiment(QUICK, overrides(data_root, **{"data.train.fov_only": "false"}))
    with pytest.raises(ConfigError, match="student.loss: class_weights must be"):
        load_kitti_experiment(QUICK, overrides(data_root, **{"student.loss.class_weights": "inverse"}))
    with pytest.raises(ConfigError, match="stages: must be a non-empty list of distinct stages"):
        load_kitti_experiment(QUICK, overrides(data_root, stages="[student,student]"))
    order = load_kitti_experiment(QUICK, overrides(data_root, stages="[student,baseline,teacher]"))
    assert order["stages"] == ["teacher", "baseline", "student"]


# ----------------------------------------------------------------------------- losses
def test_kd_skips_in_view_points_without_a_voxel():
    from pcseg_kd.distill import DKD
    from pcseg_kd.engine.kitti.objective import SegLoss, student_loss
    from pcseg_kd.losses.dkd import dkd_loss

    g = torch.Generator().manual_seed(3)
    P, K, C = 300, 90, 19
    labels = torch.randint(0, C, (P,), generator=g)
    idx = torch.randperm(P, generator=g)[:K]
    valid = torch.rand(P, generator=g) > 0.25
    s = torch.randn(P, C, generator=g)
    s[~valid] = 0.0  # what a sparse student returns for points without a voxel
    t = torch.randn(K, C, generator=g)
    dist = DKD(alpha=7.0, beta=1.0, temperature=0.7, kd_weight=1.0, ignore_index=255)
    got = student_loss(dist, SegLoss(), {"logits": s, "point_valid": valid}, {"logits": t}, "points", "in_view",
                       {"labels": labels, "img_point_idx": idx}, 1)["loss_kd"]
    keep = valid[idx]
    want = dkd_loss(s[idx][keep], t[keep], labels[idx][keep], 7.0, 1.0, 0.7)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- engine
@needs_spconv
def test_the_frozen_teacher_is_not_changed_by_student_steps(data_root, tmp_path, monkeypatch):
    from pcseg_kd.engine import checkpoint as ckpt
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    cfg = load_kitti_experiment(QUICK, overrides(data_root, **{"student.optim.max_steps_per_epoch": 2}))
    seen = {}
    real = kitti.load_teacher

    def spy(*a, **k):
        seen["teacher"] = real(*a, **k)
        return seen["teacher"]

    monkeypatch.setattr(kitti, "load_teacher", spy)
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    trained = ckpt.load_checkpoint(tmp_path / "teacher" / "final.pt")["model"]
    after = seen["teacher"].state_dict()
    assert not seen["teacher"].training and not any(p.requires_grad for p in seen["teacher"].parameters())
    assert any("running_var" in k for k in after)  # BatchNorm statistics are part of the check
    assert any(("num_batches_tracked" in k) for k in after)
    for k, v in trained.items():
        assert torch.equal(after[k], v), k


def _api_miou(pred_files, gt_files, n_points, keep_masks, learning_map):
    """semantic-kitti-api's evaluate_semantics rules, written out in numpy: raw ids through
    learning_map (0..19), conf[pred, gt], the gt-0 column zeroed, IoU = tp / (tp + fp + fn
    + 1e-15) over learning ids 1..19, mean over the 19 classes."""
    lut = np.zeros(max(learning_map) + 1, dtype=np.int64)
    for raw, lid in learning_map.items():
        lut[raw] = lid
    conf = np.zeros((20, 20), dtype=np.int64)
    for pf, gf, n, keep in zip(pred_files, gt_files, n_points, keep_masks):
        pred = np.fromfile(pf, dtype=np.uint32)
        gt = np.fromfile(gf, dtype=np.uint32)
        assert len(pred) == len(gt) == n
        p, g = lut[pred & 0xFFFF], lut[gt & 0xFFFF]
        if keep is not None:
            p, g = p[keep], g[keep]
        np.add.at(conf, (p, g), 1)
    conf[:, 0] = 0
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(1) - tp, conf.sum(0) - tp
    return float((tp / (tp + fp + fn + 1e-15))[1:].mean() * 100)


@needs_spconv
@pytest.mark.parametrize("protocol,out_of_range", [("full", "clip"), ("full", "drop"), ("fov", "drop")])
def test_reported_miou_equals_an_independent_scorer_on_the_written_files(data_root, tmp_path, protocol, out_of_range):
    from pcseg_kd.data.kitti.projection import project_to_image
    from pcseg_kd.data.kitti.reader import read_image, read_scan
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.predict import split_dataset_cfg, test_checkpoint
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.registry import DATASETS

    rng = "[-12,-12,-3,12,12,1]" if out_of_range == "drop" else "[-51.2,-51.2,-4,51.2,51.2,2.4]"
    cfg = load_kitti_experiment(QUICK, overrides(
        data_root, protocol=protocol, stages="[baseline]", **{"data.train.out_of_range": out_of_range,
                                                              "data.val.out_of_range": out_of_range,
                                                              "data.train.point_range": rng, "data.val.point_range": rng}))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    res = test_checkpoint(cfg, tmp_path / "baseline" / "final.pt", "val", tmp_path / "preds", progress=False)
    val = DATASETS.build(split_dataset_cfg(cfg, "val"))
    learning_map = yaml.safe_load((ROOT / "data/semantic-kitti.yaml").read_text())["learning_map"]
    preds, gts, ns, keeps = [], [], [], []
    for frame in val.frames:
        seq, name = frame.frame_id.split("/")
        scan = read_scan(frame.scan)
        preds.append(tmp_path / "preds" / "sequences" / seq / "predictions" / f"{name}.label")
        gts.append(frame.label)
        ns.append(len(scan))
        keeps.append(project_to_image(scan[:, :3], val.lidar_to_image(frame), read_image(frame.image).shape[:2]).in_view
                     if protocol == "fov" else None)
    api = _api_miou(preds, gts, ns, keeps, learning_map)
    assert res["metrics"]["all"]["miou"] == pytest.approx(api, abs=1e-6)
    if out_of_range == "drop":
        # the range really drops points, and they are scored (as misses), not left out
        assert sum(int((val[i]["point2voxel"] < 0).sum()) for i in range(len(val))) > 0
        labelled = sum(int((val[i]["labels"] != 255).sum()) for i in range(len(val)))
        assert res["metrics"]["all"]["points"] == labelled


# ----------------------------------------------------------------------------- pretrained backbone
def test_pretrained_backbone_loads_a_torchvision_state_dict_and_names_the_file_on_a_mismatch(tmp_path):
    from pcseg_kd.models.image.resnet_fcn import ResNetFCN

    kw = dict(widths=[8, 16, 16, 16], depths=[1, 2, 1, 1], decoder_channels=8)
    donor = ResNetFCN(**kw)
    for p in donor.encoder.parameters():
        torch.nn.init.normal_(p)
    # torchvision layout: encoder names at the top level, an fc head, saved from DataParallel
    state = {f"module.{k}": v.clone() for k, v in donor.encoder.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 16), torch.zeros(1000)
    torch.save({"state_dict": state}, tmp_path / "resnet.pth")
    model = ResNetFCN(pretrained=str(tmp_path / "resnet.pth"), **kw)
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert not torch.equal(ResNetFCN(**kw).encoder.conv1.weight, donor.encoder.conv1.weight)
    with pytest.raises(ValueError, match=r"resnet\.pth does not fit this encoder.*of another shape"):
        ResNetFCN(pretrained=str(tmp_path / "resnet.pth"), widths=[8, 16, 32, 16], depths=[1, 2, 1, 1])
    with pytest.raises(ValueError, match=r"resnet\.pth does not fit this encoder.*missing"):
        ResNetFCN(pretrained=str(tmp_path / "resnet.pth"), widths=[8, 16, 16, 16], depths=[1, 2, 2, 1])
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        ResNetFCN(pretrained=str(tmp_path / "absent.pth"), **kw)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable state_dict"):
        ResNetFCN(pretrained=str(tmp_path / "junk.pth"), **kw)
    with torch.device("meta"):  # config checks: the file must exist, nothing is read
        ResNetFCN(pretrained=str(tmp_path / "resnet.pth"), **kw)
