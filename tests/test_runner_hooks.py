"""The stage runner's hooks: best.pt, load_from, the start banner and per-class table, the
epoch's mean losses, a validation logged once across a kill, Weights & Biases offline."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kitti_common import QUICK, needs_spconv, tiny_overrides, tiny_root
from pcseg_kd.config import ConfigError
from pcseg_kd.engine import checkpoint as ckpt
from pcseg_kd.engine.distributed import DistEnv
from pcseg_kd.engine.hook import Hook
from pcseg_kd.engine.kitti import hooks as kitti_hooks
from pcseg_kd.engine.kitti import runner as kitti_runner
from pcseg_kd.engine.kitti import train as kitti
from pcseg_kd.engine.kitti.schema import load_kitti_experiment

pytestmark = needs_spconv


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "runner_hooks", frames=4, seed=7)


def baseline_cfg(root, epochs=3, **extra):
    return load_kitti_experiment(QUICK, tiny_overrides(root, student_epochs=epochs, steps=1, stages="[baseline]",
                                                       threads=1, **extra))


def run_stage(cfg, work, hooks=()):
    env = DistEnv()
    ds = kitti.DATASETS.build(cfg["data"]["train"])
    val = kitti.DATASETS.build(cfg["data"]["val"])
    cw = kitti.resolve_class_weights(cfg, ds, work, env)
    return kitti.train_stage("baseline", cfg, env, work, ds, val, progress=False, class_weights=cw, hooks=hooks)


def test_best_pt_holds_the_best_validation_not_the_last(data_root, tmp_path, monkeypatch):
    """Validation mIoU scripted to 10, 30, 20 over three epochs: best.pt holds epoch 2's
    weights (a snapshot taken when epoch 2 was scored), final.pt epoch 3's."""
    real = kitti_hooks.evaluate
    scripted, snapshots = iter([10.0, 30.0, 20.0]), []

    def scored(model, *a, **k):
        m = real(model, *a, **k)
        value = next(scripted)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {rows: {**v, "miou": value} for rows, v in m.items()}

    monkeypatch.setattr(kitti_hooks, "evaluate", scored)
    run_stage(baseline_cfg(data_root), tmp_path)
    best = ckpt.load_checkpoint(tmp_path / "baseline" / "best.pt")
    final = ckpt.load_checkpoint(tmp_path / "baseline" / "final.pt")
    assert best["epoch"] == 2 and best["best"] == {"rows": "all", "miou": 30.0}
    assert best["metrics"]["all"]["miou"] == 30.0 and final["metrics"]["all"]["miou"] == 20.0
    for k, v in best["model"].items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0)
    assert any(not torch.equal(v, final["model"][k]) for k, v in best["model"].items() if v.is_floating_point())


def test_best_pt_ties_keep_the_earliest_and_nan_never_wins(data_root, tmp_path, monkeypatch):
    real = kitti_hooks.evaluate
    values = iter([5.0, float("nan"), 5.0])

    def scored(*a, **k):
        value = next(values)
        return {r: {**v, "miou": value} for r, v in real(*a, **k).items()}

    monkeypatch.setattr(kitti_hooks, "evaluate", scored)
    run_stage(baseline_cfg(data_root), tmp_path)
    assert ckpt.load_checkpoint(tmp_path / "baseline" / "best.pt")["epoch"] == 1
    assert not math.isnan(ckpt.load_checkpoint(tmp_path / "baseline" / "best.pt")["best"]["miou"])


class Capture(Hook):
    """The model's weights when the loop starts."""
    def before_run(self, r):
        self.start = {k: v.clone() for k, v in r.model.state_dict().items()}


def test_load_from_starts_from_those_weights_and_joins_the_fingerprint(data_root, tmp_path):
    run_stage(baseline_cfg(data_root, epochs=1), tmp_path / "a")
    source = tmp_path / "a" / "baseline" / "final.pt"
    cfg = baseline_cfg(data_root, epochs=1, **{"student.load_from": str(source)})
    cap = Capture()
    run_stage(cfg, tmp_path / "b", hooks=[cap])
    want = ckpt.load_checkpoint(source)["model"]
    for k, v in want.items():
        torch.testing.assert_close(cap.start[k], v, rtol=0, atol=0)
    fp = ckpt.load_checkpoint(tmp_path / "b" / "baseline" / "final.pt")["fingerprint"]
    assert fp["load_from"]["path"] == str(source.resolve()) and len(fp["load_from"]["sha256"]) == 64
    # without load_from the same settings start elsewhere (and the fingerprint has no such key)
    cap2 = Capture()
    run_stage(baseline_cfg(data_root, epochs=1), tmp_path / "c", hooks=[cap2])
    assert any(not torch.equal(cap2.start[k], want[k]) for k in want if want[k].is_floating_point())
    assert "load_from" not in ckpt.load_checkpoint(tmp_path / "c" / "baseline" / "final.pt")["fingerprint"]


def test_load_from_a_missing_file_names_the_key(data_root, tmp_path):
    with pytest.raises(ConfigError, match=r"student\.load_from.*does not exist"):
        baseline_cfg(data_root, **{"student.load_from": str(tmp_path / "nope.pt")})


def test_banner_epoch_means_and_per_class_table_are_printed(data_root, tmp_path, capsys):
    cfg = baseline_cfg(data_root, epochs=2)
    env = DistEnv()
    ds = kitti.DATASETS.build(cfg["data"]["train"])
    val = kitti.DATASETS.build(cfg["data"]["val"])
    kitti.train_stage("baseline", cfg, env, tmp_path, ds, val, progress=True,
                      class_weights=kitti.resolve_class_weights(cfg, ds, tmp_path, env))
    out = capsys.readouterr().out
    assert "[baseline] SpUNet (" in out and "1 process(es) (backend none)" in out
    assert f"[baseline] batch {cfg['student']['optim']['batch_size']} scans per process" in out
    assert f"{len(ds)} training scans (1 steps per epoch x 2 epochs), {len(val)} validation scans" in out
    # the epoch line carries the epoch's mean losses: one step per epoch, so the step's own value
    logged = [json.loads(line) for line in (tmp_path / "baseline" / "log.jsonl").read_text().splitlines()]
    step2 = next(r for r in logged if r.get("global_step") == 2 and "loss_seg" in r)
    assert f"[baseline] epoch 2/2: " in out and f"loss_seg {step2['loss_seg']:.4f}" in out
    assert "per-class IoU (%) of the last validation" in out
    table = out.split("per-class IoU (%) of the last validation:")[1]
    for name in ds.class_names:
        assert name in table
    assert "mIoU (present)" in table


def test_epoch_mean_is_the_mean_over_the_epochs_steps(data_root, tmp_path, capsys):
    """Two steps per epoch, logged every step: the printed mean is their average."""
    cfg = load_kitti_experiment(QUICK, tiny_overrides(data_root, student_epochs=1, steps=2, stages="[baseline]",
                                                      threads=1, **{"student.optim.batch_size": 1}))
    env = DistEnv()
    ds = kitti.DATASETS.build(cfg["data"]["train"])
    kitti.train_stage("baseline", cfg, env, tmp_path, ds, None, progress=True,
                      class_weights=kitti.resolve_class_weights(cfg, ds, tmp_path, env))
    logged = [json.loads(line) for line in (tmp_path / "baseline" / "log.jsonl").read_text().splitlines()]
    mean = sum(r["loss_seg"] for r in logged[:2]) / 2
    assert f"loss_seg {mean:.4f}" in capsys.readouterr().out


def test_validation_logged_once_when_killed_before_its_checkpoint(data_root, tmp_path, monkeypatch):
    """Dies writing the checkpoint right after the epoch-1 validation was logged: the rerun
    redoes that validation and log.jsonl holds it once; the weights equal a clean run's."""
    cfg = baseline_cfg(data_root, epochs=2)
    run_stage(cfg, tmp_path / "clean")
    real = kitti_runner.save_checkpoint
    saves = {"n": 0}

    def dies_on_second(path, state, *a, **k):
        if path.name == "last.pt":
            saves["n"] += 1
            if saves["n"] == 2:  # epoch 1's end (validation pending), then the validation's own
                raise KeyboardInterrupt("simulated kill")
        return real(path, state, *a, **k)

    monkeypatch.setattr(kitti_runner, "save_checkpoint", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, tmp_path / "killed")
    log = tmp_path / "killed" / "baseline" / "log.jsonl"
    assert sum('"val"' in line for line in log.read_text().splitlines()) == 1  # logged, not checkpointed
    monkeypatch.setattr(kitti_runner, "save_checkpoint", real)
    run_stage(cfg, tmp_path / "killed")
    vals = [json.loads(line)["epoch"] for line in log.read_text().splitlines() if '"val"' in line]
    assert vals == [1, 2]
    clean = ckpt.load_checkpoint(tmp_path / "clean" / "baseline" / "final.pt")["model"]
    resumed = ckpt.load_checkpoint(tmp_path / "killed" / "baseline" / "final.pt")["model"]
    for k in clean:
        torch.testing.assert_close(resumed[k], clean[k], rtol=0, atol=0)


def test_warmup_longer_than_training_warns(data_root, tmp_path, capsys):
    cfg = load_kitti_experiment(QUICK, tiny_overrides(data_root, student_epochs=1, steps=1, stages="[teacher,student]",
                                                      threads=1, **{"distiller.warmup_epochs": 5}))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    assert "distiller.warmup_epochs (5) is longer than training (1 epochs)" in capsys.readouterr().out


def test_wandb_offline_run_logs_losses_and_validations(data_root, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'pcseg_kd[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = baseline_cfg(data_root, epochs=1, **{"wandb": "{project: pcseg-test, mode: offline}"})
    run_stage(cfg, tmp_path)
    runs = list((tmp_path / "baseline" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "baseline").iterdir())
    run_id = (tmp_path / "baseline" / "wandb_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # an offline run keeps its records in run-<id>.wandb (protobuf: the keys stand in it as text)
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"loss_seg", b"lr", b"val/all/miou", b"val/in_view/miou_present"):
        assert key in records, key
    assert wandb.run is None  # finished


def test_wandb_settings_are_checked(data_root):
    with pytest.raises(ConfigError, match=r"wandb.*unknown key"):
        baseline_cfg(data_root, **{"wandb": "{projekt: x}"})
    with pytest.raises(ConfigError, match=r"wandb.*mode must be"):
        baseline_cfg(data_root, **{"wandb": "{mode: sometimes}"})


def test_per_step_hooks_do_not_sync_with_the_host():
    """The hooks that act on every step (epoch mean losses, teacher-target counts) only queue
    device work: no value is read on the host until the epoch ends."""
    from types import SimpleNamespace

    from pcseg_kd.distill.dkd_pssm import DKDPSSM
    from pcseg_kd.engine.kitti.hooks import EpochLossHook, TeacherTargetHook, target_scores
    from pcseg_kd.utils.sync_guard import forbid_host_sync

    g = torch.Generator().manual_seed(0)
    P, K, C = 300, 80, 19
    labels = torch.randint(0, C, (P,), generator=g)
    labels[::7] = 255
    idx = torch.randperm(P, generator=g)[:K]
    env = DistEnv()
    r = SimpleNamespace(env=env, device=env.device, stage="student", model=SimpleNamespace(num_classes=C),
                        seg=SimpleNamespace(ignore_index=255), rows="points", teacher_rows="in_view",
                        distiller=DKDPSSM(ignore_index=255), batch={"labels": labels, "img_point_idx": idx},
                        out={"logits": torch.randn(P, C, generator=g)},
                        teacher_out={"logits": torch.randn(K, C, generator=g)},
                        losses={"loss_seg": torch.tensor(1.5), "loss_kd": torch.tensor(0.25)})
    targets, means = TeacherTargetHook(r), EpochLossHook(env)
    with forbid_host_sync():
        for _ in range(2):
            targets.after_step(r)
            means.after_step(r)
    # what was counted: the teacher's argmax against the labels on the in-view rows, twice
    want = torch.zeros(C, C, dtype=torch.int64)
    for t, y in zip(r.teacher_out["logits"].argmax(1).tolist(), labels[idx].tolist()):
        if y != 255:
            want[y, t] += 2
    assert torch.equal(targets.counts[:-1].reshape(C, C), want)
    assert target_scores(want)["rows"] == int((labels[idx] != 255).sum()) * 2
    assert torch.equal(means.sums, torch.tensor([3.0, 0.5])) and means.steps == 2
