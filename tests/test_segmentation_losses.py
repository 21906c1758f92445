"""Lovász-softmax, class-weighted cross entropy and class weights against independent references."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcseg_kd.losses.class_weights import inverse_frequency_weights
from pcseg_kd.losses.segmentation import lovasz_softmax, weighted_ce

IGN = 255


def lovasz_reference(probs, labels, ignore=None, classes="present"):
    """Berman et al.'s algorithm written out per class in float64 with Python loops: drop the
    ignored rows, sort each class's errors, and dot them with the increments of the Jaccard
    loss of the growing prefix (the Lovász extension's gradient)."""
    probs, labels = probs.double(), labels.clone()
    if ignore is not None:
        keep = labels != ignore
        probs, labels = probs[keep], labels[keep]
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).double()
        if classes == "present" and fg.sum() == 0:
            continue
        err = (fg - probs[:, c]).abs()
        order = sorted(range(len(err)), key=lambda i: -float(err[i]))
        total, prev = 0.0, 0.0
        gts = float(fg.sum())
        inter, union = gts, gts
        for i in order:
            inter -= float(fg[i])
            union += 1.0 - float(fg[i])
            jac = 1.0 - inter / union if union > 0 else 0.0
            total += float(err[i]) * (jac - prev)
            prev = jac
        losses.append(total)
    return sum(losses) / max(len(losses), 1)


def jaccard_loss_hard(pred, labels, num_classes, ignore=None):
    """Mean over present classes of 1 - IoU of a hard prediction (brute force counting)."""
    if ignore is not None:
        keep = labels != ignore
        pred, labels = pred[keep], labels[keep]
    out = []
    for c in range(num_classes):
        if not (labels == c).any():
            continue
        inter = int(((pred == c) & (labels == c)).sum())
        union = int(((pred == c) | (labels == c)).sum())
        out.append(1.0 - inter / union)
    return sum(out) / len(out)


@pytest.mark.parametrize("seed", range(4))
def test_lovasz_matches_the_per_class_reference_with_ignored_rows(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(37, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (37,), generator=g)
    labels[torch.randperm(37, generator=g)[:6]] = IGN
    labels[labels == 3] = 1  # a class absent from the target
    ours = lovasz_softmax(logits, labels, IGN)
    ref = lovasz_reference(F.softmax(logits, -1), labels, IGN)
    assert float(ours) == pytest.approx(ref, abs=1e-12)
    ours_all = lovasz_softmax(logits, labels, IGN, classes="all")
    assert float(ours_all) == pytest.approx(lovasz_reference(F.softmax(logits, -1), labels, IGN, "all"), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lovasz_on_one_hot_probabilities_is_the_jaccard_loss_of_the_hard_prediction(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (50,), generator=g)
    labels[:5] = IGN
    pred = torch.where(torch.rand(50, generator=g) < 0.6, labels.clamp_max(3), torch.randint(0, 4, (50,), generator=g))
    logits = F.one_hot(pred, 4).double() * 200.0  # softmax is one-hot to float64 precision
    assert float(lovasz_softmax(logits, labels, IGN)) == pytest.approx(jaccard_loss_hard(pred, labels, 4, IGN), abs=1e-9)


def test_lovasz_gradient_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (24,), generator=g)
    labels[:3] = IGN
    assert torch.autograd.gradcheck(lambda x: lovasz_softmax(x, labels, IGN), (logits,))


def test_lovasz_edge_cases():
    x = torch.randn(6, 3, requires_grad=True)
    every_row_ignored = lovasz_softmax(x, torch.full((6,), IGN), IGN)
    assert float(every_row_ignored) == 0.0
    every_row_ignored.backward()
    assert torch.isfinite(x.grad).all()
    half = lovasz_softmax(x.detach().half(), torch.tensor([0, 1, 2, 0, 1, 2]), IGN)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        lovasz_softmax(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        lovasz_softmax(x, torch.zeros(6, dtype=torch.long), classes="some")


def test_lovasz_does_not_sync_with_the_host():
    from pcseg_kd.utils.sync_guard import forbid_host_sync
    x = torch.randn(30, 5, requires_grad=True)
    y = torch.randint(0, 5, (30,))
    y[:4] = IGN
    with forbid_host_sync():
        lovasz_softmax(x, y, IGN).backward()


@pytest.mark.parametrize("with_weights", [False, True])
def test_weighted_ce_matches_torch_cross_entropy(with_weights):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (40,), generator=g)
    labels[::7] = IGN
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.1 if with_weights else None
    ours = weighted_ce(logits, labels, IGN, w)
    ref = F.cross_entropy(logits, labels, weight=w, ignore_index=IGN)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(F.cross_entropy(logits, labels, weight=w, ignore_index=IGN), logits)
    torch.testing.assert_close(g1, g2)


def test_inverse_frequency_weights_follow_2dpass_rule():
    counts = np.array([1000.0, 10.0, 0.0, 250.0])
    w = inverse_frequency_weights(counts)
    f = counts / counts.sum()
    expected = [(f.max() / f[0]) ** (1 / 3), (f.max() / f[1]) ** (1 / 3), None, (f.max() / f[3]) ** (1 / 3)]
    for i in (0, 1, 3):
        assert float(w[i]) == pytest.approx(expected[i], rel=1e-6)
    assert float(w[2]) == pytest.approx(float(w.max()))  # absent class: the largest finite weight
    assert float(w[0]) == pytest.approx(1.0)
    for bad in ([], [0, 0], [1, -1], [1, float("nan")]):
        with pytest.raises(ValueError):
            inverse_frequency_weights(bad)


def test_label_map_content_gives_the_official_training_frequencies():
    from pcseg_kd.data.kitti.labels import LabelMap
    m = LabelMap()
    f = m.train_frequencies()
    # car = raw 10 + moving-car 252 (semantic-kitti-api content); road = 40 + lane-marking 60
    assert f[m.class_names.index("car")] == pytest.approx(0.040818519255974316 + 0.001789309418528068)
    assert f[m.class_names.index("road")] == pytest.approx(0.1987493871255525 + 4.7084144280367186e-05)
    assert len(f) == 19 and (f > 0).all()
