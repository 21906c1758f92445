#!/usr/bin/env python
"""Draw a SemanticKITTI scan's labels and/or predictions (bird's-eye view + camera overlay).

    python tools/visualize_kitti.py --root data/synthetic_kitti --frame 08/000003
    python tools/visualize_kitti.py --root data/semantic_kitti --frame 08/000100 --predictions preds/ --out f.png
    python tools/visualize_kitti.py --root ... --frame ... --predictions preds/ --open3d   # interactive, optional

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
    p.add_argument("--root", required=True, help="dataset root (holds sequences/)")
    p.add_argument("--frame", required=True, help="SS/NNNNNN, e.g. 08/000003")
    p.add_argument("--predictions", default=None, help="folder with sequences/SS/predictions/NNNNNN.label")
    p.add_argument("--out", default=None, help="PNG to write (default: vis_SS_NNNNNN.png)")
    p.add_argument("--label-map", default=None, help="semantic-kitti.yaml (default: the repository's)")
    p.add_argument("--bev-range", type=float, default=50.0, help="half-width of the bird's-eye view, m")
    p.add_argument("--open3d", action="store_true", help="also open an interactive open3d window")
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(run_main(main))
