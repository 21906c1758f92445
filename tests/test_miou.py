"""Segmentation IoU against a brute-force per-point count."""
import math

import numpy as np
import pytest
import torch

from pcseg_kd.metrics import SegmentationIoU, confusion_matrix, iou_from_confusion


def brute_force_iou(pred, labels, num_classes, ignore):
    ious = []
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, l in zip(pred.tolist(), labels.tolist()):
            if l == ignore:
                continue
            tp += p == c and l == c
            fp += p == c and l != c
            fn += p != c and l == c
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return ious


def test_matches_brute_force_over_batches():
    g = torch.Generator().manual_seed(0)
    metric = SegmentationIoU(num_classes=5, ignore_index=255)
    all_p, all_l = [], []
    for _ in range(3):
        labels = torch.randint(0, 5, (400,), generator=g)
        labels[torch.rand(400, generator=g) < 0.2] = 255
        pred = torch.where(torch.rand(400, generator=g) < 0.6, labels.clamp(max=4), torch.randint(0, 5, (400,), generator=g))
        metric.update(pred, {"labels": labels})
        all_p.append(pred)
        all_l.append(labels)
    ref = brute_force_iou(torch.cat(all_p), torch.cat(all_l), 5, 255)
    out = metric.compute()
    np.testing.assert_allclose([out["iou"][str(c)] for c in range(5)], np.array(ref) * 100)
    assert out["miou"] == pytest.approx(np.nanmean(ref) * 100)  # every class occurs here
    assert out["points"] == int((torch.cat(all_l) != 255).sum())


def test_absent_class_counts_as_zero_in_miou_and_is_skipped_in_miou_present():
    pred = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, 1, 255])
    iou = iou_from_confusion(confusion_matrix(pred, labels, 3))
    assert math.isnan(iou[2]) and iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    m = SegmentationIoU(3)
    m.update(pred, labels)
    out = m.compute()
    assert out["miou"] == pytest.approx(100 / 3)          # (0.5 + 0.5 + 0) / 3, as semantic-kitti-api
    assert out["miou_present"] == pytest.approx(50.0)
    assert math.isnan(out["iou"]["2"])


def test_out_of_range_labels_are_not_aliased_and_missing_predictions_are_misses():
    conf = confusion_matrix(torch.tensor([0, 7, 1, -1]), torch.tensor([0, 1, 9, 2]), 3, ignore_index=None)
    # label 9 is counted nowhere; predictions 7 and -1 are misses of classes 1 and 2
    assert conf.shape == (3, 4) and int(conf.sum()) == 3
    assert int(conf[0, 0]) == 1 and int(conf[1, 3]) == 1 and int(conf[2, 3]) == 1


def test_a_miss_is_a_false_negative_only_as_the_official_tool_counts_a_predicted_unlabeled():
    # semantic-kitti-api: conf[pred, gt] over learning ids 0..C with 0 ignored; a prediction
    # of 0 ("unlabeled") adds to its row 0, which no included class reads: fn only
    pred = torch.tensor([0, 1, -1, 1, 0, -1])
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    ours = iou_from_confusion(confusion_matrix(pred, labels, 3, ignore_index=None))
    api = torch.zeros(4, 4, dtype=torch.float64)          # learning ids: ours + 1, 0 = unlabeled
    for p_, g in zip((pred + 1).clamp_min(0).tolist(), (labels + 1).tolist()):
        api[p_, g] += 1
    api[:, 0] = 0
    tp = api.diagonal()
    fp, fn = api.sum(1) - tp, api.sum(0) - tp
    torch.testing.assert_close(ours, (tp / (tp + fp + fn))[1:])


def test_errors():
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(RuntimeError, match="before any update"):
        SegmentationIoU().compute()


def test_update_does_not_sync_with_the_host():
    from pcseg_kd.utils.sync_guard import forbid_host_sync
    m = SegmentationIoU(4)
    labels = torch.tensor([0, 1, 2, 3, 255, 1])
    with forbid_host_sync():
        m.update(torch.tensor([0, 1, 1, 3, 0, 2]), {"labels": labels})
    assert m.compute()["points"] == 5
