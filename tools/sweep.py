#!/usr/bin/env python
"""Run a grid of shift level x method and write the paper-style tables and plot.

    python tools/sweep.py configs/gauss/sweep_table8.yaml [key=value ...] [--work-dir DIR]

Writes DIR/results.json, DIR/results.md (Markdown tables in the layout of the paper's
Tables 2 and 8), DIR/accuracy_vs_cmd.png, and one file per finished cell in DIR/cells/
(a killed sweep resumes from them; --force recomputes). A failure is one ``error: ...``
line (exit status 1); --debug shows the traceback.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.engine.runner import default_work_dir, parse_args  # noqa: E402
from pcseg_kd.utils.cli import EXPECTED_ERRORS, run_main  # noqa: E402


def main(argv=None):
    args = parse_args("Run a sweep of shift level x method", argv)
    from pcseg_kd.engine.toy.sweep import run_sweep

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    summary = run_sweep(args.config, args.overrides, work_dir, progress=not args.no_progress, force=args.force)
    print((work_dir / "results.md").read_text())
    print(f"wrote {work_dir / 'results.json'}, {work_dir / 'results.md'}, {work_dir / 'accuracy_vs_cmd.png'}")
    return summary


if __name__ == "__main__":
    # KeyError / TypeError: a config's value of the wrong kind that reaches the sweep's code
    sys.exit(run_main(main, expected=EXPECTED_ERRORS + (KeyError, TypeError)))
