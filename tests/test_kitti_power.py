"""tools/kitti_power.py: the analysis on hand-written metrics (paired interval, seeds for a
target, per-class variance shares, moving confusions) against independent computations, its
errors, and (slow) a tiny run end to end whose confusions agree with the runs' own IoU."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from kitti_common import QUICK, ROOT, needs_spconv, tiny_overrides

TOOL = ROOT / "tools/kitti_power.py"
CLASSES = ["road", "parking", "car", "bicycle"]


def tool():
    spec = importlib.util.spec_from_file_location("kitti_power", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def metrics(b_iou, s_iou, key="in_view"):
    def block(iou):
        return {key: {"miou": float(np.mean([v or 0.0 for v in iou])), "iou": dict(zip(CLASSES, iou))}}
    return {"baseline": block(b_iou), "student": block(s_iou)}


def fake_work(tmp_path, seeds=(0, 1, 2, 3, 4)):
    """Five seeds: road and parking trade places from seed to seed (the spread), bicycle is
    absent from the validation rows (None); confusions where road -> parking moves most."""
    rng = np.random.default_rng(0)
    work = tmp_path / "w"
    runs = []
    for s in seeds:
        swing = [0.0, 20.0, -15.0, 5.0, -10.0][s]
        b = [80.0 + swing, 40.0 - swing, 60.0 + rng.normal(), None]
        st = [b[0] + 1.0 + rng.normal(), b[1] + 0.5, b[2] + 2.0 + rng.normal(), None]
        (work / f"seed{s}").mkdir(parents=True)
        m = metrics(b, st)
        runs.append(m)
        (work / f"seed{s}" / "metrics.json").write_text(json.dumps(m))
        conf = np.zeros((4, 5), dtype=int)
        conf[0] = [992 - 10 * (20 + swing), 10 * (20 + swing), 5, 0, 3]
        conf[1] = [30, 470, 0, 0, 0]
        conf[2] = [2, 0, 300, 0, 1]
        (work / f"seed{s}" / "confusion.json").write_text(json.dumps(
            {"in_view": {st_: {"checkpoint": [0, 0], "confusion": conf.tolist()} for st_ in ("baseline", "student")}}))
    (work / "teacher").mkdir()
    (work / "teacher" / "metrics.json").write_text(json.dumps({"teacher": {"in_view": {"miou": 70.0, "iou": {}}}}))
    return work, runs


def test_analysis_against_independent_computations(tmp_path):
    kp = tool()
    work, runs = fake_work(tmp_path)
    base = [r["baseline"]["in_view"]["miou"] for r in runs]
    stud = [r["student"]["in_view"]["miou"] for r in runs]
    confs = [np.array(json.loads((work / f"seed{s}" / "confusion.json").read_text())["in_view"]["baseline"]["confusion"])
             for s in range(5)]
    a = kp.analyse(runs, list(range(5)), "in_view", 1.5, 3, {"teacher": {"in_view": {"miou": 70.0}}},
                   {"baseline": confs})
    stats = pytest.importorskip("scipy.stats")
    d = np.array(stud) - np.array(base)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert a["delta"]["mean"] == pytest.approx(d.mean()) and a["delta"]["half_width"] == pytest.approx(half)
    assert a["delta_ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert a["baseline_std"] == pytest.approx(np.std(base, ddof=1))
    assert a["teacher_minus_baseline_in_view"] == pytest.approx(70.0 - np.mean(base))
    # seeds for the target: the first n whose half-width is <= 1.5, by brute force over scipy's t
    n = next(n for n in range(2, 1000) if stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) <= 1.5)
    assert a["seeds_for_target"] == n
    # variance shares: cov(class, mIoU) / var(mIoU); road and parking carry it, the absent class nothing
    x = np.array([[r["baseline"]["in_view"]["iou"][c] or 0.0 for c in CLASSES] for r in runs])
    miou = x.mean(1)
    assert miou == pytest.approx(base)  # absent counts 0, as in the mIoU
    shares = {c["class"]: c["baseline_share"] for c in a["classes"]}
    for i, c in enumerate(CLASSES):
        assert shares[c] == pytest.approx(np.cov(x[:, i], miou)[0, 1] / 4 / miou.var(ddof=1))
    assert sum(shares.values()) == pytest.approx(1.0) and shares["bicycle"] == 0.0
    assert sum(c["delta_share"] for c in a["classes"]) == pytest.approx(1.0)
    # the moving confusion: road -> parking, 20 + swing per cent of the road points
    top = a["confusions"]["baseline"][0]
    assert (top["label"], top["predicted"]) == ("road", "parking")
    assert top["per_seed"] == pytest.approx([20.0, 40.0, 5.0, 25.0, 10.0])
    assert top["std"] == pytest.approx(np.std([20, 40, 5, 25, 10], ddof=1))
    assert all(m["label"] != "bicycle" for m in a["confusions"]["baseline"])  # no labelled points: no rate


def run_tool(capsys, *args):
    """The tool in this process (its imports are paid once): (exit status, stdout, stderr)."""
    from pcseg_kd.utils.cli import run_main
    status = run_main(tool().main, [str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_analyses_finished_seeds_and_writes_the_report(tmp_path, capsys):
    work, runs = fake_work(tmp_path)
    status, out, err = run_tool(capsys, QUICK, "--seeds", 5, "--work-dir", work, "--analyse-only")
    assert status == 0, err
    a = json.loads((work / "power.json").read_text())
    md = (work / "power.md").read_text()
    assert md in out and "paired Δ (distilled − no-KD, same seed): " in md and "(n=5, 95 % CI [" in md
    assert "| road → parking | 20.0 / 40.0 / 5.0 / 25.0 / 10.0 |" in md
    assert "teacher: 70.00 in view" in md and a["seeds"] == [0, 1, 2, 3, 4]
    assert a["command"] == f"python tools/kitti_power.py {QUICK} --seeds 5"


def test_cli_errors(tmp_path, capsys):
    work, _ = fake_work(tmp_path, seeds=(0, 1))
    status, _, err = run_tool(capsys, QUICK, "--seeds", 3, "--work-dir", work, "--analyse-only")
    assert status == 1 and "seeds [2] have no finished no-KD and distilled student" in err
    status, _, err = run_tool(capsys, QUICK, "--seeds", 1, "--work-dir", work)
    assert status == 1 and "--seeds must be at least 2" in err
    status, _, err = run_tool(capsys, ROOT / "configs/kitti/none.yaml", "--seeds", 2, "--work-dir", work, "--analyse-only")
    assert status == 1 and "distiller.type is none" in err
    status, _, err = run_tool(capsys, QUICK, "student.optim.epochz=3", "--seeds", 2, "--work-dir", work)
    assert status == 1 and "epochz" in err


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    return tiny_synthetic(tmp_path_factory.mktemp("kitti_power"), sequences=("00", "08"), frames=2, seed=4)


@needs_spconv
@pytest.mark.slow
def test_tiny_power_run_end_to_end_resumes_and_its_confusions_match_the_runs(data_root, tmp_path):
    work = tmp_path / "w"
    over = tiny_overrides(data_root, student_epochs=1, steps=1) + ["distiller.teacher_source=cache"]
    cmd = [sys.executable, str(TOOL), QUICK, *over, "--seeds", "2", "--work-dir", str(work), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = json.loads((work / "power.json").read_text())
    assert a["seeds"] == [0, 1] and a["delta"]["n"] == 2 and "teacher_in_view" in a
    assert (work / "teacher_cache" / "meta.json").is_file()  # one cache for both seeds
    for s in (0, 1):
        cfg = (work / f"seed{s}" / "config.yaml").read_text()
        assert f"seed: {s}" in cfg and str(work / "teacher" / "teacher" / "final.pt") in cfg
        m = json.loads((work / f"seed{s}" / "metrics.json").read_text())
        conf = json.loads((work / f"seed{s}" / "confusion.json").read_text())["in_view"]
        for stage in ("baseline", "student"):  # a separate scoring pass gives the run's own IoU
            c = np.array(conf[stage]["confusion"], dtype=float)
            tp = np.diag(c[:, :-1])
            denom = c[:, :-1].sum(0) + c.sum(1) - tp
            for name, iou in zip(m[stage]["in_view"]["iou"], np.where(denom > 0, 100 * tp / np.maximum(denom, 1), np.nan)):
                got = m[stage]["in_view"]["iou"][name]
                assert (got is None and np.isnan(iou)) or got == pytest.approx(iou, abs=1e-6), (stage, name)
    stamp = (work / "seed1" / "student" / "final.pt").stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # finished: nothing trains again
    assert r.returncode == 0 and (work / "seed1" / "student" / "final.pt").stat().st_mtime_ns == stamp
    assert json.loads((work / "power.json").read_text())["delta"] == a["delta"]
