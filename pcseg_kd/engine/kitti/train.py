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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...utils.io import write_json
from ...registry import DATASETS, DISTILLERS, MODELS
from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ...data.kitti.teacher_cache import (TeacherCache, TeacherCacheDataset, TeacherCacheError, complete_chunks,
                                         num_chunks, read_meta)
from ..distributed import DistEnv, all_reduce_sum, barrier, broadcast_module, broadcast_object
from ..loggers import StageLogger
from ..sync_bn import convert_sync_batchnorm
from .data import ShardedBatchSampler, generate_synthetic_if_missing, make_loader, to_device  # noqa: F401
from .evaluate import evaluate
from .export import export_teacher
from .teacher import (ResumeMismatch, cache_fingerprint, load_frozen, load_teacher, load_weights,  # noqa: F401
                      teacher_fingerprint, teacher_source, teacher_weights_path, without_engine_keys, without_pretrained)
from .objective import SegLoss, rows_of, student_loss, teacher_loss


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
                      work_dir: Path, distiller, expected_cache: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The settings a stage's weights depend on; checkpoints carry it, and resuming or
    reusing one under different settings is an error rather than a silent mix."""
    section = cfg[model_section(stage)]
    fp = {"model": section["model"], "optim": section["optim"], "loss": section.get("loss"),
          "train": cfg["data"]["train"], "seed": cfg["seed"], "amp": use_amp, "threads": cfg["threads"],
          "world_size": env.world_size, "steps_per_epoch": steps}
    if cfg.get("sync_bn") and env.distributed:  # only where it acts: older checkpoints still resume
        fp["sync_bn"] = True
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


def model_section(stage: str) -> str:
    """The config section a stage trains: the baseline is the student without KD."""
    return "teacher" if stage == "teacher" else "student"


def stage_distiller_cfg(stage: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The student's distiller; the baseline keeps its segmentation weight and drops KD."""
    if stage == "baseline":
        return {"type": "none", "ce_weight": cfg["distiller"].get("ce_weight", 1.0)}
    return cfg["distiller"]


def check_fingerprint(path: Path, saved: Optional[Dict[str, Any]], now: Dict[str, Any],
                      ignore: tuple = ()) -> None:
    if saved is None:
        return  # written by an older version: nothing to compare
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise ResumeMismatch(f"{path} was written with different settings ({', '.join(diff)} changed): "
                             f"delete {path.parent} to train this stage again, or use another --work-dir")


def train_stage(stage: str, cfg: Dict[str, Any], env: DistEnv, work_dir: Path, train_ds, val_ds,
                progress: bool = True, class_weights: Optional[Dict[str, Tensor]] = None,
                on_step: Optional[Callable[[int], None]] = None) -> StageResult:
    """``class_weights``: {section: [C] weights} for sections whose loss asks for them;
    ``on_step(global_step)`` is called after every optimiser step (benchmarks time steps
    with it)."""
    from tqdm import tqdm

    scfg, o = cfg[model_section(stage)], cfg[model_section(stage)]["optim"]
    from .schema import KittiOptimConfig
    o = KittiOptimConfig(**o)
    stage_dir = work_dir / stage
    final = stage_dir / "final.pt"
    device = env.device
    use_amp = o.amp and device.type == "cuda"
    train_sampler = ShardedBatchSampler(len(train_ds), o.batch_size, True, cfg["seed"], env, drop_last=True)
    steps = train_sampler.full_length()
    if o.max_steps_per_epoch:
        steps = min(steps, o.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"[{stage}] {len(train_ds)} training scans give no full batch of {o.batch_size} per "
                         f"process on {env.world_size} process(es): lower {stage}.optim.batch_size")
    distiller = None
    if stage != "teacher":
        distiller = DISTILLERS.build({**without_engine_keys(stage_distiller_cfg(stage, cfg)),
                                      "ignore_index": train_ds.ignore_index})
    loss_cfg = scfg.get("loss") or {}
    seg = SegLoss(ce=loss_cfg.get("ce", 1.0), lovasz=loss_cfg.get("lovasz", 0.0),
                  class_weights=(class_weights or {}).get(model_section(stage)),
                  ignore_index=train_ds.ignore_index).to(device)
    expected_cache = None  # the fingerprint a cache exported from this run's teacher has (None: no weights)
    cached_kd = distiller is not None and distiller.has_kd and teacher_source(cfg, work_dir)[0] == "cache"
    if cached_kd:
        expected_cache = cache_fingerprint(cfg, work_dir, device=device)  # loads and hashes the teacher: once
    fingerprint = stage_fingerprint(stage, cfg, env, steps, use_amp, work_dir, distiller, expected_cache)
    if final.is_file():
        state = load_checkpoint(final, mmap=True)  # its fingerprint and metrics only
        # a finished stage can be reused on another number of processes or threads, and without
        # the teacher cache it was trained from
        ignore = ("world_size", "steps_per_epoch", "threads", "sync_bn")
        if fingerprint.get("teacher") == {"cache": "missing"}:
            ignore += ("teacher",)
        check_fingerprint(final, state.get("fingerprint"), fingerprint, ignore=ignore)
        if env.is_main:
            print(f"[{stage}] already trained: {final} (delete it to train again)", flush=True)
            if not (stage_dir / "metrics.json").is_file():  # killed between final.pt and metrics.json
                write_stage_metrics(stage_dir, state.get("metrics", {}), state.get("history", []),
                                    state.get("omega_history", []))
        return StageResult(state.get("metrics", {}), final)
    stage_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])  # the same initialisation on every rank

    model = MODELS.build(scfg["model"]).to(device)
    if cfg.get("sync_bn") and env.distributed:
        # BatchNorm statistics over the global batch (spconv's BatchNorm1d too: over every
        # rank's active voxels); before the optimiser and DDP, which keep the same tensors
        model = convert_sync_batchnorm(model)
    rows = rows_of(model)
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
        if hasattr(distiller, "track_omega") and distiller.has_kd:
            distiller.track_omega()  # PSSM's Ω shares per epoch (docs/results_kitti.md)
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    opt = build_optimizer(params, o, device)
    sched = build_scheduler(opt, o, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: List[Dict[str, Any]] = []
    omega_history: List[Dict[str, Any]] = []  # per epoch: shares of the distilled rows with Ω = 1 / 0 / between

    start_epoch, start_step, global_step = 1, 0, 0
    pending: Optional[int] = None  # an epoch whose validation a kill interrupted
    last = stage_dir / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)  # on the CPU: RNG states must stay CPU tensors
        check_fingerprint(last, state.get("fingerprint"), fingerprint)
        load_weights(model, state["model"], last)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if distiller is not None and state.get("distiller"):
            distiller.load_state_dict(state["distiller"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        history = list(state.get("history", []))
        omega_history = list(state.get("omega_history", []))
        if env.is_main and distiller is not None and state.get("omega_counts") is not None:
            # the epoch's counts so far, summed over ranks when saved: rank 0 carries them
            distiller.omega_counts = state["omega_counts"].to(device)
        pending = state.get("pending_validation")
        set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else None)
        if env.is_main:
            print(f"[{stage}] resuming from {last}: epoch {start_epoch}, step {start_step}", flush=True)
    ddp = model
    if env.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch: int, step_in_epoch: int, pending_validation: Optional[int] = None) -> None:
        rngs = _gather_rng(env)
        omega_counts = omega_counts_over_ranks(distiller, env)
        if env.is_main:
            save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                   "distiller": distiller.state_dict() if distiller is not None else None,
                                   "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                                   "rng": rngs, "model_cfg": scfg["model"], "fingerprint": fingerprint,
                                   "history": history, "pending_validation": pending_validation,
                                   "omega_history": omega_history,
                                   "omega_counts": omega_counts})
        barrier(env)

    val_loader = None
    if val_ds is not None:
        val_sampler = ShardedBatchSampler(len(val_ds), o.batch_size, False, cfg["seed"], env, drop_last=False)
        val_loader = make_loader(val_ds, val_sampler, cfg["data"]["num_workers"], device)
    logger = StageLogger(stage_dir, env, cfg.get("tensorboard", False), resume_step=global_step)
    log_path = logger.path
    metrics: Dict[str, Any] = {}

    def validate(epoch: int, seconds: float, log: bool = True) -> None:
        """Score, record in the history (replacing a record of the same epoch), checkpoint."""
        nonlocal metrics, history
        metrics = evaluate(model, val_loader, env, model.num_classes, val_ds.ignore_index,
                           val_ds.class_names, progress)
        record = val_record(epoch, metrics, seconds, global_step)
        history = [h for h in history if h.get("epoch") != epoch] + [record]
        if log:
            logger.log(record, global_step)
        checkpoint(epoch + 1, 0)  # with this validation in its history, none pending
        if env.is_main:
            print(f"[{stage}] epoch {epoch}: " + ", ".join(f"val mIoU ({k}) {v['miou']:.2f}"
                                                          for k, v in metrics.items()), flush=True)

    if pending is not None and val_loader is not None:  # killed inside that validation: redo it
        validate(pending, 0.0)
    ddp.train()
    for epoch in range(start_epoch, o.epochs + 1):
        first = start_step if epoch == start_epoch else 0
        train_ds.set_epoch(epoch)
        train_sampler.set_epoch(epoch, first)
        loader = make_loader(train_ds, train_sampler, cfg["data"]["num_workers"], device)
        bar = tqdm(total=steps, initial=first, desc=f"[{stage}] epoch {epoch}/{o.epochs}",
                   disable=not (progress and env.is_main and sys.stderr.isatty()), dynamic_ncols=True)
        t0 = time.perf_counter()
        for step_in_epoch, batch in enumerate(loader, start=first + 1):
            if step_in_epoch > steps:
                break
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = ddp(batch)
                if stage == "teacher":
                    losses = teacher_loss(model, out, batch, scfg.get("loss_weights") or {}, seg)
                else:
                    with torch.no_grad():
                        t_out = teacher(batch) if teacher is not None else None
                    losses = student_loss(distiller, seg, out, t_out, rows, rows_of(teacher) if teacher else rows,
                                          batch, epoch)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if distiller is not None and env.distributed:
                _average_grads(distiller, env)  # its own parameters (feature distillers) are outside DDP
            if o.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            global_step += 1
            bar.update(1)
            if on_step is not None:
                on_step(global_step)
            if global_step % cfg["log_interval"] == 0 or step_in_epoch == steps:
                # averaged over ranks, so every rank sees the same values (and stops together
                # on a non-finite loss instead of leaving the others in a collective)
                stacked = all_reduce_sum(torch.stack([v.detach().float() for v in losses.values()]), env)
                values = dict(zip(losses, (stacked / env.world_size).tolist()))  # the step's only host sync
                record = {"epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                          "lr": sched.get_last_lr()[0], **values}
                logger.log(record, global_step)
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()})
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(f"[{stage}] non-finite loss at epoch {epoch} step {step_in_epoch}: "
                                             f"{values} (see {log_path})")
            if cfg["checkpoint_interval"] and global_step % cfg["checkpoint_interval"] == 0 and step_in_epoch < steps:
                # never save weights a non-finite loss has already touched (one host sync per checkpoint)
                finite = all_reduce_sum(torch.isfinite(loss.detach()).float().reshape(1), env)
                if float(finite) < env.world_size:
                    raise FloatingPointError(f"[{stage}] non-finite loss at epoch {epoch} step {step_in_epoch}; "
                                             f"not checkpointing it (see {log_path})")
                checkpoint(epoch, step_in_epoch)
        bar.close()
        if getattr(distiller, "tracking_omega", False):
            distiller.omega_counts = omega_counts_over_ranks(distiller, env)
            shares = distiller.pop_omega_shares()  # one host sync per epoch
            if shares is not None:
                omega_history = [h for h in omega_history if h["epoch"] != epoch] + [{"epoch": epoch, **shares}]
        if progress and env.is_main and not sys.stderr.isatty():  # a log file: one line per epoch, no \r frames
            print(f"[{stage}] epoch {epoch}/{o.epochs}: {time.perf_counter() - t0:.1f} s", flush=True)
        due = val_loader is not None and (epoch % cfg["eval_interval"] == 0 or epoch == o.epochs)
        # a kill inside the validation below leaves it pending: the rerun does it first
        checkpoint(epoch + 1, 0, pending_validation=epoch if due else None)
        if due:
            validate(epoch, time.perf_counter() - t0)
    if val_loader is not None and not metrics:  # resumed after the last validation, before final.pt
        # the same weights as when it was recorded: score again (the per-class figures are not
        # kept in the history) without logging the record a second time
        validate(o.epochs, 0.0, log=not any(h.get("epoch") == o.epochs for h in history))
    if env.is_main:
        save_checkpoint(final, {"model": model.state_dict(), "model_cfg": scfg["model"], "metrics": metrics,
                                "config": cfg, "fingerprint": fingerprint, "history": history,
                                "omega_history": omega_history})
        write_stage_metrics(stage_dir, metrics, history, omega_history)
    logger.close()
    barrier(env)
    return StageResult(metrics, final)


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


def write_stage_metrics(stage_dir: Path, metrics: Dict[str, Any], history: List[Dict[str, Any]],
                        omega_history: Optional[List[Dict[str, Any]]] = None) -> None:
    out = {"final": metrics, "history": history}
    if omega_history:  # PSSM students: the shares of distilled rows with Ω = 1 / 0 / between, per epoch
        out["omega"] = omega_history
    write_json(stage_dir / "metrics.json", out)  # NaN -> null


def val_record(epoch: int, metrics: Dict[str, Any], seconds: float, global_step: int) -> Dict[str, Any]:
    return {"epoch": epoch, "global_step": global_step, "val": {k: {"miou": v["miou"], "miou_present": v["miou_present"],
                                        "accuracy": v["accuracy"], "points": v["points"]}
                                    for k, v in metrics.items()}, "seconds": seconds}


def omega_counts_over_ranks(distiller, env: DistEnv) -> Optional[Tensor]:
    """A PSSM distiller's Ω counts summed over ranks (a copy; every rank must call this), or
    None when it does not track them."""
    if not getattr(distiller, "tracking_omega", False):
        return None
    counts = distiller.omega_counts
    if counts is None:
        counts = torch.zeros(3, dtype=torch.int64, device=env.device)
    return all_reduce_sum(counts.clone(), env)


def _average_grads(module: nn.Module, env: DistEnv) -> None:
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad, env).div_(env.world_size)


def _gather_rng(env: DistEnv) -> List[Dict[str, Any]]:
    """Every rank's RNG state, for rank 0 to save (each rank resumes with its own)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    import torch.distributed as dist
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


def check_batches(cfg: Dict[str, Any], scans: int, env: DistEnv) -> None:
    """Each stage to run gets at least one full batch per process and epoch."""
    for stage in cfg["stages"]:
        if stage == "teacher" and cfg.get("teacher_checkpoint"):
            continue
        bs = cfg[model_section(stage)]["optim"]["batch_size"]
        if scans // env.world_size // bs < 1:
            raise ValueError(f"{model_section(stage)}.optim.batch_size: {scans} training scans give no full batch of "
                             f"{bs} per process on {env.world_size} process(es) for the {stage} stage: lower it")


def resolve_class_weights(cfg: Dict[str, Any], train_ds, work_dir: Path, env: DistEnv) -> Dict[str, Tensor]:
    """{section: [C] CE class weights} for the sections whose ``loss.class_weights`` asks for
    them: 2DPASS's (max f / f_c)^(1/3) from the label map's ``content`` (``"content"``) or
    from the training labels (``"frequency"``, counted once and kept in
    ``WORK/class_counts.json``), or the config's own list."""
    from ...losses.class_weights import inverse_frequency_weights

    out: Dict[str, Tensor] = {}
    for section in dict.fromkeys(model_section(s) for s in cfg["stages"]):
        source = (cfg[section].get("loss") or {}).get("class_weights")
        if source is None:
            continue
        if source == "content":
            weights = inverse_frequency_weights(train_ds.label_map.train_frequencies())
        elif source == "frequency":
            weights = inverse_frequency_weights(training_class_counts(cfg, train_ds, work_dir, env))
        else:
            if len(source) != train_ds.num_classes:
                raise ValueError(f"{section}.loss.class_weights: {len(source)} weights for "
                                 f"{train_ds.num_classes} classes")
            weights = torch.tensor(source, dtype=torch.float32)
        out[section] = weights
    return out


def training_class_counts(cfg: Dict[str, Any], train_ds, work_dir: Path, env: DistEnv) -> List[int]:
    path = work_dir / "class_counts.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("train") == cfg["data"]["train"]:
            return saved["counts"]
    counts = [int(c) for c in train_ds.label_counts(progress=env.is_main)]
    if env.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {"train": cfg["data"]["train"], "counts": counts, "classes": train_ds.class_names})
    return counts


def summarize(cfg: Dict[str, Any], results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Every stage's final validation on the same rows: ``in_view`` for all, ``all`` (the
    student's rows) for the baseline and the student; per-class IoU kept."""
    summary: Dict[str, Any] = {"protocol": cfg["protocol"], "distiller": cfg["distiller"].get("type")}
    for stage, metrics in results.items():
        keys = ("in_view",) if stage == "teacher" else ("in_view", "all")
        summary[stage] = {k: {"miou": metrics[k]["miou"], "iou": metrics[k]["iou"], "points": metrics[k]["points"]}
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
        if stage != "teacher":
            line += f"   all {fmt(stage, 'all')}"
        if stage == "student" and "baseline" in summary:
            gains = [f"{summary['student'][k]['miou'] - summary['baseline'][k]['miou']:+.2f} {k.replace('_', ' ')}"
                     for k in ("in_view", "all") if k in summary["student"] and k in summary["baseline"]]
            line += f"   vs baseline: {', '.join(gains)}"
        lines.append(line)
    return lines


def run_kitti(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, progress: bool = True) -> Dict[str, Any]:
    """Run the experiment's stages in order; returns {stage: final validation metrics} and
    writes ``WORK/metrics.json`` (:func:`summarize`)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data = cfg["data"]
    roots = [data["train"]["root"]] + ([data["val"]["root"]] if data.get("val") else [])
    generate_synthetic_if_missing(roots, data.get("synthetic"), env)
    train_ds = DATASETS.build(data["train"])
    val_ds = DATASETS.build(data["val"]) if data.get("val") else None
    check_batches(cfg, len(train_ds), env)  # every stage, before the first one trains
    class_weights = resolve_class_weights(cfg, train_ds, work_dir, env)
    results = {}
    for stage in cfg["stages"]:
        if stage == "teacher" and cfg.get("teacher_checkpoint"):
            continue
        results[stage] = train_stage(stage, cfg, env, work_dir, train_ds, val_ds, progress, class_weights).metrics
    if val_ds is not None and env.is_main:
        summary = summarize(cfg, results)
        write_json(work_dir / "metrics.json", summary)
        from ...utils.io import read_json
        from ...vis import plot_learning_curves
        histories = {stage: (read_json(work_dir / stage / "metrics.json", default={}) or {}).get("history", [])
                     for stage in results}
        plot_learning_curves(histories, work_dir / "learning_curves.png",
                             f"{cfg.get('name') or 'kitti'}: validation ({cfg['protocol']} protocol)")
        print("\n".join(["", f"[{cfg.get('name') or 'kitti'}] final validation ({cfg['protocol']} protocol):"]
                        + comparison_lines(summary)), flush=True)
    return results
