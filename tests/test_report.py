"""pcseg_kd.metrics.report.iou_table against hand-computed IoUs."""
import math

import pytest
import torch

from pcseg_kd.metrics.miou import SegmentationIoU
from pcseg_kd.metrics.report import iou_table, present_summary, summary_line

NAMES = ["car", "road", "person", "pole"]


def _metrics():
    # labels / predictions chosen so each IoU is easy by hand:
    # car: tp 2, fn 1 (one car predicted road), fp 0 -> 2/3; road: tp 3, fp 1 -> 3/4;
    # person: absent from labels and predictions -> n/a; pole: labelled once, predicted as car -> tp 0,
    # and car gets the fp: car = 2 / (2 + 1 + 1) = 1/2
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 3])
    pred = torch.tensor([0, 0, 1, 1, 1, 1, 0])
    m = SegmentationIoU(4, 255, NAMES)
    m.update(pred, labels)
    all_rows = m.compute()
    m2 = SegmentationIoU(4, 255, NAMES)
    m2.update(pred[:6], labels[:6])  # no pole: two classes absent
    return {"in_view": m2.compute(), "all": all_rows}


def _row(table, name):
    return [line for line in table.splitlines() if line.split("  ")[0].strip() == name][0].split()


def test_per_class_cells_match_hand_values():
    table = iou_table(_metrics(), NAMES)
    header = table.splitlines()[0].split()
    assert header == ["class", "in_view", "all"]
    assert _row(table, "car") == ["car", f"{100 * 2 / 3:.2f}", "50.00"]
    assert _row(table, "road") == ["road", "75.00", "75.00"]
    assert _row(table, "person") == ["person", "n/a", "n/a"]
    assert _row(table, "pole") == ["pole", "n/a", "0.00"]  # labelled, never hit: 0, not n/a


def test_footer_mious_and_present_counts():
    table = iou_table(_metrics(), NAMES)
    miou_all = (50 + 75 + 0 + 0) / 4
    present_all = (50 + 75 + 0) / 3
    miou_iv = (200 / 3 + 75) / 4
    present_iv = (200 / 3 + 75) / 2
    assert _row(table, "mIoU (4 classes)")[-2:] == [f"{miou_iv:.2f}", f"{miou_all:.2f}"]
    assert _row(table, "mIoU (present)")[-2:] == [f"{present_iv:.2f}", f"{present_all:.2f}"]
    assert _row(table, "present classes")[-2:] == ["2", "3"]
    assert _row(table, "points")[-2:] == ["6", "7"]
    assert f"all: mIoU {miou_all:.2f} over 4 classes; {present_all:.2f} over the 3 present" in table
    assert f"in_view: mIoU {miou_iv:.2f} over 4 classes; {present_iv:.2f} over the 2 present" in table


def test_single_row_set_and_missing_keys_recomputed():
    metrics = _metrics()["all"]
    slim = {"miou": metrics["miou"], "iou": metrics["iou"]}  # train.py's summary keeps no miou_present
    s = present_summary(slim, NAMES)
    assert s["present"] == 3 and s["classes"] == 4
    assert s["miou_present"] == pytest.approx((50 + 75 + 0) / 3)
    table = iou_table(slim)  # class order from the dict, one column
    assert table.splitlines()[0].split() == ["class", "iou"]
    assert "points" not in table  # not in the dict: no made-up row


def test_json_round_trip_nan_and_none_mark_absent():
    metrics = _metrics()
    metrics["all"]["iou"]["person"] = None  # as a JSON writer that maps NaN to null leaves it
    assert _row(iou_table(metrics, NAMES), "person") == ["person", "n/a", "n/a"]
    assert math.isnan(metrics["in_view"]["iou"]["person"])


def test_all_present_has_no_present_clause_and_no_row_set_is_an_error():
    m = SegmentationIoU(2, 255, ["a", "b"])
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    line = summary_line("all", m.compute(), ["a", "b"])
    assert line == "all: mIoU 100.00 over 2 classes"
    assert "n/a:" not in iou_table({"all": m.compute()})  # the note only where a class is n/a
    assert iou_table(_metrics(), NAMES).splitlines()[-1].startswith("n/a: a class in neither the labels nor")
    with pytest.raises(ValueError, match="no row set"):
        iou_table({"scans": 3}, ["a"])
