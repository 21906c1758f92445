#!/usr/bin/env python
"""Train what a config describes.

    python tools/train.py configs/kitti/quickstart.yaml              # SemanticKITTI, synthetic default
    python tools/train.py configs/kitti_fusion_pssm.yaml [key=value ...] [--work-dir DIR]
    torchrun --nproc_per_node=8 tools/train.py configs/kitti_fusion_pssm.yaml
    python tools/train.py configs/sklearn/dkd_pssm.yaml              # a small task: all its seeds

SemanticKITTI (``experiment: semantickitti``): runs the stages (teacher, then the distilled
student) into DIR/<stage>/ (checkpoints, log.jsonl, metrics.json); rerunning resumes a
killed stage and skips finished ones. Small tasks: teacher, no-KD baseline and KD student
for every seed. Both write DIR/config.yaml (the resolved config) and DIR/metrics.json.
"""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.kitti.schema import load_kitti_experiment  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, experiment_kind, parse_args, save_config, write_json  # noqa: E402
from pcseg_kd.engine.toy.schema import load_experiment  # noqa: E402
from pcseg_kd.utils.lock import work_dir_lock  # noqa: E402


def load_or_exit(loader, args):
    """A bad config ends the run with one clear message (key, file), not a traceback."""
    try:
        return loader(args.config, args.overrides)
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


def run_kitti(args):
    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.kitti.train import run_kitti as run

    cfg = load_or_exit(load_kitti_experiment, args)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    env = init_distributed(cfg["device"])
    try:
        try:
            with (work_dir_lock(work_dir) if env.is_main else contextlib.nullcontext()):
                if env.is_main:
                    save_config(cfg, work_dir / "config.yaml")
                results = run(cfg, work_dir, env, progress=not args.no_progress)
        except (KittiDataError, FileNotFoundError, ResumeMismatch) as e:
            raise SystemExit(f"error: {e}")
        if env.is_main and (work_dir / "metrics.json").is_file():
            print(f"wrote {work_dir / 'metrics.json'} (per-stage details: {work_dir}/<stage>/metrics.json)")
        return results
    finally:
        cleanup(env)


def run_toy(args):
    cfg = load_or_exit(load_experiment, args)
    from pcseg_kd.engine.toy.train import run_setting

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    with work_dir_lock(work_dir):
        save_config(cfg, work_dir / "config.yaml")
        result = run_setting(cfg, progress=not args.no_progress)
        m = result["metrics"]
        write_json(work_dir / "metrics.json", m)
    print(f"{cfg.get('name') or args.config}: teacher {m['teacher_acc_mean']:.2f} | no-KD {m['baseline_acc_mean']:.2f} | "
          f"student {m['student_acc_mean']:.2f} ± {m['student_acc_std']:.2f} | "
          f"Δ {m['delta_mean']:+.2f} ± {m['delta_std']:.2f} | input CMD {m['input_cmd']:.2f} | "
          f"output CMD {m['output_cmd']:.3f} | {m['n_seeds']} seeds, {m['seconds']:.1f}s")
    print(f"wrote {work_dir / 'metrics.json'}")
    return m


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    kind = load_or_exit(experiment_kind, args)
    return run_kitti(args) if kind == "semantickitti" else run_toy(args)


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
