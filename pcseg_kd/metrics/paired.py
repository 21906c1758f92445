"""Paired differences over seeds and their Student-t confidence interval.

A paired Δ is ``student_s − baseline_s`` for each seed ``s`` (the no-KD student of the same
seed is the control: same initialisation, shuffling and augmentation). Its 95 % interval is
``mean ± t(0.975, n − 1) · std / √n`` with the sample std (ddof 1). The t quantile is computed
here, exactly, so that scipy stays a test-only dependency: for an integer number of degrees
of freedom the two-sided t probability has a closed form in θ = atan(t / √ν) (Abramowitz &
Stegun 26.7.3-4), which is inverted by bisection to machine precision.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence


def _two_sided(theta: float, df: int) -> float:
    """P(|T| < t) for t = √ν·tan(θ), ν = ``df`` degrees of freedom (A&S 26.7.3-4)."""
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd ν
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = c, c
        for k in range(3, df - 1, 2):  # c + (2/3) c³ + (2·4)/(3·5) c⁵ + ... up to c^(ν−2)
            term *= c * c * (k - 1) / k
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # 1 + (1/2) c² + (1·3)/(2·4) c⁴ + ... up to c^(ν−2)
        term *= c * c * (k - 1) / k
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` (a whole number ≥ 1) degrees of freedom."""
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"t_quantile: degrees of freedom must be a whole number >= 1, got {df!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p!r}")
    df = int(df)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 2.0 * p - 1.0  # P(|T| < t)
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):  # the probability rises monotonically in θ; bisect until θ stops moving
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


def paired_delta(student: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Dict[str, Any]:
    """Mean, sample std and ``confidence`` t-interval of ``student[i] − baseline[i]``.

    Keys: ``n``, ``mean``, ``std`` (ddof 1), ``t`` (the critical value), ``half_width``,
    ``low``, ``high``, ``excludes_zero``, ``confidence`` and ``deltas``. With fewer than two
    pairs the interval is undefined: ``std``, ``t``, ``half_width``, ``low`` and ``high`` are
    None and ``excludes_zero`` is False (one seed decides nothing)."""
    student, baseline = list(student), list(baseline)
    if len(student) != len(baseline):
        raise ValueError(f"paired_delta: {len(student)} student values but {len(baseline)} baseline values; "
                         "each student needs the baseline of its own seed")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_delta: confidence must be in (0, 1), got {confidence!r}")
    deltas = []
    for i, (s, b) in enumerate(zip(student, baseline)):
        if s is None or b is None or not (math.isfinite(float(s)) and math.isfinite(float(b))):
            raise ValueError(f"paired_delta: pair {i} is not a pair of finite numbers ({s!r}, {b!r})")
        deltas.append(float(s) - float(b))
    n = len(deltas)
    out: Dict[str, Any] = {"n": n, "mean": sum(deltas) / n if n else None, "std": None, "t": None,
                           "half_width": None, "low": None, "high": None, "excludes_zero": False,
                           "confidence": confidence, "deltas": deltas}
    if n < 2:
        return out
    mean = out["mean"]
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    t = t_quantile(0.5 + confidence / 2, n - 1)
    half = t * std / math.sqrt(n)
    out.update(std=std, t=t, half_width=half, low=mean - half, high=mean + half,
               excludes_zero=bool(mean - half > 0 or mean + half < 0))
    return out


def ci95(d: Dict[str, Any]) -> Optional[list]:
    """``[low, high]`` of a :func:`paired_delta` result, None where it is undefined (JSON's ``delta_ci95``)."""
    return None if d.get("low") is None else [d["low"], d["high"]]


def format_delta(d: Dict[str, Any], digits: int = 2) -> str:
    """``+0.81 ± 2.10 (n=5, 95 % CI [-1.80, +3.42])``, with `` *`` when the interval excludes 0;
    the std is the paired differences' sample std, not the interval's half-width."""
    n = d["n"]
    if not n:
        return "– (n=0)"
    f = f"{{:+.{digits}f}}"
    if d.get("low") is None:
        return f"{f.format(d['mean'])} (n={n}, no interval: needs 2 or more seeds)"
    level = f"{100 * d.get('confidence', 0.95):g} %"
    return (f"{f.format(d['mean'])} ± {d['std']:.{digits}f} (n={n}, {level} CI "
            f"[{f.format(d['low'])}, {f.format(d['high'])}])" + (" *" if d["excludes_zero"] else ""))
