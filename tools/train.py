#!/usr/bin/env python
"""Run one setting (teacher, no-KD baseline, KD student) over all its seeds.

    python tools/train.py configs/sklearn/dkd_pssm.yaml [key=value ...] [--work-dir DIR]

Writes DIR/config.yaml (the resolved config) and DIR/metrics.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.config import ConfigError  # noqa: E402
from pcseg_kd.engine.runner import default_work_dir, load_experiment, parse_args, save_config, write_json  # noqa: E402


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    try:
        cfg = load_experiment(args.config, args.overrides)
    except (ConfigError, KeyError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    from pcseg_kd.engine.toy import run_setting

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    work_dir.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    main()
