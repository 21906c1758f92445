"""One study runner: cells of teacher × [image degradation D] × [teacher fit] × method × seed.

The paper's Table 6 on real SemanticKITTI is a study with no D and one fit (``configs/kitti/
table6.yaml``); the shift study (``configs/kitti/shift_study.yaml``) adds the synthetic
generator's image degradation D (:class:`~pcseg_kd.data.kitti.synthetic.camera.ImageQuality`:
teacher trained and distilled on images of that D, the student's LiDAR scans the same files for
every D) and the teacher fit: ``in_sample`` (the teacher's targets on scans it was trained on)
or ``out_of_fold`` (each scan taught by the fold teacher that never saw it, ``teacher.folds``).

Cells, in dependency order:

* ``teacher-T[-dD]``: each teacher once per D with ``teacher_seed`` (and its fold teachers when
  the base config sets ``teacher.folds``), in ``WORK/teachers/T[-dD]/``;
* ``cache-T[-dD][-FIT]``: the teacher cache of that teacher and fit, exported once and read by
  every distilled student of it (when the cells distil from the cache);
* the no-KD student (a method whose distiller is ``none``), once per seed: it reads no image
  and no teacher, so the same run is the paired control of every teacher, D and fit;
* ``T[-dD][-FIT]-METHOD``, once per seed.

The seed drives the student's initialisation, shuffling and augmentation, so the no-KD student
of the same seed is the paired control. Each cell is an ordinary ``tools/train.py`` work folder
plus ``cell.json`` (its figures and SSDH diagnostics); :mod:`.study_submit` runs the cells
through submitit (local processes, a SLURM cluster, or in-process), :mod:`.study_report`
gathers them into tables, records and a plot.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ...utils.io import read_json, write_json

if TYPE_CHECKING:
    import torch

METHOD_LABELS = {"none": "no KD", "kd": "KD", "kd_pssm": "KD+PSSM", "dkd": "DKD", "dkd_pssm": "DKD+PSSM"}
FIT_TAGS = {"in_sample": "insample", "out_of_fold": "oof"}
NAME = re.compile(r"^[A-Za-z0-9_.+]+$")  # teacher and method keys: parts of cell and folder names


@dataclass(kw_only=True)
class SlurmSettings:
    """What ``--executor slurm`` asks the cluster for, per cell (submitit's ``slurm_*`` parameters)."""
    partition: str = ""
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 720
    additional: Dict[str, Any] = field(default_factory=dict)  # slurm_additional_parameters, e.g. {account: X}


@dataclass(kw_only=True)
class StudyConfig:
    experiment: str = "semantickitti_study"
    name: str = ""
    base: str = ""                                                # experiment config of every cell, relative to this file
    overrides: List[str] = field(default_factory=list)            # applied to every cell
    root: str = ""                                                # with degradations: one dataset per D, ROOT_d<D>
    degradations: List[float] = field(default_factory=list)       # [] : no D axis (real data)
    fits: List[str] = field(default_factory=lambda: ["in_sample"])  # in_sample | out_of_fold
    teachers: Dict[str, List[str]] = field(default_factory=dict)  # teacher -> overrides of its cells
    methods: Dict[str, List[str]] = field(default_factory=dict)   # method -> overrides (one of distiller none)
    teacher_seed: int = 0
    seeds: List[int] = field(default_factory=lambda: [0])
    metric: str = "in_view"                                       # the students' score: in_view or all
    cmd_moments: int = 5                                          # K of CMD_K (the paper's Table 1)
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)  # teacher -> {teacher | method label: mIoU}
    slurm: Dict[str, Any] = field(default_factory=dict)          # SlurmSettings, for --executor slurm


def d_tag(d: Optional[float]) -> str:
    return "" if d is None else f"d{float(d):g}"


def method_label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def load_study(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from ...config import ConfigError, load_config_with_provenance, validate
    cfg, _ = load_config_with_provenance(path, overrides, schema=StudyConfig)
    out = OmegaConf.to_container(cfg, resolve=True)
    out["config_path"] = str(Path(path))
    try:
        out["slurm"] = validate(out["slurm"], SlurmSettings)
    except ConfigError as e:
        raise ConfigError(f"{path}: slurm: {e}") from None
    out["config_overrides"] = list(overrides)
    if not out["base"]:
        raise ConfigError(f"{path}: base: the experiment config every cell starts from is required")
    out["base"] = str((Path(path).parent / out["base"]).resolve())
    if not out["teachers"]:
        raise ConfigError(f"{path}: teachers must name at least one teacher")
    if not out["methods"]:
        raise ConfigError(f"{path}: methods must name at least one method")
    bad = [k for k in list(out["teachers"]) + list(out["methods"]) if not NAME.match(k)]
    if bad:
        raise ConfigError(f"{path}: teacher and method names become folder names: letters, digits, _ . + only "
                          f"(got {bad})")
    ds = out["degradations"]
    if len(set(ds)) != len(ds) or not all(0.0 <= float(d) <= 1.0 for d in ds):
        raise ConfigError(f"{path}: degradations must be distinct numbers in [0, 1], got {ds}")
    if ds and not out["root"]:
        raise ConfigError(f"{path}: root: degradations need the root of their synthetic datasets (ROOT_d<D>)")
    if not out["fits"] or len(set(out["fits"])) != len(out["fits"]) or set(out["fits"]) - set(FIT_TAGS):
        raise ConfigError(f"{path}: fits must be distinct, among {list(FIT_TAGS)}, got {out['fits']}")
    if not out["seeds"] or len(set(out["seeds"])) != len(out["seeds"]):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct seeds, got {out['seeds']}")
    if out["metric"] not in ("all", "in_view"):
        raise ConfigError(f"{path}: metric must be 'all' or 'in_view', got {out['metric']!r}")
    return out


SUBSET_AXES = ("teachers", "degradations", "fits", "methods", "seeds")


def subset(study: Dict[str, Any], only: List[str]) -> Dict[str, Any]:
    """The study restricted to some values of its axes (``--only teachers=fusion --only
    seeds=0,1``): the same cells, names and folders as in the whole study, fewer of them. The
    no-KD methods are kept whatever ``methods`` says (every Δ is paired to them)."""
    from ...config import ConfigError

    out = dict(study)
    for item in only:
        axis, _, values = item.partition("=")
        if axis not in SUBSET_AXES or not values:
            raise ConfigError(f"--only {item!r}: expected AXIS=V1,V2 with AXIS one of {', '.join(SUBSET_AXES)}")
        have = study[axis]
        keys = list(have) if isinstance(have, dict) else have
        name = (lambda v: f"{float(v):g}") if axis == "degradations" else str  # "1", "1.0" and 1.0 alike
        by_name = {name(k): k for k in keys}
        wanted = [v.strip() for v in values.split(",")]
        unknown = [v for v in wanted if _safe(name, v) not in by_name]
        if unknown:
            raise ConfigError(f"--only {item!r}: {unknown} not among the study's {axis} {list(by_name)}")
        picked = {by_name[name(v)] for v in wanted}
        if axis == "methods":  # filtered in cells(), which knows which method is the no-KD control
            out["method_filter"] = sorted(picked)
        elif isinstance(have, dict):
            out[axis] = {k: v for k, v in have.items() if k in picked}
        else:
            out[axis] = [k for k in have if k in picked]
    out["only"] = list(only)
    return out


def _safe(name, value: str) -> Optional[str]:
    try:
        return name(value)
    except ValueError:  # "x" as a degradation: unknown, reported with the others
        return None


def data_overrides(study: Dict[str, Any], d: Optional[float]) -> List[str]:
    """The dataset of degradation ``d``: its own root, generated with that image quality."""
    if d is None:
        return []
    root = f"{study['root']}_{d_tag(d)}"
    return [f"data.train.root={root}", f"data.val.root={root}", f"data.synthetic.quality={{degradation: {float(d)}}}"]


def fit_overrides(fit: str, teacher_cfg: Dict[str, Any]) -> List[str]:
    """In sample: the teacher's own targets (no folds); out of fold: the base's fold teachers."""
    if fit == "in_sample":
        return ["teacher.folds=0"] if teacher_cfg["teacher"].get("folds") else []
    return []


def cell_name(study: Dict[str, Any], teacher: str, d: Optional[float], fit: str, method: Optional[str]) -> str:
    parts = [teacher, d_tag(d)]
    if study["fits"] != ["in_sample"]:  # a fit axis: every cell says which
        parts.append(FIT_TAGS[fit])
    return "-".join([p for p in parts if p] + ([method] if method else []))


def cells(study: Dict[str, Any], work_dir: Path) -> List[Dict[str, Any]]:
    """Every cell, in dependency order: name, kind (teacher, cache, baseline, student),
    teacher, degradation, fit, method, seed, work folder, experiment config, and the names of
    the cells it needs. Every config is loaded and validated here, before anything trains."""
    from ...config import ConfigError
    from .schema import load_kitti_experiment

    base, common = study["base"], list(study["overrides"])
    degs = [float(d) for d in study["degradations"]] or [None]
    out: List[Dict[str, Any]] = []

    def load(extra: List[str]) -> Dict[str, Any]:
        return load_kitti_experiment(base, common + extra)

    teacher_cells = {}
    for t, t_over in study["teachers"].items():
        for d in degs:
            name = "teacher-" + "-".join(p for p in (t, d_tag(d)) if p)
            cfg = load(data_overrides(study, d) + list(t_over) + [f"seed={study['teacher_seed']}", "stages=[teacher]"])
            if "out_of_fold" in study["fits"] and not cfg["teacher"].get("folds"):
                raise ConfigError(f"{study['config_path']}: fits: out_of_fold needs fold teachers: set teacher.folds "
                                  "in the base config (or the study's overrides)")
            teacher_cells[(t, d)] = c = {"name": name, "kind": "teacher", "teacher": t, "degradation": d, "fit": None,
                                         "method": None, "seed": study["teacher_seed"],
                                         "dir": work_dir / "teachers" / name[len("teacher-"):], "cfg": cfg, "needs": []}
            out.append(c)
    baselines = [m for m, m_over in study["methods"].items()
                 if load(data_overrides(study, degs[0]) + list(m_over))["distiller"]["type"] == "none"]
    if not baselines:
        raise ConfigError(f"{study['config_path']}: methods: one method must be the no-KD student "
                          "(distiller={_delete_: true, type: none}), the paired control of every other")
    distilled = [m for m in study["methods"] if m not in baselines
                 and m in study.get("method_filter", study["methods"])]  # --only methods=...: the controls stay

    def student_cfg(t, d, fit, m, seed):
        teacher = teacher_cells[(t, d)]
        cfg = load(data_overrides(study, d) + list(study["teachers"][t]) + fit_overrides(fit, teacher["cfg"])
                   + list(study["methods"][m]) + [f"seed={seed}", "stages=[student]"])
        cfg["teacher_checkpoint"] = str(teacher["dir"] / "teacher" / "final.pt")
        return cfg

    caches = {}
    for (t, d), teacher in teacher_cells.items():
        for fit in study["fits"]:
            # one export serves every student of this teacher and fit that distils from the cache
            cfg = next((c for c in (student_cfg(t, d, fit, m, study["teacher_seed"]) for m in distilled)
                        if c["distiller"].get("teacher_source", "online") == "cache"), None)
            if cfg is None:
                continue
            name = "cache-" + cell_name(study, t, d, fit, None)
            cdir = work_dir / "caches" / name[len("cache-"):]
            cfg["distiller"]["teacher_cache"] = str(cdir / "teacher_cache")
            caches[(t, d, fit)] = c = {"name": name, "kind": "cache", "teacher": t, "degradation": d, "fit": fit,
                                       "method": None, "seed": study["teacher_seed"], "dir": cdir, "cfg": cfg,
                                       "needs": [teacher["name"]]}
            out.append(c)
    for seed in study["seeds"]:
        for m in baselines:
            cfg = load(data_overrides(study, degs[0]) + list(study["methods"][m]) + [f"seed={seed}", "stages=[student]"])
            out.append({"name": m, "kind": "baseline", "teacher": None, "degradation": None, "fit": None, "method": m,
                        "seed": seed, "dir": work_dir / "students" / f"seed{seed}" / m, "cfg": cfg,
                        "needs": [c["name"] for c in teacher_cells.values()]})  # its CMD to every teacher
    for seed in study["seeds"]:
        for t in study["teachers"]:
            for d in degs:
                for fit in study["fits"]:
                    for m in distilled:
                        cfg = student_cfg(t, d, fit, m, seed)
                        needs = [teacher_cells[(t, d)]["name"]]
                        if cfg["distiller"].get("teacher_source", "online") == "cache" and (t, d, fit) in caches:
                            cfg["distiller"]["teacher_cache"] = caches[(t, d, fit)]["cfg"]["distiller"]["teacher_cache"]
                            needs.append(caches[(t, d, fit)]["name"])
                        name = cell_name(study, t, d, fit, m)
                        out.append({"name": name, "kind": "student", "teacher": t, "degradation": d, "fit": fit,
                                    "method": m, "seed": seed, "dir": work_dir / "students" / f"seed{seed}" / name,
                                    "cfg": cfg, "needs": needs})
    return out


def once_per_study(cell: Dict[str, Any]) -> bool:
    return cell["kind"] in ("teacher", "cache")


def find_cell(all_cells: List[Dict[str, Any]], name: str, seed: Optional[int]) -> Dict[str, Any]:
    matches = [c for c in all_cells if c["name"] == name and (once_per_study(c) or seed is None or c["seed"] == seed)]
    if not matches:
        names = sorted({c["name"] for c in all_cells})
        raise ValueError(f"--cell {name!r} (seed {seed}) is not a cell of this study; cells: {', '.join(names)}")
    if len(matches) > 1:
        raise ValueError(f"--cell {name!r} runs once per seed: give --seed (one of "
                         f"{sorted(c['seed'] for c in matches)})")
    return matches[0]


def is_done(cell: Dict[str, Any]) -> bool:
    return (cell["dir"] / "cell.json").is_file()


# settings that change no figure of a cell (or name where its inputs lie in the work folder,
# which the chain of needed cells already pins): a done cell differing only in these is reused
SETTINGS_NOT_COMPARED = ("eval_interval", "log_interval", "teacher_checkpoint", "distiller.teacher_cache")


def stale_cells(all_cells: List[Dict[str, Any]]) -> List[str]:
    """The done teacher, baseline and student cells whose saved ``config.yaml`` differs from the
    study's config for them now (beyond :data:`SETTINGS_NOT_COMPARED`): reused, they would put
    figures of other settings in the tables. One line each, naming the first difference."""
    from ...config import yaml_load

    def flat(d: Any, prefix: str = "") -> Dict[str, Any]:
        if isinstance(d, dict):
            out: Dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    out = []
    for c in all_cells:
        saved_path = c["dir"] / "config.yaml"
        if c["kind"] == "cache" or not is_done(c) or not saved_path.is_file():
            continue
        saved = flat(json.loads(json.dumps(yaml_load(saved_path.read_text()), default=str)))
        now = flat(json.loads(json.dumps(c["cfg"], default=str)))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                      and not any(k == s or k.startswith(s + ".") for s in SETTINGS_NOT_COMPARED))
        if diff:
            out.append(f"{describe(c)} ({saved_path}: {diff[0]} was {saved.get(diff[0])!r}, the study now has "
                       f"{now.get(diff[0])!r}" + (f"; {len(diff) - 1} more" if len(diff) > 1 else "") + ")")
    return out


def describe(cell: Dict[str, Any]) -> str:
    return cell["name"] + ("" if once_per_study(cell) else f" seed {cell['seed']}")


def cells_to_gather(all_cells: List[Dict[str, Any]], partial_ok: bool) -> tuple:
    """(the cells to gather, the names of the cells left out): every cell, or with
    ``partial_ok`` (``--gather``) the done ones when whole groups (teacher, D, fit, method,
    every seed) were not run: a study run in parts. A group with some seeds done and others
    not is refused (ValueError): its mean and interval would be over fewer seeds than the study's."""
    missing = [c for c in all_cells if not is_done(c)]
    if not missing:
        return all_cells, []
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for c in all_cells:
        groups.setdefault((c["kind"], c["teacher"], c["degradation"], c["fit"], c["method"]), []).append(c)
    partial = [c for cs in groups.values() if 0 < sum(not is_done(c) for c in cs) < len(cs) for c in cs if not is_done(c)]
    needed = [c for c in missing if c["kind"] in ("teacher", "baseline")]
    if not partial_ok or partial or needed:
        first = (partial or needed or missing)[0]
        raise ValueError(f"{len(missing)} of {len(all_cells)} cells are not done (first: {describe(first)})"
                         + ("; run the study first" if partial_ok else "")
                         + (" (--gather leaves out whole groups of cells only: teacher, D, fit and method with "
                            "all their seeds)" if partial_ok and partial else ""))
    return [c for c in all_cells if is_done(c)], sorted({c["name"] for c in missing})


# ----------------------------------------------------------------------------- one cell
def run_cell(cell: Dict[str, Any], all_cells: List[Dict[str, Any]], study: Dict[str, Any],
             progress: bool = False) -> Dict[str, Any]:
    """Train one cell (resuming), compute its diagnostics, write ``cell.json``; returns it.
    The teacher and cache cells it needs run first if they have not."""
    from ...config import save_config
    from ..distributed import init_distributed
    from .train import run_kitti

    done = read_json(cell["dir"] / "cell.json", default=None)
    if done is not None:
        return done
    by_name = {c["name"]: c for c in all_cells if once_per_study(c)}
    for need in cell["needs"]:
        if not is_done(by_name[need]):
            run_cell(by_name[need], all_cells, study, progress)
    env = init_distributed(cell["cfg"]["device"])
    if env.distributed:
        raise ValueError("a study runs each cell in one process; cells run side by side through --jobs")
    t0 = time.perf_counter()
    cell["dir"].mkdir(parents=True, exist_ok=True)
    out = {k: cell[k] for k in ("name", "kind", "teacher", "degradation", "fit", "method", "seed")}
    if cell["kind"] == "cache":
        out.update(export_cache(cell, env, progress))
        out["seconds"] = time.perf_counter() - t0
        write_json(cell["dir"] / "cell.json", out)
        return out
    save_config(cell["cfg"], cell["dir"] / "config.yaml")
    results = run_kitti(cell["cfg"], cell["dir"], env, progress)
    stage = "teacher" if cell["kind"] == "teacher" else "student"
    metrics = results[stage]
    out.update({"in_view": metrics["in_view"]["miou"], "all": metrics.get("all", {}).get("miou"),
                "iou_in_view": metrics["in_view"]["iou"]})
    if cell["kind"] == "teacher":
        out["fold_teachers"] = results.get("fold_teachers")
    else:
        stage_metrics = read_json(cell["dir"] / "student" / "metrics.json", default={}) or {}
        out["omega_last_epoch"] = (stage_metrics.get("omega") or [None])[-1]  # the last epoch's shares
        out["teacher_targets"] = (stage_metrics.get("teacher_targets") or [None])[-1]
        if cell["kind"] == "baseline":  # the no-KD student against every teacher
            out["output_cmd"] = {c["name"][len("teacher-"):]: cell_cmd(cell, c, study, env.device)
                                 for c in all_cells if c["kind"] == "teacher"}
        else:
            out["output_cmd"] = cell_cmd(cell, by_name[cell["needs"][0]], study, env.device)
    out["seconds"] = time.perf_counter() - t0
    write_json(cell["dir"] / "cell.json", out)
    return out


def complete_baseline_cmds(all_cells: List[Dict[str, Any]], study: Dict[str, Any]) -> int:
    """A no-KD cell run as part of a subset (``--only``) knows its CMD to that subset's teachers
    only: add the CMD to every other teacher of the study that is done (its cell.json is
    rewritten). Returns how many CMDs were computed."""
    import torch

    teachers = [c for c in all_cells if c["kind"] == "teacher" and is_done(c)]
    added = 0
    for cell in all_cells:
        if cell["kind"] != "baseline" or not is_done(cell):
            continue
        out = read_json(cell["dir"] / "cell.json")
        missing = [t for t in teachers if t["name"][len("teacher-"):] not in out.get("output_cmd", {})]
        if missing and cell["cfg"].get("threads"):  # as in the cell's own run: the same figures, bitwise
            torch.set_num_threads(cell["cfg"]["threads"])
        for t in missing:
            out["output_cmd"][t["name"][len("teacher-"):]] = cell_cmd(cell, t, study, torch.device("cpu"))
            added += 1
        if missing:
            write_json(cell["dir"] / "cell.json", out)
    return added


def export_cache(cell: Dict[str, Any], env, progress: bool) -> Dict[str, Any]:
    """The teacher cache the cell's students read (resuming a killed export)."""
    from .export import export_teacher
    from .teacher import cache_fingerprint, teacher_source

    cfg = cell["cfg"]
    path = teacher_source(cfg, cell["dir"])[1]
    fingerprint = cache_fingerprint(cfg, cell["dir"], device=env.device)
    export_teacher(cfg, cell["dir"], env, path, progress=progress, fingerprint=fingerprint)
    return {"cache": str(path)}


def cell_cmd(student_cell: Dict[str, Any], teacher_cell: Dict[str, Any], study: Dict[str, Any],
             device: "torch.device") -> float:
    """CMD between the student's and the teacher's softmax outputs on the in-view validation
    points of the teacher's D (the student's LiDAR input is the same for every D). The
    teacher's side comes from :func:`teacher_val_logits`, computed once per teacher."""
    from ...registry import DATASETS
    from .diagnostics import output_cmd
    from .teacher import load_frozen

    cfg = teacher_cell["cfg"]
    student = load_frozen(student_cell["dir"] / "student" / "final.pt", student_cell["cfg"]["student"]["model"], device)
    teacher_logits = teacher_val_logits(teacher_cell, device)
    val = DATASETS.build(cfg["data"]["val"]).without_pixels()  # the LiDAR student reads no pixels
    return output_cmd(student, teacher_logits, _val_loader(val, cfg, device), device, k=study["cmd_moments"])


def _val_loader(val, cfg: Dict[str, Any], device: "torch.device"):
    """The teacher's validation loader (its batch size), as its training validated, on one process."""
    from ..distributed import DistEnv
    from .runner import make_val_loader

    return make_val_loader(val, cfg["teacher"]["optim"]["batch_size"], cfg, DistEnv(device=device))


def teacher_val_logits(teacher_cell: Dict[str, Any], device: "torch.device") -> list:
    """The teacher's in-view logits on every validation batch, kept beside its ``final.pt``
    (``val_in_view_logits.pt``, tagged with that checkpoint's size and time and the validation
    settings): the teacher's half of every student's CMD, computed by the first of them. A
    retrained teacher or other validation data computes them again."""
    import torch

    from ...registry import DATASETS
    from ...utils.io import atomic_write
    from .diagnostics import teacher_in_view_logits
    from .teacher import load_frozen

    cfg = teacher_cell["cfg"]
    final = teacher_cell["dir"] / "teacher" / "final.pt"
    st = final.stat()
    key = {"final_pt": [st.st_size, st.st_mtime_ns], "val": json.loads(json.dumps(cfg["data"]["val"], default=str)),
           "batch_size": cfg["teacher"]["optim"]["batch_size"]}
    path = final.parent / "val_in_view_logits.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["logits"]
        except Exception:  # noqa: BLE001 - a damaged file is computed again
            pass
    teacher = load_frozen(final, cfg["teacher"]["model"], device)
    val = DATASETS.build(cfg["data"]["val"])
    logits = teacher_in_view_logits(teacher, _val_loader(val, cfg, device), device)
    atomic_write(path, lambda f: torch.save({"key": key, "logits": logits}, f), binary=True)
    return logits


def cell_lines(cell_out: Dict[str, Any]) -> List[str]:
    """What ``--cell`` prints."""
    what = describe(cell_out)
    if cell_out["kind"] == "cache":
        return [f"{what}: teacher cache {cell_out['cache']}", f"  {cell_out['seconds']:.0f} s"]
    lines = [f"{what}: mIoU in view {cell_out['in_view']:.2f}"
             + (f", all {cell_out['all']:.2f}" if cell_out.get("all") is not None else "")]
    tt = cell_out.get("teacher_targets")
    if tt:
        lines.append(f"  teacher targets on the distilled rows: {tt['accuracy']:.1f} % right, mIoU {tt['miou']:.1f}")
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


def generate_data(all_cells: List[Dict[str, Any]]) -> None:
    """Each D's synthetic dataset, before any cell runs (cells side by side must not race to
    it); then every dataset the cells read is opened once, so that a missing or damaged root
    fails here, naming it, rather than in every job."""
    from ...registry import DATASETS
    from ..distributed import DistEnv
    from .data import generate_synthetic_if_missing

    env = DistEnv()
    seen = set()
    for c in all_cells:
        if c["kind"] == "teacher":
            data = c["cfg"]["data"]
            generate_synthetic_if_missing([data["train"]["root"], data["val"]["root"]], data.get("synthetic"), env)
            for split in ("train", "val"):
                key = repr(sorted(data[split].items()))
                if key not in seen:
                    seen.add(key)
                    DATASETS.build(data[split])
