"""SemanticKITTI training: the teacher stage, the distillation stage, and validation mIoU.

One code path for one process and for ``torchrun`` (DDP, one process per device). Each
stage writes ``WORK/<stage>/``: ``last.pt`` (atomic, every epoch and every
``checkpoint_interval`` steps; a killed run resumes from it, mid-epoch included),
``final.pt`` (the trained model, what the student stage loads as its teacher),
``log.jsonl`` (losses at ``log_interval``, validations) and ``metrics.json``. A finished
stage is skipped when the experiment is run again.

Rows: a model's ``logits`` cover either every point (``rows = "points"``: the student) or
the in-view points in ``img_point_idx`` order (``rows = "in_view"``: image and fusion
teachers). The student's loss is ``ce_weight · CE`` over every labelled point plus the
distiller's KD term over the in-view points, where the teacher speaks.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...config import atomic_write_text
from ...losses.segmentation import ce_rows
from ...losses.reduce import row_mean
from ...metrics.miou import SegmentationIoU
from ...registry import DATASETS, DISTILLERS, MODELS
from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..distributed import DistEnv, all_reduce_sum, barrier, broadcast_module
from ..loggers import StageLogger
from .data import ShardedBatchSampler, generate_synthetic_if_missing, make_loader, to_device  # noqa: F401

HEAD_ROWS = {"point_logits": "points", "image_logits": "in_view"}  # other heads of a teacher's output
TEACHER_HEADS = ("logits",) + tuple(HEAD_ROWS)


class ResumeMismatch(ValueError):
    """A stage's checkpoint was written under a different configuration."""


# ----------------------------------------------------------------------------- losses
def rows_of(model: nn.Module) -> str:
    rows = getattr(model, "rows", None)
    if rows not in ("points", "in_view"):
        raise ValueError(f"model {type(model).__name__} does not say which rows its logits cover "
                         "(class attribute rows = 'points' or 'in_view')")
    return rows


def in_view(x: Tensor, rows: str, batch: Dict[str, Any]) -> Tensor:
    """The in-view rows of a per-point (``rows = "points"``) or in-view output."""
    return x[batch["img_point_idx"]] if rows == "points" else x


def labels_for(rows: str, batch: Dict[str, Any], point_valid: Optional[Tensor] = None,
               ignore_index: int = 255) -> Tensor:
    """Labels of a model's rows; points without a voxel (``point_valid`` False, only with
    ``out_of_range: drop``) get ``ignore_index``: the model cannot predict them."""
    labels = batch["labels"] if rows == "points" else batch["labels"][batch["img_point_idx"]]
    if rows == "points" and point_valid is not None:
        labels = torch.where(point_valid, labels, torch.full_like(labels, ignore_index))
    return labels


def ce_mean(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    ce, valid = ce_rows(logits, labels, ignore_index)
    return row_mean(ce, valid)


def teacher_loss(model: nn.Module, out: Dict[str, Tensor], batch: Dict[str, Any], weights: Dict[str, float],
                 ignore_index: int) -> Dict[str, Tensor]:
    """Cross entropy on every head the teacher returns (``logits`` and, for the fusion
    teacher, ``point_logits`` / ``image_logits``), each weighted by ``loss_weights``."""
    losses = {}
    for head in TEACHER_HEADS:
        if head in out:
            rows = rows_of(model) if head == "logits" else HEAD_ROWS[head]
            labels = labels_for(rows, batch, out.get("point_valid"), ignore_index)
            losses[f"loss_{head}"] = weights.get(head, 1.0) * ce_mean(out[head], labels, ignore_index)
    return losses


def student_loss(distiller, s_out: Dict[str, Tensor], t_out: Optional[Dict[str, Tensor]], s_rows: str,
                 t_rows: str, batch: Dict[str, Any], epoch: int) -> Dict[str, Tensor]:
    labels = labels_for(s_rows, batch, s_out.get("point_valid"), distiller.ignore_index)
    losses = {"loss_ce": distiller.ce_weight * ce_mean(s_out["logits"], labels, distiller.ignore_index)}
    if t_out is not None and distiller.has_kd:
        extras = {}
        if distiller.uses_features:  # logit distillers: no [K, D] gathers per step
            extras = {"student_feats": in_view(s_out["feats"], s_rows, batch),
                      "teacher_feats": in_view(t_out["feats"], t_rows, batch).detach()}
        losses["loss_kd"] = distiller.kd_loss(in_view(s_out["logits"], s_rows, batch),
                                              in_view(t_out["logits"], t_rows, batch).detach(),
                                              labels_for("in_view", batch), epoch, **extras)
    return losses


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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, num_classes: int, ignore_index: int,
             class_names: List[str], progress: bool = False) -> Dict[str, Any]:
    """mIoU of ``logits`` over the rows they cover (full scans for the student, in-view points
    for image teachers) and, for a per-point model, over the in-view points too (the rows
    where student and teacher compare); confusion matrices are summed over ranks."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    rows = rows_of(model)
    metrics = {"all": SegmentationIoU(num_classes, ignore_index, class_names),
               "in_view": SegmentationIoU(num_classes, ignore_index, class_names)}
    for batch in tqdm(loader, desc="val", leave=False, disable=not (progress and env.is_main)):
        batch = to_device(batch, env.device)
        out = model(batch)
        pred = out["logits"].argmax(-1)
        labels = labels_for(rows, batch, out.get("point_valid"), ignore_index)
        if rows == "points":
            metrics["all"].update(pred, labels)
        if "img_point_idx" in batch:  # scans read without images have no in-view rows
            metrics["in_view"].update(in_view(pred, rows, batch), in_view(labels, rows, batch))
    out = {}
    for key, m in metrics.items():
        if m.conf is None:
            m.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=env.device)
        all_reduce_sum(m.conf, env)
        if m.conf.sum() > 0:
            out[key] = m.compute()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- stages
@dataclass
class StageResult:
    metrics: Dict[str, Any]
    final: Path


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def load_teacher(cfg: Dict[str, Any], work_dir: Path, device: torch.device) -> nn.Module:
    path = Path(cfg["teacher_checkpoint"]) if cfg.get("teacher_checkpoint") else work_dir / "teacher" / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {path} do not exist: run the teacher stage first "
                                "(stages: [teacher, student]) or set teacher_checkpoint")
    state = load_checkpoint(path)
    weights = state.get("model", state)  # a final.pt, or a bare state_dict
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"teacher weights {path}: neither a pcseg_kd final.pt nor a state_dict")
    teacher = MODELS.build(state.get("model_cfg") or cfg["teacher"]["model"])
    load_weights(teacher, weights, path)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_weights(model: nn.Module, weights: Dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ResumeMismatch(f"{path}: weights do not fit the configured {type(model).__name__} "
                             f"({str(e).splitlines()[0]} ...): the model config changed since it was "
                             "written; use the config it was trained with, or another --work-dir") from e


def teacher_fingerprint(cfg: Dict[str, Any], work_dir: Path) -> Dict[str, Any]:
    """What the student stage depends on of its teacher: the teacher stage's fingerprint, or
    the identity (path, size, mtime) of an external ``teacher_checkpoint``."""
    if cfg.get("teacher_checkpoint"):
        p = Path(cfg["teacher_checkpoint"])
        if not p.is_file():
            return {"path": str(p.resolve()), "missing": True}
        stored = load_checkpoint(p, mmap=True).get("fingerprint") if p.suffix == ".pt" else None
        if stored:  # a pcseg_kd final.pt: its settings, wherever the file has been moved or copied
            return stored
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
    final = work_dir / "teacher" / "final.pt"
    return load_checkpoint(final, mmap=True).get("fingerprint", {}) if final.is_file() else {}


def stage_fingerprint(stage: str, cfg: Dict[str, Any], env: DistEnv, steps: int, use_amp: bool,
                      work_dir: Path, distiller) -> Dict[str, Any]:
    """The settings a stage's weights depend on; checkpoints carry it, and resuming or
    reusing one under different settings is an error rather than a silent mix."""
    fp = {"model": cfg[stage]["model"], "optim": cfg[stage]["optim"], "train": cfg["data"]["train"],
          "seed": cfg["seed"], "amp": use_amp, "world_size": env.world_size, "steps_per_epoch": steps}
    if stage == "teacher":
        fp["loss_weights"] = cfg["teacher"].get("loss_weights") or {}
    else:
        fp["distiller"] = cfg["distiller"]
        if distiller.has_kd:
            fp["teacher"] = teacher_fingerprint(cfg, work_dir)
    return fp


def check_fingerprint(path: Path, saved: Optional[Dict[str, Any]], now: Dict[str, Any],
                      ignore: tuple = ()) -> None:
    if saved is None:
        return  # written by an older version: nothing to compare
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise ResumeMismatch(f"{path} was written with different settings ({', '.join(diff)} changed): "
                             f"delete {path.parent} to train this stage again, or use another --work-dir")


def train_stage(stage: str, cfg: Dict[str, Any], env: DistEnv, work_dir: Path, train_ds, val_ds,
                progress: bool = True) -> StageResult:
    from tqdm import tqdm

    scfg, o = cfg[stage], cfg[stage]["optim"]
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
    if stage == "student":
        distiller = DISTILLERS.build({**cfg["distiller"], "ignore_index": train_ds.ignore_index})
    fingerprint = stage_fingerprint(stage, cfg, env, steps, use_amp, work_dir, distiller)
    if final.is_file():
        state = load_checkpoint(final, mmap=True)  # its fingerprint and metrics only
        # a finished stage can be reused on another number of processes
        check_fingerprint(final, state.get("fingerprint"), fingerprint, ignore=("world_size", "steps_per_epoch"))
        if env.is_main:
            print(f"[{stage}] already trained: {final} (delete it to train again)", flush=True)
        return StageResult(state.get("metrics", {}), final)
    stage_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])  # the same initialisation on every rank

    model = MODELS.build(scfg["model"]).to(device)
    rows = rows_of(model)
    teacher = None
    if distiller is not None:
        if distiller.has_kd:  # the no-KD baseline needs no teacher
            teacher = load_teacher(cfg, work_dir, device)
            distiller.build_modules(model.out_channels, teacher.out_channels)
        distiller.to(device)
        broadcast_module(distiller, env)  # outside DDP: start every rank from rank 0's regressors
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    opt = build_optimizer(params, o, device)
    sched = build_scheduler(opt, o, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: List[Dict[str, Any]] = []

    start_epoch, start_step, global_step = 1, 0, 0
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
        set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else None)
        if env.is_main:
            print(f"[{stage}] resuming from {last}: epoch {start_epoch}, step {start_step}", flush=True)
    ddp = model
    if env.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        rngs = _gather_rng(env)
        if env.is_main:
            save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                   "distiller": distiller.state_dict() if distiller is not None else None,
                                   "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                                   "rng": rngs, "model_cfg": scfg["model"], "fingerprint": fingerprint,
                                   "history": history})
        barrier(env)

    val_loader = None
    if val_ds is not None:
        val_sampler = ShardedBatchSampler(len(val_ds), o.batch_size, False, cfg["seed"], env, drop_last=False)
        val_loader = make_loader(val_ds, val_sampler, cfg["data"]["num_workers"], device)
    logger = StageLogger(stage_dir, env, cfg.get("tensorboard", False), resume_step=global_step)
    log_path = logger.path
    metrics: Dict[str, Any] = {}
    ddp.train()
    for epoch in range(start_epoch, o.epochs + 1):
        first = start_step if epoch == start_epoch else 0
        train_ds.set_epoch(epoch)
        train_sampler.set_epoch(epoch, first)
        loader = make_loader(train_ds, train_sampler, cfg["data"]["num_workers"], device)
        bar = tqdm(total=steps, initial=first, desc=f"[{stage}] epoch {epoch}/{o.epochs}",
                   disable=not (progress and env.is_main), dynamic_ncols=True)
        t0 = time.perf_counter()
        for step_in_epoch, batch in enumerate(loader, start=first + 1):
            if step_in_epoch > steps:
                break
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = ddp(batch)
                if stage == "teacher":
                    losses = teacher_loss(model, out, batch, scfg.get("loss_weights") or {}, train_ds.ignore_index)
                else:
                    with torch.no_grad():
                        t_out = teacher(batch) if teacher is not None else None
                    losses = student_loss(distiller, out, t_out, rows, rows_of(teacher) if teacher else rows, batch, epoch)
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
        checkpoint(epoch + 1, 0)
        if val_loader is not None and (epoch % cfg["eval_interval"] == 0 or epoch == o.epochs):
            metrics = evaluate(model, val_loader, env, model.num_classes, val_ds.ignore_index,
                               val_ds.class_names, progress)
            record = val_record(epoch, metrics, time.perf_counter() - t0, global_step)
            history.append(record)
            logger.log(record, global_step)
            checkpoint(epoch + 1, 0)  # again, with this validation in its history
            if env.is_main:
                print(f"[{stage}] epoch {epoch}: " + ", ".join(f"val mIoU ({k}) {v['miou']:.2f}"
                                                              for k, v in metrics.items()), flush=True)
    if val_loader is not None and not metrics:  # resumed after the last epoch's checkpoint
        metrics = evaluate(model, val_loader, env, model.num_classes, val_ds.ignore_index, val_ds.class_names,
                           progress)
        record = val_record(o.epochs, metrics, 0.0, global_step)
        history = [h for h in history if h.get("epoch") != o.epochs] + [record]
        logger.log(record, global_step)
    if env.is_main:
        save_checkpoint(final, {"model": model.state_dict(), "model_cfg": scfg["model"], "metrics": metrics,
                                "config": cfg, "fingerprint": fingerprint})
        atomic_write_text(stage_dir / "metrics.json", json.dumps({"final": metrics, "history": history}, indent=2) + "\n")
    logger.close()
    barrier(env)
    return StageResult(metrics, final)


def val_record(epoch: int, metrics: Dict[str, Any], seconds: float, global_step: int) -> Dict[str, Any]:
    return {"epoch": epoch, "global_step": global_step, "val": {k: {"miou": v["miou"], "miou_present": v["miou_present"],
                                        "accuracy": v["accuracy"], "points": v["points"]}
                                    for k, v in metrics.items()}, "seconds": seconds}


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


def run_kitti(cfg: Dict[str, Any], work_dir: Path, env: DistEnv, progress: bool = True) -> Dict[str, Any]:
    """Run the experiment's stages in order; returns {stage: final validation metrics}."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data = cfg["data"]
    roots = [data["train"]["root"]] + ([data["val"]["root"]] if data.get("val") else [])
    generate_synthetic_if_missing(roots, data.get("synthetic"), env)
    train_ds = DATASETS.build(data["train"])
    val_ds = DATASETS.build(data["val"]) if data.get("val") else None
    results = {}
    for stage in cfg["stages"]:
        if stage == "teacher" and cfg.get("teacher_checkpoint"):
            continue
        results[stage] = train_stage(stage, cfg, env, work_dir, train_ds, val_ds, progress).metrics
    return results
