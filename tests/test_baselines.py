"""helpers.baselines on the real data path (helpers.data.prepare): fitting, messy tables, MLflow
runs and the notebook. No mocks: real scikit-learn, MLflow (a temporary SQLite store) and
papermill."""

from __future__ import annotations

import time
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from helpers import baselines, contract, data, metrics, tracking
from helpers.config import DEMO_PARAMS, load_params
from helpers.workflow import notebooks


@pytest.fixture(scope="module")
def demo():
    return data.prepare(load_params(DEMO_PARAMS))


@pytest.fixture(scope="module")
def demo_results(demo):
    t0 = time.perf_counter()
    results = baselines.fit_all(demo)
    print(f"\nall baselines on the built-in dataset: {time.perf_counter() - t0:.1f} s")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(baselines.results_table(results)[["accuracy", "accuracy_ci", "f1", "roc_auc",
                                               "hyperparameters", "fit_s"]])
    return {r.name: r for r in results}


def _store(tmp_path, experiment: str) -> None:
    """Create the experiment in the (temporary) store first, with its artifacts under tmp_path:
    tracking.setup then reuses it instead of writing artifacts into the project's mlruns/."""
    mlflow.set_tracking_uri(tracking.tracking_uri())  # an earlier test may have pinned another
    client = mlflow.MlflowClient()
    client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())


def test_linear_models_raise_no_deprecation_warning(demo):
    X, y = baselines.training_data(demo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FutureWarning on `penalty=`, convergence, ...
        for factory in (baselines.lasso, baselines.logistic_l2):
            model = factory(seed=0)
            assert isinstance(model, Pipeline)
            model.fit(X, y)
    assert (model.named_steps["model"].coef_ != 0).any()


def test_factories_are_seeded(demo):
    X, y = baselines.training_data(demo)
    a = baselines.random_forest(seed=3).fit(X, y).predict_proba(demo.X("test"))
    b = baselines.random_forest(seed=3).fit(X, y).predict_proba(demo.X("test"))
    np.testing.assert_array_equal(a, b)


def test_training_rows_never_include_test(demo):
    X, y = baselines.training_data(demo)
    assert not set(X.index) & set(demo.split["test"])
    assert len(X) == len(demo.split["train"]) + len(demo.split["valid"]) == len(y)


def test_forest_beats_both_dummies(demo_results):
    forest = demo_results["random_forest"].summary["test_accuracy"]
    for dummy in ("majority", "stratified"):
        assert forest >= demo_results[dummy].summary["test_accuracy"] + 0.15, dummy
    assert demo_results["random_forest"].chosen  # CV chose something
    assert demo_results["lasso"].cv_score > 0.9


def test_fixed_mode_uses_the_given_hyperparameters(demo):
    params = demo.params.replace(**{"baselines.mode": "fixed", "baselines.models": ["lasso"],
                                    "baselines.fixed": {"lasso": {"C": 0.05}}})
    (result,) = baselines.fit_all(demo, params)
    assert result.chosen == {"C": 0.05} and result.cv_score is None
    assert result.model.named_steps["model"].C == 0.05
    bad = params.replace(**{"baselines.fixed": {"lasso": {"depth": 3}}})
    with pytest.raises(ValueError, match="baselines.fixed.lasso"):
        baselines.fit_all(demo, bad)
    with pytest.raises(ValueError, match="unknown baseline 'svm'"):
        baselines.fit_all(demo, params.replace(**{"baselines.models": ["svm"]}))


def test_one_threshold_rule_for_every_model(demo):
    """threshold_mode: tune -> tuned (as the LLMs' on valid) on out-of-fold P(yes) of the
    training rows, never on test; fixed -> params.threshold, as the LLMs'."""
    from sklearn.model_selection import cross_val_predict

    params = demo.params.replace(**{"baselines.models": ["lasso"], "threshold_mode": "tune"})
    (tuned,) = baselines.fit_all(demo, params)
    X, y = baselines.training_data(demo)
    oof = cross_val_predict(tuned.model, X, y, method="predict_proba",
                            cv=baselines._cv(y, params.baselines.cv_folds, params.seed))[:, 1]
    assert tuned.threshold_source == contract.THRESHOLD_OOF
    assert tuned.threshold == metrics.tune_threshold(y, oof) != 0.5
    np.testing.assert_array_equal(tuned.y_pred, metrics.predict(tuned.p_yes, tuned.threshold))
    # Regression: the stratified floor's threshold was tuned on its random P(yes) (to 0: "Yes"
    # to every row); the floors keep the fixed one.
    (floor,) = baselines.fit_all(demo, params.replace(**{"baselines.models": ["stratified"]}))
    assert (floor.threshold, floor.threshold_source) == (0.5, contract.THRESHOLD_FIXED)
    (fixed,) = baselines.fit_all(demo, params.replace(threshold_mode="fixed", threshold=0.3))
    assert (fixed.threshold, fixed.threshold_source) == (0.3, contract.THRESHOLD_FIXED)
    np.testing.assert_array_equal(fixed.y_pred, (fixed.p_yes >= 0.3).astype(int))


def _messy_csv(path) -> None:
    """Numeric columns with gaps, a categorical column with a rare value and gaps, free text."""
    rng = np.random.default_rng(0)
    n = 160
    y = rng.integers(0, 2, n)
    df = pd.DataFrame({
        "age": np.round(40 + 15 * y + rng.normal(0, 8, n)),
        "score": rng.normal(0, 1, n) + y,
        "colour": rng.choice(["red", "green", "blue"], n),
        "notes": [f"patient {i} says {rng.choice(['fine', 'tired', 'dizzy'])}" for i in range(n)],
        "outcome": np.where(y == 1, "yes", "no"),
    })
    df.loc[rng.choice(n, 12, replace=False), "age"] = np.nan
    df.loc[rng.choice(n, 7, replace=False), "colour"] = np.nan
    df.loc[3, "colour"] = "ultraviolet"  # seen once: a rare category
    df.to_csv(path, index=False)


def test_messy_csv_trains_and_the_report_says_what_was_done(tmp_path):
    _messy_csv(tmp_path / "messy.csv")
    params = load_params(None, {"dataset.source": str(tmp_path / "messy.csv"),
                                "dataset.target": "outcome", "dataset.positive_label": "yes",
                                "name": "messy"})
    prepared = data.prepare(params)
    X, _ = baselines.training_data(prepared)
    report = baselines.preprocessing_report(X)
    text = str(report)
    print(text)
    assert set(report.imputed) == {"age", "colour"}
    assert report.imputed["age"] == X["age"].isna().sum()
    assert set(report.encoded) == {"colour", "notes"}
    assert "imputed 'age'" in text and "median" in text and "imputed 'colour'" in text
    assert "one-hot encoded 'notes'" in text and "rare grouped" in text
    row = report.table.set_index("column").loc["colour"]
    assert row["rare_grouped"] == (1 if "ultraviolet" in set(X["colour"]) else 0)
    results = baselines.fit_all(prepared)
    assert [r.name for r in results] == list(baselines.BASELINES)
    for r in results:
        assert len(r.p_yes) == len(prepared.split["test"]) and np.isfinite(r.p_yes).all()
    assert {r.name: r for r in results}["logistic_l2"].summary["test_accuracy"] > 0.6


def test_run_all_writes_one_run_per_baseline_on_the_llm_split(demo, mlflow_store, tmp_path):
    params = demo.params.replace(experiment="baselines-test")
    _store(tmp_path, params.experiment)
    parent = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(params.experiment).experiment_id).info.run_id
    t0 = time.perf_counter()
    results = baselines.run_all(demo, params, batch_id="b42", parent_run_id=parent)
    print(f"\nrun_all (fit + MLflow logging): {time.perf_counter() - t0:.1f} s")
    client = mlflow.MlflowClient()
    for r in results:
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == r.name
        tags = run.data.tags
        assert tags[contract.TAG_KIND] == "baseline"
        assert tags[contract.TAG_SPLIT_HASH] == demo.split_hash
        assert tags[contract.TAG_MODEL_NAME] == r.name
        assert tags[contract.TAG_BATCH_ID] == "b42" and tags[contract.TAG_PARENT] == parent
        m = run.data.metrics
        assert m["test_accuracy"] == pytest.approx(r.summary["test_accuracy"])
        assert m["test_accuracy_ci_low"] <= m["test_accuracy"] <= m["test_accuracy_ci_high"]
        csv = mlflow.artifacts.download_artifacts(run_id=r.run_id,
                                                  artifact_path="predictions/test.csv",
                                                  dst_path=str(tmp_path / r.name))
        pred = pd.read_csv(csv)
        assert pred["row_id"].tolist() == list(demo.split["test"])  # the LLM runs' test rows
        assert pred["label"].tolist() == demo.y("test").tolist()
        artifacts = {a.path for a in client.list_artifacts(r.run_id)}
        assert {"predictions", "figures", "data"} <= artifacts
        # Like the LLM runs: the data as dataset inputs, a Source, a user, a description.
        assert sorted(i.tags[0].value for i in run.inputs.dataset_inputs) == [
            "test", "train", "valid"]
        assert tags[contract.TAG_USER] and tags[contract.TAG_SOURCE_NAME]
        assert tags[contract.TAG_NOTE].startswith("Test accuracy ")
        for k, v in r.chosen.items():
            assert run.data.params[f"model.{k}"] == str(v)
        assert m["threshold"] == r.threshold
        assert tags[contract.THRESHOLD_SOURCE_TAGS[contract.PREFIX_TEST]] == r.threshold_source
    figures = {r.name: {a.path for a in client.list_artifacts(r.run_id, "figures")}
               for r in results}
    assert "figures/importances.png" in figures["random_forest"]
    assert "figures/coefficients.png" in figures["lasso"]
    models = mlflow.search_logged_models(experiment_ids=[
        mlflow.get_experiment_by_name(params.experiment).experiment_id], output_format="list")
    assert len(models) == len(results)


def test_notebook_runs_with_papermill(mlflow_store, tmp_path):
    experiment = "baselines-notebook-test"
    _store(tmp_path, experiment)
    out = tmp_path / "baselines.ipynb"
    overrides = {"experiment": experiment,
                 "baselines.models": ["random_forest", "lasso", "majority"]}
    result = notebooks.execute("baselines", DEMO_PARAMS, overrides, output=out,
                               progress=False, batch_id="nb1")
    print(f"\nnotebook: {result.seconds:.1f} s")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["lasso", "majority", "random_forest"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics
        assert run.data.tags[contract.TAG_BATCH_ID] == "nb1"
    import nbformat

    nb = nbformat.read(out, as_version=4)
    last = nb.cells[-1].outputs[0]["data"]["text/plain"]
    assert "random_forest_test_accuracy" in last
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # forest importances, LASSO coefficients


def test_a_curve_point_fits_on_its_k_rows_and_says_when_cv_cannot_run(tmp_path, monkeypatch):
    """dataset.train_rows (a learning curve's point): the baselines learn from those k rows
    only, not train + valid; too few rows of a class for CV folds -> the model's defaults and a
    fixed threshold, said in the result (logged as a tag)."""
    from helpers import config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    params = load_params(DEMO_PARAMS, {"dataset.train_rows": 3})
    prepared = data.prepare(params)
    X, y = baselines.training_data(prepared)
    assert list(X.index) == prepared.split["train"] and len(y) == 3 and y.sum() == 1
    with pytest.warns(UserWarning, match="random_forest: fixed settings"):
        result = baselines.fit_baseline(prepared, "random_forest")
    assert result.fallback == ("fixed settings (default hyperparameters, threshold fixed at "
                               "0.5): stratified CV needs 2 rows of each class and the 3 "
                               "training rows hold 1 positive / 2 negative")
    assert result.chosen == {} and result.threshold_source == contract.THRESHOLD_FIXED
    assert baselines.fallback_note("majority", y, params) == ""  # a floor tunes nothing
    roomy = data.prepare(params.replace(**{"dataset.train_rows": 40}))
    assert baselines.fit_baseline(roomy, "lasso").fallback == ""


# --- multi-class ------------------------------------------------------------------------------


def test_multiclass_baselines_on_wine():
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    wine = data.prepare(load_params(None, {"dataset.source": "builtin:wine",
                                           "baselines.cv_folds": 3, "n_bootstrap": 200}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated multi_class / solver
        results = {r.name: r for r in baselines.fit_all(wine)}
    y = wine.y("test")
    for r in results.values():
        assert r.p_yes.shape == (len(y), 3) and r.classes == wine.classes
        np.testing.assert_allclose(r.p_yes.sum(axis=1), 1.0)
        assert list(r.y_pred) == list(np.argmax(r.p_yes, axis=1))
        assert r.summary["test_accuracy"] == pytest.approx(accuracy_score(y, r.y_pred))
        assert r.summary["test_f1_macro"] == pytest.approx(f1_score(y, r.y_pred,
                                                                    average="macro"))
        assert r.summary["test_log_loss"] == pytest.approx(log_loss(y, r.p_yes, labels=range(3)))
        assert np.isnan(r.threshold) and r.threshold_source == contract.THRESHOLD_ARGMAX
        assert "test_specificity" not in r.summary
    # The LASSO is one multinomial L1 model (saga), not one-vs-rest liblinear fits.
    lasso = results["lasso"].model.named_steps["model"]
    assert lasso.solver == "saga" and lasso.l1_ratio == 1.0 and lasso.coef_.shape[0] == 3
    assert results["lasso"].summary["test_accuracy"] > 0.8
    weights = baselines.importances(results["lasso"])  # mean |coefficient| over the classes
    assert list(weights.columns) == ["feature", "importance"]
    np.testing.assert_allclose(sorted(weights["importance"]),
                               sorted(np.abs(lasso.coef_).mean(axis=0)))
    # The floors: the most frequent training class for every row (Grignolino).
    majority = results["majority"]
    assert set(majority.y_pred) == {wine.classes.index("Grignolino")}
    assert majority.summary["test_accuracy"] == pytest.approx(np.mean(y == 1))
    table = baselines.results_table(list(results.values()))
    assert {"f1_macro", "log_loss", "balanced_accuracy"} <= set(table.columns)
    assert "specificity" not in table.columns
