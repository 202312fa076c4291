"""helpers.analysis.stats: exact McNemar, Holm, the paired bootstrap, verdicts and tied ranks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from helpers.analysis import stats


def _pairs(a_only: int, b_only: int, both: int = 30, neither: int = 10):
    """Correct-vectors with the given discordant counts."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return np.array(a), np.array(b)


def test_mcnemar_matches_scipy_binomtest_on_random_vectors():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.random(59) < 0.55, rng.random(59) < 0.5
        res = stats.mcnemar(a, b)
        n_a, n_b = int((a & ~b).sum()), int((~a & b).sum())
        assert (res.a_only, res.b_only, res.n) == (n_a, n_b, 59)
        assert res.p == pytest.approx(binomtest(n_a, n_a + n_b, 0.5).pvalue)
        assert res.acc_a == pytest.approx(a.mean())


def test_mcnemar_known_values():
    # 1 vs 6 discordant: two-sided exact p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128.
    assert stats.mcnemar(*_pairs(1, 6)).p == pytest.approx(0.125)
    # The example in the issue: 6 vs 8 discordant rows -> p = 0.79.
    assert stats.mcnemar(*_pairs(6, 8)).p == pytest.approx(0.7905, abs=1e-4)
    # Symmetric in A and B; no discordant rows -> p = 1.
    assert stats.mcnemar(*_pairs(8, 6)).p == pytest.approx(stats.mcnemar(*_pairs(6, 8)).p)
    assert stats.mcnemar(*_pairs(0, 0)).p == 1.0


def test_mcnemar_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar([True, False], [True])


def test_holm_against_a_hand_computation():
    # Sorted: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> running max 0.09; 0.5*1 = 0.5.
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # 0.3*2, max(0.6, 0.6*1)
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []


def test_paired_bootstrap_difference():
    a, b = _pairs(10, 2, both=40, neither=8)
    diff, low, high = stats.paired_bootstrap_diff(a, b, n=4000, seed=0)
    assert diff == pytest.approx(8 / 60)
    assert low < diff < high
    # Close to the normal approximation of the paired difference's standard error.
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    # Seeded: the same call gives the same CI; identical models give a zero-width CI.
    assert stats.paired_bootstrap_diff(a, b, n=4000, seed=0) == (diff, low, high)
    assert stats.paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)


def test_verdict_text():
    a, b = _pairs(6, 8, both=26, neither=19)  # 32/59 = 54.2% vs 34/59 = 57.6%
    res = stats.mcnemar(a, b)
    assert stats.verdict("Llama", "RF", res) == (
        "54.2% vs 57.6% on 59 rows, 6 vs 8 discordant rows: not distinguishable, "
        "exact McNemar p=0.79")
    strong = stats.mcnemar(*_pairs(1, 15))
    assert "B is better" in stats.verdict("A", "B", strong)
    # Significant alone, not after Holm: the adjusted p decides, and both are shown.
    text = stats.verdict("A", "B", stats.mcnemar(*_pairs(2, 11)), p_adjusted=0.12)
    assert "not distinguishable" in text and "p=0.022" in text and "Holm-adjusted p=0.12" in text


def test_formatting():
    assert stats.pct_ci(0.5424, 0.415, 0.669) == "54.2% [41.5, 66.9]"
    assert stats.pct(None) == "–" and stats.pct(float("nan")) == "–"
    assert stats.points(0.153) == "+15.3" and stats.points(-0.02) == "-2.0"
    assert stats.fmt_p(0.0004) == "p<0.001" and stats.fmt_p(0.031) == "p=0.031"


def test_tie_ranks():
    order = ["a", "b", "c", "d"]
    assert stats.tie_ranks(order, set()) == {m: "=1" for m in order}
    assert stats.tie_ranks(order, {"c", "d"}) == {"a": "=1", "b": "=1", "c": "=3", "d": "=3"}
    assert stats.tie_ranks(order, {"b", "c", "d"}) == {"a": "1", "b": "=2", "c": "=2", "d": "=2"}
    assert stats.tie_ranks(["a", "b"], {"b"}) == {"a": "1", "b": "2"}
