"""SemanticKITTI training engine on tiny synthetic data: the stages end to end, the
student loss (segmentation loss on every point, KD on the in-view points, sync-free), resume after a
kill (bitwise the same weights as an uninterrupted run), checkpoints that survive a
failed write, the sharded sampler, clear errors, and torchrun with two CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kitti_common import POINT, QUICK, tiny_overrides, tiny_root
import torch

from pcseg_kd.models.sparse.spconv_compat import HAVE_SPCONV

pytestmark = pytest.mark.skipif(not HAVE_SPCONV, reason="spconv is not installed (pip install 'pcseg_kd[spconv]')")

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine import checkpoint as ckpt  # noqa: E402
from pcseg_kd.engine.kitti import train as kitti  # noqa: E402
from pcseg_kd.engine.kitti.objective import student_loss  # noqa: E402
# where the runner split put what the kill tests interrupt: the step's loss, validation, metrics.json
from pcseg_kd.engine.kitti import hooks as kitti_hooks, runner as kitti_runner  # noqa: E402
from pcseg_kd.engine.distributed import DistEnv  # noqa: E402
from pcseg_kd.engine.kitti.objective import SegLoss  # noqa: E402
from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.losses.segmentation import lovasz_softmax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_root(tmp_path_factory, "kitti_engine", frames=4, seed=5)


def overrides(root, **extra):
    return tiny_overrides(root, **extra)


def test_three_stages_end_to_end_and_rerun_skips(data_root, tmp_path, capsys):
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher,baseline,student]"))
    env = DistEnv()
    res = kitti.run_kitti(cfg, tmp_path, env, progress=False)
    assert set(res) == {"teacher", "baseline", "student"}
    assert 0 <= res["teacher"]["in_view"]["miou"] <= 100          # image/fusion teachers: in-view rows
    assert {"all", "in_view"} <= set(res["student"])               # the student scores its own rows too
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["protocol"] == "fov" and summary["distiller"] == "dkd_pssm"
    assert set(summary["student"]["teacher_targets"]) == {"epoch", "accuracy", "miou", "rows"}
    for stage, keys in (("teacher", {"in_view"}), ("baseline", {"in_view", "all"}), ("student", {"in_view", "all"})):
        assert set(summary[stage]) - {"teacher_targets"} == keys
        for k in keys:
            assert summary[stage][k]["miou"] == pytest.approx(res[stage][k]["miou"])
    # fov: the student's rows are the in-view points, the same rows the teacher is scored on
    assert summary["student"]["all"]["points"] == summary["student"]["in_view"]["points"] \
        == summary["teacher"]["in_view"]["points"]
    printed = capsys.readouterr().out.splitlines()[-5:]
    assert printed[0].startswith("teacher") and printed[1].startswith("baseline (no KD)")
    assert printed[2].startswith("student (dkd_pssm)") and "vs baseline" in printed[2]
    assert "over present classes" in printed[0] and printed[3].startswith("teacher targets on the student's")
    assert printed[4].startswith("one seed decides nothing")
    baseline_log = [json.loads(line) for line in (tmp_path / "baseline" / "log.jsonl").read_text().splitlines()]
    assert all("loss_kd" not in r for r in baseline_log) and any("loss_seg" in r for r in baseline_log)
    for stage in ("teacher", "baseline", "student"):
        d = tmp_path / stage
        assert (d / "final.pt").is_file() and (d / "last.pt").is_file()
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        assert any("val" in r for r in log) and all(r.get("epoch") for r in log)
        assert json.loads((d / "metrics.json").read_text())["final"]
    student_log = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert all("loss_kd" in r for r in student_log if "loss_seg" in r)
    before = (tmp_path / "student" / "final.pt").stat().st_mtime_ns
    again = kitti.run_kitti(cfg, tmp_path, env, progress=False)   # finished stages are skipped
    assert (tmp_path / "student" / "final.pt").stat().st_mtime_ns == before
    assert again["student"]["all"]["miou"] == res["student"]["all"]["miou"]


def test_no_kd_baseline_needs_no_teacher(data_root, tmp_path):
    cfg = load_kitti_experiment(str(ROOT / "configs/kitti/none.yaml"), overrides(data_root, stages="[student]"))
    res = kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    assert set(res) == {"student"} and not (tmp_path / "teacher").exists()


def test_student_loss_is_ce_on_all_points_plus_kd_on_in_view_rows_without_host_sync():
    from pcseg_kd.distill import DKDPSSM, pssm_config
    from pcseg_kd.distill.dkd_pssm import pssm_dkd_loss
    from pcseg_kd.utils.sync_guard import forbid_host_sync

    g = torch.Generator().manual_seed(0)
    P, K, C = 500, 120, 19
    labels = torch.randint(0, C, (P,), generator=g)
    labels[::9] = 255
    idx = torch.randperm(P, generator=g)[:K]
    batch = {"labels": labels, "img_point_idx": idx}
    s_logits = torch.randn(P, C, generator=g, requires_grad=True)
    t_logits = torch.randn(K, C, generator=g)
    t_logits[::2] = s_logits.detach()[idx[::2]] * 1.5 + 0.01  # rows where PSSM keeps a wrong teacher
    dist = DKDPSSM(ce_weight=0.7, kd_weight=0.3, alpha=1.0, beta=8.0, temperature=2.0, ignore_index=255,
                   pssm={"space": "probs"})
    w = torch.rand(C, generator=g) + 0.5
    seg = SegLoss(ce=1.0, lovasz=0.5, class_weights=w, ignore_index=255)
    with forbid_host_sync():
        losses = student_loss(dist, seg, {"logits": s_logits}, {"logits": t_logits}, "points", "in_view", batch, 1)
        sum(losses.values()).backward()
    valid = labels != 255
    ce = torch.nn.functional.cross_entropy(s_logits.detach()[valid], labels[valid], weight=w)
    lov = lovasz_softmax(s_logits.detach()[valid], labels[valid])
    torch.testing.assert_close(losses["loss_seg"], 0.7 * (ce + 0.5 * lov))
    y_iv = labels[idx]
    rows = pssm_dkd_loss(s_logits.detach()[idx], t_logits, y_iv, 1.0, 8.0, 2.0, "none", 255,
                         pssm_config("reference", space="probs"), backend="reference")
    torch.testing.assert_close(losses["loss_kd"], 0.3 * rows.sum() / (y_iv != 255).sum())
    # gradient of the KD term reaches only the in-view rows
    s2 = s_logits.detach().clone().requires_grad_()
    student_loss(dist, seg, {"logits": s2}, {"logits": t_logits}, "points", "in_view", batch,
                       1)["loss_kd"].backward()
    out_of_view = torch.ones(P, dtype=torch.bool)
    out_of_view[idx] = False
    assert (s2.grad[out_of_view] == 0).all() and s2.grad[idx].abs().sum() > 0


@pytest.mark.parametrize("die_at,resume_at", [(3, (2, 0)), (4, (2, 1))])
def test_killed_run_resumes_to_the_same_weights(data_root, tmp_path, monkeypatch, die_at, resume_at):
    """checkpoint_interval=1, two steps per epoch; the run dies at student step 3 (epoch 2's
    first step, so it resumes at the epoch boundary) or 4 (mid-epoch 2, after the step-3
    checkpoint) and is run again: its final student weights equal, bitwise, those of a run
    that never died."""
    o = overrides(data_root, checkpoint_interval=1)
    cfg = load_kitti_experiment(QUICK, o)
    kitti.run_kitti(cfg, tmp_path / "clean", DistEnv(), progress=False)
    clean = ckpt.load_checkpoint(tmp_path / "clean" / "student" / "final.pt")["model"]

    # the same teacher, so that only the student stage is interrupted
    (tmp_path / "killed" / "teacher").mkdir(parents=True)
    for f in ("final.pt", "last.pt"):
        (tmp_path / "killed" / "teacher" / f).write_bytes((tmp_path / "clean" / "teacher" / f).read_bytes())
    real = kitti_runner.student_loss
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(kitti_runner, "student_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        kitti.run_kitti(cfg, tmp_path / "killed", DistEnv(), progress=False)
    state = ckpt.load_checkpoint(tmp_path / "killed" / "student" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == resume_at
    assert not (tmp_path / "killed" / "student" / "final.pt").exists()
    monkeypatch.setattr(kitti_runner, "student_loss", real)
    kitti.run_kitti(cfg, tmp_path / "killed", DistEnv(), progress=False)
    resumed = ckpt.load_checkpoint(tmp_path / "killed" / "student" / "final.pt")["model"]
    steps = [json.loads(line)["global_step"] for line in
             (tmp_path / "killed" / "student" / "log.jsonl").read_text().splitlines() if '"loss_seg"' in line]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # what the killed run logged past its checkpoint is dropped
    assert clean.keys() == resumed.keys()
    for k in clean:
        torch.testing.assert_close(resumed[k], clean[k], rtol=0, atol=0, msg=k)


def test_killed_during_the_last_validation_resumes_and_finishes(data_root, tmp_path, monkeypatch):
    """Dies inside the student's last validation, after its epoch-end checkpoint: the rerun
    has no epoch left to train, validates, and writes final.pt with the same weights."""
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]"))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    cfg = load_kitti_experiment(QUICK, overrides(data_root))
    real = kitti_hooks.evaluate
    calls = {"n": 0}

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the student's epoch-2 (= last) validation
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(kitti_hooks, "evaluate", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    before = ckpt.load_checkpoint(tmp_path / "student" / "last.pt")
    assert before["epoch"] == 3 and len(before["history"]) == 1  # epoch 1's validation is kept
    monkeypatch.setattr(kitti_hooks, "evaluate", real)
    res = kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    final = ckpt.load_checkpoint(tmp_path / "student" / "final.pt")
    for k, v in before["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=0, atol=0)
    assert res["student"]["all"]["points"] > 0
    history = json.loads((tmp_path / "student" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # the validation redone after the kill is recorded


def test_changed_settings_are_refused_not_mixed(data_root, tmp_path):
    cfg = load_kitti_experiment(QUICK, overrides(data_root))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    # a finished student trained with another distiller setting
    changed = load_kitti_experiment(QUICK, overrides(data_root) + ["distiller.beta=2.0"])
    with pytest.raises(kitti.ResumeMismatch, match=r"student/final.pt was written with different settings \(distiller"):
        kitti.run_kitti(changed, tmp_path, DistEnv(), progress=False)
    # an unfinished stage resumed with more epochs (its LR schedule was planned for 2)
    (tmp_path / "student" / "final.pt").unlink()
    longer = load_kitti_experiment(QUICK, overrides(data_root) + ["student.optim.epochs=3"])
    with pytest.raises(kitti.ResumeMismatch, match=r"student/last.pt .*\(optim changed\)"):
        kitti.run_kitti(longer, tmp_path, DistEnv(), progress=False)
    # the teacher was retrained since: the student's checkpoint no longer matches it
    import shutil
    shutil.rmtree(tmp_path / "teacher")
    other_teacher = load_kitti_experiment(QUICK, overrides(data_root) + ["teacher.optim.lr=0.02"])
    with pytest.raises(kitti.ResumeMismatch, match=r"student/last.pt .*teacher"):
        kitti.run_kitti(other_teacher, tmp_path, DistEnv(), progress=False)


def test_points_without_a_voxel_are_misses_and_images_are_optional(data_root, tmp_path):
    """out_of_range: drop and load_image: false, student-only baseline (full protocol):
    voxel-less points get no loss and are scored as misses of their class (as the official
    tool scores the "unlabeled" written for them); without images only full scans are scored."""
    o = overrides(data_root) + ["protocol=full", "data.train.out_of_range=drop", "data.val.out_of_range=drop",
                                "data.train.load_image=false", "data.val.load_image=false",
                                "data.train.point_range=[-10,-10,-3,10,10,1]", "data.val.point_range=[-10,-10,-3,10,10,1]"]
    cfg = load_kitti_experiment(str(ROOT / "configs/kitti/none.yaml"), o + ["stages=[student]"])
    res = kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)["student"]
    assert set(res) == {"all"}
    from pcseg_kd.registry import DATASETS
    val = DATASETS.build(cfg["data"]["val"])
    with_voxel = sum(int(((s["labels"] != 255) & (s["point2voxel"] >= 0)).sum()) for s in (val[i] for i in range(len(val))))
    everything = sum(int((val[i]["labels"] != 255).sum()) for i in range(len(val)))
    assert with_voxel < everything == res["all"]["points"]


def test_student_ce_ignores_points_without_a_voxel():
    from pcseg_kd.distill import NoKD
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 4, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    valid = torch.rand(50, generator=g) > 0.3
    out = student_loss(NoKD(ignore_index=255), SegLoss(ce=1.0, lovasz=1.0), {"logits": logits, "point_valid": valid},
                             None, "points", "points", {"labels": labels}, 1)
    want = torch.nn.functional.cross_entropy(logits[valid], labels[valid]) + lovasz_softmax(logits[valid], labels[valid])
    torch.testing.assert_close(out["loss_seg"], want)


def test_teacher_checkpoint_takes_a_final_pt_or_a_bare_state_dict(data_root, tmp_path):
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]"))
    kitti.run_kitti(cfg, tmp_path / "t", DistEnv(), progress=False)
    final = ckpt.load_checkpoint(tmp_path / "t" / "teacher" / "final.pt")
    torch.save(final["model"], tmp_path / "bare.pt")
    for path in (tmp_path / "t" / "teacher" / "final.pt", tmp_path / "bare.pt"):
        cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[student]", teacher_checkpoint=path))
        res = kitti.run_kitti(cfg, tmp_path / path.stem, DistEnv(), progress=False)
        assert set(res) == {"student"}
    torch.save({"epoch": 3}, tmp_path / "junk.pt")
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[student]", teacher_checkpoint=tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="junk.pt: neither a pcseg_kd final.pt nor a state_dict"):
        kitti.run_kitti(cfg, tmp_path / "junk", DistEnv(), progress=False)


def test_checkpoint_write_is_atomic_and_bad_files_are_named(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1        # the old checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    path.write_bytes(path.read_bytes()[:20])                # truncated
    with pytest.raises(RuntimeError, match="last.pt cannot be read"):
        ckpt.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


def test_sharded_sampler_partitions_and_resumes():
    batches = {}
    for rank in range(3):
        s = kitti.ShardedBatchSampler(23, 2, True, seed=4, env=DistEnv(rank=rank, world_size=3), drop_last=True)
        s.set_epoch(5)
        batches[rank] = list(s)
        assert len(batches[rank]) == len(s) == 3          # 23 // 3 = 7 per rank -> 3 full batches
        s.set_epoch(5, start=1)
        assert list(s) == batches[rank][1:] and len(s) == 2
    flat = [i for b in batches.values() for batch in b for i in batch]
    assert len(flat) == len(set(flat)) == 18               # disjoint across ranks
    again = kitti.ShardedBatchSampler(23, 2, True, seed=4, env=DistEnv(rank=0, world_size=3), drop_last=True)
    again.set_epoch(6)
    assert list(again) != batches[0]                        # a new epoch, a new order
    val = kitti.ShardedBatchSampler(5, 2, False, seed=0, env=DistEnv(rank=1, world_size=2), drop_last=False)
    assert list(val) == [[1, 3]] and len(val) == 1


def test_experiment_seed_reaches_the_datasets_unless_they_set_their_own():
    cfg = load_kitti_experiment(QUICK, ["seed=7"])
    assert cfg["data"]["train"]["seed"] == cfg["data"]["val"]["seed"] == 7
    cfg = load_kitti_experiment(QUICK, ["seed=7", "data.train.seed=3"])
    assert cfg["data"]["train"]["seed"] == 3


def test_a_moved_teacher_checkpoint_keeps_its_identity(data_root, tmp_path):
    import shutil
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]"))
    kitti.run_kitti(cfg, tmp_path / "t", DistEnv(), progress=False)
    src = tmp_path / "t" / "teacher" / "final.pt"
    dst = tmp_path / "elsewhere" / "teacher.pt"
    dst.parent.mkdir()
    shutil.copy(src, dst)  # new path and mtime, same weights and settings
    a = kitti.teacher_fingerprint({"teacher_checkpoint": str(src)}, tmp_path)
    b = kitti.teacher_fingerprint({"teacher_checkpoint": str(dst)}, tmp_path)
    assert a == b == ckpt.load_checkpoint(src)["fingerprint"]


def test_config_errors_name_the_key_and_source(data_root, tmp_path):
    with pytest.raises(ConfigError, match="student.optim.lrr"):
        load_kitti_experiment(QUICK, ["student.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"command line: stages: must be a non-empty list"):
        load_kitti_experiment(QUICK, ["stages=[teacher,studnet]"])
    with pytest.raises(ConfigError, match="optimizer must be"):
        load_kitti_experiment(QUICK, ["teacher.optim.optimizer=lion"])
    with pytest.raises(ConfigError, match="spunet"):
        load_kitti_experiment(QUICK, ["student.model.channels=[8,8,8]"])
    with pytest.raises(ConfigError, match="command line: eval_interval: must be >= 1"):
        load_kitti_experiment(QUICK, ["eval_interval=0"])
    with pytest.raises(ConfigError, match="checkpoint_interval: must be >= 0"):
        load_kitti_experiment(QUICK, ["checkpoint_interval=-3"])
    with pytest.raises(ConfigError, match=r"teacher.loss_weights: unknown head\(s\) \['point_logit'\]"):
        load_kitti_experiment(QUICK, ["teacher.loss_weights.point_logit=2"])
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[student]"))
    with pytest.raises(FileNotFoundError, match="run the teacher stage first"):
        kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    cfg = load_kitti_experiment(QUICK, overrides(tmp_path / "missing"))
    from pcseg_kd.data.kitti.errors import KittiDataError
    with pytest.raises(KittiDataError, match="missing"):
        kitti.run_kitti(cfg, tmp_path / "w", DistEnv(), progress=False)


def test_cli_generates_the_synthetic_default_and_trains(tmp_path):
    root = tmp_path / "synth"
    out = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), QUICK, "--work-dir", str(tmp_path / "w"),
                          "--no-progress", f"data.train.root={root}", f"data.val.root={root}",
                          "data.synthetic.frames=2", f"student.model={POINT}", "teacher.optim.epochs=1",
                          "student.optim.epochs=1", "teacher.optim.max_steps_per_epoch=1",
                          "student.optim.max_steps_per_epoch=1"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "generating a synthetic SemanticKITTI" in out.stdout
    assert "\r" not in out.stderr  # not a terminal: no progress-bar frames
    assert (root / "sequences" / "00" / "velodyne").is_dir()
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert set(metrics) == {"protocol", "distiller", "teacher", "baseline", "student"}
    assert "vs baseline" in out.stdout.splitlines()[-4]
    assert (tmp_path / "w" / "config.yaml").is_file()


def test_torchrun_two_cpu_processes(data_root, tmp_path):
    """DDP over Gloo with two processes: both ranks train their shard, rank 0 writes; with
    synchronized BatchNorm (its equivalence to one process: tests/test_sync_bn.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools/train.py"), QUICK, "--work-dir", str(tmp_path / "w"), "--no-progress",
           *overrides(data_root, threads=1, sync_bn="true",
                      **{"student.optim.batch_size": 1, "teacher.optim.batch_size": 1}),
           "distiller={_delete_: true, type: fitnet, kd_weight: 0.5}"]  # a distiller with its own parameters, outside DDP
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert set(metrics) == {"protocol", "distiller", "teacher", "student"}
    assert out.stdout.count("final validation") == 1  # only rank 0 reports
    # validation is sharded over the two ranks and summed: every labelled val point once
    from pcseg_kd.registry import DATASETS
    cfg = load_kitti_experiment(QUICK, overrides(data_root))
    val = DATASETS.build(cfg["data"]["val"])
    labelled = sum(int((val[i]["labels"] != 255).sum()) for i in range(len(val)))
    assert metrics["student"]["all"]["points"] == labelled
    final = torch.load(tmp_path / "w" / "student" / "final.pt", weights_only=False)
    assert final["fingerprint"]["sync_bn"] is True
    from pcseg_kd.registry import MODELS
    MODELS.build(final["model_cfg"]).load_state_dict(final["model"])   # a plain-BatchNorm model takes it


def _broadcast_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from pcseg_kd.engine.distributed import broadcast_module
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different regressors on each rank, as a per-rank seed would give
    module = torch.nn.Linear(3, 2)
    module.register_buffer("bank", torch.randn(4))
    broadcast_module(module, DistEnv(rank=rank, world_size=2))
    torch.save(module.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_module_gives_every_rank_rank0_weights(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_broadcast_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    want = torch.nn.Linear(3, 2).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.testing.assert_close(a["weight"], want["weight"], rtol=0, atol=0)


def test_prediction_files_score_like_the_evaluation(data_root, tmp_path):
    """tools/test.py's path: the .label files written for val, read back through the raw
    label map, give the same confusion as the in-memory evaluation."""
    from pcseg_kd.data.kitti.reader import read_label
    from pcseg_kd.engine.kitti.predict import split_dataset_cfg, test_checkpoint
    from pcseg_kd.metrics import SegmentationIoU
    from pcseg_kd.registry import DATASETS

    cfg = load_kitti_experiment(QUICK, overrides(data_root, protocol="full", stages="[teacher,student]"))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    res = test_checkpoint(cfg, tmp_path / "student" / "final.pt", "val", tmp_path / "preds", batch_size=2,
                          progress=False)
    val = DATASETS.build(split_dataset_cfg(cfg, "val"))
    assert res["written"] == len(val) and res["scans"] == len(val)
    metric = SegmentationIoU(19, 255)
    for frame in val.frames:
        seq, name = frame.frame_id.split("/")
        n = frame.scan.stat().st_size // 16
        raw, inst = read_label(tmp_path / "preds" / "sequences" / seq / "predictions" / f"{name}.label", n)
        assert (inst == 0).all()
        pred = torch.as_tensor(val.label_map.to_train(raw, "pred", "error").astype("int64"))
        gt, _ = read_label(frame.label, n)
        metric.update(pred, torch.as_tensor(val.label_map.to_train(gt, frame.label, "error").astype("int64")))
    want = metric.compute()
    assert want["points"] == res["metrics"]["all"]["points"]
    assert want["miou"] == pytest.approx(res["metrics"]["all"]["miou"])
    with pytest.raises(ValueError, match="predicts in-view points only"):
        test_checkpoint(cfg, tmp_path / "teacher" / "final.pt", "val", tmp_path / "tp", progress=False, stage="teacher")
    with pytest.raises(ValueError, match="holds a 'fusion_teacher' model, but --stage student is a 'spunet'"):
        test_checkpoint(cfg, tmp_path / "teacher" / "final.pt", "val", progress=False)
    with pytest.raises(ValueError, match="--batch-size must be a whole number >= 1"):
        test_checkpoint(cfg, tmp_path / "student" / "final.pt", "val", progress=False, batch_size=0)
    other = load_kitti_experiment(QUICK, overrides(data_root, protocol="full", **{"data.val.voxel_size": "[0.1,0.1,0.1]"}))
    with pytest.raises(ValueError, match=r"trained with other input settings \(voxel_size: trained \[0.2, 0.2, 0.2\], now"):
        test_checkpoint(other, tmp_path / "student" / "final.pt", "val", progress=False)
    torch.save(ckpt.load_checkpoint(tmp_path / "student" / "final.pt")["model"], tmp_path / "bare.pt")
    bare = test_checkpoint(cfg, tmp_path / "bare.pt", "val", progress=False)  # built from cfg["student"]["model"]
    assert bare["metrics"]["all"]["miou"] == pytest.approx(res["metrics"]["all"]["miou"])
    with pytest.raises(ValueError, match="no data.val"):
        split_dataset_cfg({**cfg, "data": {**cfg["data"], "val": None}}, "val")
    test_cfg = split_dataset_cfg(cfg, "test")
    assert test_cfg["split"] == "test" and test_cfg["load_labels"] is False and "sequences" not in test_cfg
    with pytest.raises(ValueError, match="split must be"):
        split_dataset_cfg(cfg, "dev")


def test_tensorboard_events_or_a_clear_error(data_root, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'pcseg_kd[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]", tensorboard="true"))
    kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    events = EventAccumulator(str(tmp_path / "teacher" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss_logits", "loss_point_logits", "loss_image_logits", "lr", "val/in_view/miou"} <= tags
    assert [e.step for e in events.Scalars("loss_logits")] == [1, 2]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"tensorboard: tensorboard: true needs the tensorboard package"):
        load_kitti_experiment(QUICK, ["tensorboard=true"])


def test_feature_distillers_get_the_in_view_features():
    """A feature distiller (uses_features) receives the student's features at the in-view
    rows and the teacher's; a logit distiller is not handed any."""
    from pcseg_kd.distill.feature import FitNet, fitnet_loss
    g = torch.Generator().manual_seed(2)
    P, K, C = 200, 50, 19
    labels = torch.randint(0, C, (P,), generator=g)
    idx = torch.randperm(P, generator=g)[:K]
    batch = {"labels": labels, "img_point_idx": idx}
    s_out = {"logits": torch.randn(P, C, generator=g), "feats": torch.randn(P, 6, generator=g)}
    t_out = {"logits": torch.randn(K, C, generator=g), "feats": torch.randn(K, 4, generator=g)}
    fit = FitNet(kd_weight=2.0, ignore_index=255)
    fit.build_modules(6, 4)
    got = student_loss(fit, SegLoss(), s_out, t_out, "points", "in_view", batch, 1)["loss_kd"]
    want = 2.0 * fitnet_loss(fit.regressor(s_out["feats"][idx].unsqueeze(0)).squeeze(0), t_out["feats"])
    torch.testing.assert_close(got, want)

    class Spy(kitti.DISTILLERS.get("kd")):
        def kd_term(self, *a, **extras):
            assert not extras  # no feature gathers for logit distillers
            return super().kd_term(*a)

    assert torch.isfinite(student_loss(Spy(ignore_index=255), SegLoss(), s_out, t_out, "points", "in_view", batch,
                                             1)["loss_kd"])


def test_killed_inside_an_intermediate_validation_redoes_it_on_resume(data_root, tmp_path, monkeypatch):
    """Dies inside the student's epoch-1 validation (after that epoch's checkpoint): the
    rerun validates epoch 1 first, so metrics.json and log.jsonl keep both epochs once each,
    and training continues to bitwise the weights of a run that was never killed."""
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]"))
    kitti.run_kitti(cfg, tmp_path / "clean", DistEnv(), progress=False)
    (tmp_path / "killed" / "teacher").mkdir(parents=True)
    for f in ("final.pt", "last.pt"):
        (tmp_path / "killed" / "teacher" / f).write_bytes((tmp_path / "clean" / "teacher" / f).read_bytes())
    cfg = load_kitti_experiment(QUICK, overrides(data_root, threads=1))
    kitti.run_kitti(cfg, tmp_path / "clean", DistEnv(), progress=False)
    real = kitti_hooks.evaluate

    def dies_first(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(kitti_hooks, "evaluate", dies_first)
    with pytest.raises(KeyboardInterrupt):
        kitti.run_kitti(cfg, tmp_path / "killed", DistEnv(), progress=False)
    assert ckpt.load_checkpoint(tmp_path / "killed" / "student" / "last.pt")["pending_validation"] == 1
    monkeypatch.setattr(kitti_hooks, "evaluate", real)
    kitti.run_kitti(cfg, tmp_path / "killed", DistEnv(), progress=False)
    history = json.loads((tmp_path / "killed" / "student" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "student" / "log.jsonl").read_text().splitlines()
              if '"val"' in line]
    assert logged == [1, 2]
    clean = ckpt.load_checkpoint(tmp_path / "clean" / "student" / "final.pt")["model"]
    resumed = ckpt.load_checkpoint(tmp_path / "killed" / "student" / "final.pt")["model"]
    for k in clean:
        torch.testing.assert_close(resumed[k], clean[k], rtol=0, atol=0, msg=k)


def test_killed_between_final_pt_and_metrics_json_writes_them_on_rerun(data_root, tmp_path, monkeypatch):
    cfg = load_kitti_experiment(QUICK, overrides(data_root, stages="[teacher]"))
    real = kitti_runner.write_stage_metrics

    def dies(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(kitti_runner, "write_stage_metrics", dies)
    with pytest.raises(KeyboardInterrupt):
        kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    assert (tmp_path / "teacher" / "final.pt").is_file() and not (tmp_path / "teacher" / "metrics.json").exists()
    monkeypatch.setattr(kitti_runner, "write_stage_metrics", real)
    res = kitti.run_kitti(cfg, tmp_path, DistEnv(), progress=False)
    saved = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert saved["final"]["in_view"]["miou"] == pytest.approx(res["teacher"]["in_view"]["miou"])
    assert [h["epoch"] for h in saved["history"]] == [1]


def test_a_synthetic_root_generated_under_another_spec_is_refused(tmp_path):
    from pcseg_kd.engine.kitti.data import generate_synthetic_if_missing
    spec = {"sequences": ["00"], "frames": 1, "seed": 0, "render_scale": 0.25, "lidar": {"azimuth_steps": 128}}
    generate_synthetic_if_missing([str(tmp_path)], spec, DistEnv())
    assert json.loads((tmp_path / "synthetic.json").read_text()) == spec
    generate_synthetic_if_missing([str(tmp_path)], spec, DistEnv())  # the same spec: reused as it is
    with pytest.raises(ValueError, match=r"holds a synthetic dataset generated with other settings \(frames differ"):
        generate_synthetic_if_missing([str(tmp_path)], {**spec, "frames": 2}, DistEnv())
