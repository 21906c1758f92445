#!/usr/bin/env python
"""Train and score a grid of teachers × distillation methods on SemanticKITTI (Table 6).

    python tools/kitti_table.py configs/kitti/table6_quickstart.yaml      # synthetic, CPU minutes
    python tools/kitti_table.py configs/kitti/table6.yaml [key=value ...] [--work-dir DIR]

Writes, per seed S, DIR/seedS/teachers/<row>/, DIR/seedS/students/<row>-<method>/ and, for the
no-KD column, DIR/seedS/students/<method>/ (each a tools/train.py work folder: config.yaml,
metrics.json, stage folders; rerunning resumes), then DIR/results.json and DIR/results.md (the
table, the paper's numbers in parentheses). Overrides apply to the table config (e.g.
``overrides=[student.optim.epochs=5]``); each cell's ``device`` comes from its experiment config.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, import_all, parse_args  # noqa: E402


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.kitti.table import cell_configs, load_table, run_table

    import_all()
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    try:
        table = load_table(args.config, args.overrides)
        runs = cell_configs(table, work_dir)  # every cell's config validated before anything trains
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    env = init_distributed(runs[0]["cfg"]["device"])
    try:
        try:
            run_table(table, work_dir, env, progress=not args.no_progress, runs=runs)
        except (KittiDataError, FileNotFoundError, ResumeMismatch) as e:
            raise SystemExit(f"error: {e}")
        if env.is_main:
            print((work_dir / "results.md").read_text())
            print(f"wrote {work_dir / 'results.md'}")
    finally:
        cleanup(env)


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
