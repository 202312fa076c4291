"""Paired statistics for small test sets: exact McNemar, Holm, a paired bootstrap, and verdicts.

Two models scored on the same test rows are compared on the rows where they disagree (the
discordant rows): with 59 test rows a 3-point accuracy gap is 2 rows, and only a paired test can
say whether that is more than chance. Everything here is a pure function of 0/1 "correct" vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of model A against model B on the same rows."""

    n: int  # rows compared
    a_only: int  # rows A got right and B got wrong
    b_only: int  # rows B got right and A got wrong
    p: float  # two-sided exact p-value
    acc_a: float
    acc_b: float

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
            ) -> McNemar:
    """Exact (binomial) McNemar test: under H0 each discordant row favours A with probability 1/2.

    The exact form, not the chi-square one: with a handful of discordant rows the chi-square
    approximation is poor, and test sets here are small.
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D and the same length, got "
                         f"{a.shape} and {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    # No discordant rows: the models agree on every row, nothing to test.
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    n = int(a.size)
    return McNemar(n=n, a_only=a_only, b_only=b_only, p=min(p, 1.0),
                   acc_a=float(a.mean()) if n else float("nan"),
                   acc_b=float(b.mean()) if n else float("nan"))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Sorted ascending, the i-th (0-based) of m p-values is multiplied by m - i; a running maximum
    keeps the adjusted values in the same order as the raw ones; capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def paired_bootstrap_diff(correct_a: Sequence[bool] | np.ndarray,
                          correct_b: Sequence[bool] | np.ndarray, n: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B, with a percentile CI from resampling rows (paired).

    Rows are resampled together for both models, so the CI reflects the paired design (much
    narrower than two independent CIs when the models agree on most rows).
    """
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("correct_a and correct_b must be non-empty and the same length")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


# ---- formatting: one place decides how figures read in tables and verdicts ----

def pct(x: float | None, digits: int = 1) -> str:
    """0.5424 -> '54.2%'; None/NaN -> '–'."""
    if x is None or not np.isfinite(x):
        return "–"
    return f"{100 * x:.{digits}f}%"


def pct_ci(x: float | None, low: float | None = None, high: float | None = None) -> str:
    """'54.2% [41.5, 66.9]' (the CI in percent, without repeating the sign)."""
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return pct(x)
    return f"{pct(x)} [{100 * low:.1f}, {100 * high:.1f}]"


def points(x: float, digits: int = 1) -> str:
    """An accuracy difference in percentage points: 0.153 -> '+15.3'."""
    return f"{100 * x:+.{digits}f}"


def fmt_p(p: float, prefix: str = "p") -> str:
    """'p=0.79', 'p=0.031', 'p<0.001' (two significant digits are all a p-value deserves)."""
    if p < 0.001:
        return f"{prefix}<0.001"
    return f"{prefix}={p:.2g}" if p < 0.1 else f"{prefix}={p:.2f}"


def verdict(name_a: str, name_b: str, test: McNemar, p_adjusted: float | None = None,
            alpha: float = ALPHA) -> str:
    """Plain language: '54.2% vs 57.6% on 59 rows, 6 vs 8 discordant rows: not distinguishable,
    exact McNemar p=0.79'. Significance is judged on the Holm-adjusted p when one is given."""
    p_used = test.p if p_adjusted is None else p_adjusted
    if p_used < alpha:
        better = name_a if test.a_only > test.b_only else name_b
        outcome = f"{better} is better"
    else:
        outcome = "not distinguishable"
    p_text = f"exact McNemar {fmt_p(test.p)}"
    if p_adjusted is not None and abs(p_adjusted - test.p) > 1e-12:
        p_text += f", Holm-adjusted {fmt_p(p_adjusted)}"
    return (f"{pct(test.acc_a)} vs {pct(test.acc_b)} on {test.n} rows, {test.a_only} vs "
            f"{test.b_only} discordant rows: {outcome}, {p_text}")


def tie_ranks(ordered: Sequence[str], worse_than_top: set[str]) -> dict[str, str]:
    """Ranks that show ties: the top model and every model not significantly worse than it share
    rank 1 ("=1" when shared); the models significantly worse share the next rank.

    Each model is tested only against the top one, so the data do not order the models below it:
    they get one shared rank rather than a spurious 2nd, 3rd, 4th.
    """
    top_group = [m for m in ordered if m not in worse_than_top]
    rest = [m for m in ordered if m in worse_than_top]
    ranks: dict[str, str] = {}
    for group, rank in ((top_group, 1), (rest, len(top_group) + 1)):
        for m in group:
            ranks[m] = f"={rank}" if len(group) > 1 else str(rank)
    return ranks
