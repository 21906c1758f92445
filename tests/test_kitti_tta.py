"""Test-time augmentation (``tools/test.py --tta N``): the view schedule, the vote against a
brute-force float64 reference that transforms and voxelizes each scan by hand, a model blind
to the views giving its ``--tta 1`` output, and ``--tta 4`` end to end on a tiny quickstart run."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides, tiny_root
import torch
from torch import nn

from pcseg_kd.data.kitti.collate import collate_kitti
from pcseg_kd.data.kitti.voxelize import voxelize
from pcseg_kd.engine.kitti.tta import TTAModel, View, apply_view, check_tta, transform_points, tta_views, view_matrix

VOXEL_KEYS = ("points", "voxel_features", "voxel_coords", "voxel_num_points", "voxel_offsets", "point2voxel")
NUM_CLASSES = 19


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "kitti_tta", frames=2, seed=3)


def val_scans(root, **kw):
    """The two validation scans (full 360° scans, with images), loaded and collated as a batch."""
    from pcseg_kd.data.kitti import SemanticKITTIDataset

    ds = SemanticKITTIDataset(str(root), split="val", sequences=["08"], voxel_size=[0.2] * 3, **kw)
    samples = [ds[i] for i in range(len(ds))]
    return ds, samples, collate_kitti(samples)


class RemissionModel(nn.Module):
    """Logits from each point's remission only: every view gives the same output."""

    num_classes = NUM_CLASSES

    def __init__(self, rows: str = "points"):
        super().__init__()
        self.rows = rows
        self.w = nn.Parameter(torch.linspace(-3.0, 3.0, NUM_CLASSES))

    def forward(self, batch):
        logits = 4 * torch.sin(batch["points"][:, 3:4] * 7 * self.w + self.w)
        if self.rows == "in_view":
            logits = logits[batch["img_point_idx"]]
        return {"logits": logits, "point_valid": batch["point2voxel"] >= 0}


class VoxelModel(nn.Module):
    """Per-voxel logits from the voxel features, the voxel's place in the grid and its point
    count, read by each point through point2voxel (zero without a voxel), as the student does."""

    rows = "points"
    num_classes = NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7 + 3 + 1, NUM_CLASSES)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g) * 2)

    def forward(self, batch):
        where = batch["voxel_coords"][:, 1:].float() / torch.tensor(batch["spatial_shape"], dtype=torch.float32)
        x = torch.cat([batch["voxel_features"], where, batch["voxel_num_points"].float().log1p().unsqueeze(1)], 1)
        p2v = batch["point2voxel"]
        valid = p2v >= 0
        logits = torch.where(valid.unsqueeze(1), self.lin(x)[p2v.clamp_min(0)], torch.zeros(()))
        return {"logits": logits, "point_valid": valid}


# ----------------------------------------------------------------------------- the views
def test_views_are_the_documented_deterministic_schedule():
    assert tta_views(1) == [View(0.0, False, False)]
    assert tta_views(2) == [View(0.0, False, False), View(0.0, True, False)]
    # identity, half turn, x-flip, x-flip then half turn (= y-flip), exactly
    assert [view_matrix(v) for v in tta_views(4)] == [[[1, 0], [0, 1]], [[-1, 0], [0, -1]],
                                                      [[-1, 0], [0, 1]], [[1, 0], [0, -1]]]
    quarter = tta_views(8)
    assert [v.angle for v in quarter[:4]] == pytest.approx([0, math.pi / 2, math.pi, 3 * math.pi / 2])
    assert all(e in (-1.0, 0.0, 1.0) for v in quarter for row in view_matrix(v) for e in row)  # no 1e-16 residue
    for n in range(1, 10):
        views = tta_views(n)
        assert views == tta_views(n) and len(views) == n and views[0] == View(0.0, False, False)
        mats = [np.array(view_matrix(v)) for v in views]
        assert len({tuple(np.round(m, 9).ravel()) for m in mats}) == n, f"repeated view in tta_views({n})"
        for v, m in zip(views, mats):
            np.testing.assert_allclose(m @ m.T, np.eye(2), atol=1e-12)              # no scaling
            assert round(np.linalg.det(m)) == (-1 if v.flip_x != v.flip_y else 1)  # flips reflect, turns rotate
            assert 0 <= v.angle < 2 * math.pi


def test_a_view_flips_first_then_rotates_counter_clockwise():
    pts = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    out = transform_points(pts, View(math.pi / 2, True, False))  # (1, 2) -> (-1, 2) -> (-2, -1)
    assert out.tolist() == [[-2.0, -1.0, 3.0, 0.5]]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_a_bad_number_of_views_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"--tta must be a whole number of views >= 1 \(1 = no test-time"):
        tta_views(bad)
    assert check_tta(np.int64(3)) == 3


# ----------------------------------------------------------------------------- the vote
@pytest.mark.parametrize("rows", ["points", "in_view"])
def test_a_model_blind_to_the_views_gives_its_tta1_output(data_root, rows):
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti.evaluate import evaluate

    ds, _, batch = val_scans(data_root)
    model = RemissionModel(rows).eval()
    tta = TTAModel(model, 4, ds.voxel_size, ds.point_range, ds.out_of_range)
    assert tta.rows == rows and tta.num_classes == NUM_CLASSES
    with torch.no_grad():
        plain, voted = model(batch), tta(batch)
    torch.testing.assert_close(voted["logits"], plain["logits"].log_softmax(-1), rtol=0, atol=1e-6)
    assert torch.equal(voted["point_valid"], plain["point_valid"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_kitti)
    scores = [evaluate(m, loader, DistEnv(), NUM_CLASSES, ds.ignore_index, ds.class_names) for m in (model, tta)]
    as_text = [json.dumps(sc, sort_keys=True) for sc in scores]  # text: an absent class's IoU is NaN != NaN
    assert as_text[0] == as_text[1] and scores[0]["in_view"]["points"] > 0


def reference_probs(ds, samples, views, model):
    """The vote computed the long way: each scan transformed by hand in float64 (flip, then
    rotate by cos/sin of the view's angle), voxelized alone with the dataset's settings,
    collated, run; softmax in float64, averaged over the views where the point has a voxel."""
    total, count, batches = 0.0, 0, []
    for view in views:
        c, s = math.cos(view.angle), math.sin(view.angle)
        seen = []
        for smp in samples:
            p = smp["points"].numpy().astype(np.float64)
            x = -p[:, 0] if view.flip_x else p[:, 0]
            y = -p[:, 1] if view.flip_y else p[:, 1]
            pts = torch.from_numpy(np.stack([c * x - s * y, s * x + c * y, p[:, 2], p[:, 3]], 1).astype(np.float32))
            vox = voxelize(pts, ds.voxel_size, ds.point_range, out_of_range=ds.out_of_range)
            seen.append({**smp, "points": pts, "voxel_features": vox.features, "voxel_coords": vox.coords,
                         "voxel_num_points": vox.num_points, "point2voxel": vox.point2voxel,
                         "spatial_shape": vox.spatial_shape})
        batch = collate_kitti(seen)
        batches.append(batch)
        with torch.no_grad():
            out = model(batch)
        valid = out["point_valid"].unsqueeze(1)
        total = total + torch.where(valid, out["logits"].double().softmax(-1), torch.zeros((), dtype=torch.float64))
        count = count + valid.long()
    return total / count.clamp_min(1), count.squeeze(1), batches


@pytest.mark.parametrize("n", [4, 6])
def test_the_vote_equals_a_brute_force_reference(data_root, n):
    # x range off centre and y range narrow: mirrored and turned views lose and gain points
    # (out_of_range: drop), so the mean really runs over a different number of views per point
    ds, samples, batch = val_scans(data_root, point_range=[-20, -12, -3, 16, 12, 1], out_of_range="drop",
                                   load_image=False)
    model = VoxelModel().eval()
    views = tta_views(n)
    want, count, ref_batches = reference_probs(ds, samples, views, model)
    for view, ref in zip(views, ref_batches):  # each view's batch is what collating its scans gives
        got = apply_view(batch, view, ds.voxel_size, ds.point_range, ds.out_of_range)
        assert got["spatial_shape"] == ref["spatial_shape"]
        for key in VOXEL_KEYS:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), (view, key)
    with torch.no_grad():
        out = TTAModel(model, n, ds.voxel_size, ds.point_range, ds.out_of_range)(batch)
    assert ((count > 0) & (count < n)).sum() > 100 and (count == 0).sum() > 100 and (count == n).sum() > 100
    assert torch.equal(out["point_valid"], count > 0)
    torch.testing.assert_close(out["logits"].double().exp()[count > 0], want[count > 0], rtol=0, atol=1e-6)
    assert (out["logits"][count == 0] == 0).all()  # no voxel in any view: zero logits, as the model gives


# ----------------------------------------------------------------------------- tools/test.py
def load_test_tool():
    spec = importlib.util.spec_from_file_location("kitti_test_tool", ROOT / "tools/test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_spconv
def test_tta4_end_to_end_on_a_tiny_quickstart_run(data_root, tmp_path, capsys):
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti import train as kitti
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment

    over = tiny_overrides(data_root, student_epochs=1, steps=1, stages="[baseline]", **{"data.val.frame_stride": 1})
    kitti.run_kitti(load_kitti_experiment(QUICK, over), tmp_path, DistEnv(), progress=False)
    tool = load_test_tool()
    common = [QUICK, *over, "--work-dir", str(tmp_path), "--stage", "baseline", "--no-progress"]
    plain = tool.main(common)
    voted = tool.main(common + ["--tta", "4", "--batch-size", "2", "--predictions", str(tmp_path / "preds")])
    printed = capsys.readouterr().out
    assert "(2 scans, TTA over 4 views): mIoU {\"all\": " in printed
    saved = json.loads((tmp_path / "test_baseline_val_tta4.json").read_text())
    assert saved["tta"] == 4 and saved["written"] == 2
    assert json.loads((tmp_path / "test_baseline_val.json").read_text())["tta"] == 1  # the plain score stays
    for res in (plain, voted):
        assert {"all", "in_view"} <= set(res["metrics"]) and 0 <= res["metrics"]["all"]["miou"] <= 100
    assert voted["metrics"]["all"]["points"] == plain["metrics"]["all"]["points"]
    assert len(list((tmp_path / "preds" / "sequences" / "08" / "predictions").glob("*.label"))) == 2


@pytest.mark.parametrize("value,message", [("0", "error: --tta must be a whole number of views >= 1"),
                                           ("-2", "error: --tta must be a whole number of views >= 1")])
def test_bad_tta_values_are_one_error_line(value, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        load_test_tool().main([QUICK, "--work-dir", str(tmp_path), "--tta", value])
    assert str(e.value).startswith(message) and f"got {value}" in str(e.value)
    assert not any(tmp_path.iterdir())  # refused before the config or a checkpoint is read


@pytest.mark.parametrize("value", ["x", "2.5"])
def test_a_tta_that_is_not_a_number_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        load_test_tool().main([QUICK, "--tta", value])
    assert e.value.code == 2 and f"argument --tta: invalid int value: '{value}'" in capsys.readouterr().err


def test_test_checkpoint_refuses_a_bad_tta_before_reading_anything(tmp_path):
    from pcseg_kd.engine.kitti.predict import test_checkpoint

    with pytest.raises(ValueError, match="--tta must be a whole number of views >= 1"):
        test_checkpoint({}, tmp_path / "missing.pt", tta=0)
