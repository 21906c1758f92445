"""Dataset + collate on generated data: the same reader as real SemanticKITTI, the flat
batch dict, the registry and config validation."""
import dataclasses

import numpy as np
import pytest
import torch

from pcseg_kd.config import ConfigError, registry_field, validate
from pcseg_kd.data.kitti import (DEFAULT_SPLITS, LabelMap, SemanticKITTIDataset, collate_kitti, read_label,
                                 read_scan, split_sequences, voxelize)
from pcseg_kd.data.kitti.testing import tiny_synthetic
from pcseg_kd.registry import DATASETS

BATCH_KEYS = {"batch_size", "frame_ids", "has_labels", "points", "batch_idx", "offsets", "labels",
              "voxel_features", "voxel_coords", "voxel_num_points", "voxel_offsets", "point2voxel",
              "spatial_shape", "images", "image_hw", "img_point_idx", "img_pixel_vu", "img_batch_idx", "point_index", "num_scan_points", "skipped_frames",
              "img_offsets"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth_ds"), sequences=("00", "08", "11"), frames=2, seed=11)


def test_default_splits():
    assert split_sequences("train") == ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]
    assert split_sequences("val") == ["08"] and split_sequences("test") == [f"{i}" for i in range(11, 22)]
    assert split_sequences("val", {"val": [3]}) == ["03"]
    assert DEFAULT_SPLITS["val"] == ["08"]
    with pytest.raises(ValueError, match="unknown split"):
        split_sequences("nope")


def test_registry_and_config_validation(root):
    @dataclasses.dataclass
    class Schema:
        dataset: dict = registry_field(DATASETS)

    cfg = {"dataset": {"type": "semantickitti", "root": str(root), "split": "val", "voxel_size": [0.1, 0.1, 0.1]}}
    validate(cfg, Schema)
    ds = DATASETS.build(cfg["dataset"])
    assert isinstance(ds, SemanticKITTIDataset) and ds.sequences == ["08"] and len(ds) == 2
    with pytest.raises(ConfigError, match="voxel_size: expected"):
        validate({"dataset": {**cfg["dataset"], "voxel_size": "big"}}, Schema)
    with pytest.raises(ConfigError, match="unknown key"):
        validate({"dataset": {**cfg["dataset"], "voxel_sise": [0.1] * 3}}, Schema)


def test_generated_data_reads_like_real(root):
    ds = SemanticKITTIDataset(str(root), split="val", augment=False)
    s = ds[1]
    f = ds.frames[1]
    scan = read_scan(f.scan)
    sem, _ = read_label(f.label, len(scan))
    np.testing.assert_array_equal(s["points"].numpy(), scan)  # no augmentation on val
    np.testing.assert_array_equal(s["labels"].numpy(), LabelMap().to_train(sem))
    assert s["image"].shape == (3, 370, 1226) and s["image_hw"] == (370, 1226)
    test = SemanticKITTIDataset(str(root), split="test", sequences=["11"])
    assert not test[0]["has_labels"] and (test[0]["labels"] == 255).all()


def test_collate_flat_batch(root):
    ds = SemanticKITTIDataset(str(root), split="train", sequences=["00"], voxel_size=[0.2, 0.2, 0.2],
                              image_crop_hw=[256, 512])
    val = SemanticKITTIDataset(str(root), split="val", voxel_size=[0.2, 0.2, 0.2])
    samples = [ds[0], ds[1], val[0]]  # mixed image sizes: crops and a full val image
    b = collate_kitti(samples)
    assert set(b) == BATCH_KEYS
    n = [len(s["points"]) for s in samples]
    assert b["offsets"].tolist() == [0, n[0], n[0] + n[1], sum(n)]
    assert b["points"].shape == (sum(n), 4) and b["labels"].shape == (sum(n),)
    assert (b["batch_idx"][b["offsets"][1]:b["offsets"][2]] == 1).all()
    # voxels: batch column set, inverse map global and consistent with batch_idx
    assert b["voxel_coords"].dtype == torch.int32
    assert (b["voxel_coords"][b["point2voxel"], 0].long() == b["batch_idx"]).all()
    assert b["voxel_num_points"].sum() == sum(n)
    # same voxels as voxelizing the whole batch at once with a batch column
    whole = voxelize(b["points"], [0.2] * 3, ds.point_range, batch_idx=b["batch_idx"])
    torch.testing.assert_close(whole.coords, b["voxel_coords"])
    torch.testing.assert_close(whole.point2voxel, b["point2voxel"])
    torch.testing.assert_close(whole.features, b["voxel_features"], atol=1e-5, rtol=1e-5)
    # images padded to the largest; pixel indices index into the padded batch image
    assert b["images"].shape == (3, 3, 370, 1226)
    assert b["image_hw"].tolist() == [[256, 512], [256, 512], [370, 1226]]
    for i, s in enumerate(samples):
        lo, hi = b["img_offsets"][i], b["img_offsets"][i + 1]
        assert (b["img_batch_idx"][lo:hi] == i).all()
        np.testing.assert_array_equal(b["img_point_idx"][lo:hi] - b["offsets"][i], s["img_point_idx"])
        vu = b["img_pixel_vu"][lo:hi]
        torch.testing.assert_close(b["images"][i][:, vu[:, 0], vu[:, 1]], s["image"][:, vu[:, 0], vu[:, 1]])
        assert (vu[:, 0] < b["image_hw"][i, 0]).all() and (vu[:, 1] < b["image_hw"][i, 1]).all()
    assert b["frame_ids"] == ["00/000000", "00/000001", "08/000000"] and b["batch_size"] == 3


def test_dataloader_with_workers(root):
    ds = SemanticKITTIDataset(str(root), split="train", sequences=["00", "08"], voxel_size=[0.2, 0.2, 0.2])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_kitti)
    batches = list(loader)
    assert len(batches) == 2 and all(b["batch_size"] == 2 for b in batches)
    # augmentations depend on (seed, epoch, index) only: the same with or without workers
    torch.testing.assert_close(batches[0]["points"], collate_kitti([ds[0], ds[1]])["points"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["points"], batches[0]["points"][: len(ds[0]["points"])])
