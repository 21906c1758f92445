"""The seed-batched engine's linear full-batch path (issue 10.6) trains exactly what the
general autograd path trains, and is used only where it applies."""
from __future__ import annotations

import copy

import pytest
import torch

import pcseg_kd.data  # noqa: F401
import pcseg_kd.distill  # noqa: F401
from pcseg_kd.data.gaussian import GaussianTask
from pcseg_kd.engine.toy.schema import OptimConfig
from pcseg_kd.engine.toy.train import batched_models, fit, linear_fast_path
from pcseg_kd.registry import DISTILLERS

DISTILLER_CFGS = [
    {"type": "none"},
    {"type": "none", "ce_weight": 0.5},
    {"type": "kd", "temperature": 0.7, "scale_by_t2": False},
    {"type": "kd", "temperature": 0.7, "ignore_index": 255},   # the autograd-through-everything branch
    {"type": "kd_pssm", "temperature": 0.7, "scale_by_t2": False, "pssm": {"preset": "reference"}},
    {"type": "kd_pssm", "temperature": 0.7, "apply": "weight", "pssm": {"preset": "paper"}},
    {"type": "dkd", "alpha": 1.0, "beta": 1.0, "temperature": 0.7, "warmup_epochs": 5},
    {"type": "dkd_pssm", "alpha": 1.0, "beta": 1.0, "temperature": 0.7},
    {"type": "sp", "kd_weight": 1.0},   # a feature distiller without parameters: features = logits here
]


def _setup(seeds=(0, 3, 7)):
    """float64 data and models: the two paths round differently, and some settings (SP with
    a large weight, PKT on 2-d logits) amplify float32 rounding ~10x per epoch; in float64
    both paths agree to ~1e-14 after 60 epochs."""
    task = GaussianTask(overlap=4, n_train=80, n_test=40)
    data = {k: v.double() if v.is_floating_point() else v for k, v in task.make_data(list(seeds)).items()}
    models = {k: v.double() for k, v in
              batched_models(task, {"type": "mlp", "hidden": []}, None, {"a": 25, "b": 25}, list(seeds)).items()}
    return task, data, models


@pytest.mark.parametrize("cfg", DISTILLER_CFGS, ids=lambda c: c["type"] + "-" + str(len(c)))
def test_fast_path_equals_autograd_path(cfg):
    task, data, models = _setup()
    seeds = [0, 3, 7]
    opt = OptimConfig(lr=0.1, epochs=60)
    teacher = fit(models["teacher"], data["x_a_train"], data["y_train"], opt, seeds, DISTILLERS.build({"type": "none"}),
                  fast=False)
    dist = DISTILLERS.build(cfg)
    assert linear_fast_path(models["student"], opt, 80, task, dist)
    out = {}
    for fast in (True, False):
        m = fit(copy.deepcopy(models["student"]), data["x_b_train"], data["y_train"], opt, seeds, DISTILLERS.build(cfg),
                teacher, data["x_a_train"], task, fast=fast)
        out[fast] = (m.weights[0].detach(), m.biases[0].detach())
    start = models["student"].weights[0].detach()
    assert (out[True][0] - start).abs().max() > 1e-2          # it trained
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-10, atol=1e-12)


def test_fast_path_teacher_equals_autograd_teacher():
    task, data, models = _setup()
    opt = OptimConfig(lr=0.1, epochs=60)
    a = fit(copy.deepcopy(models["teacher"]), data["x_a_train"], data["y_train"], opt, [0, 3, 7],
            DISTILLERS.build({"type": "none"}), fast=True)
    b = fit(copy.deepcopy(models["teacher"]), data["x_a_train"], data["y_train"], opt, [0, 3, 7],
            DISTILLERS.build({"type": "none"}), fast=False)
    torch.testing.assert_close(a.weights[0], b.weights[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.biases[0], b.biases[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", [
    {"opt": OptimConfig(lr=0.1, epochs=5, momentum=0.9)},
    {"opt": OptimConfig(lr=0.1, epochs=5, weight_decay=1e-4)},
    {"opt": OptimConfig(optimizer="adam", lr=0.01, epochs=5)},
    {"opt": OptimConfig(lr=0.1, epochs=5, batch_size=16)},
    {"hidden": [8]},
    {"distiller": {"type": "fitnet"}},   # has a trainable regressor
])
def test_fast_path_only_where_it_applies(change):
    task = GaussianTask(overlap=4, n_train=80, n_test=40)
    models = batched_models(task, {"type": "mlp", "hidden": change.get("hidden", [])}, None, {"a": 25, "b": 25}, [0])
    dist = DISTILLERS.build(change.get("distiller", {"type": "kd"}))
    dist.build_modules(models["student"].feature_dim, 2, num_models=1, num_samples=80, num_classes=2)
    assert not linear_fast_path(models["student"], change.get("opt", OptimConfig(lr=0.1, epochs=5)), 80, task, dist)


def test_distiller_parameters_do_not_depend_on_earlier_global_rng_use():
    """FitNet's regressor is initialised from a per-cell seed: the same cell gives the same
    result whatever ran before it (a sweep resumed after a kill runs cells in a new process)."""
    from pcseg_kd.engine.toy.schema import load_experiment
    from pcseg_kd.engine.toy.train import run_setting

    cfg = load_experiment("configs/gauss/kd.yaml", ["seeds.num=2", "teacher.epochs=20", "student.epochs=20"])
    cfg = {**cfg, "distiller": {"type": "fitnet", "kd_weight": 1.0}}
    first = run_setting(cfg)["metrics"]["per_seed"]["student_acc"]
    torch.rand(1000)  # what an earlier cell would do to the global generator
    again = run_setting(cfg)["metrics"]["per_seed"]["student_acc"]
    assert first == again
