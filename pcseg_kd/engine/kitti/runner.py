"""One stage's training run: its state in one object that saves and restores itself, and a
loop that calls hooks (as Pointcept's trainer and mmengine's runner do).

The loop itself only steps the optimiser. Everything else a run does is a hook
(:mod:`.hooks`): the progress bar, logged losses, mid-epoch and end-of-epoch checkpoints,
PSSM's Ω statistics, the per-epoch mean losses, validation, ``best.pt`` and the loggers
(:mod:`pcseg_kd.engine.loggers`). A new behaviour is a new hook, not an edit of the loop.

Hook calls, in priority order (lower first) at each point::

    before_run                 after the state is built and restored (resume)
    before_epoch               the epoch's loader exists
    after_step                 after every optimiser step (runner.losses: the step's losses)
    after_epoch                after an epoch's last step: Ω shares, mean losses, checkpoint, validation
    after_validation(record)   a validation is recorded in runner.history (before its checkpoint)
    after_train                the loop is over (a validation a kill skipped is redone here)
    after_run                  final.pt and metrics.json are written

A hook with state that must survive a kill returns it from ``state_dict`` (called on every
rank at each checkpoint, so it may use collectives) and gets it back in ``load_state_dict``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ...utils.io import write_json
from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..hook import Hook
from ..distributed import DistEnv, all_reduce_sum, barrier
from .data import ShardedBatchSampler, make_loader, to_device
from .objective import rows_of, student_loss, teacher_loss
from .teacher import ResumeMismatch, load_weights


class StageRunner:
    """The state of one stage's training (model, optimiser, scheduler, scaler, distiller,
    position, history) and the loop over it. :func:`.train.train_stage` builds one."""

    def __init__(self, stage: str, cfg: Dict[str, Any], env: DistEnv, stage_dir: Path, *, model: nn.Module,
                 optim_cfg, opt: torch.optim.Optimizer, sched, scaler, params: List[Tensor], seg, distiller,
                 teacher: Optional[nn.Module], train_ds, val_ds, steps: int, fingerprint: Dict[str, Any],
                 progress: bool = True, name: Optional[str] = None):
        self.stage, self.cfg, self.env, self.stage_dir = stage, cfg, env, Path(stage_dir)
        self.name = name or stage  # what messages call it: teacher_fold_k for a fold teacher
        self.model, self.optim_cfg, self.opt, self.sched, self.scaler = model, optim_cfg, opt, sched, scaler
        self.params, self.seg, self.distiller, self.teacher = params, seg, distiller, teacher
        self.train_ds, self.val_ds, self.steps, self.fingerprint = train_ds, val_ds, steps, fingerprint
        self.progress = progress
        self.device = env.device
        self.use_amp = optim_cfg.amp and self.device.type == "cuda"
        self.epochs = optim_cfg.epochs
        self.rows = rows_of(model)
        self.teacher_rows = rows_of(teacher) if teacher is not None else self.rows
        self.hooks: List[Hook] = []  # :meth:`register`
        # position: the next step to run is (epoch, step_in_epoch + 1)
        self.epoch, self.start_step, self.global_step = 1, 0, 0
        self.step_in_epoch = 0
        self.history: List[Dict[str, Any]] = []   # one record per validation
        self.metrics: Dict[str, Any] = {}         # the latest validation
        self.pending_validation: Optional[int] = None  # an epoch whose validation a kill interrupted
        self.losses: Dict[str, Tensor] = {}       # the last step's losses (on the device)
        self.batch: Dict[str, Any] = {}
        self.out: Dict[str, Tensor] = {}
        self.teacher_out: Optional[Dict[str, Tensor]] = None
        self.epoch_seconds = 0.0
        self.train_sampler = ShardedBatchSampler(len(train_ds), optim_cfg.batch_size, True, cfg["seed"], env,
                                                 drop_last=True)
        self.ddp = model
        self.last = self.stage_dir / "last.pt"
        self.final = self.stage_dir / "final.pt"

    # ------------------------------------------------------------------------- hooks
    def register(self, hooks: Sequence[Hook]) -> None:
        """Add hooks; each call point runs them in priority order (lower first)."""
        self.hooks = sorted(self.hooks + list(hooks), key=lambda h: h.priority)

    def call(self, name: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def hook(self, kind: type) -> Optional[Hook]:
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    def log(self, record: Dict[str, Any]) -> None:
        """Hand a record to every logger hook (``log(record, step)``)."""
        for hook in self.hooks:
            if hasattr(hook, "log"):
                hook.log(record, self.global_step)

    def print(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[{self.name}] {msg}", flush=True)

    # ------------------------------------------------------------------------- state
    def state_dict(self, epoch: int, step_in_epoch: int, pending_validation: Optional[int] = None) -> Dict[str, Any]:
        """What ``last.pt`` holds; every rank must call this (hooks may gather over ranks)."""
        rngs = gather_rng(self.env)
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                 "distiller": self.distiller.state_dict() if self.distiller is not None else None,
                 "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                 "rng": rngs, "model_cfg": self.cfg_section["model"], "fingerprint": self.fingerprint,
                 "history": self.history, "pending_validation": pending_validation}
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    @property
    def cfg_section(self) -> Dict[str, Any]:
        return self.cfg[model_section(self.stage)]

    def checkpoint(self, epoch: int, step_in_epoch: int, pending_validation: Optional[int] = None) -> None:
        """Write ``last.pt`` atomically (rank 0); resuming from it continues at (epoch, step_in_epoch + 1)."""
        state = self.state_dict(epoch, step_in_epoch, pending_validation)
        if self.env.is_main:
            save_checkpoint(self.last, state)
        barrier(self.env)

    def restore(self) -> bool:
        """Resume from ``last.pt`` when there is one; True when resumed."""
        if not self.last.is_file():
            return False
        state = load_checkpoint(self.last)  # on the CPU: RNG states must stay CPU tensors
        check_fingerprint(self.last, state.get("fingerprint"), self.fingerprint)
        load_weights(self.model, state["model"], self.last)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.distiller is not None and state.get("distiller"):
            self.distiller.load_state_dict(state["distiller"])
        self.epoch, self.start_step, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.history = list(state.get("history", []))
        for hook in self.hooks:
            hook.load_state_dict(state)
        self.pending_validation = state.get("pending_validation")
        set_rng_state(state["rng"][self.env.rank] if self.env.rank < len(state["rng"]) else None)
        self.print(f"resuming from {self.last}: epoch {self.epoch}, step {self.start_step}")
        return True

    # ------------------------------------------------------------------------- the loop
    def train_step(self, batch: Dict[str, Any]) -> None:
        """One optimiser step on ``batch`` (already on the device)."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            self.out = out = self.ddp(batch)
            if self.stage == "teacher":
                losses = teacher_loss(self.model, out, batch, self.cfg_section.get("loss_weights") or {}, self.seg)
            else:
                with torch.no_grad():
                    self.teacher_out = self.teacher(batch) if self.teacher is not None else None
                losses = student_loss(self.distiller, self.seg, out, self.teacher_out, self.rows, self.teacher_rows,
                                      batch, self.epoch)
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.distiller is not None and self.env.distributed:
            _average_grads(self.distiller, self.env)  # its own parameters (feature distillers) are outside DDP
        if self.optim_cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.losses, self.loss = losses, loss

    def run(self) -> Dict[str, Any]:
        """Train to the last epoch, then write ``final.pt`` and ``metrics.json``; returns the
        final validation metrics."""
        if self.env.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.call("before_run")
        self.ddp.train()
        start_epoch = self.epoch
        for epoch in range(start_epoch, self.epochs + 1):
            self.epoch = epoch
            first = self.start_step if epoch == start_epoch else 0
            self.first_step = first
            self.train_ds.set_epoch(epoch)
            self.train_sampler.set_epoch(epoch, first)
            loader = make_loader(self.train_ds, self.train_sampler, self.cfg["data"]["num_workers"], self.device)
            self.epoch_t0 = time.perf_counter()
            self.call("before_epoch")
            for step_in_epoch, batch in enumerate(loader, start=first + 1):
                if step_in_epoch > self.steps:
                    break
                self.step_in_epoch = step_in_epoch
                self.batch = batch = to_device(batch, self.device)
                self.train_step(batch)
                self.global_step += 1
                self.call("after_step")
            self.epoch_seconds = time.perf_counter() - self.epoch_t0
            self.call("after_epoch")
        self.call("after_train")
        if self.env.is_main:
            save_checkpoint(self.final, {"model": self.model.state_dict(), "model_cfg": self.cfg_section["model"],
                                         "metrics": self.metrics, "config": self.cfg, "fingerprint": self.fingerprint,
                                         "history": self.history, **self.final_extras()})
            write_stage_metrics(self.stage_dir, self.metrics, self.history, self.final_extras())
        self.call("after_run")
        barrier(self.env)
        return self.metrics

    def final_extras(self) -> Dict[str, Any]:
        """What hooks add to ``final.pt`` (``final_state``: e.g. the Ω history)."""
        out: Dict[str, Any] = {}
        for hook in self.hooks:
            if hasattr(hook, "final_state"):
                out.update(hook.final_state())
        return out

    # ------------------------------------------------------------------------- helpers for hooks
    def is_last_step(self) -> bool:
        return self.step_in_epoch == self.steps

    def reduce_mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over ranks (a collective: every rank calls it at the same point)."""
        return all_reduce_sum(t, self.env) / self.env.world_size


def _average_grads(module: nn.Module, env: DistEnv) -> None:
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad, env).div_(env.world_size)


#: what hooks keep in final.pt beside the weights, and its key in the stage's metrics.json
FINAL_EXTRAS = {"omega_history": "omega", "teacher_target_history": "teacher_targets"}


def write_stage_metrics(stage_dir: Path, metrics: Dict[str, Any], history: List[Dict[str, Any]],
                        extras: Optional[Dict[str, Any]] = None) -> None:
    """``metrics.json``: the final validation, its history and the hooks' per-epoch records
    (``omega``: PSSM students' shares of distilled rows with Ω = 1 / 0 / between;
    ``teacher_targets``: the teacher's accuracy and mIoU on the distilled rows)."""
    out = {"final": metrics, "history": history}
    for key, name in FINAL_EXTRAS.items():
        if (extras or {}).get(key):
            out[name] = extras[key]
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


def gather_rng(env: DistEnv) -> List[Dict[str, Any]]:
    """Every rank's RNG state, for rank 0 to save (each rank resumes with its own)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    import torch.distributed as dist
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


def model_section(stage: str) -> str:
    """The config section a stage trains: the baseline is the student without KD."""
    return "teacher" if stage == "teacher" else "student"


def check_fingerprint(path: Path, saved: Optional[Dict[str, Any]], now: Dict[str, Any],
                      ignore: tuple = ()) -> None:
    if saved is None:
        return  # written by an older version: nothing to compare
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise ResumeMismatch(f"{path} was written with different settings ({', '.join(diff)} changed): "
                             f"delete {path.parent} to train this stage again, or use another --work-dir")


def make_val_loader(val_ds, batch_size: int, cfg: Dict[str, Any], env: DistEnv):
    sampler = ShardedBatchSampler(len(val_ds), batch_size, False, cfg["seed"], env, drop_last=False)
    return make_loader(val_ds, sampler, cfg["data"]["num_workers"], env.device)

