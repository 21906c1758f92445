"""The shift study: the paper's Table 6 extended by a distribution-shift axis we control.

Teachers (image, fusion) × image degradation D (the synthetic generator's
:class:`~pcseg_kd.data.kitti.synthetic.camera.ImageQuality` knob: the teacher is trained and
distilled on images of that D; the student's LiDAR scans are the same files for every D) ×
methods (no KD, KD, KD+PSSM, DKD, DKD+PSSM) × seeds. Every teacher is trained once per
(teacher, D) with ``teacher_seed``; the no-KD student, which depends on neither, once per
seed; every distilled student once per (teacher, D, method, seed). The seed drives the
student's initialisation, shuffling and augmentation, so the no-KD student of the same seed
is the paired control.

Each cell is an ordinary ``tools/train.py`` work folder plus ``cell.json`` (its figures and
SSDH diagnostics: PSSM's Ω shares over the last epoch, the output CMD between teacher and
student on the in-view validation points). Cells run in separate processes, ``jobs`` side
by side (one thread each); a killed study resumes cell by cell, and a killed cell inside
itself. The whole study is gathered into ``results.json`` (one record per cell and seed),
``results.md``, ``records.json`` (the records alone) and ``shift_study.png``.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...config import atomic_write_text
from ...metrics.paired import ci95, format_delta, paired_delta
from ...utils.io import read_json, write_json
from .table import PAIRED_KEYS
from .table import mean_std as stats

METHOD_LABELS = {"none": "no KD", "kd": "KD", "kd_pssm": "KD+PSSM", "dkd": "DKD", "dkd_pssm": "DKD+PSSM"}
RECORD_KEYS = ("teacher", "degradation", "method", "seed", "student_in_view", "student_all", "baseline_in_view",
               "teacher_in_view", "omega_one_share", "omega_zero_share", "output_cmd", "delta_ci95")
PSSM_PAIRS = (("kd_pssm", "kd"), ("dkd_pssm", "dkd"))  # PSSM's own effect: with − without, same seed


@dataclass(kw_only=True)
class ShiftStudyConfig:
    experiment: str = "semantickitti_shift_study"
    name: str = ""
    base: str = ""                                                # experiment config of every cell, relative to this file
    overrides: List[str] = field(default_factory=list)            # applied to every cell
    root: str = "data/synthetic_kitti_shift"                      # one synthetic dataset per D: ROOT_d<D>
    degradations: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    teachers: Dict[str, List[str]] = field(default_factory=dict)  # teacher -> overrides of its cells
    methods: Dict[str, List[str]] = field(default_factory=dict)   # none/kd/kd_pssm/dkd/dkd_pssm -> overrides
    teacher_seed: int = 0
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    cmd_moments: int = 5                                          # K of CMD_K (the paper's Table 1)
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)  # teacher -> {teacher | method: mIoU} at D = 0


def d_tag(d: float) -> str:
    return f"d{float(d):g}"


def load_study(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from ...config import ConfigError, load_config_with_provenance
    cfg, _ = load_config_with_provenance(path, overrides, schema=ShiftStudyConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    out["config_path"] = str(Path(path))
    out["config_overrides"] = list(overrides)
    if not out["base"]:
        raise ConfigError(f"{path}: base: the experiment config every cell starts from is required")
    out["base"] = str((Path(path).parent / out["base"]).resolve())
    if not out["teachers"]:
        raise ConfigError(f"{path}: teachers must name at least one teacher")
    unknown = set(out["methods"]) - set(METHOD_LABELS)
    if unknown or "none" not in out["methods"]:
        raise ConfigError(f"{path}: methods must include none and be among {list(METHOD_LABELS)}"
                          + (f" (unknown: {sorted(unknown)})" if unknown else ""))
    ds = out["degradations"]
    if not ds or len(set(ds)) != len(ds) or not all(0.0 <= float(d) <= 1.0 for d in ds):
        raise ConfigError(f"{path}: degradations must be distinct numbers in [0, 1], got {ds}")
    if not out["seeds"] or len(set(out["seeds"])) != len(out["seeds"]):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct seeds, got {out['seeds']}")
    return out


def data_overrides(study: Dict[str, Any], d: float) -> List[str]:
    """The dataset of degradation ``d``: its own root, generated with that image quality."""
    root = f"{study['root']}_{d_tag(d)}"
    return [f"data.train.root={root}", f"data.val.root={root}", f"data.synthetic.quality={{degradation: {float(d)}}}"]


def cells(study: Dict[str, Any], work_dir: Path) -> List[Dict[str, Any]]:
    """Every cell, in dependency order (teachers, then the no-KD students, then the rest):
    name, kind, teacher, D, method, seed, work folder, experiment config, and the names of the
    cells it needs. Every config is loaded and validated here, before anything trains."""
    from .schema import load_kitti_experiment

    base, common = study["base"], list(study["overrides"])
    out: List[Dict[str, Any]] = []
    teacher_cells = {}
    for t, t_over in study["teachers"].items():
        for d in study["degradations"]:
            name = f"teacher-{t}-{d_tag(d)}"
            cfg = load_kitti_experiment(base, common + data_overrides(study, d) + list(t_over)
                                        + [f"seed={study['teacher_seed']}", "stages=[teacher]"])
            teacher_cells[(t, d)] = name
            out.append({"name": name, "kind": "teacher", "teacher": t, "degradation": float(d), "method": None,
                        "seed": study["teacher_seed"], "dir": work_dir / "teachers" / f"{t}-{d_tag(d)}",
                        "cfg": cfg, "needs": []})
    d0 = study["degradations"][0]  # the no-KD student reads no image: any D's scans are the same
    for seed in study["seeds"]:
        cfg = load_kitti_experiment(base, common + data_overrides(study, d0) + list(study["methods"]["none"])
                                    + [f"seed={seed}", "stages=[student]"])
        if cfg["distiller"]["type"] != "none":
            raise ValueError("methods.none must set a distiller of type none")
        out.append({"name": "none", "kind": "baseline", "teacher": None, "degradation": None, "method": "none",
                    "seed": seed, "dir": work_dir / "students" / f"seed{seed}" / "none", "cfg": cfg,
                    "needs": list(teacher_cells.values())})  # its CMD to every teacher
    for seed in study["seeds"]:
        for t, t_over in study["teachers"].items():
            for d in study["degradations"]:
                for m, m_over in study["methods"].items():
                    if m == "none":
                        continue
                    teacher_dir = work_dir / "teachers" / f"{t}-{d_tag(d)}"
                    cfg = load_kitti_experiment(base, common + data_overrides(study, d) + list(t_over) + list(m_over)
                                                + [f"seed={seed}", "stages=[student]"])
                    cfg["teacher_checkpoint"] = str(teacher_dir / "teacher" / "final.pt")
                    name = f"{t}-{d_tag(d)}-{m}"
                    out.append({"name": name, "kind": "student", "teacher": t, "degradation": float(d), "method": m,
                                "seed": seed, "dir": work_dir / "students" / f"seed{seed}" / name, "cfg": cfg,
                                "needs": [teacher_cells[(t, d)]]})
    return out


def find_cell(all_cells: List[Dict[str, Any]], name: str, seed: Optional[int]) -> Dict[str, Any]:
    matches = [c for c in all_cells if c["name"] == name and (c["kind"] == "teacher" or seed is None or c["seed"] == seed)]
    if not matches:
        names = sorted({c["name"] for c in all_cells})
        raise ValueError(f"--cell {name!r} (seed {seed}) is not a cell of this study; cells: {', '.join(names)}")
    if len(matches) > 1:
        raise ValueError(f"--cell {name!r} runs once per seed: give --seed (one of "
                         f"{sorted(c['seed'] for c in matches)})")
    return matches[0]


# ----------------------------------------------------------------------------- one cell
def run_cell(cell: Dict[str, Any], all_cells: List[Dict[str, Any]], study: Dict[str, Any], progress: bool = False) -> Dict[str, Any]:
    """Train one cell (resuming), compute its diagnostics, write ``cell.json``; returns it.
    The teachers it needs are trained first if they are not yet."""
    from ...config import save_config
    from ..distributed import init_distributed
    from .train import run_kitti

    done = read_json(cell["dir"] / "cell.json", default=None)
    if done is not None:
        return done
    by_name = {c["name"]: c for c in all_cells if c["kind"] == "teacher"}
    for need in cell["needs"]:
        if not (by_name[need]["dir"] / "cell.json").is_file():
            run_cell(by_name[need], all_cells, study, progress)
    env = init_distributed(cell["cfg"]["device"])
    if env.distributed:
        raise ValueError("the shift study runs each cell in one process; use --jobs for parallel cells")
    t0 = time.perf_counter()
    cell["dir"].mkdir(parents=True, exist_ok=True)
    save_config(cell["cfg"], cell["dir"] / "config.yaml")
    results = run_kitti(cell["cfg"], cell["dir"], env, progress)
    stage = "teacher" if cell["kind"] == "teacher" else "student"
    metrics = results[stage]
    out = {"name": cell["name"], "kind": cell["kind"], "teacher": cell["teacher"], "degradation": cell["degradation"],
           "method": cell["method"], "seed": cell["seed"], "in_view": metrics["in_view"]["miou"],
           "all": metrics.get("all", {}).get("miou"),
           "iou_in_view": metrics["in_view"]["iou"]}
    if cell["kind"] != "teacher":
        stage_metrics = read_json(cell["dir"] / "student" / "metrics.json", default={}) or {}
        omega = (stage_metrics.get("omega") or [None])[-1]  # the last epoch's shares
        out["omega_last_epoch"] = omega
        if cell["kind"] == "baseline":  # the no-KD student against every teacher
            out["output_cmd"] = {f"{c['teacher']}-{d_tag(c['degradation'])}": cell_cmd(cell, c, study, env.device)
                                 for c in all_cells if c["kind"] == "teacher"}
        else:
            out["output_cmd"] = cell_cmd(cell, by_name[cell["needs"][0]], study, env.device)
    out["seconds"] = time.perf_counter() - t0
    write_json(cell["dir"] / "cell.json", out)
    return out


def cell_cmd(student_cell: Dict[str, Any], teacher_cell: Dict[str, Any], study: Dict[str, Any],
             device: "torch.device") -> float:
    """CMD between the student's and the teacher's softmax outputs on the in-view validation
    points of the teacher's D (the student's LiDAR input is the same for every D)."""
    from ...registry import DATASETS
    from ..distributed import DistEnv
    from .data import ShardedBatchSampler, make_loader
    from .diagnostics import output_cmd
    from .train import load_frozen

    cfg = teacher_cell["cfg"]
    student = load_frozen(student_cell["dir"] / "student" / "final.pt", student_cell["cfg"]["student"]["model"], device)
    teacher = load_frozen(teacher_cell["dir"] / "teacher" / "final.pt", cfg["teacher"]["model"], device)
    val = DATASETS.build(cfg["data"]["val"])
    env = DistEnv(device=device)
    loader = make_loader(val, ShardedBatchSampler(len(val), cfg["teacher"]["optim"]["batch_size"], False, 0, env, False),
                         0, device)
    return output_cmd(student, teacher, loader, device, k=study["cmd_moments"])


def cell_lines(cell_out: Dict[str, Any]) -> List[str]:
    """What ``--cell`` prints."""
    what = cell_out["name"] + ("" if cell_out["kind"] == "teacher" else f" seed {cell_out['seed']}")
    lines = [f"{what}: mIoU in view {cell_out['in_view']:.2f}"
             + (f", all {cell_out['all']:.2f}" if cell_out.get("all") is not None else "")]
    om = cell_out.get("omega_last_epoch")
    if om:
        lines.append(f"  PSSM over the last epoch: Ω = 1 on {100 * om['one']:.1f} %, Ω = 0 on {100 * om['zero']:.1f} %, "
                     f"between on {100 * om['between']:.1f} % of {om['rows']} distilled points")
    cmd = cell_out.get("output_cmd")
    if isinstance(cmd, dict):
        lines += [f"  output CMD to teacher {k}: {v:.4f}" for k, v in cmd.items()]
    elif cmd is not None:
        lines.append(f"  output CMD to its teacher: {cmd:.4f}")
    lines.append(f"  {cell_out['seconds']:.0f} s")
    return lines


# ----------------------------------------------------------------------------- the grid
def generate_data(study: Dict[str, Any], all_cells: List[Dict[str, Any]]) -> None:
    """Each D's synthetic dataset, before any cell runs (cells in parallel must not race to it)."""
    from ..distributed import DistEnv
    from .data import generate_synthetic_if_missing

    env = DistEnv()
    for c in all_cells:
        if c["kind"] == "teacher":
            data = c["cfg"]["data"]
            generate_synthetic_if_missing([data["train"]["root"], data["val"]["root"]], data.get("synthetic"), env)


def run_study(study: Dict[str, Any], work_dir: Path, jobs: int = 1, argv_base: Optional[List[str]] = None,
              all_cells: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run every cell not yet done, ``jobs`` processes at a time (each ``--cell NAME --seed S``
    of ``argv_base``, the command that runs one cell, logging to ``CELL/cell.log``), in
    dependency order; then gather the results."""
    all_cells = all_cells if all_cells is not None else cells(study, work_dir)
    generate_data(study, all_cells)
    t0 = time.perf_counter()
    todo = [c for c in all_cells if not (c["dir"] / "cell.json").is_file()]
    done = {(c["name"], c["seed"]) for c in all_cells if c not in todo}
    teacher_done = {c["name"] for c in all_cells if c["kind"] == "teacher" and (c["name"], c["seed"]) in done}
    running: List[tuple] = []
    failed: List[str] = []
    total = len(all_cells)
    print(f"shift study: {total} cells, {total - len(todo)} already done, {jobs} at a time", flush=True)
    if len(todo) < total:
        print(f"resuming: {total - len(todo)} of {total} cells done ({work_dir})", flush=True)
    while todo or running:
        ready = [c for c in todo if all(n in teacher_done for n in c["needs"])]
        while ready and len(running) < jobs:
            c = ready.pop(0)
            todo.remove(c)
            c["dir"].mkdir(parents=True, exist_ok=True)
            log = open(c["dir"] / "cell.log", "a")
            cmd = list(argv_base) + ["--cell", c["name"], "--seed", str(c["seed"])]
            running.append((c, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cell_env()), log))
        if not running:
            blocked = ", ".join(f"{c['name']} seed {c['seed']}" for c in todo)
            raise RuntimeError(f"shift study: cells failed ({', '.join(failed)}); not run: {blocked}")
        time.sleep(1.0)
        for item in list(running):
            c, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            what = f"{c['name']}" + ("" if c["kind"] == "teacher" else f" seed {c['seed']}")
            if proc.returncode != 0:
                failed.append(what)
                print(f"  FAILED {what} (exit {proc.returncode}): see {c['dir'] / 'cell.log'}", flush=True)
                todo = [t for t in todo if c["name"] not in t["needs"]] if c["kind"] == "teacher" else todo
                continue
            done.add((c["name"], c["seed"]))
            if c["kind"] == "teacher":
                teacher_done.add(c["name"])
            out = read_json(c["dir"] / "cell.json")
            print(f"  [{len(done)}/{total}, {(time.perf_counter() - t0) / 60:.1f} min] " + cell_lines(out)[0], flush=True)
    if failed:
        raise RuntimeError(f"shift study: cells failed: {', '.join(failed)} (their cell.log says why); "
                           "rerun to retry them")
    return gather(study, work_dir, all_cells, time.perf_counter() - t0)


def cell_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per cell: cells side by side do not fight
    return env


def gather(study: Dict[str, Any], work_dir: Path, all_cells: List[Dict[str, Any]],
           seconds: Optional[float] = None) -> Dict[str, Any]:
    """results.json (records, summary), results.md and the plot, from the cells' cell.json."""
    outs = {(c["name"], c["seed"]): read_json(c["dir"] / "cell.json") for c in all_cells}
    teachers = {(c["teacher"], c["degradation"]): outs[(c["name"], c["seed"])] for c in all_cells if c["kind"] == "teacher"}
    baselines = {c["seed"]: outs[(c["name"], c["seed"])] for c in all_cells if c["kind"] == "baseline"}
    records = []
    for c in all_cells:
        if c["kind"] == "teacher":
            continue
        o = outs[(c["name"], c["seed"])]
        base = baselines[c["seed"]]
        pairs = [(c["teacher"], c["degradation"])] if c["kind"] == "student" else list(teachers)
        for t, d in pairs:
            om = o.get("omega_last_epoch") or {}
            cmd = o["output_cmd"][f"{t}-{d_tag(d)}"] if c["kind"] == "baseline" else o["output_cmd"]
            records.append({"teacher": t, "degradation": d, "method": c["method"], "seed": c["seed"],
                            "student_in_view": o["in_view"], "student_all": o["all"],
                            "baseline_in_view": base["in_view"], "baseline_all": base["all"],
                            "teacher_in_view": teachers[(t, d)]["in_view"],
                            "omega_one_share": om.get("one"), "omega_zero_share": om.get("zero"),
                            "omega_between_share": om.get("between"), "output_cmd": cmd,
                            "cell_seconds": o.get("seconds")})
    records.sort(key=lambda r: (list(study["teachers"]).index(r["teacher"]), r["degradation"],
                                list(study["methods"]).index(r["method"]), r["seed"]))
    summary = summarise(records)
    for r in records:  # the interval of the record's cell (teacher, D, method) over its seeds, in view
        r["delta_ci95"] = (None if r["method"] == "none"
                           else summary[r["teacher"]][d_tag(r["degradation"])][r["method"]]["delta_in_view_ci95"])
    spread = stats([b["in_view"] for b in baselines.values()])
    total_cell_seconds = sum(o.get("seconds") or 0.0 for o in outs.values())
    results = {"name": study["name"], "command": study_command(study), "seeds": study["seeds"],
               "baseline_in_view": spread, "baseline_all": stats([b["all"] for b in baselines.values()]),
               "teachers": {f"{t}-{d_tag(d)}": o["in_view"] for (t, d), o in teachers.items()},
               "summary": summary, "pssm_effect": pssm_effect(records), "records": records,
               "cell_seconds_total": total_cell_seconds,
               "wall_seconds_last_run": seconds}
    write_json(work_dir / "results.json", results)
    write_json(work_dir / "records.json", records)  # what docs/results/kitti_shift_study.json holds
    atomic_write_text(work_dir / "results.md", markdown(study, results))
    plot(study, results, work_dir / "shift_study.png")
    return results


def study_command(study: Dict[str, Any]) -> str:
    return " ".join(["python tools/kitti_table.py", study["config_path"]] + study["config_overrides"])


def paired(student: List[Optional[float]], control: List[Optional[float]]) -> Dict[str, Any]:
    """The paired Δ over the seeds where both values exist: mean, std, n, t-interval."""
    pairs = [(a, b) for a, b in zip(student, control) if a is not None and b is not None]
    d = paired_delta([a for a, _ in pairs], [b for _, b in pairs])
    return {k: d[k] for k in PAIRED_KEYS}


def pssm_effect(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per teacher and D: KD+PSSM − KD and DKD+PSSM − DKD of the same seed (in view), with
    their intervals: PSSM's effect on its own, not through the no-KD student."""
    by = {(r["teacher"], r["degradation"], r["method"], r["seed"]): r["student_in_view"] for r in records}
    out: Dict[str, Any] = {}
    for t, d in dict.fromkeys((r["teacher"], r["degradation"]) for r in records):
        for with_, without in PSSM_PAIRS:
            seeds = sorted(s for (t2, d2, m, s) in by if (t2, d2, m) == (t, d, with_) and (t, d, without, s) in by)
            if seeds:
                p = paired([by[(t, d, with_, s)] for s in seeds], [by[(t, d, without, s)] for s in seeds])
                out.setdefault(t, {}).setdefault(d_tag(d), {})[f"{with_}-{without}"] = {
                    **p, "ci95": None if p["low"] is None else [p["low"], p["high"]], "seeds": seeds}
    return out


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per teacher, D and method: mean ± sample std over seeds of the student's mIoU (in view,
    all), of the CMD and Ω shares, and the paired Δ to the no-KD student of the same seed
    with its 95 % t-interval (``delta_*``: mean, std, n, t, half_width, low, high,
    excludes_zero; ``delta_*_ci95``: [low, high])."""
    out: Dict[str, Any] = {}
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["teacher"], r["degradation"], r["method"]), []).append(r)
    for (t, d, m), rs in groups.items():
        delta_in_view = paired([r["student_in_view"] for r in rs], [r["baseline_in_view"] for r in rs])
        delta_all = paired([r["student_all"] for r in rs], [r["baseline_all"] for r in rs])
        out.setdefault(t, {}).setdefault(d_tag(d), {})[m] = {
            "student_in_view": stats([r["student_in_view"] for r in rs]),
            "student_all": stats([r["student_all"] for r in rs]),
            "delta_in_view": delta_in_view, "delta_all": delta_all,
            "delta_in_view_ci95": ci95(delta_in_view), "delta_all_ci95": ci95(delta_all),
            "output_cmd": stats([r["output_cmd"] for r in rs]),
            "omega_one_share": stats([r["omega_one_share"] for r in rs]),
            "omega_zero_share": stats([r["omega_zero_share"] for r in rs]),
            "teacher_in_view": rs[0]["teacher_in_view"], "seeds": sorted(r["seed"] for r in rs)}
    return out


def _pm(s: Dict[str, Any], fmt: str = "{:.2f}", signed: bool = False) -> str:
    if s["mean"] is None:
        return "–"
    f = fmt.replace("{:", "{:+") if signed else fmt
    return f.format(s["mean"]) + (f" ± {fmt.format(s['std'])}" if s["std"] is not None else "")


def markdown(study: Dict[str, Any], results: Dict[str, Any]) -> str:
    methods = list(study["methods"])
    summary = results["summary"]
    b = results["baseline_in_view"]
    lines = [f"# {study['name'] or 'Shift study'}", "",
             f"`{results['command']}`", "",
             f"Student val mIoU (%) on in-view points, mean ± sample std over seeds {study['seeds']}; "
             "in brackets the paired Δ to the no-KD student of the same seed (mean ± std of the per-seed "
             "differences, n, 95 % t-interval; * marks an interval that excludes 0, the only differences "
             "larger than the seed spread). "
             f"No-KD student: {_pm(b)} in view, {_pm(results['baseline_all'])} on full scans "
             f"(its seed-to-seed spread). Teachers: trained once per (teacher, D), seed {study['teacher_seed']}, "
             "in-view mIoU. Paper (Table 6, real SemanticKITTI) in parentheses at D = 0.", ""]
    head = "| teacher | D | teacher mIoU | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |"
    lines += [head, "|---" * (3 + len(methods)) + "|"]
    for t in study["teachers"]:
        paper = study["paper"].get(t, {})
        for d in study["degradations"]:
            row = summary.get(t, {}).get(d_tag(d), {})
            if not row:
                continue
            first = next(iter(row.values()))
            tv = f"{first['teacher_in_view']:.2f}" + (f" ({paper['teacher']:.2f})" if d == 0 and "teacher" in paper else "")
            cells_ = []
            for m in methods:
                s = row.get(m)
                if s is None:
                    cells_.append("–")
                    continue
                txt = _pm(s["student_in_view"])
                if m != "none":
                    txt += f" [{format_delta(s['delta_in_view'])}]"
                if d == 0 and METHOD_LABELS[m] in paper:
                    txt += f" ({paper[METHOD_LABELS[m]]:.2f})"
                cells_.append(txt)
            lines.append(f"| {t} | {float(d):g} | {tv} | " + " | ".join(cells_) + " |")
    lines += ["", "## Full scans (student mIoU on every point, Δ to the no-KD student)", "",
              "| teacher | D | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |", "|---" * (2 + len(methods)) + "|"]
    for t in study["teachers"]:
        for d in study["degradations"]:
            row = summary.get(t, {}).get(d_tag(d), {})
            if row:
                lines.append(f"| {t} | {float(d):g} | " + " | ".join(
                    (_pm(row[m]["student_all"]) + ("" if m == "none" else f" [{format_delta(row[m]['delta_all'])}]"))
                    if m in row else "–" for m in methods) + " |")
    effect = results.get("pssm_effect") or {}
    if effect:
        lines += ["", "## PSSM's own effect (in view): the method with PSSM − the same method without, same seed",
                  "", "| teacher | D | KD+PSSM − KD | DKD+PSSM − DKD |", "|---" * 4 + "|"]
        for t in study["teachers"]:
            for d in study["degradations"]:
                row = effect.get(t, {}).get(d_tag(d))
                if row:
                    lines.append(f"| {t} | {float(d):g} | " + " | ".join(
                        format_delta(row[f"{a}-{b}"]) if f"{a}-{b}" in row else "–" for a, b in PSSM_PAIRS) + " |")
    lines += ["", "## SSDH diagnostics: output CMD (teacher vs student softmax, in-view val points) "
              "and PSSM's Ω over the last epoch", "",
              "| teacher | D | method | output CMD | Ω = 1 | Ω = 0 | between |", "|---" * 7 + "|"]
    for t in study["teachers"]:
        for d in study["degradations"]:
            for m in methods:
                s = summary.get(t, {}).get(d_tag(d), {}).get(m)
                if s is None:
                    continue
                one, zero = s["omega_one_share"], s["omega_zero_share"]
                if one["mean"] is None:
                    om = ["–", "–", "–"]
                else:
                    om = [f"{100 * one['mean']:.1f} %", f"{100 * zero['mean']:.1f} %",
                          f"{100 * (1 - one['mean'] - zero['mean']):.1f} %"]
                lines.append(f"| {t} | {float(d):g} | {METHOD_LABELS[m]} | {_pm(s['output_cmd'], '{:.4f}')} | "
                             + " | ".join(om) + " |")
    total = results.get("cell_seconds_total") or 0.0
    lines += ["", f"Cells' compute time, summed: {total / 60:.1f} min"
              + (f"; this run's wall time: {results['wall_seconds_last_run'] / 60:.1f} min"
                 if results.get("wall_seconds_last_run") else "") + "."]
    return "\n".join(lines) + "\n"


def plot(study: Dict[str, Any], results: Dict[str, Any], path: Path) -> None:
    """Δ in view (paired, mean and 95 % t-interval over seeds) against D, one panel per teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(study["teachers"])
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.2 * len(teachers), 4), sharey=True, squeeze=False)
    ds = [float(d) for d in study["degradations"]]
    spread = results["baseline_in_view"]["std"]
    for ax, t in zip(axes[0], teachers):
        for i, m in enumerate(m for m in study["methods"] if m != "none"):
            rows = [results["summary"].get(t, {}).get(d_tag(d), {}).get(m) for d in ds]
            mean = [r["delta_in_view"]["mean"] if r else float("nan") for r in rows]
            half = [(r["delta_in_view"].get("half_width") or 0.0) if r else 0.0 for r in rows]
            ax.errorbar([d + 0.012 * (i - 1.5) for d in ds], mean, yerr=half, marker="o", capsize=3, label=METHOD_LABELS[m])
        ax.axhline(0.0, color="k", lw=0.8)
        if spread:
            ax.axhspan(-spread, spread, color="0.85", zorder=0, label="no-KD seed std")
        ax.set_title(f"{t} teacher")
        ax.set_xlabel("image degradation D (larger shift →)")
        ax.set_xticks(ds)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ mIoU in view vs no-KD student (paired, 95 % CI)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(study["name"] or "shift study")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
