"""helpers.analysis.report on hand-built records (no MLflow): paired tests, ranks, verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_records import CLASSES, record3

from helpers import contract
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


def floor_record(name: str = "majority", seed: int = 0) -> RunRecord:
    """A floor baseline: always "No" (majority) or random (stratified)."""
    rng = np.random.default_rng(seed)
    pred = np.zeros(N, int) if name == "majority" else (rng.random(N) < 0.4).astype(int)
    frame = pd.DataFrame({"row_id": np.arange(N), "label": LABELS, "p_yes": pred * 1.0,
                          "prediction": pred})
    acc = float((pred == LABELS).mean())
    return RunRecord(name=name, kind="baseline", predictions=frame,
                     metrics={"test_accuracy": acc, "test_f1": 0.0})


def test_a_model_at_the_floor_takes_no_rank_and_every_verdict_says_so():
    # Regression: a fine-tuned model below the majority-class floor was ranked first and said to
    # have "improved significantly" (issue 14).
    floor = floor_record()
    same = RunRecord(name="tiny", kind="llm", predictions=floor.predictions.copy(),
                     zeroshot=floor.predictions.copy(),
                     metrics={"test_accuracy": 0.6, "test_f1": 0.0,
                              "zeroshot_test_accuracy": 0.6})
    good = record("big", "llm", 5, 1)
    c = report.build([same, good, record("rf", "baseline", 8, 4), floor,
                      floor_record("stratified")])
    assert c.floor.name == "majority" and c.at_floor(same) and not c.at_floor(good)
    assert c.ranks == {"big": "1"} and c.best_llm is good
    assert c.rank(same) == "– (no better than the floor)"
    assert any(line.startswith("tiny (LLM, 60.0%) is no better than the floor: the "
                               "majority-class floor (majority, 60.0%)") for line in c.headline)
    readme = report.readme_table(c)
    row = next(line for line in readme.splitlines() if line.startswith("| tiny "))
    assert "no better than the floor" in row and "| 1 " not in row
    assert "| – (floor)" in next(line for line in readme.splitlines() if "majority" in line)
    z = c.zeroshot[0]
    assert "both zero-shot and fine-tuned are no better than the floor" in z.text
    text = report.markdown(c)
    assert "## Against the floor" in text and "## Calibration (test)" in text
    # One Holm family: every non-floor model (fine-tuned and zero-shot) against the floor.
    assert {(t.a.name, t.which_a) for t in c.floor_tests} == {
        ("tiny", "test"), ("tiny", "zeroshot"), ("big", "test"), ("rf", "test")}


def test_improvement_to_a_model_still_at_the_floor_is_not_called_a_gain():
    floor = floor_record()
    worse = record("tiny", "llm", 70, 7)  # zero-shot: 70 of the 100 rows wrong
    ft = floor.predictions.copy()
    ft.loc[0, "prediction"] = 1  # one row away from the floor
    r = RunRecord(name="tiny", kind="llm", predictions=ft, zeroshot=worse.predictions,
                  metrics={"test_accuracy": 0.61, "test_f1": 0.05,
                           "zeroshot_test_accuracy": 0.3})
    c = report.build([r, floor])
    assert c.zeroshot[0].a_better and c.at_floor(r)
    line = next(x for x in c.headline if x.startswith("Fine-tuning"))
    assert line.startswith("Fine-tuning improved accuracy significantly for 0 of 1 LLMs")
    assert "tiny improved but is still no better than the floor" in line
    assert "No LLM is better than the floor" in " ".join(c.headline)


def test_a_model_still_improving_when_its_budget_ended_is_called_out():
    r = record("a", "llm", 10, 1)
    r.tags = {contract.TAG_STILL_IMPROVING: "true"}
    c = report.build([r, record("b", "llm", 12, 2), floor_record()])
    line = next(x for x in c.headline if x.startswith("Training stopped while"))
    assert "still falling for a:" in line and "b" not in line.split(":")[0]


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


# --- multi-class ------------------------------------------------------------------------------

def test_a_multiclass_comparison_shows_its_own_metrics_and_class_names():
    c = report.build([record3("tiny", "llm", 10, 1), record3("rf", "baseline", 30, 2),
                      record3("majority", "baseline", 66, 3)])
    assert c.multiclass and c.floor.name == "majority"
    assert c.floor_test(c.llms[0]).a_better  # McNemar on right/wrong per row, as for binary
    text = report.markdown(c)
    assert "Macro F1" in text and "Log loss" in text and "Weighted F1" in text
    assert "Specificity" not in text and "Balance gap" not in text
    assert "threshold tuning does not apply" in text
    assert "none: the most likely class" in report.all_models_table(c)
    names, cm = report.class_confusion(c.llms[0])
    assert names == CLASSES and cm.sum() == N and np.trace(cm) == N - 10
    assert "ant → ant / bee / cat" in report.confusion_table(c)
    frame = report.results_frame(c)
    assert "Macro F1" in frame.columns and "Specificity" not in frame.columns
    assert report.readme_table(c).splitlines()[0].startswith("| Model")
