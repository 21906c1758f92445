"""The trainer's pin: a short quickstart-scale run (quickstart widths, tiny data, threads 1)
whose final weights are recorded in ``tests/golden/trainer_pin.json``. The runner/hook split
of the trainer was checked against it bit for bit; ``python tests/trainer_pin.py OUT.json``
writes the figures of the checkout it runs in."""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GOLDEN = ROOT / "tests" / "golden" / "trainer_pin.json"
STAGES = ("teacher", "baseline", "student", "student_cache")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weights_figures(state_dict):
    """sha256 over every tensor's bytes (name order) and each tensor's float64 sum of |w|."""
    import torch
    h = hashlib.sha256()
    sums = {}
    for name, t in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if t.is_floating_point():
            sums[name] = float(t.detach().double().abs().sum())
    return {"sha256": h.hexdigest(), "abs_sums": sums}


def pinned_run(tmp: Path):
    """Train teacher, baseline and (online) PSSM student, then a second student from the
    teacher cache; return {stage: weights figures, plus the final in-view mIoU}."""
    import torch
    from pcseg_kd.data.kitti.testing import tiny_synthetic
    from pcseg_kd.engine.checkpoint import load_checkpoint
    from pcseg_kd.engine.distributed import DistEnv
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.kitti.train import run_kitti
    from kitti_common import QUICK

    root = tiny_synthetic(tmp / "data", sequences=("00", "08"), frames=6, seed=3)
    common = [f"data.train.root={root}", f"data.val.root={root}", "data.synthetic=null",
              "data.train.sequences=[00]", "data.val.sequences=[08]", "data.val.frame_stride=1",
              "data.num_workers=0", "teacher.optim.epochs=2", "student.optim.epochs=3",
              "teacher.optim.max_steps_per_epoch=3", "student.optim.max_steps_per_epoch=3",
              "teacher.optim.batch_size=2", "student.optim.batch_size=2",
              "log_interval=1", "eval_interval=2", "checkpoint_interval=2", "distiller.warmup_epochs=1",
              "threads=1"]
    env = DistEnv()
    out = {}
    cfg = load_kitti_experiment(QUICK, common + ["stages=[teacher,baseline,student]", "distiller.teacher_source=online"])
    run_kitti(cfg, tmp / "online", env, progress=False)
    cfg = load_kitti_experiment(QUICK, common + ["stages=[student]", f"teacher_checkpoint={tmp / 'online/teacher/final.pt'}",
                                                 "distiller.teacher_source=cache"])
    run_kitti(cfg, tmp / "cache", env, progress=False)
    for stage, path in (("teacher", "online/teacher"), ("baseline", "online/baseline"),
                        ("student", "online/student"), ("student_cache", "cache/student")):
        state = load_checkpoint(tmp / path / "final.pt")
        fig = weights_figures(state["model"])
        fig["miou_in_view"] = state["metrics"]["in_view"]["miou"]
        out[stage] = fig
    torch.set_num_threads(1)
    return {"cpu": cpu_model(), "torch": torch.__version__, "stages": out}


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        res = pinned_run(Path(d))
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v["sha256"][:16] + f" {v['miou_in_view']:.4f}" for k, v in res["stages"].items()}, indent=1))
