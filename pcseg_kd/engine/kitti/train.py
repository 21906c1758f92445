"""SemanticKITTI training: the teacher, baseline and distillation stages, run in order.

One code path for one process and for ``torchrun`` (DDP, one process per device). Each
stage writes ``WORK/<stage>/``: ``last.pt`` (atomic, every epoch and every
``checkpoint_interval`` steps; a killed run resumes from it, mid-epoch included),
``final.pt`` (the trained model, what the student stage loads as its teacher),
``log.jsonl`` (losses at ``log_interval``, validations) and ``metrics.json``. A finished
stage is skipped when the experiment is run again. ``WORK/metrics.json`` gathers every
stage's final validation (teacher, baseline, student) on the same rows.

What each stage minimises is in :mod:`.objective`; validation in :mod:`.evaluate`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ...utils.io import write_json
from ...registry import DATASETS, DISTILLERS, MODELS
from ..checkpoint import load_checkpoint, rng_state
from ...data.kitti.teacher_cache import (TeacherCache, TeacherCacheDataset, TeacherCacheError, complete_chunks,
                                         num_chunks, read_meta)
from ..distributed import DistEnv, all_reduce_sum, broadcast_module, broadcast_object
from ..hook import Hook
from ..loggers import build_loggers
from ..sync_bn import convert_sync_batchnorm
from .data import ShardedBatchSampler, generate_synthetic_if_missing, make_loader, to_device  # noqa: F401
from .evaluate import evaluate  # noqa: F401  (importable from here, as before the runner split)
from .export import export_teacher
from .teacher import (ResumeMismatch, cache_fingerprint, load_frozen, load_teacher, load_weights,  # noqa: F401
                      teacher_fingerprint, teacher_source, teacher_weights_path, without_engine_keys, without_pretrained)
from .objective import SegLoss, rows_of  # noqa: F401
from .schema import check_num_classes
from .runner import (FINAL_EXTRAS, StageRunner, check_fingerprint, model_section, omega_counts_over_ranks,  # noqa: F401
                     val_record, write_stage_metrics)


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(params, o, device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    # fused on CUDA: one kernel per step, and GradScaler hands it found_inf on the device
    # instead of reading it back (the non-fused path syncs every AMP step for that)
    fused = device.type == "cuda"
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.momentum > 0, fused=fused)


def build_scheduler(opt, o, steps_per_epoch: int):
    total = max(1, o.epochs * steps_per_epoch)
    if o.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=total, pct_start=o.pct_start,
                                                   anneal_strategy="cos", div_factor=10.0, final_div_factor=1e3)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


# ----------------------------------------------------------------------------- stages
@dataclass
class StageResult:
    metrics: Dict[str, Any]
    final: Path


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def stage_fingerprint(stage: str, cfg: Dict[str, Any], env: DistEnv, steps: int, use_amp: bool,
                      work_dir: Path, distiller, expected_cache: Optional[Dict[str, Any]] = None,
                      fold: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The settings a stage's weights depend on; checkpoints carry it, and resuming or
    reusing one under different settings is an error rather than a silent mix."""
    section = cfg[model_section(stage)]
    fp = {"model": section["model"], "optim": section["optim"], "loss": section.get("loss"),
          "train": stage_train_cfg(stage, cfg), "seed": cfg["seed"], "amp": use_amp, "threads": cfg["threads"],
          "world_size": env.world_size, "steps_per_epoch": steps}
    if fold is not None:  # a fold teacher: which scans it left out
        fp["fold"] = fold
    if cfg.get("sync_bn") and env.distributed:  # only where it acts: older checkpoints still resume
        fp["sync_bn"] = True
    if section.get("load_from"):  # only where set: checkpoints written before the key still resume
        fp["load_from"] = file_identity(Path(section["load_from"]))
    if stage == "teacher":
        fp["loss_weights"] = cfg["teacher"].get("loss_weights") or {}
    else:
        # where a cache lies is not what the student depends on: its fingerprint is
        fp["distiller"] = {k: v for k, v in stage_distiller_cfg(stage, cfg).items() if k != "teacher_cache"}
        if distiller.has_kd:
            source, cache = teacher_source(cfg, work_dir)
            if source == "cache":
                # the cache's own fingerprint; before its export, the one it will have (``expected_cache``)
                fp["teacher"] = (read_meta(cache)["fingerprint"] if (cache / "meta.json").is_file()
                                 else expected_cache or {"cache": "missing"})
            else:
                fp["teacher"] = teacher_fingerprint(cfg, work_dir)
    return fp


def stage_train_cfg(stage: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The training set a stage trains on: ``data.train``, with ``teacher.data`` merged in for
    the teacher (a held-out teacher trains on other scans)."""
    if stage == "teacher" and cfg["teacher"].get("data"):
        return {**cfg["data"]["train"], **cfg["teacher"]["data"]}
    return cfg["data"]["train"]


def stage_distiller_cfg(stage: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The student's distiller; the baseline keeps its segmentation weight and drops KD."""
    if stage == "baseline":
        return {"type": "none", "ce_weight": cfg["distiller"].get("ce_weight", 1.0)}
    return cfg["distiller"]


def train_stage(stage: str, cfg: Dict[str, Any], env: DistEnv, work_dir: Path, train_ds, val_ds,
                progress: bool = True, class_weights: Optional[Dict[str, Tensor]] = None,
                on_step: Optional[Callable[[int], None]] = None, hooks: Sequence[Hook] = (),
                name: Optional[str] = None, fold: Optional[Dict[str, Any]] = None) -> StageResult:
    """Train one stage (or reuse its ``final.pt``): build its state, resume it from
    ``last.pt``, and run :class:`.runner.StageRunner` with the stage's hooks.

    ``class_weights``: {section: [C] weights} for sections whose loss asks for them;
    ``on_step(global_step)`` is called after every optimiser step (benchmarks time steps
    with it); ``hooks``: extra :class:`pcseg_kd.engine.hook.Hook` s; ``name``: the stage's
    folder under ``work_dir`` (default ``stage``; ``teacher_fold_k`` for fold teachers, whose
    ``fold`` {k, folds, digest of every scan's fold} joins the fingerprint)."""
    from .schema import KittiOptimConfig

    name = name or stage
    scfg = cfg[model_section(stage)]
    o = KittiOptimConfig(**scfg["optim"])
    stage_dir = work_dir / name
    final = stage_dir / "final.pt"
    device = env.device
    use_amp = o.amp and device.type == "cuda"
    steps = ShardedBatchSampler(len(train_ds), o.batch_size, True, cfg["seed"], env, drop_last=True).full_length()
    if o.max_steps_per_epoch:
        steps = min(steps, o.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"[{name}] {len(train_ds)} training scans give no full batch of {o.batch_size} per "
                         f"process on {env.world_size} process(es): lower {stage}.optim.batch_size")
    distiller = None
    if stage != "teacher":
        distiller = DISTILLERS.build({**without_engine_keys(stage_distiller_cfg(stage, cfg)),
                                      "ignore_index": train_ds.ignore_index})
        warmup = stage_distiller_cfg(stage, cfg).get("warmup_epochs") or 0
        if distiller.has_kd and warmup > o.epochs and env.is_main:
            print(f"[{stage}] warning: distiller.warmup_epochs ({warmup}) is longer than training "
                  f"({o.epochs} epochs): the KD term never reaches its full weight", flush=True)
    loss_cfg = scfg.get("loss") or {}
    seg = SegLoss(ce=loss_cfg.get("ce", 1.0), lovasz=loss_cfg.get("lovasz", 0.0),
                  class_weights=(class_weights or {}).get(model_section(stage)),
                  ignore_index=train_ds.ignore_index).to(device)
    expected_cache = None  # the fingerprint a cache exported from this run's teacher has (None: no weights)
    cached_kd = distiller is not None and distiller.has_kd and teacher_source(cfg, work_dir)[0] == "cache"
    if cached_kd:
        expected_cache = cache_fingerprint(cfg, work_dir, device=device)  # loads and hashes the teacher: once
    fingerprint = stage_fingerprint(stage, cfg, env, steps, use_amp, work_dir, distiller, expected_cache, fold)
    if final.is_file():
        state = load_checkpoint(final, mmap=True)  # its fingerprint and metrics only
        # a finished stage can be reused on another number of processes or threads, and without
        # the teacher cache it was trained from
        ignore = ("world_size", "steps_per_epoch", "threads", "sync_bn")
        if fingerprint.get("teacher") == {"cache": "missing"}:
            ignore += ("teacher",)
        check_fingerprint(final, state.get("fingerprint"), fingerprint, ignore=ignore)
        if env.is_main:
            print(f"[{name}] already trained: {final} (delete it to train again)", flush=True)
            if not (stage_dir / "metrics.json").is_file():  # killed between final.pt and metrics.json
                write_stage_metrics(stage_dir, state.get("metrics", {}), state.get("history", []),
                                    {k: state[k] for k in FINAL_EXTRAS if state.get(k)})
        return StageResult(state.get("metrics", {}), final)
    stage_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])  # the same initialisation on every rank

    model = MODELS.build(scfg["model"]).to(device)
    if scfg.get("load_from"):  # fine-tuning: start from trained weights instead of the initialisation
        load_start_weights(model, Path(scfg["load_from"]), f"{model_section(stage)}.load_from")
    if cfg.get("sync_bn") and env.distributed:
        # BatchNorm statistics over the global batch (spconv's BatchNorm1d too: over every
        # rank's active voxels); before the optimiser and DDP, which keep the same tensors
        model = convert_sync_batchnorm(model)
    teacher = None
    if distiller is not None:
        if cached_kd:  # the teacher's rows come with each sample: no teacher in the step
            cache = ensure_teacher_cache(cfg, work_dir, env, train_ds, expected_cache, progress)
            train_ds = TeacherCacheDataset(train_ds, cache)
        elif distiller.has_kd:  # the no-KD baseline needs no teacher
            teacher = load_teacher(cfg, work_dir, device)
            distiller.build_modules(model.out_channels, teacher.out_channels)
        distiller.to(device)
        broadcast_module(distiller, env)  # outside DDP: start every rank from rank 0's regressors
    if (stage == "student" and teacher is None and not getattr(model, "reads_images", False)
            and hasattr(train_ds, "without_pixels")):
        # no model in this stage's steps reads pixels (the teacher's rows, if any, come from
        # the cache): image sizes only, the same samples and augmentation draws
        train_ds = train_ds.without_pixels()
        val_ds = val_ds.without_pixels() if val_ds is not None else None
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    opt = build_optimizer(params, o, device)
    runner = StageRunner(stage, cfg, env, stage_dir, name=name, model=model, optim_cfg=o, opt=opt,
                         sched=build_scheduler(opt, o, steps), scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
                         params=params, seg=seg, distiller=distiller, teacher=teacher, train_ds=train_ds,
                         val_ds=val_ds, steps=steps, fingerprint=fingerprint, progress=progress)
    runner.register(default_hooks(runner, on_step) + list(hooks))
    runner.restore()  # from last.pt, when a killed run left one
    if env.is_main:
        print(start_banner(runner, cached_kd, work_dir), flush=True)
    metrics = runner.run()
    return StageResult(metrics, final)


def default_hooks(runner: StageRunner, on_step: Optional[Callable[[int], None]] = None) -> List[Hook]:
    """What every stage does besides stepping: loggers, progress, logged losses, epoch means,
    Ω statistics, checkpoints, validation and ``best.pt``."""
    from . import hooks as H

    cfg = runner.cfg
    evaluation = H.EvalHook(cfg["eval_interval"])
    out: List[Hook] = build_loggers(cfg, runner.stage_dir, runner.env.is_main, runner.name)
    out += [H.ProgressHook(), H.LossLogHook(cfg["log_interval"]), H.EpochLossHook(runner.env),
            H.OmegaStatsHook(runner), H.TeacherTargetHook(runner), H.CheckpointHook(cfg["checkpoint_interval"], lambda e: evaluation.due(runner, e)),
            evaluation, H.BestCheckpointHook()]
    if on_step is not None:
        out.append(H.StepCallbackHook(on_step))
    return out


def start_banner(r: StageRunner, cached_kd: bool, work_dir: Path) -> str:
    """What a run is doing, in its log's first lines: device, processes, batches, AMP, data."""
    env, o = r.env, r.optim_cfg
    backend = torch.distributed.get_backend() if env.distributed else "none"
    params = sum(p.numel() for p in r.model.parameters())
    lines = [f"[{r.name}] {type(r.model).__name__} ({params / 1e6:.2f} M parameters) on {env.device}, "
             f"{env.world_size} process(es) (backend {backend}), {torch.get_num_threads()} thread(s) each",
             f"[{r.name}] batch {o.batch_size} scans per process, {o.batch_size * env.world_size} global; "
             f"AMP {'on' if r.use_amp else 'off'}; {o.optimizer} lr {o.lr:g}, {o.schedule} schedule",
             f"[{r.name}] {len(r.train_ds)} training scans ({r.steps} steps per epoch x {o.epochs} epochs), "
             + (f"{len(r.val_ds)} validation scans" if r.val_ds is not None else "no validation")
             + f", protocol {r.cfg['protocol']}"]
    if r.distiller is not None:
        kd = r.cfg["distiller"].get("type") if r.stage == "student" else "none"
        source = ""
        if r.distiller.has_kd:
            source = f", teacher from {'the cache ' + str(teacher_source(r.cfg, work_dir)[1]) if cached_kd else 'its weights, every step'}"
        lines.append(f"[{r.name}] distiller {kd}{source}")
    if r.cfg_section.get("load_from"):
        lines.append(f"[{r.name}] initialised from {r.cfg_section['load_from']}")
    return "\n".join(lines)


def file_identity(path: Path) -> Dict[str, Any]:
    """A file's resolved path and the SHA-256 of its bytes."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path.resolve()), "sha256": h.hexdigest()}


def load_start_weights(model: nn.Module, path: Path, key: str) -> None:
    """``load_from``: a stage's final.pt / best.pt / last.pt, or a bare state_dict of the model."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    state = load_checkpoint(path)
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{key}: {path} is neither a pcseg_kd checkpoint nor a state_dict")
    load_weights(model, weights, path)


def ensure_teacher_cache(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, train_ds,
                         expected: Optional[Dict[str, Any]], progress: bool = True) -> TeacherCache:
    """The run's teacher cache, checked against ``expected`` (:func:`.export.cache_fingerprint`
    of the run's teacher; None: the run has no teacher weights); exported first (or finished,
    when a killed export left it incomplete) when the run has the teacher's weights."""
    _, path = teacher_source(cfg, work_dir)
    complete = None
    if env.is_main:  # decided once: every rank must take part in an export or none
        if (path / "meta.json").is_file():
            meta = read_meta(path)
            complete = len(complete_chunks(path, meta)) == num_chunks(meta)
    complete = broadcast_object(complete, env)
    if not complete:
        if expected is None:
            raise TeacherCacheError(f"{path}: no complete teacher cache, and no teacher weights "
                                    f"({teacher_weights_path(cfg, work_dir)}) to export one from: train the "
                                    "teacher stage, set teacher_checkpoint, or point distiller.teacher_cache "
                                    "at a complete cache")
        if env.is_main:
            print(f"[student] exporting the teacher's logits to {path} (distiller.teacher_source: cache)", flush=True)
        export_teacher(cfg, work_dir, env, path, progress=progress, fingerprint=expected)
    cache = TeacherCache(path)
    cache.check_run(train_ds.frames, train_ds.num_classes, train_ds.class_names, expected)
    return cache


def check_batches(cfg: Dict[str, Any], scans: int, env: DistEnv) -> None:
    """Each stage to run gets at least one full batch per process and epoch."""
    for stage in cfg["stages"]:
        if stage == "teacher" and cfg.get("teacher_checkpoint"):
            continue
        bs = cfg[model_section(stage)]["optim"]["batch_size"]
        if scans // env.world_size // bs < 1:
            raise ValueError(f"{model_section(stage)}.optim.batch_size: {scans} training scans give no full batch of "
                             f"{bs} per process on {env.world_size} process(es) for the {stage} stage: lower it")


def resolve_class_weights(cfg: Dict[str, Any], train_ds, work_dir: Path, env: DistEnv,
                          teacher_ds=None) -> Dict[str, Tensor]:
    """{section: [C] CE class weights} for the sections whose ``loss.class_weights`` asks for
    them: 2DPASS's (max f / f_c)^(1/3) from the label map's ``content`` (``"content"``) or
    from the training labels (``"frequency"``, counted once and kept in
    ``WORK/class_counts.json``; a teacher with its own ``teacher.data`` counts its own, in
    ``WORK/class_counts_teacher.json``), or the config's own list."""
    from ...losses.class_weights import inverse_frequency_weights

    out: Dict[str, Tensor] = {}
    for section in dict.fromkeys(model_section(s) for s in cfg["stages"]):
        source = (cfg[section].get("loss") or {}).get("class_weights")
        if source is None:
            continue
        own = section == "teacher" and teacher_ds is not None and teacher_ds is not train_ds
        ds = teacher_ds if own else train_ds
        if source == "content":
            weights = inverse_frequency_weights(ds.label_map.train_frequencies())
        elif source == "frequency":
            counts_file = work_dir / ("class_counts_teacher.json" if own else "class_counts.json")
            data_cfg = stage_train_cfg("teacher" if own else "student", cfg)
            weights = inverse_frequency_weights(training_class_counts(data_cfg, ds, counts_file, env))
        else:
            if len(source) != ds.num_classes:
                raise ValueError(f"{section}.loss.class_weights: {len(source)} weights for "
                                 f"{ds.num_classes} classes")
            weights = torch.tensor(source, dtype=torch.float32)
        out[section] = weights
    return out


def training_class_counts(data_cfg: Dict[str, Any], train_ds, path: Path, env: DistEnv) -> List[int]:
    """Per-class label counts of a training set, kept in ``path`` (keyed by its config)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("train") == data_cfg:
            return saved["counts"]
    counts = [int(c) for c in train_ds.label_counts(progress=env.is_main)]
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"train": data_cfg, "counts": counts, "classes": train_ds.class_names})
    return counts


def summarize(cfg: Dict[str, Any], results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Every stage's final validation on the same rows: ``in_view`` for all, ``all`` (the
    student's rows) for the baseline and the student; per-class IoU kept."""
    summary: Dict[str, Any] = {"protocol": cfg["protocol"], "distiller": cfg["distiller"].get("type")}
    for stage, metrics in results.items():
        keys = ("in_view",) if stage == "teacher" else ("in_view", "all")
        summary[stage] = {k: {"miou": metrics[k]["miou"], "miou_present": metrics[k].get("miou_present"),
                              "iou": metrics[k]["iou"], "points": metrics[k]["points"]}
                          for k in keys if k in metrics}
    return summary


def comparison_lines(summary: Dict[str, Any]) -> List[str]:
    """The three-line comparison printed at the end of a run."""
    def fmt(stage, key):
        v = summary.get(stage, {}).get(key)
        return f"{v['miou']:6.2f}" if v else "     -"
    names = {"teacher": "teacher", "baseline": "baseline (no KD)", "student": f"student ({summary['distiller']})"}
    lines = []
    for stage in ("teacher", "baseline", "student"):
        if stage not in summary:
            continue
        line = f"{names[stage]:<24} mIoU in view {fmt(stage, 'in_view')}"
        present = summary[stage].get("in_view", {}).get("miou_present")
        if present is not None:  # classes absent from these rows count 0 in the mIoU above
            line += f" ({present:5.2f} over present classes)"
        if stage != "teacher":
            line += f"   all {fmt(stage, 'all')}"
        if stage == "student" and "baseline" in summary:
            gains = [f"{summary['student'][k]['miou'] - summary['baseline'][k]['miou']:+.2f} {k.replace('_', ' ')}"
                     for k in ("in_view", "all") if k in summary["student"] and k in summary["baseline"]]
            line += f"   vs baseline: {', '.join(gains)}"
        lines.append(line)
    targets = summary.get("student", {}).get("teacher_targets")
    if targets:
        lines.append(f"teacher targets on the student's distilled rows (last epoch): accuracy {targets['accuracy']:.2f} %, "
                     f"mIoU {targets['miou']:.2f} ({targets['rows']} rows)")
    if "student" in summary and "baseline" in summary:
        lines.append("one seed decides nothing: the seed spread is as large as the effects studied; compare >= 5 seeds "
                     "with tools/kitti_compare.py (paired 95 % interval)")
    return lines


def fold_teacher_name(k: int) -> str:
    return f"teacher_fold_{k}"


def train_fold_teachers(cfg: Dict[str, Any], env: DistEnv, work_dir: Path, train_ds, val_ds, progress: bool,
                        class_weights) -> Dict[str, Dict[str, Any]]:
    """``teacher.folds = K``: K teachers with the teacher's settings, fold teacher k trained on
    every training scan outside fold k (:func:`pcseg_kd.data.kitti.folds.contiguous_folds`: blocks of
    frames, or whole sequences with ``teacher.fold_by: sequence``),
    each a resumable stage of its own in ``WORK/teacher_fold_k/``; the teacher cache gives
    each scan the logits of the one that did not see it. Returns {name: final validation}."""
    from ...data.kitti.folds import FrameSubset, fold_assignment, folds_digest
    k_folds = cfg["teacher"]["folds"]
    folds = fold_assignment(cfg, train_ds.frames)
    out = {}
    for k in range(k_folds):
        subset = FrameSubset(train_ds, [i for i, f in enumerate(folds) if f != k])
        fold = {"k": k, "folds": k_folds, "frame_folds_sha256": folds_digest(folds)}
        if cfg["teacher"].get("fold_by", "block") != "block":  # only where set: block-fold checkpoints still resume
            fold["by"] = cfg["teacher"]["fold_by"]
        out[fold_teacher_name(k)] = train_stage("teacher", cfg, env, work_dir, subset, val_ds, progress, class_weights,
                                                name=fold_teacher_name(k), fold=fold).metrics
    return out


def run_kitti(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, progress: bool = True) -> Dict[str, Any]:
    """Run the experiment's stages in order; returns {stage: final validation metrics} and
    writes ``WORK/metrics.json`` (:func:`summarize`)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data = cfg["data"]
    roots = [data["train"]["root"]] + ([data["val"]["root"]] if data.get("val") else [])
    generate_synthetic_if_missing(roots, data.get("synthetic"), env)
    train_ds = DATASETS.build(data["train"])
    teacher_ds = DATASETS.build(stage_train_cfg("teacher", cfg)) if cfg["teacher"].get("data") else train_ds
    val_ds = DATASETS.build(data["val"]) if data.get("val") else None
    check_num_classes(cfg, train_ds.num_classes)  # a label map other than the configured default
    for ds in dict.fromkeys([train_ds, teacher_ds]):  # all-unlabelled data would train on nothing
        ds.check_has_labels("loss.class_weights")
    check_batches(cfg, len(train_ds), env)  # every stage, before the first one trains
    class_weights = resolve_class_weights(cfg, train_ds, work_dir, env, teacher_ds)
    results = {}
    for stage in cfg["stages"]:
        if stage == "teacher" and cfg.get("teacher_checkpoint"):
            continue
        ds = teacher_ds if stage == "teacher" else train_ds
        results[stage] = train_stage(stage, cfg, env, work_dir, ds, val_ds, progress, class_weights).metrics
        if stage == "teacher" and cfg["teacher"].get("folds"):
            fold_results = train_fold_teachers(cfg, env, work_dir, train_ds, val_ds, progress, class_weights)
    if val_ds is not None and env.is_main:
        summary = summarize(cfg, results)
        if cfg["teacher"].get("folds") and "teacher" in results:
            summary["fold_teachers"] = {name: {"miou": m["in_view"]["miou"]} for name, m in fold_results.items()}
        from ...utils.io import read_json
        from ...vis import plot_learning_curves
        stage_metrics = {stage: read_json(work_dir / stage / "metrics.json", default={}) or {} for stage in results}
        if stage_metrics.get("student", {}).get("teacher_targets"):  # the last epoch's
            summary["student"]["teacher_targets"] = stage_metrics["student"]["teacher_targets"][-1]
        write_json(work_dir / "metrics.json", summary)
        histories = {stage: m.get("history", []) for stage, m in stage_metrics.items()}
        plot_learning_curves(histories, work_dir / "learning_curves.png",
                             f"{cfg.get('name') or 'kitti'}: validation ({cfg['protocol']} protocol)")
        print("\n".join(["", f"[{cfg.get('name') or 'kitti'}] final validation ({cfg['protocol']} protocol):"]
                        + comparison_lines(summary)), flush=True)
    return results
