#!/usr/bin/env python
"""Train and score a grid of teachers × distillation methods on SemanticKITTI (Table 6).

    python tools/kitti_table.py configs/kitti/table6_quickstart.yaml      # synthetic, CPU minutes
    python tools/kitti_table.py configs/kitti/table6.yaml [key=value ...] [--work-dir DIR]

Writes, per seed S, DIR/seedS/teachers/<row>/, DIR/seedS/students/<row>-<method>/ and, for the
no-KD column, DIR/seedS/students/<method>/ (each a tools/train.py work folder: config.yaml,
metrics.json, stage folders; rerunning resumes), then DIR/results.json and DIR/results.md (the
table, the paper's numbers in parentheses). Overrides apply to the table config (e.g.
``overrides=[student.optim.epochs=5]``); each cell's ``device`` comes from its experiment config.

A shift-study config (``experiment: semantickitti_shift_study``, configs/kitti/shift_study.yaml)
adds the image-degradation axis and the SSDH diagnostics (pcseg_kd/engine/kitti/shift_study.py):

    python tools/kitti_table.py configs/kitti/shift_study.yaml --jobs 2     # the grid, resumable
    python tools/kitti_table.py configs/kitti/shift_study.yaml --cell fusion-d0.5-dkd_pssm --seed 1
    python tools/kitti_table.py configs/kitti/shift_study.yaml --gather     # tables and plot from what is done

``--cell`` runs (or, when done, reads) one cell and prints its figures; ``--jobs N`` runs N
cells side by side, one process and one thread each.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, import_all, parse_args  # noqa: E402


def study_options(p):
    p.add_argument("--jobs", type=int, default=1, help="shift study: cells run side by side (one thread each)")
    p.add_argument("--cell", default=None, help="shift study: run or read one cell, e.g. fusion-d0.5-dkd_pssm")
    p.add_argument("--seed", type=int, default=None, help="shift study: the seed of --cell")
    p.add_argument("--gather", action="store_true", help="shift study: write the tables from the finished cells")


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=study_options)
    from pcseg_kd.engine.runner import experiment_kind

    import_all()
    try:
        kind = experiment_kind(args.config, args.overrides)
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    if kind == "semantickitti_shift_study":
        return shift_study(args)
    if args.cell or args.gather or args.jobs != 1 or args.seed is not None:
        raise SystemExit("error: --jobs, --cell, --seed and --gather are options of a shift-study config "
                         "(experiment: semantickitti_shift_study)")
    return table(args)


def shift_study(args):
    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.kitti.shift_study import cell_lines, cells, find_cell, gather, load_study, run_cell, run_study
    from pcseg_kd.engine.kitti.train import ResumeMismatch

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    try:
        study = load_study(args.config, args.overrides)
        all_cells = cells(study, work_dir)  # every cell's config validated before anything trains
        cell = find_cell(all_cells, args.cell, args.seed) if args.cell else None
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    try:
        if cell is not None:
            out = run_cell(cell, all_cells, study, progress=not args.no_progress)
            print("\n".join(cell_lines(out)))
            return 0
        if args.gather:
            missing = [c for c in all_cells if not (c["dir"] / "cell.json").is_file()]
            if missing:
                raise SystemExit(f"error: {len(missing)} of {len(all_cells)} cells are not done (first: "
                                 f"{missing[0]['name']} seed {missing[0]['seed']}); run the study first")
            gather(study, work_dir, all_cells)
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), args.config, *args.overrides,
                    "--work-dir", str(work_dir), "--no-progress"]
            run_study(study, work_dir, args.jobs, argv, all_cells)
    except (KittiDataError, FileNotFoundError, ResumeMismatch, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    print((work_dir / "results.md").read_text())
    print(f"wrote {work_dir / 'results.md'}, {work_dir / 'results.json'}, {work_dir / 'shift_study.png'}")
    return 0


def table(args):
    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.distributed import cleanup, init_distributed
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.kitti.table import cell_configs, load_table, run_table

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
