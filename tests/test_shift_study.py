"""The shift study's diagnostics: PSSM's Ω shares against a brute-force count, the output CMD
against a float64 formula, the same LiDAR for every degradation. The study runner itself:
tests/test_study.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from kitti_common import ROOT

STUDY = str(ROOT / "configs/kitti/shift_study.yaml")


# ----------------------------------------------------------------------------- Ω shares
def brute_omega(s, t, y, tau=0.996):
    """Ω of the authors' preset on probabilities, row by row in float64: 1 where the teacher
    is right, else d = (cos + 1) / 2 if cos >= tau, else 0 (REFERENCE.md §2)."""
    out = []
    for si, ti, yi in zip(s.double(), t.double(), y):
        ps, pt = si.softmax(-1).numpy(), ti.softmax(-1).numpy()
        cos = ps @ pt / (np.linalg.norm(ps) * np.linalg.norm(pt))
        out.append(1.0 if int(ti.argmax()) == int(yi) else (0.5 * (cos + 1) if cos >= tau else 0.0))
    return np.array(out)


@pytest.mark.parametrize("method", ["kd_pssm", "dkd_pssm"])
def test_omega_shares_count_the_distilled_rows(method):
    from pcseg_kd.registry import DISTILLERS
    import pcseg_kd.distill  # noqa: F401

    d = DISTILLERS.build({"type": method, "kd_weight": 1.0, "ignore_index": 255,
                          "pssm": {"preset": "reference", "space": "probs"}})
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 6, generator=g) * 3
    s = torch.randn(300, 6, generator=g) * 3
    t[:100] /= 3  # flatter teacher outputs, and students near them: cos >= 0.996 for some, Ω = d < 1
    s[:100] = t[:100] + 0.2 * torch.randn(100, 6, generator=g)
    y = torch.randint(0, 6, (300,), generator=g)
    y[280:] = 255  # unlabelled: not distilled, not counted
    assert d.pop_omega_shares() is None  # nothing tracked yet
    d.kd_loss(s, t, y)
    assert d.omega_counts is None  # tracking is off by default: no extra pass
    d.track_omega()
    d.kd_loss(s[:150], t[:150], y[:150])
    d.kd_loss(s[150:], t[150:], y[150:])  # counts add up over steps
    shares = d.pop_omega_shares()
    keep = (y != 255).numpy()
    ref = brute_omega(s, t, y)[keep]
    assert not ((ref > 1 - 1e-5) & (ref < 1)).any()  # no row where float32 rounding could decide "Ω = 1"
    assert shares["rows"] == keep.sum() == 280
    assert shares["one"] == pytest.approx((ref == 1).mean())
    assert shares["zero"] == pytest.approx((ref == 0).mean())
    assert shares["between"] == pytest.approx(((ref > 0) & (ref < 1)).mean())
    assert 0 < shares["between"] and 0 < shares["zero"] and 0 < shares["one"]  # all three kinds occur
    assert d.pop_omega_shares() is None  # reset by reading


@pytest.mark.parametrize("normalize", ["batch", "kept"])
def test_tracking_omega_leaves_the_loss_and_its_gradient_bitwise_unchanged(normalize):
    """Tracking computes Ω once and hands it to the loss as its weight (PyTorch path): the same
    loss and student gradient, bit for bit, as the untracked fused loss that computes Ω inside."""
    from pcseg_kd.registry import DISTILLERS
    import pcseg_kd.distill  # noqa: F401

    results = []
    for track in (False, True):
        d = DISTILLERS.build({"type": "dkd_pssm", "kd_weight": 0.1, "alpha": 7.0, "beta": 1.0, "temperature": 0.7,
                              "ignore_index": 255, "normalize": normalize,
                              "pssm": {"preset": "reference", "space": "probs"}})
        d.track_omega(track)
        g = torch.Generator().manual_seed(1)
        s = torch.randn(2000, 19, generator=g).requires_grad_()
        t, y = torch.randn(2000, 19, generator=g), torch.randint(0, 19, (2000,), generator=g)
        y[::7] = 255
        loss = d.kd_loss(s, t, y, 3)
        loss.backward()
        results.append((loss.detach(), s.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert d.omega_counts[2] == (y != 255).sum()


# ----------------------------------------------------------------------------- output CMD
class Fixed(nn.Module):
    """A 'model' whose logits are given per batch (rows: in_view or points)."""

    def __init__(self, rows, key):
        super().__init__()
        self.rows, self.key = rows, key

    def forward(self, batch):
        return {"logits": batch[self.key]}


def cmd_float64(x, y, k=5):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    total = np.linalg.norm(mx - my)
    for order in range(2, k + 1):
        total += np.linalg.norm(((x - mx) ** order).mean(0) - ((y - my) ** order).mean(0))
    return total


def test_output_cmd_is_the_cmd_of_the_in_view_softmax_outputs():
    from pcseg_kd.engine.kitti.diagnostics import output_cmd, teacher_in_view_logits

    g = torch.Generator().manual_seed(1)
    batches, s_all, t_all = [], [], []
    for n, m in ((50, 20), (40, 30)):
        idx = torch.randperm(n, generator=g)[:m]
        s, t = torch.randn(n, 5, generator=g), torch.randn(m, 5, generator=g) * 2
        batches.append({"s": s, "t": t, "img_point_idx": idx, "labels": torch.zeros(n, dtype=torch.long)})
        s_all.append(s[idx].double().softmax(-1).numpy())
        t_all.append(t.double().softmax(-1).numpy())
    cpu = torch.device("cpu")
    teacher = teacher_in_view_logits(Fixed("in_view", "t"), batches, cpu)
    assert [x.shape[0] for x in teacher] == [20, 30]
    got = output_cmd(Fixed("points", "s"), teacher, batches, cpu)
    assert got == pytest.approx(cmd_float64(np.concatenate(s_all), np.concatenate(t_all)), rel=1e-10)
    same = output_cmd(Fixed("in_view", "t"), teacher, batches, cpu)
    assert same == 0.0
    with pytest.raises(ValueError, match="no in-view points"):
        output_cmd(Fixed("points", "s"), [], [], cpu)
    with pytest.raises(ValueError, match="the loader gave 2 batches, the teacher's logits are of 3"):
        output_cmd(Fixed("points", "s"), teacher + teacher[:1], batches, cpu)
    with pytest.raises(ValueError, match="more batches than the 1 of the teacher's logits"):
        output_cmd(Fixed("points", "s"), teacher[:1], batches, cpu)


def test_unknown_image_quality_key_is_a_config_error():
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    with pytest.raises(ConfigError, match=r"data.synthetic: unknown key\(s\) \['degradaton'\]"):
        load_kitti_experiment(str(ROOT / "configs/kitti/quickstart.yaml"), ["data.synthetic.quality={degradaton: 1}"])


def test_every_degradation_has_the_same_lidar_files(tmp_path):
    from pcseg_kd.data.kitti.synthetic.generate import generate_dataset, synthetic_config
    from pcseg_kd.data.kitti.reader import read_scan
    from pcseg_kd.data.kitti import read_image
    spec = {"frames": 2, "seed": 3, "render_scale": 0.125, "lidar": {"azimuth_steps": 256}}
    for d in (0.0, 1.0):
        generate_dataset(tmp_path / f"d{d}", ["00"], synthetic_config({**spec, "quality": {"degradation": d}}),
                         progress=False)
    a, b = tmp_path / "d0.0/sequences/00", tmp_path / "d1.0/sequences/00"
    for f in ("velodyne/000000.bin", "velodyne/000001.bin", "labels/000001.label", "calib.txt", "poses.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert len(read_scan(a / "velodyne/000000.bin")) > 1000
    ia, ib = read_image(a / "image_2/000000.png"), read_image(b / "image_2/000000.png")
    assert ia.shape == ib.shape and np.abs(ia.astype(float) - ib.astype(float)).mean() > 5  # the images are not


def test_omega_counts_over_ranks_is_a_copy_and_none_without_tracking():
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti.train import omega_counts_over_ranks
    from pcseg_kd.registry import DISTILLERS
    import pcseg_kd.distill  # noqa: F401

    d = DISTILLERS.build({"type": "kd_pssm", "kd_weight": 1.0, "ignore_index": 255})
    assert omega_counts_over_ranks(d, DistEnv()) is None and omega_counts_over_ranks(None, DistEnv()) is None
    d.track_omega()
    assert omega_counts_over_ranks(d, DistEnv()).tolist() == [0, 0, 0]  # tracked, nothing counted yet
    d.omega_counts = torch.tensor([3, 1, 5])
    got = omega_counts_over_ranks(d, DistEnv())
    got += 1
    assert d.omega_counts.tolist() == [3, 1, 5]  # the distiller's own counts are untouched
