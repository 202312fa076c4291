"""helpers.analysis.report on hand-built records (no MLflow): paired tests, ranks, verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.analysis import report
from helpers.analysis.records import ReportError, RunRecord

N = 100
LABELS = np.array([1] * 40 + [0] * 60)


def record(name: str, kind: str, wrong: int, seed: int = 0, rows=None, **metrics) -> RunRecord:
    """A model that gets `wrong` of the N rows wrong (chosen at random by `seed`)."""
    rng = np.random.default_rng(seed)
    pred = LABELS.copy()
    flip = rng.choice(N, wrong, replace=False)
    pred[flip] = 1 - pred[flip]
    frame = pd.DataFrame({"row_id": np.arange(N) if rows is None else rows, "label": LABELS,
                          "p_yes": np.where(pred == 1, 0.8, 0.2), "prediction": pred})
    acc = float((pred == LABELS).mean())
    return RunRecord(name=name, kind=kind, predictions=frame,
                     metrics={"test_accuracy": acc, "test_f1": acc, **metrics})


def test_ranks_tie_what_the_data_cannot_separate():
    llms = [record("a", "llm", 10, 1), record("b", "llm", 12, 2), record("c", "llm", 45, 3)]
    c = report.build(llms + [record("rf", "baseline", 8, 4)])
    assert c.best_llm.name == "a" and c.best_baseline.name == "rf"
    assert c.ranks == {"a": "=1", "b": "=1", "c": "3"}
    assert not c.clear_winner
    vs = next(t for t in c.tests if t.family == report.VS_BEST_LLM and t.a.name == "c")
    assert vs.significant and vs.a_worse and vs.p_adjusted >= vs.test.p
    assert any("No clear winner" in line for line in c.headline)


def test_clear_winner_needs_every_other_llm_significantly_worse():
    c = report.build([record("a", "llm", 5, 1), record("b", "llm", 45, 2)])
    assert c.clear_winner and c.ranks == {"a": "1", "b": "2"}
    assert c.headline[0].startswith("Clear winner among the LLMs: a")


def test_different_rows_on_one_split_are_refused():
    with pytest.raises(ReportError, match="different test rows"):
        report.build([record("a", "llm", 5), record("rf", "baseline", 5, rows=np.arange(N) + 1)])


def test_markdown_has_every_section():
    c = report.build([record("a", "llm", 10, 1, zeroshot_test_accuracy=0.6),
                      record("rf", "baseline", 8, 4)])
    text = report.markdown(c)
    for heading in ("## Verdict", "## Fine-tuned LLM results", "## Baselines beside the LLMs",
                    "## Paired comparisons", "## Summary for a README"):
        assert heading in text
    assert report.md_table(["x", "y"], [["1", "22"]]).splitlines()[2] == "| 1 | 22 |"


def checked(model_id: str, source: str, row_exact: int, **more) -> report.MemcheckRecord:
    """A memorization check of `model_id` on `source` (the row test, and any others given)."""
    tests = {"row": {"exact": row_exact, "trials": 10, "chance_exact": 0, "chance_trials": 10,
                     "flagged": float(row_exact >= 4)}, **more}
    return report.MemcheckRecord(model_id, source, "file", tests)


def test_memorization_line_in_the_verdict():
    a = record("a", "llm", 10, 1)
    b = record("b", "llm", 12, 2)  # the same model with other settings: one line
    other = record("c", "llm", 14, 3)
    for r, model in ((a, "m/seen"), (b, "m/seen"), (other, "m/fresh")):
        r.model_id, r.params = model, {"dataset": {"source": "builtin:breast_cancer"}}
    header = {"exact": 5, "trials": 8, "chance_exact": 0, "chance_trials": 8, "flagged": 1.0}
    checks = [checked("m/seen", "builtin:breast_cancer", 7, header=header),
              checked("m/fresh", "builtin:breast_cancer", 0),
              checked("m/seen", "other.csv", 9)]  # another table: not this comparison's
    c = report.build([a, b, other], memchecks=checks)
    lines = [line for line in c.headline if line.startswith("Memorization")]
    assert lines == [
        "Memorization: m/seen has seen builtin:breast_cancer: it completes 7 of 10 rows of the "
        "table verbatim (shuffled copy: 0 of 10) [file text]; continues the table's first rows "
        "verbatim at 5 of 8 cuts (shuffled copy: 0 of 8) [file text]; its results on this table "
        "may be inflated (tablora memcheck).",
        "Memorization check: no sign that m/fresh has seen builtin:breast_cancer (tests row at "
        "chance level: it completes 0 of 10 rows of the table verbatim (shuffled copy: 0 of "
        "10)).",
    ]
    assert "## Verdict" in report.markdown(c) and lines[0] in report.markdown(c)
    # No check ran: no line (and nothing else changes).
    assert not any(line.startswith("Memorization") for line in report.build([a]).headline)
