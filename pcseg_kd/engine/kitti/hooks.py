"""The behaviours of a training stage, as hooks of :class:`.runner.StageRunner`.

Priorities (lower runs first at each call): loggers 0, progress bar 10, step callback and
Ω statistics 20, logged losses and epoch means 30, checkpoints 40, validation and best.pt 50.
At the end of an epoch that makes the order: close the bar, read Ω's shares, print the epoch's
mean losses, write ``last.pt`` (with the validation pending), validate, write ``best.pt``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..checkpoint import save_checkpoint
from ..distributed import all_reduce_sum
from .evaluate import evaluate
from .runner import Hook, StageRunner, make_val_loader, omega_counts_over_ranks, val_record


class ProgressHook(Hook):
    """A tqdm bar per epoch on a terminal (rank 0); nothing in a log file."""
    priority = 10

    def __init__(self):
        self.bar = None

    def before_epoch(self, r: StageRunner) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=r.steps, initial=r.first_step, desc=f"[{r.name}] epoch {r.epoch}/{r.epochs}",
                        disable=not (r.progress and r.env.is_main and sys.stderr.isatty()), dynamic_ncols=True)

    def after_step(self, r: StageRunner) -> None:
        self.bar.update(1)

    def show(self, values: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()})

    def after_epoch(self, r: StageRunner) -> None:
        self.bar.close()


class StepCallbackHook(Hook):
    """``fn(global_step)`` after every optimiser step (benchmarks time steps with it)."""
    priority = 20

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def after_step(self, r: StageRunner) -> None:
        self.fn(r.global_step)


class LossLogHook(Hook):
    """The step's losses, averaged over ranks, every ``log_interval`` steps and at an epoch's
    last step: the step's only host sync. A non-finite loss stops every rank together."""
    priority = 30

    def __init__(self, interval: int):
        self.interval = interval

    def after_step(self, r: StageRunner) -> None:
        if r.global_step % self.interval and not r.is_last_step():
            return
        stacked = r.reduce_mean(torch.stack([v.detach().float() for v in r.losses.values()]))
        values = dict(zip(r.losses, stacked.tolist()))  # the step's only host sync
        r.log({"epoch": r.epoch, "step": r.step_in_epoch, "global_step": r.global_step,
               "lr": r.sched.get_last_lr()[0], **values})
        progress = r.hook(ProgressHook)
        if progress is not None:
            progress.show(values)
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"[{r.name}] non-finite loss at epoch {r.epoch} step {r.step_in_epoch}: "
                                     f"{values} (see {r.stage_dir / 'log.jsonl'})")


class EpochLossHook(Hook):
    """Each epoch's mean losses over all its steps and ranks: summed on the device every step
    (no sync), read once at the epoch's end and printed in the epoch's one line (the step
    records in log.jsonl have the logged steps' values). The partial sums survive a kill."""
    priority = 30

    def __init__(self, env):
        self.env = env
        self.names: List[str] = []
        self.sums: Optional[Tensor] = None
        self.steps = 0

    def after_step(self, r: StageRunner) -> None:
        stacked = torch.stack([v.detach().float() for v in r.losses.values()])
        if self.sums is None:
            self.names, self.sums = list(r.losses), torch.zeros_like(stacked)
        self.sums += stacked
        self.steps += 1

    def after_epoch(self, r: StageRunner) -> None:
        means = {}
        if self.steps:
            total = all_reduce_sum(self.sums.clone(), r.env) / (self.steps * r.env.world_size)
            means = dict(zip(self.names, total.tolist()))  # one host sync per epoch
        self.sums, self.steps = None, 0
        if r.progress:
            r.print(f"epoch {r.epoch}/{r.epochs}: {r.epoch_seconds:.1f} s"
                    + "".join(f", {k} {v:.4f}" for k, v in means.items()))

    def state_dict(self) -> Dict[str, Any]:
        # every rank's partial sums, summed: rank 0 carries them across a resume
        sums = all_reduce_sum(self.sums.clone(), self.env).cpu() if self.sums is not None else None
        return {"epoch_losses": {"names": self.names, "sums": sums, "steps": self.steps}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state.get("epoch_losses")
        if not saved or saved["sums"] is None:
            return
        self.names, self.steps = list(saved["names"]), saved["steps"]
        sums = saved["sums"].to(self.env.device)
        self.sums = sums if self.env.is_main else torch.zeros_like(sums)


class OmegaStatsHook(Hook):
    """PSSM's Ω shares (distilled rows with Ω = 1 / 0 / between) per epoch, counted on the
    device by the distiller and read once per epoch (docs/results_kitti.md)."""
    priority = 20

    def __init__(self, r: StageRunner):
        self.distiller, self.env = r.distiller, r.env
        self.history: List[Dict[str, Any]] = []
        if self.distiller is not None and hasattr(self.distiller, "track_omega") and self.distiller.has_kd:
            self.distiller.track_omega()

    def after_epoch(self, r: StageRunner) -> None:
        if getattr(self.distiller, "tracking_omega", False):
            self.distiller.omega_counts = omega_counts_over_ranks(self.distiller, self.env)
            shares = self.distiller.pop_omega_shares()  # one host sync per epoch
            if shares is not None:
                self.history = [h for h in self.history if h["epoch"] != r.epoch] + [{"epoch": r.epoch, **shares}]

    def state_dict(self) -> Dict[str, Any]:
        return {"omega_history": self.history, "omega_counts": omega_counts_over_ranks(self.distiller, self.env)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = list(state.get("omega_history", []))
        if self.env.is_main and self.distiller is not None and state.get("omega_counts") is not None:
            # the epoch's counts so far, summed over ranks when saved: rank 0 carries them
            self.distiller.omega_counts = state["omega_counts"].to(self.env.device)

    def final_state(self) -> Dict[str, Any]:
        return {"omega_history": self.history}


class CheckpointHook(Hook):
    """``last.pt`` every ``interval`` steps inside an epoch (0: never) and at every epoch's end."""
    priority = 40

    def __init__(self, interval: int, validation_due: Callable[[int], bool]):
        self.interval, self.validation_due = interval, validation_due

    def after_step(self, r: StageRunner) -> None:
        if not self.interval or r.global_step % self.interval or r.is_last_step():
            return
        # never save weights a non-finite loss has already touched (one host sync per checkpoint)
        finite = all_reduce_sum(torch.isfinite(r.loss.detach()).float().reshape(1), r.env)
        if float(finite) < r.env.world_size:
            raise FloatingPointError(f"[{r.name}] non-finite loss at epoch {r.epoch} step {r.step_in_epoch}; "
                                     f"not checkpointing it (see {r.stage_dir / 'log.jsonl'})")
        r.checkpoint(r.epoch, r.step_in_epoch)

    def after_epoch(self, r: StageRunner) -> None:
        # a kill inside the validation that follows leaves it pending: the rerun does it first
        r.checkpoint(r.epoch + 1, 0, pending_validation=r.epoch if self.validation_due(r.epoch) else None)


class EvalHook(Hook):
    """Validation every ``interval`` epochs and after the last, recorded in the history
    (replacing a record of the same epoch), logged and checkpointed; a validation a kill
    interrupted is redone first. Prints the per-class IoU table after the run."""
    priority = 50

    def __init__(self, interval: int):
        self.interval = interval
        self.loader = None

    def due(self, r: StageRunner, epoch: int) -> bool:
        return r.val_ds is not None and (epoch % self.interval == 0 or epoch == r.epochs)

    def before_run(self, r: StageRunner) -> None:
        if r.val_ds is None:
            return
        self.loader = make_val_loader(r.val_ds, r.optim_cfg.batch_size, r.cfg, r.env)
        if r.pending_validation is not None:  # killed inside that validation: redo it
            self.validate(r, r.pending_validation, 0.0)

    def after_epoch(self, r: StageRunner) -> None:
        if self.due(r, r.epoch):
            self.validate(r, r.epoch, time.perf_counter() - r.epoch_t0)

    def after_train(self, r: StageRunner) -> None:
        if self.loader is not None and not r.metrics:  # resumed after the last validation, before final.pt
            # the same weights as when it was recorded: score again (the per-class figures are not
            # kept in the history) without logging the record a second time
            self.validate(r, r.epochs, 0.0, log=not any(h.get("epoch") == r.epochs for h in r.history))

    def validate(self, r: StageRunner, epoch: int, seconds: float, log: bool = True) -> None:
        r.metrics = evaluate(r.model, self.loader, r.env, r.model.num_classes, r.val_ds.ignore_index,
                             r.val_ds.class_names, r.progress)
        record = val_record(epoch, r.metrics, seconds, r.global_step)
        r.history = [h for h in r.history if h.get("epoch") != epoch] + [record]
        r.call("after_validation", record)
        if log:
            r.log(record)
        r.checkpoint(epoch + 1, 0)  # with this validation in its history, none pending
        r.print(f"epoch {epoch}: " + ", ".join(f"val mIoU ({k}) {v['miou']:.2f}" for k, v in r.metrics.items()))

    def after_run(self, r: StageRunner) -> None:
        if r.metrics and r.env.is_main:
            from ...metrics.report import iou_table
            print(f"[{r.name}] per-class IoU (%) of the last validation:\n" + iou_table(r.metrics, r.val_ds.class_names),
                  flush=True)


def model_rows_key(r: StageRunner) -> str:
    """The validation row set a model is judged on: its own rows (in-view for the teachers,
    every point the student sees for the student)."""
    return "in_view" if r.rows == "in_view" else "all"


class BestCheckpointHook(Hook):
    """``best.pt``: the weights of the validation with the highest mIoU on the model's rows
    (:func:`model_rows_key`), the earliest on a tie; the format of ``final.pt`` plus ``epoch``.
    Written before the checkpoint that records the validation, so a kill in between redoes
    the validation and writes the same file."""
    priority = 50

    def after_validation(self, r: StageRunner, record: Dict[str, Any]) -> None:
        key = model_rows_key(r)

        def score(h):
            v = (h.get("val") or {}).get(key, {}).get("miou")
            return v if v is not None and math.isfinite(v) else -math.inf

        earlier = [score(h) for h in r.history if h["epoch"] < record["epoch"]]
        path = r.stage_dir / "best.pt"
        if earlier and score(record) <= max(earlier) and path.is_file():
            return
        if r.env.is_main:
            save_checkpoint(path, {"model": r.model.state_dict(), "model_cfg": r.cfg_section["model"],
                                   "metrics": r.metrics, "config": r.cfg, "fingerprint": r.fingerprint,
                                   "epoch": record["epoch"], "best": {"rows": key, "miou": score(record)}},
                            keep_previous=False)


class TeacherTargetHook(Hook):
    """How often the teacher is right where it teaches: the accuracy and mIoU of the teacher's
    argmax against the labels on the student's distilled rows (the cache's rows, or the
    in-view points), per epoch. A confusion matrix is summed on the device every step (a
    scatter-add, no sync) and read once per epoch; mIoU is over the classes present in those
    rows' labels. A teacher that memorised its training scans scores far above its validation
    mIoU here; out-of-fold targets score near it (docs/results_kitti.md)."""
    priority = 20

    def __init__(self, r: StageRunner):
        self.env, self.num_classes, self.ignore = r.env, r.model.num_classes, r.seg.ignore_index
        self.active = r.stage == "student" and r.distiller is not None and r.distiller.has_kd
        self.history: List[Dict[str, Any]] = []
        self.counts: Optional[Tensor] = None  # [C * C + 1]: label * C + prediction, the last bin for ignored rows

    def after_step(self, r: StageRunner) -> None:
        from .objective import kd_rows, labels_for
        if not self.active:
            return
        with torch.no_grad():
            labels = labels_for(r.rows, r.batch, r.out.get("point_valid"), self.ignore)
            rows = kd_rows(r.distiller, r.out, r.teacher_out, r.rows, r.teacher_rows, r.batch, labels)
            if rows is None:
                return
            _, teacher_logits, labels = rows
            c = self.num_classes
            valid = (labels >= 0) & (labels < c)
            idx = torch.where(valid, labels.clamp(0, c - 1) * c + teacher_logits.argmax(1), c * c)
            if self.counts is None:
                self.counts = torch.zeros(c * c + 1, dtype=torch.int64, device=idx.device)
            self.counts.scatter_add_(0, idx, torch.ones_like(idx))

    def _summed(self) -> Optional[Tensor]:
        if not self.active:
            return None
        counts = self.counts if self.counts is not None else torch.zeros(
            self.num_classes ** 2 + 1, dtype=torch.int64, device=self.env.device)
        return all_reduce_sum(counts.clone(), self.env)

    def after_epoch(self, r: StageRunner) -> None:
        summed = self._summed()
        if summed is None:
            return
        entry = target_scores(summed[:-1].reshape(self.num_classes, self.num_classes).cpu())  # one sync per epoch
        self.counts = None
        if entry["rows"]:
            self.history = [h for h in self.history if h["epoch"] != r.epoch] + [{"epoch": r.epoch, **entry}]
        if entry["rows"] and r.epoch == r.epochs:  # every epoch's is in metrics.json
            r.print(f"teacher targets on the distilled rows, epoch {r.epoch}: accuracy {entry['accuracy']:.2f} %, "
                    f"mIoU {entry['miou']:.2f} ({entry['rows']} rows)")

    def state_dict(self) -> Dict[str, Any]:
        summed = self._summed()
        return {"teacher_target_history": self.history,
                "teacher_target_counts": summed.cpu() if summed is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = list(state.get("teacher_target_history", []))
        counts = state.get("teacher_target_counts")
        if counts is not None and self.env.is_main:  # summed over ranks when saved: rank 0 carries them
            self.counts = counts.to(self.env.device)

    def final_state(self) -> Dict[str, Any]:
        return {"teacher_target_history": self.history}


def target_scores(confusion: Tensor) -> Dict[str, Any]:
    """Accuracy and mIoU (%) of a [C, C] (label, prediction) count matrix; the mIoU is over
    the classes that occur among the labels. Also the row count."""
    conf = confusion.double()
    total = conf.sum()
    tp = conf.diagonal()
    present = conf.sum(1) > 0
    iou = tp / (conf.sum(1) + conf.sum(0) - tp).clamp(min=1)
    return {"accuracy": float(100 * tp.sum() / total) if total else float("nan"),
            "miou": float(100 * iou[present].mean()) if present.any() else float("nan"),
            "rows": int(total)}
