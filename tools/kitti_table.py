#!/usr/bin/env python
"""Run a study: teachers × [image degradation D] × [teacher fit] × methods × seeds on SemanticKITTI.

    python tools/kitti_table.py configs/kitti/table6_quickstart.yaml      # Table 6 on the synthetic default
    python tools/kitti_table.py configs/kitti/table6.yaml [key=value ...] [--work-dir DIR]   # real data
    python tools/kitti_table.py configs/kitti/shift_study.yaml --jobs 2   # the shift study, 2 cells side by side
    python tools/kitti_table.py configs/kitti/shift_study.yaml --cell fusion-d0-oof-dkd_pssm --seed 1
    python tools/kitti_table.py configs/kitti/shift_study.yaml --gather   # tables and plot from finished cells
    python tools/kitti_table.py configs/kitti/table6.yaml --executor slurm slurm.partition=gpu   # on a cluster

Every cell (pcseg_kd/engine/kitti/study.py) is an ordinary tools/train.py work folder plus its
``cell.json``: DIR/teachers/<teacher>[-dD]/, DIR/caches/<cell>/ (the teacher cache its students
read), DIR/students/seedS/<cell>/. Cells go through submitit (``--executor``): ``local`` runs
``--jobs`` processes side by side on this machine (one thread each), ``slurm`` submits each cell
as a job with the config's ``slurm`` settings, ``debug`` runs them in this process (a failure
opens pdb). A killed study resumes cell by cell; ``--cell NAME --seed S`` runs (or, when done,
reads) one cell here and prints its figures. The results: DIR/results.md, results.json,
records.json and study.png (pcseg_kd/engine/kitti/study_report.py).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, import_all, parse_args  # noqa: E402

STUDY_KIND = "semantickitti_study"


def study_options(p):
    p.add_argument("--executor", default="local", choices=("local", "slurm", "debug"),
                   help="where cells run: local processes, SLURM jobs, or in this process (default local)")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells at once (default: 1 locally, every ready cell on SLURM)")
    p.add_argument("--cell", default=None, help="run or read one cell here, e.g. fusion-d0-oof-dkd_pssm")
    p.add_argument("--seed", type=int, default=None, help="the seed of --cell")
    p.add_argument("--gather", action="store_true", help="write the tables from the finished cells")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2",
                   help="run part of the study: teachers, degradations, fits, methods or seeds (repeatable); "
                        "the same cells and folders as in the whole study")


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=study_options)
    from pcseg_kd.data.kitti.errors import KittiDataError
    from pcseg_kd.engine.kitti.study import (cell_lines, cells, cells_to_gather, complete_baseline_cmds, find_cell,
                                             load_study, run_cell, stale_cells, subset)
    from pcseg_kd.engine.kitti.study_report import gather
    from pcseg_kd.engine.kitti.train import ResumeMismatch
    from pcseg_kd.engine.runner import experiment_kind

    import_all()
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    try:
        kind = experiment_kind(args.config, args.overrides)
        if kind != STUDY_KIND:
            raise ConfigError(f"{args.config}: experiment: {kind!r} is not a study config "
                              f"(experiment: semantickitti_study); train one run with tools/train.py")
        study = subset(load_study(args.config, args.overrides), args.only)
        all_cells = cells(study, work_dir)  # every cell's config validated before anything trains
        cell = find_cell(all_cells, args.cell, args.seed) if args.cell else None
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    stale = stale_cells(all_cells)
    if stale:
        raise SystemExit(f"error: {len(stale)} done cells of {work_dir} were run with other settings than the "
                         f"study's now, first: {stale[0]}. Delete their folders to run them again with these "
                         "settings, or use another --work-dir")
    try:
        if cell is not None:
            out = run_cell(cell, all_cells, study, progress=not args.no_progress)
            print("\n".join(cell_lines(out)))
            return 0
        seconds = None
        if not args.gather:
            seconds = run(args, study, all_cells, work_dir)
        todo, left_out = cells_to_gather(all_cells, partial_ok=args.gather)
        if left_out:
            print(f"gathering {len(todo)} of {len(all_cells)} cells; not run, left out: {', '.join(left_out)}",
                  flush=True)
        added = complete_baseline_cmds(todo, study)
        if added:
            print(f"computed {added} output CMDs of no-KD students to teachers trained after them", flush=True)
        gather(study, work_dir, todo, seconds)
    except (KittiDataError, FileNotFoundError, ResumeMismatch, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print((work_dir / "results.md").read_text())
    print(f"wrote {work_dir / 'results.md'}, {work_dir / 'results.json'}, {work_dir / 'study.png'}")
    return 0


def run(args, study, all_cells, work_dir: Path) -> float:
    from pcseg_kd.engine.kitti.study import generate_data
    from pcseg_kd.engine.kitti.study_submit import make_executor, run_cells, submit_with

    generate_data(all_cells)
    jobs = args.jobs or (1 if args.executor != "slurm" else len(all_cells))
    executor = make_executor(args.executor, work_dir / "submitit", study)
    print(f"study: {len(all_cells)} cells, {args.executor} executor, {jobs} at a time", flush=True)
    t0 = time.perf_counter()
    failed = run_cells(all_cells, submit_with(executor, all_cells, study), jobs,
                       log=lambda s: print(s, flush=True))
    if failed:
        raise SystemExit(f"error: {len(failed)} cells failed or could not run (first: {failed[0]}); "
                         "their logs are under " + str(work_dir / "submitit") + "; rerun to retry them")
    return time.perf_counter() - t0


if __name__ == "__main__":
    from pcseg_kd.utils.cli import run_main

    sys.exit(run_main(main))  # expected failures: one 'error: ...' line, exit 1 (traceback with --debug)
