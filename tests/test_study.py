"""The one study runner (pcseg_kd/engine/kitti/study*.py, tools/kitti_table.py): the grids of the
shift study and of Table 6, the teacher-fit axis, subsets, config errors, the report's paired
intervals against a hand computation, the scheduler against a fake executor, the SLURM job's
parameters and command, and a tiny study end to end through submitit's local and debug
executors (the same figures, bitwise, and a --cell rerun reproduces them)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from kitti_common import POINT, ROOT, needs_spconv

STUDY = str(ROOT / "configs/kitti/shift_study.yaml")


@pytest.fixture(scope="module", autouse=True)
def _registries():
    from pcseg_kd.engine.runner import import_all
    import_all()


def load(path=STUDY, overrides=(), only=()):
    from pcseg_kd.engine.kitti.study import load_study, subset
    return subset(load_study(str(path), list(overrides)), list(only))


# ----------------------------------------------------------------------------- the grids
def test_shift_study_cells_teachers_once_caches_per_fit_baseline_once_per_seed(tmp_path):
    from pcseg_kd.engine.kitti.study import cells
    all_cells = cells(load(), tmp_path)
    kinds = [c["kind"] for c in all_cells]
    assert Counter(kinds) == {"teacher": 2 * 2, "cache": 2 * 2 * 2, "baseline": 5, "student": 2 * 2 * 2 * 4 * 5}
    assert kinds == sorted(kinds, key=["teacher", "cache", "baseline", "student"].index)  # dependency order
    by_name = {c["name"]: c for c in all_cells if c["kind"] in ("teacher", "cache")}
    for c in all_cells:
        assert all(n in by_name for n in c["needs"])
        if c["kind"] == "teacher":
            assert c["cfg"]["stages"] == ["teacher"] and c["cfg"]["teacher"]["folds"] == 3 and c["seed"] == 0
        if c["kind"] != "student":
            continue
        teacher, cache = by_name[c["needs"][0]], by_name[c["needs"][1]]
        assert (teacher["teacher"], teacher["degradation"]) == (c["teacher"], c["degradation"])
        assert (cache["teacher"], cache["degradation"], cache["fit"]) == (c["teacher"], c["degradation"], c["fit"])
        cfg = c["cfg"]
        assert cfg["teacher_checkpoint"] == str(teacher["dir"] / "teacher" / "final.pt")
        assert cfg["distiller"]["teacher_source"] == "cache"
        assert cfg["distiller"]["teacher_cache"] == cache["cfg"]["distiller"]["teacher_cache"]
        assert cfg["teacher"]["folds"] == (0 if c["fit"] == "in_sample" else 3)  # in sample: the teacher's own targets
        assert cfg["teacher"]["folds"] == cache["cfg"]["teacher"]["folds"]
        assert cfg["data"]["train"]["root"] == teacher["cfg"]["data"]["train"]["root"]  # the teacher's images
        assert cfg["data"]["train"]["seed"] == c["seed"] == cfg["seed"]  # augmentation follows the seed
        assert cfg["distiller"]["type"] == c["method"]
        assert c["name"] == f"{c['teacher']}-d{c['degradation']:g}-{'insample' if c['fit'] == 'in_sample' else 'oof'}-{c['method']}"
    roots = {c["cfg"]["data"]["train"]["root"] for c in all_cells if c["kind"] == "teacher"}
    assert roots == {"data/synthetic_kitti_lab_d0", "data/synthetic_kitti_lab_d1"}
    assert len({str(c["dir"]) for c in all_cells}) == len(all_cells)  # every cell its own folder


def test_table6_is_a_study_without_d_or_fit_axes(tmp_path):
    from pcseg_kd.engine.kitti.study import cells
    all_cells = cells(load(ROOT / "configs/kitti/table6.yaml"), tmp_path)
    names = [(c["kind"], c["name"]) for c in all_cells]
    assert names[:3] == [("teacher", "teacher-image"), ("teacher", "teacher-fusion"), ("baseline", "none")]
    assert [n for k, n in names if k == "student"] == [f"{t}-{m}" for t in ("image", "fusion")
                                                        for m in ("kd", "kd_pssm", "dkd", "dkd_pssm")]
    assert all(c["cfg"]["data"]["train"]["root"] == "data/semantic_kitti" for c in all_cells)
    quick = cells(load(ROOT / "configs/kitti/table6_quickstart.yaml"), tmp_path / "q")
    assert Counter(c["kind"] for c in quick) == {"teacher": 2, "cache": 2, "baseline": 3, "student": 24}
    sweep = cells(load(ROOT / "configs/kitti/kd_weight_sweep.yaml"), tmp_path / "s")
    assert [c["cfg"]["distiller"]["kd_weight"] for c in sweep if c["kind"] == "student"][:3] == [0.03, 0.1, 0.3]


def test_every_no_kd_method_gets_its_own_run(tmp_path):
    from pcseg_kd.engine.kitti.study import cells
    study = load(ROOT / "configs/kitti/table6.yaml", [
        "methods={_delete_: true, none: ['distiller={_delete_: true, type: none}'], "
        "none_long: ['distiller={_delete_: true, type: none}', 'student.optim.epochs=2'], kd: []}"])
    got = [(c["kind"], c["name"]) for c in cells(study, tmp_path)]
    assert got == [("teacher", "teacher-image"), ("teacher", "teacher-fusion"), ("baseline", "none"),
                   ("baseline", "none_long"), ("student", "image-kd"), ("student", "fusion-kd")]


def test_a_subset_keeps_the_whole_studys_names_and_folders(tmp_path):
    from pcseg_kd.engine.kitti.study import cells
    whole = {(c["name"], c["seed"]): c for c in cells(load(), tmp_path)}
    part = cells(load(only=["teachers=fusion", "methods=kd,kd_pssm", "degradations=1", "seeds=0,3"]), tmp_path)
    assert Counter(c["kind"] for c in part) == {"teacher": 1, "cache": 2, "baseline": 2, "student": 2 * 2 * 2}
    for c in part:
        ref = whole[(c["name"], c["seed"])]
        assert c["dir"] == ref["dir"] and c["cfg"] == ref["cfg"] or c["kind"] == "baseline"
    assert {c["method"] for c in part if c["kind"] != "teacher" and c["method"]} == {"none", "kd", "kd_pssm"}
    # a no-KD control under another name is kept too
    renamed = load(overrides=["methods={_delete_: true, control: ['distiller={_delete_: true, type: none}'], kd: [], "
                              "dkd: ['distiller={_delete_: true, type: dkd, teacher_source: cache}']}"], only=["methods=kd"])
    got = {(c["kind"], c["method"]) for c in cells(renamed, tmp_path) if c["kind"] in ("baseline", "student")}
    assert got == {("baseline", "control"), ("student", "kd")}


@pytest.mark.parametrize("override, message", [
    ("methods={_delete_: true, kd: []}", "one method must be the no-KD student"),
    ("methods.kd_x=['distiller.betta=3']", "distiller.betta"),
    ("methods={'no KD': []}", "letters, digits, _ . + only"),
    ("degradations=[0.0,1.5]", "degradations must be distinct numbers in [0, 1]"),
    ("seeds=[1,1]", "seeds must be a non-empty list of distinct seeds"),
    ("teachers={_delete_: true}", "teachers must name at least one teacher"),
    ("fits=[in_sample,half]", "fits must be distinct, among ['in_sample', 'out_of_fold']"),
    ("overrides=['teacher.folds=0']", "out_of_fold needs fold teachers"),
    ("metric=everything", "metric must be 'all' or 'in_view'"),
    ("slurm.gpus=2", "slurm: invalid config"),
    ("root=''", "degradations need the root"),
])
def test_bad_study_configs_are_refused(tmp_path, override, message):
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.study import cells
    with pytest.raises(ConfigError) as e:
        cells(load(overrides=[override]), tmp_path)
    assert message in str(e.value)


@pytest.mark.parametrize("only, message", [
    ("teachers=lidar", "['lidar'] not among the study's teachers ['image', 'fusion']"),
    ("degradations=0.5", "not among the study's degradations ['0', '1']"),
    ("colours=red", "AXIS one of teachers, degradations, fits, methods, seeds"),
])
def test_bad_subsets_are_refused(only, message):
    from pcseg_kd.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load(only=[only])
    assert message in str(e.value)


# ----------------------------------------------------------------------------- the report
def test_gather_pairs_every_cell_to_the_no_kd_student_of_its_seed(tmp_path):
    """gather() on hand-written cell.json files: every paired Δ (student − no-KD of the same
    seed; KD+PSSM − KD) against a hand computation with t(0.975, 2) = 4.3027, per teacher fit;
    records keep version 1's keys plus the fit, the teacher targets and their cell's interval."""
    from pcseg_kd.engine.kitti.study_report import RECORD_KEYS, gather

    study = {"name": "fake", "config_path": "study.yaml", "config_overrides": [], "seeds": [0, 1, 2],
             "teachers": {"fusion": []}, "degradations": [0.0], "fits": ["in_sample", "out_of_fold"],
             "teacher_seed": 0, "paper": {}, "metric": "in_view",
             "methods": {"none": [], "kd": [], "kd_pssm": []}}
    base = {0: 30.0, 1: 33.0, 2: 31.0}
    vals = {("in_sample", "kd"): {0: 30.5, 1: 32.0, 2: 32.5},      # Δ +0.5, -1.0, +1.5: the interval holds 0
            ("in_sample", "kd_pssm"): {0: 32.0, 1: 35.2, 2: 32.9},  # Δ +2.0, +2.2, +1.9; PSSM: +1.5, +3.2, +0.4
            ("out_of_fold", "kd"): {0: 29.0, 1: 32.0, 2: 30.0},     # Δ -1.0, -1.0, -1.0
            ("out_of_fold", "kd_pssm"): {0: 31.0, 1: 34.0, 2: 33.0}}
    cell = lambda **kw: {"teacher": "fusion", "degradation": 0.0, "fit": None, "method": None, "seed": 0,  # noqa: E731
                         "cfg": {"distiller": {"type": kw.get("method") or "none"}}, **kw}
    all_cells = [cell(name="teacher-fusion-d0", kind="teacher", dir=tmp_path / "t")]
    all_cells += [cell(name="none", kind="baseline", teacher=None, degradation=None, method="none", seed=s,
                       dir=tmp_path / f"b{s}") for s in base]
    all_cells += [cell(name=f"x-{f}-{m}", kind="student", fit=f, method=m, seed=s, dir=tmp_path / f"{f}{m}{s}")
                  for (f, m) in vals for s in base]
    for c in all_cells:
        c["dir"].mkdir()
        v = 45.0 if c["kind"] == "teacher" else (base if c["kind"] == "baseline" else vals[(c["fit"], c["method"])])[c["seed"]]
        tt = {"accuracy": 97.0 if c["fit"] == "in_sample" else 85.0, "miou": 80.0} if c["kind"] == "student" else None
        out = {"in_view": v, "all": v - 10, "seconds": 1.0, "omega_last_epoch": None, "teacher_targets": tt,
               "output_cmd": {"fusion-d0": 0.1} if c["kind"] == "baseline" else 0.1}
        (c["dir"] / "cell.json").write_text(json.dumps(out))
    res = gather(study, tmp_path / "w", all_cells)

    def interval(diffs):
        m, sd = np.mean(diffs), np.std(diffs, ddof=1)
        return [m - 4.302653 * sd / 3 ** 0.5, m + 4.302653 * sd / 3 ** 0.5]
    ins, oof = res["summary"]["fusion/d0/in_sample"], res["summary"]["fusion/d0/out_of_fold"]
    assert ins["kd_pssm"]["delta"]["mean"] == pytest.approx(2.0333333)
    assert ins["kd_pssm"]["delta_ci95"] == pytest.approx(interval([2.0, 2.2, 1.9]), abs=1e-5)
    assert ins["kd_pssm"]["delta_all_ci95"] == pytest.approx(interval([2.0, 2.2, 1.9]), abs=1e-5)
    assert ins["kd_pssm"]["delta"]["excludes_zero"] and not ins["kd"]["delta"]["excludes_zero"]
    assert oof["kd"]["delta"]["mean"] == pytest.approx(-1.0) and oof["kd"]["delta"]["std"] == 0.0
    assert ins["kd"]["teacher_target_accuracy"]["mean"] == 97.0 and oof["kd"]["teacher_target_accuracy"]["mean"] == 85.0
    effect = res["pssm_effect"]["fusion/d0/in_sample"]["kd_pssm-kd"]
    assert effect["ci95"] == pytest.approx(interval([1.5, 3.2, 0.4]), abs=1e-5) and effect["seeds"] == [0, 1, 2]
    assert res["pssm_effect"]["fusion/d0/out_of_fold"]["kd_pssm-kd"]["mean"] == pytest.approx((2 + 2 + 3) / 3)
    recs = res["records"]
    assert len(recs) == 2 * 3 * 3  # per fit: none (the shared control, repeated), kd, kd_pssm; 3 seeds
    for rec in recs:
        assert set(RECORD_KEYS) <= set(rec)
        group = res["summary"][f"fusion/d0/{rec['teacher_fit']}"]
        assert rec["delta_ci95"] == (None if rec["method"] == "none" else group[rec["method"]]["delta_ci95"])
    import statistics
    halves = [s["delta"]["half_width"] for g in res["summary"].values() for m, s in g.items() if m != "none"]
    assert len(halves) == 4 and res["median_half_width"] == pytest.approx(statistics.median(halves))
    md = (tmp_path / "w" / "results.md").read_text()
    assert "| fusion | 0 | in-sample | 97.0 % | 80.0 | 45.00 |" in md
    assert "[+2.03 ± 0.15 (n=3, 95 % CI [+1.65, +2.41]) *]" in md
    assert "| fusion/d0/in_sample | +1.70 ± 1.41 (n=3, 95 % CI [-1.80, +5.20]) |" in md  # PSSM's own effect
    assert (tmp_path / "w" / "study.png").stat().st_size > 1000
    assert json.loads((tmp_path / "w" / "records.json").read_text()) == json.loads(json.dumps(recs))


# ----------------------------------------------------------------------------- scheduling
class FakeJob:
    def __init__(self, fn, args, log):
        self.fn, self.args, self.log = fn, args, log
        self.paths = None
        self.polls = 0

    def done(self):
        self.polls += 1
        return self.polls > 1  # running for one poll

    def result(self):
        return self.fn(*self.args)


def fake_cells(tmp_path):
    mk = lambda name, kind, needs, seed=0: {"name": name, "kind": kind, "needs": needs, "seed": seed,  # noqa: E731
                                            "dir": tmp_path / f"{name}-{seed}"}
    return [mk("teacher-a", "teacher", []), mk("teacher-b", "teacher", []), mk("cache-a", "cache", ["teacher-a"]),
            mk("none", "baseline", ["teacher-a", "teacher-b"]), mk("a-kd", "student", ["teacher-a", "cache-a"]),
            mk("b-kd", "student", ["teacher-b"]), mk("a-kd", "student", ["teacher-a", "cache-a"], seed=1)]


def test_run_cells_respects_needs_and_jobs_resumes_and_blocks_after_a_failure(tmp_path):
    from pcseg_kd.engine.kitti.study_submit import run_cells
    all_cells = fake_cells(tmp_path)
    started, running, peak = [], set(), [0]

    def submit(c):
        started.append((c["name"], c["seed"]))
        running.add((c["name"], c["seed"]))
        peak[0] = max(peak[0], len(running))
        for n in c["needs"]:  # what it needs is done
            assert any((x["dir"] / "cell.json").is_file() for x in all_cells if x["name"] == n)

        def work():
            running.discard((c["name"], c["seed"]))
            if c["name"] == "teacher-b":  # submitit's message: the job's traceback, then its logs
                raise RuntimeError("Job (task=0) failed\nTraceback (most recent call last):\n  File x\n"
                                   "torch.OutOfMemoryError: CUDA out of memory\n\nYou can check full logs at: - x.err")
            c["dir"].mkdir(exist_ok=True)
            out = {"name": c["name"], "kind": "cache" if c["kind"] == "cache" else "teacher", "seed": c["seed"],
                   "cache": "x", "seconds": 1.0, "in_view": 1.0}
            (c["dir"] / "cell.json").write_text(json.dumps(out))
            return out
        return FakeJob(work, (), None)

    lines = []
    failed = run_cells(all_cells, submit, jobs=2, log=lines.append, poll_seconds=0)
    assert peak[0] <= 2
    assert set(started) == {("teacher-a", 0), ("teacher-b", 0), ("cache-a", 0), ("a-kd", 0), ("a-kd", 1)}
    assert failed == ["teacher-b", "none seed 0", "b-kd seed 0"]  # the failure, then what needed it
    assert any("FAILED teacher-b: torch.OutOfMemoryError: CUDA out of memory (log: in this process)" in s for s in lines)
    assert any(s.startswith("  not run (2 cells need a failed cell)") for s in lines)
    lines.clear()
    started.clear()
    (tmp_path / "teacher-b-0").mkdir()
    (tmp_path / "teacher-b-0" / "cell.json").write_text(json.dumps({"name": "teacher-b"}))
    submit_ok = lambda c: FakeJob(lambda: (c["dir"].mkdir(exist_ok=True), (c["dir"] / "cell.json").write_text("{}"),  # noqa: E731
                                           {"name": c["name"], "kind": "student", "seed": 0, "in_view": 1.0,
                                            "seconds": 1.0})[-1], (), None)
    assert run_cells(all_cells, submit_ok, jobs=1, log=lines.append, poll_seconds=0) == []
    assert lines[0] == "resuming: 5 of 7 cells done"


def test_the_slurm_executor_gets_the_config_settings_and_submits_the_cell_command(tmp_path, monkeypatch):
    """No cluster here: submitit's AutoExecutor replaced by a fake that records what the study
    asks of it: the SLURM parameters from the study config, and per cell the function and its
    arguments (config, overrides, work folder, cell, seed, subset), which run the cell."""
    import submitit

    from pcseg_kd.engine.kitti import study_submit

    seen = {}

    class FakeAutoExecutor:
        def __init__(self, folder, cluster):
            seen["folder"], seen["cluster"] = str(folder), cluster

        def update_parameters(self, **kw):
            seen.setdefault("params", {}).update(kw)

        def submit(self, fn, *args):
            seen.setdefault("jobs", []).append((fn, args))
            return FakeJob(lambda: {"name": args[0]["name"], "kind": "teacher", "seed": 0, "in_view": 1.0, "seconds": 0.0},
                           (), None)

    monkeypatch.setattr(submitit, "AutoExecutor", FakeAutoExecutor)
    study = load(overrides=["slurm={partition: gpu, gpus_per_node: 2, cpus_per_task: 16, mem_gb: 100, "
                            "timeout_min: 90, additional: {account: kd}}"], only=["teachers=fusion"])
    ex = study_submit.make_executor("slurm", tmp_path / "submitit", study)
    assert seen["cluster"] == "slurm" and seen["folder"] == str(tmp_path / "submitit" / "%j")
    assert seen["params"] == {"name": "pcseg_kd-shift_study", "timeout_min": 90, "gpus_per_node": 2,
                              "cpus_per_task": 16, "mem_gb": 100, "tasks_per_node": 1, "nodes": 1,
                              "slurm_partition": "gpu", "slurm_additional_parameters": {"account": "kd"}}
    teacher = {"name": "teacher-fusion-d1", "kind": "teacher", "seed": 0}
    cache = {"name": "cache-fusion-d1-oof", "kind": "cache", "seed": 0}
    student = {"name": "fusion-d1-oof-kd", "kind": "student", "seed": 0}
    submit = study_submit.submit_with(ex, [teacher, cache, student], study)
    submit(student)
    submit(teacher)
    # each job gets its cell as built here, with the once-per-study cells it may read (not the
    # whole grid again, which each job would otherwise rebuild and validate)
    assert seen["jobs"] == [(study_submit.cell_job, (student, [teacher, cache], study)),
                            (study_submit.cell_job, (teacher, [cache], study))]
    with pytest.raises(ValueError, match="--executor must be one of local, slurm, debug"):
        study_submit.make_executor("kubernetes", tmp_path, study)


# ----------------------------------------------------------------------------- end to end
TINY = ["data.synthetic={sequences: ['00', '08'], frames: 4, seed: 0, render_scale: 0.125, lidar: {azimuth_steps: 256}}",
        "data.train.sequences=['00']", "data.val.sequences=['08']", "data.train.max_frames=null",
        "data.val.frame_stride=1", "data.train.voxel_size=[0.2,0.2,0.2]", "data.val.voxel_size=[0.2,0.2,0.2]",
        f"student.model={POINT}", "teacher.optim.epochs=1", "student.optim.epochs=2",
        "teacher.optim.max_steps_per_epoch=1", "student.optim.max_steps_per_epoch=2", "eval_interval=1",
        "teacher.folds=2", "teacher.fold_by=block"]


def tiny_study(tmp_path):
    q = lambda items: "[" + ", ".join('"' + s.replace('"', '\\"') + '"' for s in items) + "]"  # noqa: E731
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"_base_: {STUDY}\nbase: {ROOT / 'configs/kitti/quickstart.yaml'}\n"
                   f"root: {tmp_path / 'data/r'}\ndegradations: [1.0]\nseeds: [0]\n"
                   "teachers: {_delete_: true, fusion: []}\n"
                   "methods: {_delete_: true, none: ['distiller={_delete_: true, type: none}'], dkd_pssm: ['distiller.warmup_epochs=0']}\n"
                   f"overrides: {q(TINY)}\n")
    return cfg


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/kitti_table.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@needs_spconv
def test_a_tiny_study_through_local_and_debug_executors_gives_the_same_figures(tmp_path):
    from pcseg_kd.engine.kitti.study_report import RECORD_KEYS
    cfg = tiny_study(tmp_path)
    timeless = lambda rs: [{k: v for k, v in rec.items() if k != "cell_seconds"} for rec in rs]  # noqa: E731
    records = {}
    for executor in ("local", "debug"):
        work = tmp_path / executor
        r = run_tool(cfg, "--executor", executor, "--jobs", "2", "--work-dir", work, "--no-progress")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"study: 6 cells, {executor} executor, 2 at a time" in r.stdout
        records[executor] = json.loads((work / "records.json").read_text())
    assert timeless(records["local"]) == timeless(records["debug"])  # where a cell runs changes nothing
    recs = records["local"]
    assert [(r["teacher_fit"], r["method"]) for r in recs] == [("in_sample", "none"), ("in_sample", "dkd_pssm"),
                                                               ("out_of_fold", "none"), ("out_of_fold", "dkd_pssm")]
    for rec in recs:
        assert set(RECORD_KEYS) <= set(rec) and math.isfinite(rec["output_cmd"]) and rec["output_cmd"] >= 0
        if rec["method"] == "none":
            assert rec["student_in_view"] == rec["baseline_in_view"] and rec["teacher_target_accuracy"] is None
        else:
            assert 0 <= rec["teacher_target_accuracy"] <= 100
            assert rec["omega_one_share"] == pytest.approx(rec["teacher_target_accuracy"] / 100)  # Ω = 1 iff right
    work = tmp_path / "local"
    assert (work / "caches/fusion-d1-oof/teacher_cache/meta.json").is_file()
    assert json.loads((work / "caches/fusion-d1-oof/teacher_cache/meta.json").read_text())["frame_folds"] is not None
    # resuming: nothing to do
    r = run_tool(cfg, "--jobs", "2", "--work-dir", work, "--no-progress")
    assert r.returncode == 0 and "resuming: 6 of 6 cells done" in r.stdout
    # one cell again from scratch: the same figures, bitwise (threads: 1)
    cell = work / "students/seed0/fusion-d1-oof-dkd_pssm"
    before = json.loads((cell / "cell.json").read_text())
    shutil.rmtree(cell)
    r = run_tool(cfg, "--work-dir", work, "--cell", "fusion-d1-oof-dkd_pssm", "--seed", "0", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    after = json.loads((cell / "cell.json").read_text())
    for key in ("in_view", "all", "iou_in_view", "omega_last_epoch", "teacher_targets", "output_cmd"):
        assert after[key] == before[key], key
    assert "fusion-d1-oof-dkd_pssm seed 0: mIoU in view" in r.stdout and "teacher targets on the distilled rows" in r.stdout
    # the CMD from the teacher's validation logits kept beside its final.pt (computed by the
    # first student) is the CMD against the teacher model itself, on images it decodes
    import torch

    from pcseg_kd.engine.kitti.diagnostics import output_cmd, teacher_in_view_logits
    from pcseg_kd.engine.kitti.study import _val_loader, cells, find_cell, load_study
    from pcseg_kd.engine.kitti.teacher import load_frozen
    from pcseg_kd.registry import DATASETS
    study = load_study(str(cfg), [])
    all_cells = cells(study, work)
    s_cell, t_cell = find_cell(all_cells, "fusion-d1-oof-dkd_pssm", 0), find_cell(all_cells, "teacher-fusion-d1", None)
    assert (t_cell["dir"] / "teacher" / "val_in_view_logits.pt").is_file()
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the cells ran (threads: 1)
    try:
        student = load_frozen(s_cell["dir"] / "student" / "final.pt", s_cell["cfg"]["student"]["model"], cpu)
        teacher = load_frozen(t_cell["dir"] / "teacher" / "final.pt", t_cell["cfg"]["teacher"]["model"], cpu)
        loader = _val_loader(DATASETS.build(t_cell["cfg"]["data"]["val"]), t_cell["cfg"], cpu)
        fresh = teacher_in_view_logits(teacher, loader, cpu)
        assert output_cmd(student, fresh, loader, cpu, k=study["cmd_moments"]) == before["output_cmd"]
    finally:
        torch.set_num_threads(threads)
    # a no-KD cell without its CMD to a teacher (run in a subset before that teacher): computed, the same value
    base_json = work / "students/seed0/none/cell.json"
    base = json.loads(base_json.read_text())
    cmd = base["output_cmd"].pop("fusion-d1")
    base_json.write_text(json.dumps(base))
    r = run_tool(cfg, "--work-dir", work, "--gather")
    assert r.returncode == 0 and "computed 1 output CMDs of no-KD students" in r.stdout
    assert json.loads(base_json.read_text())["output_cmd"]["fusion-d1"] == cmd
    assert timeless(json.loads((work / "records.json").read_text())) == timeless(recs)
    # the Ω picture of a training frame: the targets the student distilled there
    from pcseg_kd.data.kitti.folds import fold_assignment
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    vis = [sys.executable, str(ROOT / "tools/visualize_kitti.py"), "--frame", "00/000003"]
    from pcseg_kd.engine.kitti.export import export_dataset_cfg
    from pcseg_kd.registry import DATASETS
    cfg_oof = load_kitti_experiment(str(cell / "config.yaml"))
    frames = DATASETS.build(export_dataset_cfg(cfg_oof)).frames
    k = fold_assignment(cfg_oof, frames)[[f.frame_id for f in frames].index("00/000003")]
    out = subprocess.run(vis + ["--pair", str(cell), "--out", str(tmp_path / "oof.png")], capture_output=True, text=True)
    assert out.returncode == 0 and f"(training frame, out-of-fold teacher {k})" in out.stdout, out.stderr
    ins = work / "students/seed0/fusion-d1-insample-dkd_pssm"
    out = subprocess.run(vis + ["--pair", str(ins), "--out", str(tmp_path / "ins.png")], capture_output=True, text=True)
    assert out.returncode == 0 and "(training frame, in-sample teacher)" in out.stdout, out.stderr
    assert (tmp_path / "oof.png").stat().st_size > 1000 and (tmp_path / "ins.png").stat().st_size > 1000


def test_cli_errors_name_the_cell_or_the_option(tmp_path):
    cfg = tiny_study(tmp_path)
    r = run_tool(cfg, "--work-dir", tmp_path / "w", "--cell", "fusion-d2-kd", "--seed", "0")
    assert r.returncode == 1 and "is not a cell of this study" in r.stderr and "fusion-d1-oof-dkd_pssm" in r.stderr
    r = run_tool(cfg, "seeds=[0,1]", "--work-dir", tmp_path / "w", "--cell", "none")
    assert r.returncode == 1 and "give --seed" in r.stderr
    r = run_tool(cfg, "--work-dir", tmp_path / "w", "--gather")
    assert r.returncode == 1 and "cells are not done" in r.stderr
    r = run_tool(cfg, "--work-dir", tmp_path / "w", "--only", "teachers=image")
    assert r.returncode == 1 and "not among the study's teachers ['fusion']" in r.stderr
    r = run_tool(ROOT / "configs/kitti/quickstart.yaml", "--work-dir", tmp_path / "w")
    assert r.returncode == 1 and "is not a study config" in r.stderr
    # Table 6 on real data, whose root is missing: one error before any job, naming the root
    missing = tmp_path / "no_kitti"
    r = run_tool(ROOT / "configs/kitti/table6.yaml", f"overrides=[data.train.root={missing},data.val.root={missing}]",
                 "--work-dir", tmp_path / "t6")
    assert r.returncode == 1 and f"{missing}/sequences: dataset root has no sequences/ folder" in r.stderr
    assert not (tmp_path / "t6" / "submitit").exists()


def test_ctrl_c_cancels_the_running_cells(tmp_path):
    from pcseg_kd.engine.kitti.study_submit import run_cells
    cancelled = []

    class Interrupted(FakeJob):
        def done(self):
            raise KeyboardInterrupt

        def cancel(self):
            cancelled.append(self.args[0])

    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_cells(fake_cells(tmp_path), lambda c: Interrupted(None, (c["name"],), None), jobs=2, log=lines.append,
                  poll_seconds=0)
    assert cancelled == ["teacher-a", "teacher-b"] and lines == ["  interrupted: 2 running cells cancelled; rerun to resume"]


def test_gather_of_a_study_run_in_parts_leaves_out_whole_groups_only(tmp_path):
    from pcseg_kd.engine.kitti.study import cells_to_gather
    mk = lambda name, kind, method, seed: {"name": name, "kind": kind, "teacher": "a", "degradation": None,  # noqa: E731
                                           "fit": None, "method": method, "seed": seed, "dir": tmp_path / f"{name}{seed}"}
    all_cells = [mk("teacher-a", "teacher", None, 0)] + [mk("none", "baseline", "none", s) for s in (0, 1)] \
        + [mk(f"a-{m}", "student", m, s) for m in ("kd", "dkd") for s in (0, 1)]

    def finish(*names):
        for c in all_cells:
            if f"{c['name']}{c['seed']}" in names:
                c["dir"].mkdir(exist_ok=True)
                (c["dir"] / "cell.json").write_text("{}")
    finish("teacher-a0", "none0", "none1", "a-kd0", "a-kd1")
    got, left_out = cells_to_gather(all_cells, partial_ok=True)  # a-dkd not run at all: left out
    assert [f"{c['name']}{c['seed']}" for c in got] == ["teacher-a0", "none0", "none1", "a-kd0", "a-kd1"]
    assert left_out == ["a-dkd"]
    with pytest.raises(ValueError, match="2 of 7 cells are not done"):
        cells_to_gather(all_cells, partial_ok=False)  # after a run, every cell must be there
    finish("a-dkd0")  # one seed of a-dkd: its mean would be over fewer seeds than the study's
    with pytest.raises(ValueError, match=r"first: a-dkd seed 1.*whole groups of cells only"):
        cells_to_gather(all_cells, partial_ok=True)


def test_the_committed_shift_study_records_hold_five_seeds_per_cell_and_their_intervals():
    """docs/results/kitti_shift_study.json (version 2): every (teacher, D, fit, method) cell
    that ran has at least 5 seeds, paired to the no-KD student of the same seed, and each
    record's delta_ci95 is the t-interval of its cell's per-seed differences (recomputed here
    with scipy's t quantile, independently of pcseg_kd.metrics.paired)."""
    from scipy import stats

    records = json.loads((ROOT / "docs/results/kitti_shift_study.json").read_text())
    groups = {}
    for r in records:
        groups.setdefault((r["teacher"], r["degradation"], r["teacher_fit"], r["method"]), []).append(r)
    assert {k[2] for k in groups} == {"in_sample", "out_of_fold"} and {k[1] for k in groups} >= {0.0, 1.0}
    # the config's whole grid: both teachers x D 0, 1 x both fits x the five methods
    assert set(groups) == {(t, d, f, m) for t in ("image", "fusion") for d in (0.0, 1.0)
                           for f in ("in_sample", "out_of_fold") for m in ("none", "kd", "kd_pssm", "dkd", "dkd_pssm")}
    baseline = {r["seed"]: r["baseline_in_view"] for r in records}
    for key, rs in groups.items():
        seeds = sorted(r["seed"] for r in rs)
        assert len(seeds) >= 5 and len(set(seeds)) == len(seeds), key
        if key[3] == "none":
            assert all(r["student_in_view"] == baseline[r["seed"]] and r["delta_ci95"] is None for r in rs)
            continue
        d = np.array([r["student_in_view"] - baseline[r["seed"]] for r in rs])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / len(d) ** 0.5
        for r in rs:
            assert r["delta_ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9), key
        assert all(0 <= r["teacher_target_accuracy"] <= 100 for r in rs)


def test_teacher_effect_pairs_each_later_teacher_with_the_first_by_seed():
    """teacher_effect: (later teacher's student) − (first teacher's student) of the same D, fit,
    method and seed, against scipy's t-interval; seeds only one teacher has are left out, the
    no-KD control is not compared."""
    from scipy import stats

    from pcseg_kd.engine.kitti.study_report import teacher_effect

    rng = np.random.default_rng(0)
    records = [{"teacher": t, "degradation": d, "teacher_fit": f, "method": m, "seed": s,
                "student_in_view": float(rng.normal(45, 2))}
               for t in ("image", "fusion") for d in (0.0, 1.0) for f in ("in_sample", "out_of_fold")
               for m in ("none", "kd") for s in range(5)]
    records.append({**records[-1], "teacher": "fusion", "seed": 9})  # no image student of seed 9
    types = {"none": "none", "kd": "kd"}
    out = teacher_effect(records, types, ["image", "fusion"], "in_view")
    assert list(out) == ["fusion − image"] and len(out["fusion − image"]) == 4
    for d in (0.0, 1.0):
        for f in ("in_sample", "out_of_fold"):
            val = {(r["teacher"], r["seed"]): r["student_in_view"] for r in records
                   if (r["degradation"], r["teacher_fit"], r["method"]) == (d, f, "kd")}
            diff = np.array([val[("fusion", s)] - val[("image", s)] for s in range(5)])
            half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / 5 ** 0.5
            got = out["fusion − image"][f"d{d:g}/{f}"]
            assert set(got) == {"kd"} and got["kd"]["seeds"] == list(range(5))
            assert got["kd"]["ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half], abs=1e-9)


@pytest.mark.parametrize("config", ["table6.yaml", "table6_quickstart.yaml", "shift_study.yaml"])
def test_the_distilled_methods_of_a_committed_study_differ_only_in_their_loss(config):
    """Every distilled column of a study distils the same way (warm-up, kd_weight, where the
    teacher's rows come from): a column taking its base config's distiller must not differ from
    the others in more than its loss (table6_quickstart's DKD+PSSM once had 2 warm-up epochs
    and the cache while its KD columns had 5 and an online teacher)."""
    from pcseg_kd.engine.kitti.study import cells, load_study

    study = load_study(str(ROOT / "configs/kitti" / config), [])
    students = [c for c in cells(study, ROOT / "work_dirs/never_written") if c["kind"] == "student"]
    shared = {(c["cfg"]["distiller"].get("teacher_source", "online"), c["cfg"]["distiller"]["warmup_epochs"],
               c["cfg"]["distiller"]["kd_weight"]) for c in students}
    assert len({c["method"] for c in students}) == 4 and len(shared) == 1, shared


def test_done_cells_run_with_other_settings_are_named_not_reused(tmp_path):
    """A done cell whose config.yaml differs from what the study now asks of it (a method's
    warm-up changed in the study config, say) is reported, naming the key; settings that change
    no figure (eval_interval, where the teacher's files lie) are not."""
    import yaml

    from pcseg_kd.config import save_config
    from pcseg_kd.engine.kitti.study import cells, stale_cells

    all_cells = cells(load(only=["teachers=fusion", "seeds=0"]), tmp_path)
    student = next(c for c in all_cells if c["kind"] == "student" and c["method"] == "kd")
    teacher = next(c for c in all_cells if c["kind"] == "teacher")
    for c in (student, teacher):
        c["dir"].mkdir(parents=True)
        save_config(c["cfg"], c["dir"] / "config.yaml")
        (c["dir"] / "cell.json").write_text("{}")
    assert stale_cells(all_cells) == []
    saved = yaml.safe_load((student["dir"] / "config.yaml").read_text())
    saved.update(eval_interval=1, teacher_checkpoint="elsewhere/final.pt")
    saved["distiller"]["teacher_cache"] = "elsewhere/teacher_cache"
    (student["dir"] / "config.yaml").write_text(yaml.safe_dump(saved))
    assert stale_cells(all_cells) == []
    saved["distiller"]["warmup_epochs"] = 5
    (student["dir"] / "config.yaml").write_text(yaml.safe_dump(saved))
    assert stale_cells(all_cells) == [f"fusion-d0-insample-kd seed 0 ({student['dir'] / 'config.yaml'}: "
                                      "distiller.warmup_epochs was 5, the study now has 2)"]
    (student["dir"] / "cell.json").unlink()  # not done: it will run with the study's settings
    assert stale_cells(all_cells) == []
