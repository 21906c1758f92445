#!/usr/bin/env python
"""Draw a SemanticKITTI scan's labels and/or predictions (bird's-eye view + camera overlay).

    python tools/visualize_kitti.py --root data/synthetic_kitti --frame 08/000003
    python tools/visualize_kitti.py --root data/semantic_kitti --frame 08/000100 --predictions preds/ --out f.png
    python tools/visualize_kitti.py --root ... --frame ... --predictions preds/ --open3d   # interactive, optional

    python tools/visualize_kitti.py --work-dir work_dirs/kitti/quickstart --frame 08/000002   # the run's dataset
    python tools/visualize_kitti.py --pair work_dirs/kitti/quickstart --frame 08/000004
    python tools/visualize_kitti.py --pair work_dirs/shift_study/students/seed0/fusion-d1-oof-dkd_pssm --frame 08/000004

``--work-dir WORK``: the dataset root and label map come from WORK/config.yaml, the config
tools/train.py saved (--root and --label-map win). ``--pair WORK`` (a distilled student's work
folder: a tools/train.py folder holding teacher/ and student/, or a shift-study cell whose
config names teacher_checkpoint): PSSM's mask Ω on one frame's in-view points over the image
the teacher sees, beside where the teacher and the student are wrong (the dataset and both
models come from WORK/config.yaml). A validation frame is scored with the run's teacher; a
training frame with the teacher whose targets the student distilled on it: the teacher itself
(in sample) or, with teacher.folds, the fold teacher that never saw the frame (out of fold).
Predictions are the files tools/test.py --predictions writes (raw label ids). The PNG needs
only matplotlib; --open3d needs the optional extra (pip install 'pcseg_kd[vis]').
A bad input file is one ``error: ...`` line naming it (exit status 1); --debug shows the traceback.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcseg_kd.utils.cli import run_main  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="dataset root (holds sequences/)")
    p.add_argument("--work-dir", default=None,
                   help="a tools/train.py output folder (its config.yaml gives --root and --label-map)")
    p.add_argument("--pair", default=None, help="a distilled student's work folder: draw PSSM's Ω for --frame")
    p.add_argument("--frame", required=True, help="SS/NNNNNN, e.g. 08/000003")
    p.add_argument("--predictions", default=None, help="folder with sequences/SS/predictions/NNNNNN.label")
    p.add_argument("--out", default=None, help="PNG to write (default: vis_SS_NNNNNN.png)")
    p.add_argument("--label-map", default=None, help="semantic-kitti.yaml (default: the repository's)")
    p.add_argument("--bev-range", type=float, default=50.0, help="half-width of the bird's-eye view, m")
    p.add_argument("--open3d", action="store_true", help="also open an interactive open3d window")
    args = p.parse_args(argv)
    if args.pair:
        return draw_omega(args)
    if args.work_dir:
        root, label_map = run_dataset(Path(args.work_dir))
        given = [f for f, v in (("--root", args.root), ("--label-map", args.label_map)) if v]
        print(f"config: {Path(args.work_dir) / 'config.yaml'} (the run's own)"
              + (f"; {' and '.join(given)} given, so {'they win' if len(given) > 1 else 'it wins'}" if given else ""))
        args.root = args.root or root
        args.label_map = args.label_map or label_map
    if not args.root:
        p.error("--root is required (or --work-dir, or --pair)")

    from pcseg_kd.data.kitti import LabelMap, lidar_to_image_matrix, read_calib, read_image
    from pcseg_kd.data.kitti.projection import check_image_size
    from pcseg_kd.data.kitti.reader import read_label, read_scan
    from pcseg_kd.vis import open3d_or_reason, render_scan, show_open3d

    try:
        seq, frame = args.frame.split("/")
        seq_dir = Path(args.root) / "sequences" / f"{int(seq):02d}"
    except ValueError:
        raise SystemExit(f"error: --frame must look like 08/000003, got {args.frame!r}")
    lm = LabelMap(args.label_map) if args.label_map else LabelMap()
    points = read_scan(seq_dir / "velodyne" / f"{frame}.bin")
    panels = {}
    label_file = seq_dir / "labels" / f"{frame}.label"
    if label_file.is_file():
        panels["labels"] = lm.to_train(read_label(label_file, len(points))[0], label_file, "ignore")
    if args.predictions:
        pred_file = Path(args.predictions) / "sequences" / f"{int(seq):02d}" / "predictions" / f"{frame}.label"
        panels["prediction"] = lm.to_train(read_label(pred_file, len(points))[0], pred_file, "ignore")
    if not panels:
        raise SystemExit(f"error: {label_file} does not exist and no --predictions were given: nothing to draw")
    image = calib = None
    image_file, calib_file = seq_dir / "image_2" / f"{frame}.png", seq_dir / "calib.txt"
    if image_file.is_file() and calib_file.is_file():
        image = read_image(image_file)
        calib = lidar_to_image_matrix(read_calib(calib_file))
        check_image_size(image_file, image.shape[:2], calib, calib_file)
    else:
        print(f"note: {image_file} or {calib_file} is missing: bird's-eye view only")
    out = Path(args.out or f"vis_{int(seq):02d}_{frame}.png")
    render_scan(points, panels, lm.train_colors_rgb, lm.class_names, out, image, calib, args.bev_range,
                title=f"{args.root} {args.frame}")
    print(f"wrote {out}")
    if args.open3d:
        o3d, why = open3d_or_reason()
        if o3d is None:
            print(f"note: {why}")
        else:
            show_open3d(points, panels.get("prediction", panels.get("labels")), lm.train_colors_rgb, args.frame)


def run_dataset(work_dir: Path):
    """The validation root (else the training root) and label map of the run in ``work_dir``."""
    from pcseg_kd.config import ConfigError
    from pcseg_kd.engine.kitti.run_config import resolve_run_config

    try:
        cfg, _, _ = resolve_run_config(None, [], str(work_dir), "tools/visualize_kitti.py")
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    data = cfg["data"].get("val") or cfg["data"]["train"]
    return data["root"], data.get("label_map_file")


def draw_omega(args):
    import numpy as np
    import torch

    from pcseg_kd.data.kitti.augment import IMAGENET_MEAN, IMAGENET_STD
    from pcseg_kd.data.kitti.collate import collate_kitti
    from pcseg_kd.engine.kitti.diagnostics import frame_omega
    from pcseg_kd.engine.kitti.schema import load_kitti_experiment
    from pcseg_kd.engine.kitti.teacher import load_frozen, teacher_weights_path
    from pcseg_kd.engine.runner import import_all
    from pcseg_kd.losses.pssm import pssm_config
    from pcseg_kd.vis import render_omega

    import_all()
    cell = Path(args.pair)
    cfg_file, student_file = cell / "config.yaml", cell / "student" / "final.pt"
    for f in (cfg_file, student_file):
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist: --pair must be a trained student's work folder")
    cfg = load_kitti_experiment(str(cfg_file))
    # a tools/train.py folder holds its own teacher; a shift-study cell names another folder's
    teacher_file = teacher_weights_path(cfg, cell)
    if not teacher_file.is_file():
        raise SystemExit(f"error: {teacher_file} does not exist: --pair needs a distilled student's work folder "
                         f"with its teacher (teacher/final.pt there, or teacher_checkpoint in {cfg_file})")
    pssm = dict(cfg["distiller"].get("pssm") or {"preset": "reference", "space": "probs"})
    pssm_cfg = pssm_config(pssm.pop("preset", "reference"), **pssm)
    ds, index, teacher_file, which = pair_frame(cfg, cell, args, teacher_file)
    want = args.frame.replace("/", "_")
    device = torch.device("cpu")
    student = load_frozen(student_file, cfg["student"]["model"], device, "student.model")
    teacher = load_frozen(teacher_file, cfg["teacher"]["model"], device, "teacher.model")
    batch = collate_kitti([ds[index]])
    out = frame_omega(student, teacher, batch, pssm_cfg, ds.ignore_index)
    image = batch["images"][0].permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    png = Path(args.out or f"omega_{cell.name}_{want}.png")
    render_omega(image, batch["img_pixel_vu"].numpy(), out["omega"].numpy(), out["labels"].numpy(),
                 out["teacher_pred"].numpy(), out["student_pred"].numpy(), png,
                 title=f"{cell.name} ({cell.parent.name}), frame {args.frame}, {which}", ignore_index=ds.ignore_index)
    print(f"wrote {png} ({which})")
    return 0


def pair_frame(cfg, cell: Path, args, teacher_file: Path):
    """(dataset, index of --frame, the teacher whose targets that frame was distilled from, its
    description). A validation frame: the run's teacher. A training frame: the targets the
    student was distilled towards on it: the teacher's own (in sample) or, with
    ``teacher.folds``, the fold teacher that never saw the frame (out of fold)."""
    from pcseg_kd.data.kitti.folds import fold_assignment
    from pcseg_kd.engine.kitti.export import export_dataset_cfg
    from pcseg_kd.engine.kitti.teacher import fold_teacher_paths
    from pcseg_kd.registry import DATASETS

    want = args.frame.replace("/", "_")
    root = {"root": args.root} if args.root else {}
    val = DATASETS.build({**cfg["data"]["val"], **root, "frame_stride": 1, "max_frames": None})
    ids = [f.frame_id.replace("/", "_") for f in val.frames]
    if want in ids:
        return val, ids.index(want), teacher_file, "validation frame, the teacher"
    train = DATASETS.build({**export_dataset_cfg(cfg), **root})
    ids = [f.frame_id.replace("/", "_") for f in train.frames]
    if want not in ids:
        raise SystemExit(f"error: --frame {args.frame} is neither a validation nor a training frame of "
                         f"{cfg['data']['val'].get('root')} (e.g. {', '.join(f.frame_id for f in val.frames[:3])})")
    index = ids.index(want)
    folds = fold_teacher_paths(cfg, cell)
    if not folds:
        return train, index, teacher_file, "training frame, in-sample teacher"
    k = fold_assignment(cfg, train.frames)[index]
    if not folds[k].is_file():
        raise SystemExit(f"error: {folds[k]} does not exist: the fold teacher of training frame {args.frame}")
    return train, index, folds[k], f"training frame, out-of-fold teacher {k}"


if __name__ == "__main__":
    sys.exit(run_main(main))
