"""helpers.analysis.records: seeds merged, the latest run per model, one split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import contract
from helpers.analysis import records
from helpers.analysis.records import ReportError, RunRecord


def frame(pred, p_yes=None, rows=(1, 2, 3, 4)) -> pd.DataFrame:
    return pd.DataFrame({"row_id": list(rows), "label": [1, 1, 0, 0], "prediction": pred,
                         "p_yes": p_yes if p_yes is not None else [0.5] * len(pred)})


def test_majority_vote_ties_go_to_the_first_seed():
    votes = records.majority_vote([frame([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]),
                                   frame([1, 1, 0, 0], [0.7, 0.6, 0.4, 0.2]),
                                   frame([0, 1, 1, 0], [0.2, 0.8, 0.6, 0.2])], "m")
    assert votes["prediction"].tolist() == [1, 1, 1, 0]
    assert np.allclose(votes["p_yes"], [0.6, 0.5, 0.6, 0.2])
    tie = records.majority_vote([frame([1, 0, 1, 0]), frame([0, 1, 0, 1])], "m")
    assert tie["prediction"].tolist() == [1, 0, 1, 0]  # the first seed's


def test_seeds_of_different_rows_are_refused():
    with pytest.raises(ReportError, match="different test rows"):
        records.majority_vote([frame([1, 0, 1, 0]), frame([1, 0, 1, 0], rows=(1, 2, 3, 9))], "m")


def test_merge_seeds_means_sd_and_no_ci():
    runs = [RunRecord("m", seed=s, metrics={"test_accuracy": a, "test_accuracy_ci_low": 0.1,
                                            "train_seconds": 10.0 * (s + 1)},
                      predictions=frame([1, 0, 1, 0])) for s, a in ((1, 0.6), (0, 0.8))]
    merged = records.merge_seeds(runs)
    assert merged.seeds == [0, 1] and merged.label == "m (2 seeds)"
    assert merged.value("accuracy") == pytest.approx(0.7)
    assert merged.spread["test_accuracy"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert "test_accuracy_ci_low" not in merged.metrics and merged.ci("accuracy") is None
    assert merged.cell("accuracy") == "70.0% ± 14.1"


def test_record_cells_and_sizes():
    r = RunRecord("m", metrics={"test_accuracy": 0.542, "test_accuracy_ci_low": 0.415,
                                "test_accuracy_ci_high": 0.669}, model_size="3B")
    assert r.cell("accuracy") == "54.2% [41.5, 66.9]" and r.size_in_params() == 3e9
    assert RunRecord("x", model_id="org/tiny-135M-x").size_in_params() == 1.35e8
    assert records.score_key(RunRecord("nan")) < records.score_key(r)


def memcheck_run(run_id: str, start: int, model_id: str = "m", status: str = "FINISHED",
                 text: str = "file", row_exact: float = 3.0):
    """An MLflow run of kind memcheck as the store returns it (the attributes records reads)."""
    from types import SimpleNamespace

    from helpers import contract

    metrics = {contract.memcheck_metric("row", k): v for k, v in
               {"exact": row_exact, "trials": 10.0, "chance_exact": 0.0,
                "chance_trials": 10.0, "flagged": float(row_exact >= 4)}.items()}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=start, status=status),
        data=SimpleNamespace(metrics=metrics,
                             params={"model_id": model_id, "dataset.source": "t.csv"},
                             tags={contract.TAG_KIND: contract.KIND_MEMCHECK,
                                   contract.TAG_MEMCHECK_TEXT: text}))


def test_memchecks_latest_finished_per_model_table_and_text():
    runs = [memcheck_run("old", 1, row_exact=9), memcheck_run("new", 2),
            memcheck_run("failed", 3, status="FAILED"), memcheck_run("pandas", 1, text="pandas"),
            memcheck_run("other", 1, model_id="n")]
    got = {(m.model_id, m.text): m for m in records.load_memchecks(runs)}
    assert {k: m.run_id for k, m in got.items()} == {("m", "file"): "new",
                                                     ("m", "pandas"): "pandas",
                                                     ("n", "file"): "other"}
    assert got[("m", "file")].tests == {"row": {"exact": 3.0, "trials": 10.0,
                                                "chance_exact": 0.0, "chance_trials": 10.0,
                                                "flagged": 0.0}}
    assert got[("m", "file")].source == "t.csv" and got[("m", "file")].flagged == []
    assert records.load_memchecks([memcheck_run("x", 1, row_exact=8)])[0].flagged == ["row"]


def test_learning_curve_points_stay_out_of_a_plain_comparison(mlflow_store):
    """A curve's point learned from k rows: the latest run of its model, but not its result."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.create_experiment("curves")
    ids = []
    for extra in ({}, {contract.TAG_TRAIN_ROWS: "8", contract.TAG_BATCH_ID: "c1"}):
        run = client.create_run(exp, tags={contract.TAG_KIND: contract.KIND_LLM,
                                           contract.TAG_MODEL_NAME: "m", **extra})
        client.log_metric(run.info.run_id, "test_accuracy", 0.9)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    usable, skipped = records._usable(client.search_runs([exp]))
    assert [r.info.run_id for r in usable] == ids[:1]
    assert skipped == ["1 run(s) of learning curve c1: see `tablora compare --curve c1`"]


def test_a_multiclass_vote_takes_the_most_frequent_class():
    # Regression: the binary vote summed the predictions (class 2 + class 0 read as two "yes").
    from helpers import metrics

    names = ["ant", "bee", "cat"]
    y = np.array([0, 1, 2, 2])

    def seed(pred, p):
        return metrics.predictions_frame_multi(y, np.array(pred), np.array(p), [1, 2, 3, 4],
                                               names)

    one_hot = np.eye(3)
    frames = [seed(p, one_hot[p]) for p in ([2, 1, 0, 2], [0, 1, 2, 1], [2, 0, 0, 0])]
    votes = records.majority_vote(frames, "m")
    assert votes["prediction"].tolist() == [2, 1, 0, 2]  # the last row ties: the first seed's
    assert votes["prediction_name"].tolist() == ["cat", "bee", "ant", "cat"]
    assert votes["label_name"].tolist() == ["ant", "bee", "cat", "cat"]
    np.testing.assert_allclose(votes[["p_0", "p_1", "p_2"]].to_numpy()[0], [1 / 3, 0, 2 / 3])
