"""pcseg_kd.metrics.paired: the t quantile against textbook values and scipy, the paired
interval against a hand computation, the undefined interval of one seed, the formatter."""
import math

import numpy as np
import pytest

from pcseg_kd.metrics.paired import ci95, format_delta, paired_delta, t_quantile


@pytest.mark.parametrize("df, value", [(2, 4.303), (4, 2.776), (9, 2.262), (1, 12.706), (30, 2.042)])
def test_t_quantile_matches_the_textbook_table(df, value):
    assert round(t_quantile(0.975, df), 3) == value


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 99, 250, 1000]:
        for p in (0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025, 0.1):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-12), (p, df)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 2.5)
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(1.0, 3)


def test_paired_delta_against_a_hand_computation():
    student = [35.49, 35.12, 35.80, 34.0, 36.1]
    baseline = [32.88, 37.77, 36.29, 33.5, 34.0]
    d = paired_delta(student, baseline)
    diffs = np.array(student) - np.array(baseline)
    mean, sd = diffs.mean(), diffs.std(ddof=1)
    half = 2.776445105 * sd / math.sqrt(5)
    assert d["n"] == 5 and d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert d["t"] == pytest.approx(2.776445105, abs=1e-9) and d["half_width"] == pytest.approx(half)
    assert (d["low"], d["high"]) == pytest.approx((mean - half, mean + half))
    assert d["excludes_zero"] is False and ci95(d) == [d["low"], d["high"]]
    assert d["deltas"] == pytest.approx(diffs.tolist())


def test_interval_excludes_zero_on_either_side():
    up = paired_delta([3.0, 3.2, 2.9], [1.0, 1.1, 1.0])
    assert up["low"] > 0 and up["excludes_zero"]
    down = paired_delta([1.0, 1.1, 1.0], [3.0, 3.2, 2.9])
    assert down["high"] < 0 and down["excludes_zero"]
    assert not paired_delta([1.0, -1.0], [0.0, 0.0])["excludes_zero"]


def test_one_seed_gives_no_interval_and_no_crash():
    d = paired_delta([33.69], [32.88])
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.81)
    assert d["std"] is None and d["low"] is None and d["excludes_zero"] is False and ci95(d) is None
    assert format_delta(d) == "+0.81 (n=1, no interval: needs 2 or more seeds)"
    assert format_delta(paired_delta([], [])) == "– (n=0)"


def test_format_delta_marks_intervals_that_exclude_zero():
    d = {"n": 5, "mean": 0.81, "std": 2.10, "low": -1.80, "high": 3.42, "excludes_zero": False, "confidence": 0.95}
    assert format_delta(d) == "+0.81 ± 2.10 (n=5, 95 % CI [-1.80, +3.42])"
    assert format_delta(paired_delta([3.0, 3.2, 2.9], [1.0, 1.1, 1.0])).endswith("]) *")


def test_paired_delta_rejects_unpaired_or_missing_values():
    with pytest.raises(ValueError, match="3 student values but 2 baseline"):
        paired_delta([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="pair 1"):
        paired_delta([1, None], [1, 2])
    with pytest.raises(ValueError, match="pair 0"):
        paired_delta([float("nan")], [1])
