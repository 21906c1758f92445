"""The shift study (issue 11): PSSM's Ω shares against a brute-force count, the output CMD
against a float64 formula, the study's cells and their dependencies, the same LiDAR for
every degradation, and a tiny study run end to end whose cell, rerun with --cell, gives the
same figures bitwise (threads: 1)."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kitti_common import POINT, ROOT, needs_spconv

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
    from pcseg_kd.engine.kitti.diagnostics import output_cmd

    g = torch.Generator().manual_seed(1)
    batches, s_all, t_all = [], [], []
    for n, m in ((50, 20), (40, 30)):
        idx = torch.randperm(n, generator=g)[:m]
        s, t = torch.randn(n, 5, generator=g), torch.randn(m, 5, generator=g) * 2
        batches.append({"s": s, "t": t, "img_point_idx": idx, "labels": torch.zeros(n, dtype=torch.long)})
        s_all.append(s[idx].double().softmax(-1).numpy())
        t_all.append(t.double().softmax(-1).numpy())
    got = output_cmd(Fixed("points", "s"), Fixed("in_view", "t"), batches, torch.device("cpu"))
    assert got == pytest.approx(cmd_float64(np.concatenate(s_all), np.concatenate(t_all)), rel=1e-10)
    same = output_cmd(Fixed("in_view", "t"), Fixed("in_view", "t"), batches, torch.device("cpu"))
    assert same == 0.0
    with pytest.raises(ValueError, match="no in-view points"):
        output_cmd(Fixed("points", "s"), Fixed("in_view", "t"), [], torch.device("cpu"))


# ----------------------------------------------------------------------------- the grid
def test_cells_train_each_teacher_once_and_the_baseline_once_per_seed(tmp_path):
    from pcseg_kd.engine.kitti.shift_study import cells, load_study
    from pcseg_kd.engine.runner import import_all
    import_all()
    study = load_study(STUDY)
    all_cells = cells(study, tmp_path)
    kinds = [c["kind"] for c in all_cells]
    assert kinds.count("teacher") == 2 * 3 and kinds.count("baseline") == 3 and kinds.count("student") == 2 * 3 * 4 * 3
    first_student = kinds.index("student")
    assert all(k == "teacher" for k in kinds[:6]) and kinds[6:first_student] == ["baseline"] * 3
    teachers = {c["name"]: c for c in all_cells if c["kind"] == "teacher"}
    assert all(c["seed"] == 0 and c["cfg"]["stages"] == ["teacher"] for c in teachers.values())
    for c in all_cells:
        if c["kind"] == "student":
            t = teachers[c["needs"][0]]
            assert (t["teacher"], t["degradation"]) == (c["teacher"], c["degradation"])
            assert c["cfg"]["teacher_checkpoint"] == str(t["dir"] / "teacher" / "final.pt")
            assert c["cfg"]["data"]["train"]["root"] == t["cfg"]["data"]["train"]["root"]  # the teacher's images
            assert c["cfg"]["data"]["train"]["seed"] == c["seed"] == c["cfg"]["seed"]  # augmentation follows the seed
            assert c["cfg"]["distiller"]["type"] == c["method"]
        if c["kind"] == "baseline":
            assert set(c["needs"]) == set(teachers) and c["cfg"]["distiller"]["type"] == "none"
    roots = {c["cfg"]["data"]["train"]["root"] for c in teachers.values()}
    assert roots == {f"data/synthetic_kitti_shift_d{d}" for d in ("0", "0.5", "1")}
    q = {c["cfg"]["data"]["train"]["root"]: c["cfg"]["data"]["synthetic"]["quality"] for c in teachers.values()}
    assert q["data/synthetic_kitti_shift_d0.5"] == {"degradation": 0.5}


def test_gather_gives_paired_deltas_with_their_intervals(tmp_path):
    """gather() on hand-written cell.json files: every paired Δ (student − no-KD of the same
    seed; KD+PSSM − KD) against a hand computation with t(0.975, 2) = 4.3027, records keep
    their keys and get their cell's delta_ci95, the Markdown marks intervals that exclude 0."""
    import json

    from pcseg_kd.engine.kitti.shift_study import RECORD_KEYS, gather

    study = {"name": "fake", "config_path": "study.yaml", "config_overrides": [], "seeds": [0, 1, 2],
             "teachers": {"fusion": []}, "degradations": [0.0], "teacher_seed": 0, "paper": {},
             "methods": {"none": [], "kd": [], "kd_pssm": []}}
    base = {0: 30.0, 1: 33.0, 2: 31.0}
    kd = {0: 30.5, 1: 32.0, 2: 32.5}           # Δ: +0.5, -1.0, +1.5: the interval holds 0
    kd_pssm = {0: 32.0, 1: 35.2, 2: 32.9}      # Δ: +2.0, +2.2, +1.9; PSSM's own: +1.5, +3.2, +0.4
    all_cells = [{"name": "teacher-fusion-d0", "kind": "teacher", "teacher": "fusion", "degradation": 0.0,
                  "method": None, "seed": 0, "dir": tmp_path / "t"}]
    all_cells += [{"name": "none", "kind": "baseline", "teacher": None, "degradation": None, "method": "none",
                   "seed": s, "dir": tmp_path / f"b{s}"} for s in base]
    all_cells += [{"name": f"fusion-d0-{m}", "kind": "student", "teacher": "fusion", "degradation": 0.0, "method": m,
                   "seed": s, "dir": tmp_path / f"{m}{s}"} for m in ("kd", "kd_pssm") for s in base]
    for c in all_cells:
        c["dir"].mkdir()
        v = {"teacher": 45.0, "baseline": base, "kd": kd, "kd_pssm": kd_pssm}[c["method"] and c["method"].replace(
            "none", "baseline") or "teacher"]
        v = v if isinstance(v, float) else v[c["seed"]]
        out = {"in_view": v, "all": v - 10, "seconds": 1.0, "omega_last_epoch": None,
               "output_cmd": {"fusion-d0": 0.1} if c["kind"] == "baseline" else 0.1}
        (c["dir"] / "cell.json").write_text(json.dumps(out))
    res = gather(study, tmp_path / "w", all_cells)

    def interval(diffs):
        m, sd = np.mean(diffs), np.std(diffs, ddof=1)
        return [m - 4.302653 * sd / 3 ** 0.5, m + 4.302653 * sd / 3 ** 0.5]
    cell = res["summary"]["fusion"]["d0"]
    assert cell["kd_pssm"]["delta_in_view"]["mean"] == pytest.approx(2.0333333)
    assert cell["kd_pssm"]["delta_in_view_ci95"] == pytest.approx(interval([2.0, 2.2, 1.9]), abs=1e-5)
    assert cell["kd_pssm"]["delta_all_ci95"] == pytest.approx(interval([2.0, 2.2, 1.9]), abs=1e-5)
    assert cell["kd_pssm"]["delta_in_view"]["excludes_zero"] and not cell["kd"]["delta_in_view"]["excludes_zero"]
    assert cell["kd"]["delta_in_view_ci95"] == pytest.approx(interval([0.5, -1.0, 1.5]), abs=1e-5)
    effect = res["pssm_effect"]["fusion"]["d0"]["kd_pssm-kd"]
    assert effect["ci95"] == pytest.approx(interval([1.5, 3.2, 0.4]), abs=1e-5) and effect["seeds"] == [0, 1, 2]
    for rec in res["records"]:
        assert set(RECORD_KEYS) <= set(rec)
        assert rec["delta_ci95"] == (None if rec["method"] == "none" else cell[rec["method"]]["delta_in_view_ci95"])
    md = (tmp_path / "w" / "results.md").read_text()
    assert "[+2.03 ± 0.15 (n=3, 95 % CI [+1.65, +2.41]) *]" in md
    assert "[+0.33 ± 1.26 (n=3, 95 % CI [-2.79, +3.46])]" in md
    assert "| fusion | 0 | +1.70 ± 1.41 (n=3, 95 % CI [-1.80, +5.20]) | – |" in md  # PSSM's own effect


@pytest.mark.parametrize("override, message", [
    ("methods={_delete_: true, kd: []}", "methods must include none"),
    ("methods.kdd=[]", "unknown: ['kdd']"),
    ("degradations=[0.0,1.5]", "degradations must be distinct numbers in [0, 1]"),
    ("seeds=[1,1]", "seeds must be a non-empty list of distinct seeds"),
    ("teachers={_delete_: true}", "teachers must name at least one teacher"),
])
def test_bad_study_configs_are_refused(override, message):
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.shift_study import load_study
    with pytest.raises(ConfigError) as e:
        load_study(STUDY, [override])
    assert message in str(e.value)


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


# ----------------------------------------------------------------------------- end to end
TINY = ["data.synthetic={sequences: ['00', '08'], frames: 3, seed: 0, render_scale: 0.125, lidar: {azimuth_steps: 256}}",
        "data.train.max_frames=null", "data.val.frame_stride=1",
        "data.train.voxel_size=[0.2,0.2,0.2]", "data.val.voxel_size=[0.2,0.2,0.2]", f"student.model={POINT}",
        "teacher.optim.epochs=1", "student.optim.epochs=2", "teacher.optim.max_steps_per_epoch=1",
        "student.optim.max_steps_per_epoch=2", "eval_interval=1"]


def tiny_study(tmp_path):
    q = lambda items: "[" + ", ".join('"' + s.replace('"', '\\"') + '"' for s in items) + "]"  # noqa: E731
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"_base_: {STUDY}\nbase: {ROOT / 'configs/kitti/shift_study_cell.yaml'}\n"
                   f"root: {tmp_path / 'data/r'}\ndegradations: [0.0, 1.0]\nseeds: [0]\n"
                   "teachers: {_delete_: true, fusion: []}\n"
                   "methods: {_delete_: true, none: ['distiller={_delete_: true, type: none}'], dkd_pssm: []}\n"
                   f"overrides: {q(TINY)}\n")
    return cfg


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/kitti_table.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@needs_spconv
def test_a_tiny_study_runs_and_a_cell_rerun_reproduces_it(tmp_path):
    import json
    cfg, work = tiny_study(tmp_path), tmp_path / "w"
    r = run_tool(cfg, "--jobs", "2", "--work-dir", work)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((work / "results.json").read_text())
    from pcseg_kd.engine.kitti.shift_study import RECORD_KEYS
    recs = results["records"]
    assert len(recs) == 2 * 2  # (none, dkd_pssm) x D, one seed; the no-KD record repeated per teacher and D
    assert all(set(RECORD_KEYS) <= set(rec) for rec in recs)
    for rec in recs:
        assert rec["baseline_in_view"] is not None and math.isfinite(rec["output_cmd"]) and rec["output_cmd"] >= 0
        if rec["method"] == "none":
            assert rec["student_in_view"] == rec["baseline_in_view"] and rec["omega_one_share"] is None
        else:
            assert 0 <= rec["omega_one_share"] <= 1 and 0 <= rec["omega_zero_share"] <= 1
    assert (work / "shift_study.png").stat().st_size > 1000 and "| fusion | 1 |" in (work / "results.md").read_text()
    # one cell again from scratch: the same figures, bitwise (threads: 1)
    cell = work / "students/seed0/fusion-d1-dkd_pssm"
    before = json.loads((cell / "cell.json").read_text())
    shutil.rmtree(cell)
    r = run_tool(cfg, "--work-dir", work, "--cell", "fusion-d1-dkd_pssm", "--seed", "0", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    after = json.loads((cell / "cell.json").read_text())
    for key in ("in_view", "all", "iou_in_view", "omega_last_epoch", "output_cmd"):
        assert after[key] == before[key], key
    assert "fusion-d1-dkd_pssm seed 0: mIoU in view" in r.stdout and "PSSM over the last epoch" in r.stdout
    r = run_tool(cfg, "--work-dir", work, "--gather")
    timeless = lambda rs: [{k: v for k, v in rec.items() if k != "cell_seconds"} for rec in rs]  # noqa: E731
    assert r.returncode == 0 and timeless(json.loads((work / "results.json").read_text())["records"]) == timeless(recs)


def test_cli_errors_name_the_cell_or_the_option(tmp_path):
    cfg = tiny_study(tmp_path)
    r = run_tool(cfg, "--work-dir", tmp_path / "w", "--cell", "fusion-d2-kd", "--seed", "0")
    assert r.returncode == 1 and "is not a cell of this study" in r.stderr and "fusion-d1-dkd_pssm" in r.stderr
    r = run_tool(cfg, "seeds=[0,1]", "--work-dir", tmp_path / "w", "--cell", "none")
    assert r.returncode == 1 and "give --seed" in r.stderr
    r = run_tool(cfg, "--work-dir", tmp_path / "w", "--gather")
    assert r.returncode == 1 and "cells are not done" in r.stderr
    r = run_tool(ROOT / "configs/kitti/table6_quickstart.yaml", "--jobs", "2")
    assert r.returncode == 1 and "options of a shift-study config" in r.stderr


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
