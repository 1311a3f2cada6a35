"""The claims report's statistics in plain numpy: spreads, paired bootstrap intervals and verdict rules.

Every function is pure and seeded, so the same MLflow runs always give the same report. The resampling unit is
whatever the caller pairs over (seeds, or runs): intervals describe variation between training runs, not
between evaluation tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

SEED = 20250501  # fixed: a report is a pure function of its runs
N_BOOT = 4000
LEVEL = 0.95
VERDICTS = ("confirmed", "refuted", "inconclusive")


@dataclass(frozen=True)
class Estimate:
    """A mean over units with its interval (see bootstrap_mean); lo/hi are NaN when fewer than two units exist."""

    mean: float
    lo: float
    hi: float
    sd: float
    n: int
    values: tuple[float, ...] = ()

    @property
    def has_interval(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi))


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count of the finite values."""
    v = _finite(values)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return float(v.mean()), sd, int(v.size)


def bootstrap_mean(values: Iterable[float], *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Estimate:
    """Mean with an interval that is the wider of a percentile bootstrap (resampling units) and Student's t.

    Why both: with few units the percentile bootstrap is too narrow (with 3 seeds its 95% interval is just the
    range of the three values, since one resample of all-minimum already has probability 1/27 > 2.5%), while t
    assumes normal units; taking the union never claims more than either.
    """
    v = _finite(values)
    mean, sd, n = mean_sd(v)
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), sd, n, tuple(v.tolist()))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    half = float(student_t.ppf(1.0 - tail, n - 1)) * sd / np.sqrt(n)
    return Estimate(mean, min(float(lo), mean - half), max(float(hi), mean + half), sd, n, tuple(v.tolist()))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], **kw) -> Estimate:
    """Mean of a - b over paired units (one difference per seed or run) with its bootstrap interval.

    Pairs where either side is missing are dropped, so a failed seed removes its pair rather than biasing a side.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: a and b must pair one to one, got {x.shape} and {y.shape}")
    return bootstrap_mean(x - y, **kw)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], **kw) -> Estimate:
    """Mean of per-pair ratios num/den with a bootstrap interval over pairs (non-positive denominators dropped)."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (y > 0)
    return bootstrap_mean(x[ok] / y[ok], **kw)


def sign_verdict(est: Estimate, claimed: str, *, unanimous: bool = True) -> str:
    """Verdict on a difference whose claimed sign is `claimed` ('negative' or 'positive').

    confirmed: the interval excludes 0 on the claimed side (and, with `unanimous`, every unit agrees in sign);
    refuted: the same on the other side; inconclusive otherwise, and always when no interval exists.
    """
    if claimed not in ("negative", "positive"):
        raise ValueError(f"claimed must be 'negative' or 'positive', got {claimed!r}")
    if not est.has_interval:
        return "inconclusive"
    vals = np.asarray(est.values, dtype=float)
    below = est.hi < 0 and (not unanimous or bool((vals < 0).all()))
    above = est.lo > 0 and (not unanimous or bool((vals > 0).all()))
    if (below and claimed == "negative") or (above and claimed == "positive"):
        return "confirmed"
    if below or above:
        return "refuted"
    return "inconclusive"


def interval_verdict(lo: float, hi: float, *, lower: float, upper: float) -> str:
    """confirmed when [lo, hi] lies inside [lower, upper], refuted when entirely outside it, else inconclusive."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if lower <= lo and hi <= upper:
        return "confirmed"
    if hi < lower or lo > upper:
        return "refuted"
    return "inconclusive"


def majority_verdict(primary: Sequence[str], secondary: Sequence[str] = ()) -> str:
    """Combine per-cell verdicts: confirmed when the primary metric is confirmed in a strict majority of its cells
    and no cell (primary or secondary) is refuted; refuted when the primary is refuted in a strict majority and
    confirmed in none; inconclusive otherwise. Cells that are not verdicts (e.g. 'undertrained') do not count.
    """
    p = [v for v in primary if v in VERDICTS]
    s = [v for v in secondary if v in VERDICTS]
    if not p:
        return "inconclusive"
    half = len(p) / 2
    if p.count("confirmed") > half and "refuted" not in p + s:
        return "confirmed"
    if p.count("refuted") > half and "confirmed" not in p:
        return "refuted"
    return "inconclusive"


def all_or_any_verdict(cells: Sequence[str]) -> str:
    """For 'at every G' claims: confirmed when every cell is, refuted when any cell is, else inconclusive."""
    c = [v for v in cells if v in VERDICTS]
    if not c:
        return "inconclusive"
    if "refuted" in c:
        return "refuted"
    return "confirmed" if all(v == "confirmed" for v in c) else "inconclusive"


def _finite(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    return v[np.isfinite(v)]
