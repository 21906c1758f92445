"""Seed-batched training for the paper's small tasks.

All seeds of one setting train as one stacked model (``models.MLP`` with weights
``[S, ...]``): the loss is the sum over seeds of each seed's loss, so each seed's slice
of every parameter receives exactly that seed's gradient, and SGD/momentum/Adam (all
element-wise) update each slice as the per-seed loop would. ``fit_plain`` is that
per-seed loop (ordinary modules, ``torch.optim``), kept as the reference the batched
engine is tested against and benchmarked with.

Protocol (the authors'): teacher trained on modality A with CE; the no-KD baseline
and the KD student trained on modality B; the teacher frozen while the student trains.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...data.toy import ROLES, ToyTask
from ...metrics.cmd import cmd
from ...models.mlp import MLP, PlainMLP
from ...distill.base import Distiller
from ...registry import DISTILLERS, TASKS
from .schema import OptimConfig, seed_list


class DivergedError(FloatingPointError):
    """A model's weights or outputs became NaN / inf: training diverged (learning rate too
    large for the task). An expected error: the tools print it and exit 1."""


def show_progress(progress: bool) -> bool:
    """Progress bars only on a terminal: in a log file tqdm's ``\r`` frames are noise."""
    return bool(progress) and sys.stderr.isatty()


def _stage_settings(cfg, section: str) -> str:
    o = cfg[section]
    return f"{section}.lr={o['lr']:g} ({o['optimizer']}, {o['epochs']} epochs)"


def check_diverged(model: nn.Module, seeds: Sequence[int], stage: str, settings: str) -> None:
    """Raise :class:`DivergedError` naming ``stage``, the seeds and ``settings`` when any weight
    of ``model`` is not finite. One host sync per trained model, after its training."""
    S = len(seeds)
    bad = torch.zeros(S, dtype=torch.bool)
    for p in model.parameters():
        finite = torch.isfinite(p.detach())
        if p.dim() and p.shape[0] == S:  # stacked seeds: say which ones
            bad |= ~finite.reshape(S, -1).all(1).cpu()
        elif not bool(finite.all()):
            bad[:] = True
    if bool(bad.any()):
        which = [s for s, b in zip(seeds, bad.tolist()) if b]
        raise DivergedError(f"{stage} diverged: non-finite weights after training in {len(which)} of {S} seeds "
                            f"(first: seed {which[0]}); settings: {settings}. Lower the learning rate.")


# ----------------------------------------------------------------------------- building
def plain_models(task: ToyTask, model_cfg: Dict[str, Any], teacher_cfg: Optional[Dict[str, Any]],
                 dims: Dict[str, int], seed: int) -> Dict[str, PlainMLP]:
    """The three per-seed models, initialised by the task's RNG protocol."""
    def build(role: str) -> PlainMLP:
        cfg = dict(teacher_cfg or model_cfg) if role == "teacher" else dict(model_cfg)
        kind = cfg.pop("type")
        if kind != "mlp":
            raise ValueError(f"the small-task engine trains 'mlp' models, got model type {kind!r}")
        in_dim = dims["a"] if role == "teacher" else dims["b"]
        return PlainMLP(in_dim, task.num_classes, **cfg)

    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + task.init_offset)
        for role in ROLES:
            if task.init_mode == "shared":
                torch.manual_seed(seed + task.init_offset)
            out[role] = build(role)
    return out


def batched_models(task, model_cfg, teacher_cfg, dims, seeds: Sequence[int]) -> Dict[str, MLP]:
    per_seed = [plain_models(task, model_cfg, teacher_cfg, dims, s) for s in seeds]
    return {role: MLP.from_plain([m[role] for m in per_seed]) for role in ROLES}


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


# ----------------------------------------------------------------------------- batching
def take_rows(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Rows ``[S, B]`` of ``x`` (``[S, N, ...]`` or ``[1, N, ...]`` shared by all seeds)."""
    if rows is None:
        return x
    if x.shape[0] == 1:
        return x[0][rows]
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), rows]


class EpochBatches:
    """Full batch, or per-seed shuffled minibatches (each seed its own generator, so a
    seed's batches do not depend on which other seeds train beside it)."""

    def __init__(self, n: int, batch_size: Optional[int], seeds: Sequence[int], device):
        self.n, self.seeds, self.device = n, list(seeds), device
        self.batch_size = batch_size if batch_size and batch_size < n else None
        self.generators = [torch.Generator().manual_seed(10_007 * s + 17) for s in self.seeds]

    def __call__(self):
        if self.batch_size is None:
            yield torch.arange(self.n, device=self.device).expand(len(self.seeds), self.n)
            return
        perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.generators]).to(self.device)
        for start in range(0, self.n, self.batch_size):
            yield perms[:, start:start + self.batch_size]


# ----------------------------------------------------------------------------- training
def _freeze(teacher: Optional[nn.Module]) -> None:
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)


def _step(opt: torch.optim.Optimizer, terms: Dict[str, Tensor]) -> None:
    """One update on the sum of the loss terms (summed over seeds: each seed's slice of
    the stacked parameters gets its own seed's gradient)."""
    loss = sum(v.sum() for v in terms.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _identity_augment(task: Any) -> bool:
    """The task's per-epoch transform is the base class's identity (seen through a
    :class:`_TeacherView` too)."""
    inner = task.task if isinstance(task, _TeacherView) else task
    return inner is None or type(inner).augment is ToyTask.augment


def linear_fast_path(model: nn.Module, cfg: OptimConfig, n: int, task: Any, distiller: nn.Module) -> bool:
    """Whether :func:`fit_linear_full_batch` applies: one linear layer (logistic regression),
    full batch, plain SGD (no momentum, no weight decay), no input transform, and a
    distiller without parameters of its own (the authors' Gaussian protocol)."""
    return (isinstance(model, MLP) and len(model.weights) == 1 and not model.final_activation
            and not (cfg.batch_size and cfg.batch_size < n) and cfg.optimizer == "sgd"
            and cfg.momentum == 0 and cfg.weight_decay == 0 and _identity_augment(task)
            and not any(True for _ in distiller.parameters()))


def fit_linear_full_batch(model: MLP, x: Tensor, y: Tensor, cfg: OptimConfig, seeds: Sequence[int],
                          distiller: nn.Module, teacher: Optional[MLP] = None, x_teacher: Optional[Tensor] = None,
                          desc: str = "", progress: bool = False) -> MLP:
    """:func:`fit` for S stacked logistic regressions trained full batch with plain SGD.

    The same updates as ``fit`` (p ← p − lr·∂L/∂p, L the sum over seeds of each seed's loss),
    computed with fewer and cheaper ops: autograd only runs through the loss (∂L/∂z for the
    logits z; cross entropy's ∂L/∂z = (softmax(z) − onehot(y))/N is formed directly), the
    linear layer's gradients are formed directly (∂L/∂W = xᵀ·∂L/∂z,
    ∂L/∂b = Σ_rows ∂L/∂z), and every product is laid out with the rows as the long dimension
    (zᵀ = Wᵀ·xᵀ, (∂L/∂W)ᵀ = (∂L/∂z)ᵀ·x): the [S, N, D]·[S, D, 2] form of a two-class layer
    runs ~10x slower on a CPU than its transpose. The teacher's logits are computed once.
    """
    w, b = model.weights[0], model.biases[0]
    S = w.shape[0]
    x = x.expand(S, -1, -1) if x.shape[0] != S else x
    xt = x.transpose(1, 2).contiguous()                      # [S, D, N]
    yb = y.expand(S, -1) if y.shape[0] != S else y
    rows = torch.arange(y.shape[-1], device=x.device).expand(S, -1)
    t_logits, extras = None, {"index": rows}
    if teacher is not None:
        _freeze(teacher)
        with torch.no_grad():
            t_logits, extras["teacher_feats"] = teacher(x_teacher)
    lr = cfg.lr
    # Distiller.forward is CE + kd_loss: with no ignored rows, CE's gradient is formed
    # directly in the [S, C, N] layout, ce_weight · (softmax(z) − onehot(y)) / N (softmax over a
    # last dim of 2 is ~25x slower on a CPU than over the long dim), and autograd only runs
    # through kd_loss. A distiller with its own forward goes through autograd whole.
    split = type(distiller).forward is Distiller.forward and distiller.ignore_index is None
    with_kd = distiller.has_kd and teacher is not None
    if split:
        onehot_t = torch.nn.functional.one_hot(yb, w.shape[-1]).to(x.dtype).transpose(1, 2).contiguous()
        ce_scale = distiller.ce_weight / yb.shape[-1]
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not show_progress(progress), leave=False):
        with torch.no_grad():  # contiguous operands: bmm on transposed views takes a slow path
            zt = torch.baddbmm(b.transpose(1, 2), w.transpose(1, 2).contiguous(), xt)   # [S, C, N]
        if split:
            gt = (torch.softmax(zt, 1) - onehot_t).mul_(ce_scale)
            if with_kd:
                z = zt.transpose(1, 2).contiguous().requires_grad_(True)
                kd = distiller.kd_loss(z, t_logits, yb, epoch, student_feats=z, **extras)
                (g,) = torch.autograd.grad(kd.sum(), z)
                gt += g.transpose(1, 2)
        else:
            z = zt.transpose(1, 2).contiguous().requires_grad_(True)
            terms = distiller(z, t_logits, yb, epoch=epoch, student_feats=z, **extras)
            (g,) = torch.autograd.grad(sum(v.sum() for v in terms.values()), z)
            gt = g.transpose(1, 2).contiguous()                      # [S, C, N]
        with torch.no_grad():
            w.add_(torch.bmm(gt, x).transpose(1, 2), alpha=-lr)      # torch.optim.SGD's update
            b.add_(gt.sum(2).unsqueeze(1), alpha=-lr)
    return model


def fit(model: MLP, x: Tensor, y: Tensor, cfg: OptimConfig, seeds: Sequence[int], distiller: nn.Module,
        teacher: Optional[MLP] = None, x_teacher: Optional[Tensor] = None, task: Optional[ToyTask] = None,
        desc: str = "", progress: bool = False, fast: bool = True) -> MLP:
    """Train ``model`` (S stacked seeds) on ``x``/``y``; with a teacher, distil from it.
    ``fast``: use :func:`fit_linear_full_batch` where it applies (same updates, fewer ops)."""
    if fast and linear_fast_path(model, cfg, y.shape[-1], task, distiller):
        return fit_linear_full_batch(model, x, y, cfg, seeds, distiller, teacher, x_teacher, desc, progress)
    params = list(model.parameters()) + list(distiller.parameters())
    opt = make_optimizer(params, cfg)
    batches = EpochBatches(y.shape[-1], cfg.batch_size, seeds, x.device)
    full = batches.batch_size is None
    _freeze(teacher)
    augment = (task or ToyTask()).augment  # the base task's augment is the identity
    t_cached = None
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not show_progress(progress), leave=False):
        for rows in batches():
            xb = take_rows(x, None if full else rows)
            yb = take_rows(y, None if full else rows)
            xb = augment(xb, "b", epoch, seeds, rows)
            logits, feats = model(xb)
            extras: Dict[str, Any] = {"student_feats": feats, "index": rows}
            t_logits = None
            if teacher is not None:
                xa = take_rows(x_teacher, None if full else rows)
                xa = augment(xa, "a", epoch, seeds, rows)
                if full and xa is x_teacher and t_cached is not None:
                    t_logits, t_feats = t_cached
                else:
                    with torch.no_grad():
                        t_logits, t_feats = teacher(xa)
                    if full and xa is x_teacher:
                        t_cached = (t_logits, t_feats)
                extras["teacher_feats"] = t_feats
            if yb.shape[0] != logits.shape[0]:
                yb = yb.expand(logits.shape[0], -1)
            _step(opt, distiller(logits, t_logits, yb, epoch=epoch, **extras))
    return model


def fit_plain(model: PlainMLP, x: Tensor, y: Tensor, cfg: OptimConfig, seed: int, distiller: nn.Module,
              teacher: Optional[PlainMLP] = None, x_teacher: Optional[Tensor] = None,
              task: Optional[ToyTask] = None) -> PlainMLP:
    """The per-seed loop: one ordinary model on ``[N, D]`` data (the reference)."""
    params = list(model.parameters()) + list(distiller.parameters())
    opt = make_optimizer(params, cfg)
    batches = EpochBatches(y.shape[-1], cfg.batch_size, [seed], x.device)
    full = batches.batch_size is None
    augment = (task or ToyTask()).augment  # the base task's augment is the identity
    _freeze(teacher)
    for epoch in range(1, cfg.epochs + 1):
        for rows in batches():
            r = rows[0]
            xb = x if full else x[r]
            yb = y if full else y[r]
            xb = augment(xb.unsqueeze(0), "b", epoch, [seed], rows)[0]
            logits, feats = model(xb)
            extras: Dict[str, Any] = {"student_feats": feats, "index": r}
            t_logits = None
            if teacher is not None:
                xa = x_teacher if full else x_teacher[r]
                xa = augment(xa.unsqueeze(0), "a", epoch, [seed], rows)[0]
                with torch.no_grad():
                    t_logits, extras["teacher_feats"] = teacher(xa)
            _step(opt, distiller(logits, t_logits, yb, epoch=epoch, **extras))
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, task: Optional[ToyTask] = None, modality: str = "b",
            seeds: Sequence[int] = ()) -> Tensor:
    model.eval()
    if task is not None:
        x = task.augment(x, modality, 0, list(seeds), None)
    return model(x)[0]


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-model accuracy in percent, ``[S]``."""
    return (logits.argmax(-1) == y).double().mean(-1) * 100.0


# ----------------------------------------------------------------------------- one setting
DISTILLER_INIT_SEED = 0x0D15_7111
def build_task(cfg) -> ToyTask:
    return TASKS.build(dict(cfg["task"]))


def build_distiller(dist_cfg: Dict[str, Any], s_dim: int, t_dim: int, num_models: int, num_samples: int,
                    num_classes: int) -> nn.Module:
    distiller = DISTILLERS.build(dict(dist_cfg))
    distiller.build_modules(s_dim, t_dim, num_models=num_models, num_samples=num_samples,
                            num_classes=num_classes)
    return distiller


def train_teacher_and_baseline(cfg, task: ToyTask, data: Dict[str, Tensor], seeds: List[int],
                               progress: bool = False) -> Dict[str, Any]:
    dims = {"a": data["x_a_train"].shape[-1], "b": data["x_b_train"].shape[-1]}
    models = batched_models(task, dict(cfg["model"]), cfg.get("teacher_model"), dims, seeds)
    ce = DISTILLERS.build({"type": "none"})
    teacher = fit(models["teacher"], data["x_a_train"], data["y_train"], OptimConfig(**cfg["teacher"]), seeds,
                  ce, task=_TeacherView(task), desc="teacher", progress=progress)
    check_diverged(teacher, seeds, "teacher", _stage_settings(cfg, "teacher"))
    baseline = fit(models["baseline"], data["x_b_train"], data["y_train"], OptimConfig(**cfg["student"]), seeds,
                   ce, task=task, desc="no-KD baseline", progress=progress)
    check_diverged(baseline, seeds, "no-KD baseline", _stage_settings(cfg, "student"))
    return {"teacher": teacher, "baseline": baseline, "student_init": models["student"]}


class _TeacherView:
    """Trains the teacher on modality A: the task's modality-A augmentation applies to
    the teacher's own inputs."""

    def __init__(self, task: ToyTask):
        self.task = task

    def augment(self, x, modality, epoch, seeds, rows):
        return self.task.augment(x, "a" if modality == "b" else modality, epoch, seeds, rows)


def run_setting(cfg, progress: bool = False, shared: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Teacher, no-KD baseline and KD student over all seeds of one setting; metrics dict.

    ``shared`` (from a previous call with the same task/model/teacher config) reuses the
    trained teacher and baseline, as a sweep over methods does.
    """
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seeds = seed_list(cfg["seeds"])
    task = build_task(cfg)
    device = torch.device(cfg.get("device", "cpu"))
    t0 = time.perf_counter()
    if shared is None:
        data = {k: v.to(device) for k, v in task.make_data(seeds).items()}
        shared = {"data": data, **train_teacher_and_baseline(cfg, task, data, seeds, progress)}
    data = shared["data"]
    teacher, baseline = shared["teacher"], shared["baseline"]
    student = copy.deepcopy(shared["student_init"])
    n_train = data["y_train"].shape[-1]
    # a distiller's own parameters (FitNet's regressor, CRD's embeddings) are initialised from
    # a generator seeded by the cell's first seed, not from whatever global RNG state earlier
    # cells left: a cell gives the same result alone, in a sweep, or in a resumed sweep
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DISTILLER_INIT_SEED + seeds[0])
        distiller = build_distiller(cfg["distiller"], student.feature_dim, teacher.feature_dim, len(seeds), n_train,
                                    task.num_classes).to(device)
    fit(student, data["x_b_train"], data["y_train"], OptimConfig(**cfg["student"]), seeds, distiller, teacher,
        data["x_a_train"], task, desc=f"student ({cfg['distiller']['type']})", progress=progress)
    student_settings = (f"{_stage_settings(cfg, 'student')}, distiller "
                        + ", ".join(f"{k}={v}" for k, v in cfg["distiller"].items()))
    check_diverged(student, seeds, f"student ({cfg['distiller']['type']})", student_settings)

    y_test = data["y_test"]
    acc_t = accuracy(predict(teacher, data["x_a_test"], task, "a", seeds), y_test)
    acc_b = accuracy(predict(baseline, data["x_b_test"], task, "b", seeds), y_test)
    acc_s = accuracy(predict(student, data["x_b_test"], task, "b", seeds), y_test)
    in_cmd = task.input_cmd(data, seeds)
    p_s = torch.softmax(predict(student, data["x_b_train"]), -1)
    p_t = torch.softmax(predict(teacher, data["x_a_train"]), -1)
    out_cmd = cmd(p_s, p_t, k=5)
    # finite weights can still give inf logits (weights near float32's range): NaN outputs
    for stage, probs, settings in (("teacher", p_t, _stage_settings(cfg, "teacher")),
                                   (f"student ({cfg['distiller']['type']})", p_s, student_settings)):
        if not bool(torch.isfinite(probs).all()):
            raise DivergedError(f"{stage} diverged: non-finite outputs (softmax) on the training set, so the "
                                f"output CMD is undefined; settings: {settings}. Lower the learning rate.")
    delta = acc_s - acc_b
    as_list = lambda t: [float(v) for v in t.cpu().double()]
    metrics = {
        "n_seeds": len(seeds), "seeds": seeds,
        "teacher_acc_mean": float(acc_t.mean()), "teacher_acc_std": float(acc_t.std(unbiased=False)),
        "baseline_acc_mean": float(acc_b.mean()), "baseline_acc_std": float(acc_b.std(unbiased=False)),
        "student_acc_mean": float(acc_s.mean()), "student_acc_std": float(acc_s.std(unbiased=False)),
        "delta_mean": float(delta.mean()), "delta_std": float(delta.std(unbiased=False)),
        "input_cmd": float(in_cmd.mean()), "output_cmd": float(out_cmd.mean()),
        "per_seed": {"teacher_acc": as_list(acc_t), "baseline_acc": as_list(acc_b), "student_acc": as_list(acc_s),
                     "input_cmd": as_list(in_cmd), "output_cmd": as_list(out_cmd)},
        "seconds": time.perf_counter() - t0,
    }
    return {"metrics": metrics, "shared": shared, "student": student}
