"""Size presets (``size=tiny|full``, configs/kitti/_sizes_) under both teachers, and the LiDAR-only
no-KD config (configs/kitti/none.yaml) training on a dataset without image_2/ or calib.txt."""
from __future__ import annotations

import inspect
import shutil

import pytest
import torch
import yaml
from kitti_common import ROOT, needs_spconv

from pcseg_kd.config import ConfigError
from pcseg_kd.engine.kitti.schema import load_kitti_experiment

FUSION = str(ROOT / "configs/kitti_fusion_pssm.yaml")
IMAGE = str(ROOT / "configs/kitti_image_pssm.yaml")
SIZES = ROOT / "configs/kitti/_sizes_"


def preset(name):
    return yaml.safe_load((SIZES / f"{name}.yaml").read_text())


def defaults(cls):
    return {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
            for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def test_full_preset_is_the_constructors_defaults():
    from pcseg_kd.models.fusion_teacher import FusionTeacher
    from pcseg_kd.models.image.resnet_fcn import ResNetFCN
    from pcseg_kd.models.sparse.spunet import SpUNet

    full = preset("full")
    spunet, fcn = defaults(SpUNet), defaults(ResNetFCN)
    for section in (full["student"]["model"], full["teacher"]["model"]["fusion_teacher"]["point"]):
        assert {k: spunet[k] for k in section} == section
    for section in (full["teacher"]["model"]["resnet_fcn"], full["teacher"]["model"]["fusion_teacher"]["image"]):
        assert {k: fcn[k] for k in section} == section
    assert full["teacher"]["model"]["fusion_teacher"]["fusion_channels"] == defaults(FusionTeacher)["fusion_channels"]


@needs_spconv
@pytest.mark.parametrize("config,teacher", [(FUSION, "fusion_teacher"), (IMAGE, "resnet_fcn")])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_preset_loads_and_builds_under_both_teachers(config, teacher, size):
    from pcseg_kd.registry import MODELS

    cfg = load_kitti_experiment(config, [f"size={size}"])
    p = preset(size)
    want_teacher = p["teacher"]["model"][teacher]
    assert {k: cfg["teacher"]["model"][k] for k in want_teacher} == want_teacher
    assert {k: cfg["student"]["model"][k] for k in p["student"]["model"]} == p["student"]["model"]
    assert cfg["size"] is None  # applied once: WORK/config.yaml holds the values, not the preset's name
    device = "cpu" if size == "tiny" else "meta"  # the full teacher is built without weights
    with torch.device(device):
        t, s = MODELS.build(cfg["teacher"]["model"]), MODELS.build(cfg["student"]["model"])
    assert type(t).__name__ == {"fusion_teacher": "FusionTeacher", "resnet_fcn": "ResNetFCN"}[teacher]
    n_t = sum(x.numel() for x in t.parameters())
    n_s = sum(x.numel() for x in s.parameters())
    if size == "tiny":
        assert n_t < 1_000_000 and n_s < 500_000
        assert cfg["student"]["optim"]["epochs"] == cfg["teacher"]["optim"]["epochs"] == 1
        assert cfg["data"]["train"]["max_frames"] == 8 and cfg["data"]["num_workers"] == 0
    else:
        assert n_t > 5_000_000 and n_s > 5_000_000
        assert cfg["student"]["optim"]["epochs"] == 50  # full touches the models only


def test_command_line_wins_over_the_preset_and_the_preset_over_the_files():
    quick = str(ROOT / "configs/kitti/quickstart.yaml")  # sets test-sized widths in its file
    cfg = load_kitti_experiment(quick, ["size=full", "student.model.base_channels=8", "student.optim.epochs=3"])
    assert cfg["student"]["model"]["base_channels"] == 8  # command line
    assert cfg["student"]["model"]["channels"] == preset("full")["student"]["model"]["channels"]  # preset > file
    assert cfg["student"]["optim"]["epochs"] == 3
    cfg = load_kitti_experiment(quick, ["size=tiny", "teacher.optim.max_steps_per_epoch=2"])
    assert cfg["teacher"]["optim"]["max_steps_per_epoch"] == 2 and cfg["student"]["optim"]["max_steps_per_epoch"] == 4


def test_a_teacher_checkpoint_keeps_its_teachers_size_and_an_unknown_preset_is_named():
    cfg = load_kitti_experiment(FUSION, ["size=tiny", "teacher_checkpoint=some/final.pt"])
    assert "point" not in cfg["teacher"]["model"]  # the checkpoint's weights fix the teacher's widths
    with pytest.raises(ConfigError, match=r"size: no preset 'huge' .*have: full, tiny"):
        load_kitti_experiment(FUSION, ["size=huge"])


@needs_spconv
def test_lidar_only_config_trains_on_a_dataset_without_images(tmp_path):
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti

    root = tiny_synthetic(tmp_path / "data", sequences=("00", "08"), frames=2, seed=2)
    for seq in ("00", "08"):  # a velodyne + labels download
        shutil.rmtree(root / "sequences" / seq / "image_2")
        (root / "sequences" / seq / "calib.txt").unlink()
    over = ["size=tiny", f"data.train.root={root}", f"data.val.root={root}", "data.train.sequences=[00]",
            "data.val.sequences=[08]", "data.train.voxel_size=[0.2,0.2,0.2]", "data.val.voxel_size=[0.2,0.2,0.2]",
            "student.optim.max_steps_per_epoch=1", "student.optim.batch_size=1"]
    cfg = load_kitti_experiment(str(ROOT / "configs/kitti/none.yaml"), over)
    assert cfg["protocol"] == "full" and cfg["stages"] == ["student"]
    res = kitti.run_kitti(cfg, tmp_path / "work", DistEnv(), progress=False)
    assert set(res) == {"student"} and (tmp_path / "work" / "student" / "final.pt").is_file()
    assert "all" in res["student"] and "in_view" not in res["student"]  # no image: no in-view rows
