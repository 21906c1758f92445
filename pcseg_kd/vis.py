"""Pictures of a scan: labels and predictions from above, and projected into the camera.

matplotlib renders everything to PNG (headless machines included). open3d, an optional extra
(``pip install 'pcseg_kd[vis]'``; it needs the system's ``libusb-1.0-0``), adds an interactive
3D viewer; when it cannot be imported the caller is told why and the PNG path still works.
Colours are the official ``color_map`` of ``semantic-kitti.yaml``; grey points are those
without a class: unlabelled / ignored in the labels, raw 0 ("not predicted") in a prediction
file (the points outside the camera's view under the ``fov`` protocol, or without a voxel).
Every picture's legend says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

GREY = np.array([0.6, 0.6, 0.6])


def class_colours(train_ids: np.ndarray, colors_rgb: np.ndarray) -> np.ndarray:
    """(N,) train ids (anything outside 0..C-1, e.g. 255, is grey) -> (N, 3) floats in [0, 1]."""
    ids = np.asarray(train_ids).astype(np.int64)
    out = np.tile(GREY, (len(ids), 1))
    ok = (ids >= 0) & (ids < len(colors_rgb))
    out[ok] = colors_rgb[ids[ok]] / 255.0
    return out


def render_scan(points: np.ndarray, panels: Dict[str, np.ndarray], colors_rgb: np.ndarray,
                class_names: Sequence[str], out: Path, image: Optional[np.ndarray] = None,
                lidar_to_image: Optional[np.ndarray] = None, bev_range: float = 50.0,
                title: str = "", dpi: int = 110) -> Path:
    """One row per panel (e.g. ``{"labels": ..., "prediction": ...}``): a bird's-eye view of
    the scan coloured by class and, with ``image`` and ``lidar_to_image``, the in-view points
    drawn over the camera image. Writes ``out`` (PNG) and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .data.kitti.projection import project_to_image

    if not panels:
        raise ValueError("render_scan: nothing to draw (no labels and no predictions)")
    for name, ids in panels.items():
        if len(ids) != len(points):
            raise ValueError(f"render_scan: {name} has {len(ids)} entries for {len(points)} points")
    proj = None
    if image is not None and lidar_to_image is not None:
        proj = project_to_image(points[:, :3], lidar_to_image, image.shape[:2])
    cols = 2 if proj is not None else 1
    fig, axes = plt.subplots(len(panels), cols, figsize=(6 * cols + (6 if cols == 2 else 0), 5.5 * len(panels)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 2] if cols == 2 else [1]})
    near = (np.abs(points[:, 0]) < bev_range) & (np.abs(points[:, 1]) < bev_range)
    for row, (name, ids) in enumerate(panels.items()):
        colours = class_colours(ids, colors_rgb)
        ax = axes[row, 0]
        ax.scatter(points[near, 0], points[near, 1], c=colours[near], s=0.5, linewidths=0)
        ax.set_aspect("equal")
        ax.set_xlim(-bev_range, bev_range)
        ax.set_ylim(-bev_range, bev_range)
        ax.set_title(f"{name}: bird's-eye view (x forward, m)")
        if proj is not None:
            ax = axes[row, 1]
            ax.imshow(image)
            iv = proj.in_view
            ax.scatter(proj.uv[iv, 0], proj.uv[iv, 1], c=colours[iv], s=3, linewidths=0)
            ax.set_xlim(0, image.shape[1])
            ax.set_ylim(image.shape[0], 0)
            ax.set_axis_off()
            ax.set_title(f"{name}: {int(iv.sum())} points in the camera's view")
    present = sorted({int(i) for ids in panels.values() for i in np.unique(ids) if 0 <= i < len(class_names)})
    handles = [Patch(color=colors_rgb[i] / 255.0, label=class_names[i]) for i in present]
    grey = grey_meaning(panels, len(class_names))
    if grey:
        handles.append(Patch(color=GREY, label=grey))
    ncol = max(min(len(handles), 7 if cols == 2 else 3), 1)  # a one-column figure is narrow
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, min(0.02 + 0.12 * rows / (5.5 * len(panels)) * 1.6, 0.3), 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def grey_meaning(panels: Dict[str, np.ndarray], num_classes: int) -> str:
    """The legend entry of the grey points of ``panels`` ("" when there are none): unlabelled in
    a ``labels`` panel, not predicted (raw 0) in any other."""
    parts = []
    for name, ids in panels.items():
        ids = np.asarray(ids)
        if ((ids < 0) | (ids >= num_classes)).any():
            parts.append(f"unlabelled ({name})" if name == "labels" else f"not predicted, raw 0 ({name})")
    return "grey: " + "; ".join(dict.fromkeys(parts)) if parts else ""


#: the legend entry of the grey points of :func:`render_omega`
OMEGA_GREY = "grey: unlabelled, or no student voxel (no Ω)"


def open3d_or_reason() -> Tuple[Optional[object], str]:
    """(the open3d module, "") or (None, why it is unavailable and how to get it)."""
    try:
        import open3d  # noqa: F401
        return open3d, ""
    except ImportError as e:
        hint = (" (open3d needs the system library libusb-1.0: apt-get install libusb-1.0-0)"
                if "libusb" in str(e) else "")
        return None, (f"open3d is not available ({e}){hint}; install it with pip install 'pcseg_kd[vis]'. "
                      "The PNG rendering does not need it.")


def show_open3d(points: np.ndarray, train_ids: np.ndarray, colors_rgb: np.ndarray, title: str = "") -> None:
    o3d, why = open3d_or_reason()
    if o3d is None:
        raise RuntimeError(why)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(class_colours(train_ids, colors_rgb))
    o3d.visualization.draw_geometries([cloud], window_name=title or "pcseg_kd")


def plot_learning_curves(histories: Dict[str, list], out: "Path | str", title: str = "") -> Path:
    """Validation mIoU against epoch for each stage (``{stage: metrics.json history}``): the
    in-view points for every stage (the rows teacher and students share) and, dashed, a
    student's own rows where they differ. Written as a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    colours = {"teacher": "tab:green", "baseline": "tab:gray", "student": "tab:blue"}
    others = iter(["tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    colours.update({stage: next(others, None) for stage in histories if stage not in colours})
    for stage, history in histories.items():
        rows = [h for h in history if "val" in h]
        for key, style in (("in_view", "-"), ("all", "--")):
            pts = [(h["epoch"], h["val"][key]["miou"]) for h in rows if key in h["val"]]
            if not pts or (key == "all" and all(h["val"].get("all") == h["val"].get("in_view") for h in rows)):
                continue
            ax.plot(*zip(*pts), style, marker="o", ms=3, color=colours.get(stage), label=f"{stage} ({key.replace('_', ' ')})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


OMEGA_COLOURS = {"Ω = 1": (0.10, 0.75, 0.20), "0 < Ω < 1": (1.00, 0.80, 0.00), "Ω = 0": (0.90, 0.10, 0.10)}


def render_omega(image01: np.ndarray, pixel_vu: np.ndarray, omega: np.ndarray, labels: np.ndarray,
                 teacher_pred: np.ndarray, student_pred: np.ndarray, out: "Path | str", title: str = "",
                 ignore_index: int = 255, point_size: float = 2.0) -> Path:
    """Three camera views of one frame's in-view points: PSSM's Ω (1 / in between / 0), where
    the teacher is wrong and where the student is wrong (red; right: green; unlabelled:
    grey). ``image01``: (H, W, 3) in [0, 1]; ``pixel_vu``: (N, 2) row, column in that image.
    Where PSSM switches the teacher off should be where the teacher misleads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labelled = labels != ignore_index
    om = np.asarray(omega, np.float64)
    kind = np.where(om >= 1.0, 0, np.where(om > 0.0, 1, 2))
    omega_rgb = np.array(list(OMEGA_COLOURS.values()))[kind]
    omega_rgb[~labelled | np.isnan(om)] = GREY

    def right_wrong(pred):
        rgb = np.tile(np.array(OMEGA_COLOURS["Ω = 1"]), (len(pred), 1))
        rgb[pred != labels] = OMEGA_COLOURS["Ω = 0"]
        rgb[~labelled] = GREY
        return rgb

    n = max(int(labelled.sum()), 1)
    shares = {k: 100.0 * float(((kind == i) & labelled & ~np.isnan(om)).sum()) / n for i, k in enumerate(OMEGA_COLOURS)}
    t_wrong = (teacher_pred != labels) & labelled
    s_wrong = (student_pred != labels) & labelled
    off = (kind == 2) & labelled
    panels = [
        ("PSSM mask Ω: " + ", ".join(f"{k} {v:.0f} %" for k, v in shares.items()), omega_rgb),
        (f"teacher wrong (red): {100 * t_wrong.sum() / n:.0f} %, of which PSSM switches off (Ω = 0) "
         f"{100 * (t_wrong & off).sum() / max(t_wrong.sum(), 1):.0f} %", right_wrong(teacher_pred)),
        (f"student wrong (red; right: green; grey: unlabelled): {100 * s_wrong.sum() / n:.0f} %",
         right_wrong(student_pred)),
    ]
    h, w = image01.shape[:2]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels) * h / max(w, 1) * 3.3 + 0.6),
                             squeeze=False)
    for ax, (name, rgb) in zip(axes[:, 0], panels):
        ax.imshow(np.clip(image01, 0, 1))
        ax.scatter(pixel_vu[:, 1], pixel_vu[:, 0], c=rgb, s=point_size, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    axes[0, 0].legend(handles=[Patch(color=c, label=k) for k, c in OMEGA_COLOURS.items()]
                      + [Patch(color=GREY, label=OMEGA_GREY)], loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
