"""Per-class IoU table of one or several row sets, as the 2DPASS / Pointcept / mmdet3d logs print it.

``metrics`` is what :func:`pcseg_kd.engine.kitti.evaluate.evaluate` returns (``{"in_view": {...},
"all": {...}}``, each with ``iou`` per class, ``miou``, ``miou_present``, ``points``) or one such
row-set dict. A class absent from both the labels and the predictions has IoU NaN
(:func:`pcseg_kd.metrics.miou.iou_from_confusion`); it is shown as ``n/a`` and counted 0 in
``miou`` (the semantic-kitti-api convention) and left out of ``miou_present``. The footer says
both, with the class counts, so that a low mIoU on a validation set missing some classes
explains itself ("35.90 over 19 classes; 43.20 over the 14 present").
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

NA = "n/a"


def _is_row_set(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("iou"), Mapping)


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_sets(metrics: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """The row sets of ``metrics`` in their order; a single row-set dict becomes ``{"iou": it}``.
    Entries that are not row sets (a skipped-frames list, a scan count) are left out."""
    if _is_row_set(metrics):
        return {"iou": metrics}
    return {k: v for k, v in metrics.items() if _is_row_set(v)}


def present_summary(row_set: Mapping[str, Any], class_names: Sequence[str]) -> Dict[str, Any]:
    """``miou`` over all classes, ``miou_present`` over the classes with an IoU, and both counts.
    Recomputed from ``iou`` when the dict lacks a key (train.py's summary keeps only ``miou``)."""
    ious = [row_set["iou"].get(name) for name in class_names]
    present = [float(v) for v in ious if not _absent(v)]
    miou = row_set.get("miou")
    if miou is None:
        miou = sum(present) / len(class_names) if class_names else float("nan")
    miou_present = row_set.get("miou_present")
    if miou_present is None:
        miou_present = sum(present) / len(present) if present else float("nan")
    return {"miou": float(miou), "miou_present": float(miou_present), "classes": len(class_names),
            "present": len(present)}


def summary_line(name: str, row_set: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """``in_view: mIoU 35.90 over 19 classes; 43.20 over the 14 present``."""
    s = present_summary(row_set, class_names)
    line = f"{name}: mIoU {s['miou']:.2f} over {s['classes']} classes"
    if s["present"] < s["classes"]:
        line += f"; {s['miou_present']:.2f} over the {s['present']} present" if s["present"] else "; no class present"
    return line


def iou_table(metrics: Mapping[str, Any], class_names: Optional[List[str]] = None) -> str:
    """One row per class, one column per row set (IoU in %, ``n/a`` for a class absent from
    labels and predictions), then mIoU over all classes, mIoU over the present ones, the number of
    present classes and of scored points; ends with one summary line per row set."""
    sets = row_sets(metrics)
    if not sets:
        raise ValueError("iou_table: no row set with per-class 'iou' in the metrics "
                         f"(keys: {sorted(metrics)})")
    if class_names is None:  # the order the metric wrote them in
        class_names = list(next(iter(sets.values()))["iou"])
    class_names = list(class_names)
    summaries = {k: present_summary(v, class_names) for k, v in sets.items()}

    rows: List[List[str]] = [["class"] + list(sets)]
    for name in class_names:
        cells = []
        for v in sets.values():
            x = v["iou"].get(name)
            cells.append(NA if _absent(x) else f"{float(x):.2f}")
        rows.append([name] + cells)
    footer = [
        [f"mIoU ({len(class_names)} classes)"] + [f"{s['miou']:.2f}" for s in summaries.values()],
        ["mIoU (present)"] + [NA if math.isnan(s["miou_present"]) else f"{s['miou_present']:.2f}"
                              for s in summaries.values()],
        ["present classes"] + [str(s["present"]) for s in summaries.values()],
    ]
    if all("points" in v for v in sets.values()):
        footer.append(["points"] + [str(int(v["points"])) for v in sets.values()])
    first = max(len(r[0]) for r in rows + footer)
    widths = [max(8, max(len(r[i + 1]) for r in rows + footer)) for i in range(len(sets))]

    def fmt(r: List[str]) -> str:
        return "  ".join([r[0].ljust(first)] + [c.rjust(w) for c, w in zip(r[1:], widths)])

    rule = "-" * len(fmt(rows[0]))
    lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:]] + [rule] + [fmt(r) for r in footer]
    lines += [summary_line(k, v, class_names) for k, v in sets.items()]
    if any(s["present"] < s["classes"] for s in summaries.values()):
        lines.append(f"{NA}: a class in neither the labels nor the predictions (counted 0 in mIoU over all "
                     "classes, as semantic-kitti-api does; left out of mIoU over the present ones)")
    return "\n".join(lines)
