"""helpers.metrics: the reference's published figures, agreement with scikit-learn, the bootstrap,
threshold tuning and what is logged to MLflow."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from helpers import metrics


def confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(tp + fn), np.zeros(tn + fp)].astype(int)
    pred = np.r_[np.ones(tp), np.zeros(fn), np.zeros(tn), np.ones(fp)].astype(int)
    return y, pred


def random_case(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Rounded: ties between scores, which AUC must count as one half.
    p = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 2)
    return y, (p >= 0.5).astype(int), p


def test_reference_best_model_published_figures():
    c = metrics.classification(*confusion(tp=20, tn=12, fp=11, fn=16))
    published = {"accuracy": 54.2, "precision": 64.5, "recall": 55.6, "specificity": 52.2,
                 "f1": 59.7, "balance_gap": 3.4}
    assert {k: round(100 * c[k], 1) for k in published} == published
    assert (c["tp"], c["tn"], c["fp"], c["fn"]) == (20, 12, 11, 16)
    assert "roc_auc" not in c and "brier" not in c  # no probabilities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_scikit_learn(seed):
    y, pred, p = random_case(seed)
    c = metrics.classification(y, pred, p)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred),
        "recall": skm.recall_score(y, pred),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "f1": skm.f1_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "mcc": skm.matthews_corrcoef(y, pred),
        "roc_auc": skm.roc_auc_score(y, p),
        "pr_auc": skm.average_precision_score(y, p),
        "brier": skm.brier_score_loss(y, p),
        "positive_rate": pred.mean(),
        "balance_gap": abs(skm.recall_score(y, pred) - skm.recall_score(y, pred, pos_label=0)),
    }
    for k, v in expected.items():
        assert c[k] == pytest.approx(v, abs=1e-12), k
    assert (c["tp"], c["tn"], c["fp"], c["fn"]) == (tp, tn, fp, fn)


def test_zero_denominators_are_zero_and_auc_needs_both_classes():
    y = np.array([1, 1, 0, 0])
    always_no = metrics.classification(y, np.zeros(4, int), p_yes=np.full(4, 0.2))
    assert always_no["precision"] == 0.0 and always_no["f1"] == 0.0 and always_no["mcc"] == 0.0
    assert always_no["roc_auc"] == 0.5  # constant scores: every pair a tie
    one_class = metrics.classification(np.ones(4, int), np.ones(4, int), np.full(4, 0.9))
    assert "roc_auc" not in one_class and "pr_auc" not in one_class
    assert one_class["specificity"] == 0.0 and one_class["brier"] == pytest.approx(0.01)
    assert "roc_auc" not in metrics.bootstrap_ci(np.ones(4, int), np.ones(4, int),
                                                 np.full(4, 0.9))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0/1"):
        metrics.classification([0, 2], [0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        metrics.classification([0, 1], [0, 1], [0.2, 1.5])
    with pytest.raises(ValueError, match="rows"):
        metrics.classification([0, 1, 1], [0, 1])


def test_bootstrap_auc_equals_weighted_scikit_learn():
    # The vectorized AUC of each resample, against scikit-learn on the same resample.
    y, _, p = random_case(3, n=80)
    w = metrics._stratified_counts(y, 5, np.random.default_rng(0))
    ours = metrics._roc_auc(y, p, w)
    for b in range(5):
        assert ours[b] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w[b]), abs=1e-12)
    assert (w[:, y == 1].sum(axis=1) == y.sum()).all()  # stratified: class sizes kept


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
    y, pred, p = random_case(4, n=200)
    point = metrics.classification(y, pred, p)
    ci = metrics.bootstrap_ci(y, pred, p, n=1000, seed=7)
    assert set(ci) == {"accuracy", "f1", "balanced_accuracy", "roc_auc"}
    for m, (low, high) in ci.items():
        assert low <= point[m] <= high, m
    assert metrics.bootstrap_ci(y, pred, p, n=1000, seed=7) == ci
    assert metrics.bootstrap_ci(y, pred, p, n=1000, seed=8) != ci
    big = metrics.bootstrap_ci(np.tile(y, 9), np.tile(pred, 9), np.tile(p, 9), n=1000, seed=7)
    for m in ci:
        assert big[m][1] - big[m][0] < 0.5 * (ci[m][1] - ci[m][0]), m  # ~1/3 expected
    with pytest.raises(ValueError, match="1000"):
        metrics.bootstrap_ci(y, pred, p, n=10)


def test_bootstrap_is_fast():
    y, pred, p = random_case(5, n=1000)
    t0 = time.perf_counter()
    metrics.bootstrap_ci(y, pred, p, n=1000)
    print(f"bootstrap, 1000 resamples of 1000 rows: {time.perf_counter() - t0:.3f} s")


def test_summary_is_flat_with_ci_bounds():
    y, pred, p = random_case(6)
    s = metrics.summary(y, pred, p, prefix="zeroshot_test_", n_bootstrap=200)
    assert all(k.startswith("zeroshot_test_") and isinstance(v, float) for k, v in s.items())
    for m in ("accuracy", "f1", "balanced_accuracy", "roc_auc"):
        assert s[f"zeroshot_test_{m}_ci_low"] <= s[f"zeroshot_test_{m}"]
        assert s[f"zeroshot_test_{m}"] <= s[f"zeroshot_test_{m}_ci_high"]
    assert "zeroshot_test_precision_ci_low" not in s


def test_tune_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    # Separable with the gap around 0.5: nothing to gain, stays at the default.
    assert metrics.tune_threshold(y, [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]) == 0.5
    # Separable only below 0.5: the midpoint of the gap, which classifies all correctly.
    t = metrics.tune_threshold(y, [0.1, 0.2, 0.3, 0.35, 0.4, 0.45])
    assert t == pytest.approx(0.325)
    assert metrics.classification(y, metrics.predict([0.1, 0.2, 0.3, 0.35, 0.4, 0.45], t))[
        "balanced_accuracy"] == 1.0
    # No signal at all: every threshold ties, the default wins.
    assert metrics.tune_threshold(y, np.full(6, 0.9)) == 0.5
    # Never worse than 0.5 on the data it is tuned on.
    y, _, p = random_case(7)
    t = metrics.tune_threshold(y, p)
    tuned = metrics.classification(y, metrics.predict(p, t))["balanced_accuracy"]
    assert tuned >= metrics.classification(y, metrics.predict(p, 0.5))["balanced_accuracy"]


def test_confusion_figure():
    fig = metrics.confusion_figure(*confusion(20, 12, 11, 16), title="best model")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"20", "12", "11", "16"}
    assert fig.axes[0].get_title() == "best model"


def test_log_to_mlflow_writes_metrics_predictions_and_figure(mlflow_store, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    exp = mlflow.create_experiment("m", artifact_location=(tmp_path / "art").as_uri())
    y, pred, p = random_case(8, n=40)
    ids = [f"r{i}" for i in range(40)]
    with mlflow.start_run(experiment_id=exp) as run:
        logged = metrics.log_to_mlflow("test", y, pred, p, ids, n_bootstrap=200)
        metrics.log_to_mlflow("zeroshot_test", y, pred, None, ids, raw=["Yes"] * 40,
                              n_bootstrap=200)
    data = mlflow.get_run(run.info.run_id).data.metrics
    assert data["test_accuracy"] == pytest.approx(logged["test_accuracy"])
    assert "test_roc_auc_ci_high" in data and "zeroshot_test_roc_auc" not in data
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "predictions")}
    assert files == {"predictions/test.csv", "predictions/zeroshot_test.csv"}
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    test = pd.read_csv(f"{local}/predictions/test.csv")
    assert list(test.columns) == ["row_id", "label", "p_yes", "prediction"]
    assert test["row_id"].tolist() == ids and test["p_yes"].tolist() == pytest.approx(p)
    zs = pd.read_csv(f"{local}/predictions/zeroshot_test.csv")
    assert list(zs.columns) == ["row_id", "label", "p_yes", "prediction", "raw"]
    assert zs["p_yes"].isna().all()
    figures = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/confusion_test.png", "figures/confusion_zeroshot_test.png"}


# --- multi-class ------------------------------------------------------------------------------


def multiclass_case(seed: int, n: int = 240, k: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    proba[np.arange(n), y] += rng.random(n)  # better than chance, not perfect
    proba = np.round(proba / proba.sum(axis=1, keepdims=True), 3)  # ties, as AUC meets them
    proba /= proba.sum(axis=1, keepdims=True)
    return y, np.argmax(proba, axis=1), proba


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_metrics_match_scikit_learn(seed):
    y, pred, proba = multiclass_case(seed)
    names = ["ant", "bee", "cat", "dog"]
    c = metrics.classification_multi(y, pred, proba, names)
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "f1_macro": skm.f1_score(y, pred, average="macro"),
        "f1_weighted": skm.f1_score(y, pred, average="weighted"),
        "log_loss": skm.log_loss(y, proba, labels=range(4)),
        "roc_auc": skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"),
    }
    recall = skm.recall_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None, zero_division=0)
    for k, name in enumerate(names):
        expected[f"recall_{name}"], expected[f"precision_{name}"] = recall[k], precision[k]
    assert set(c) == set(expected)
    for key, v in expected.items():
        assert c[key] == pytest.approx(v, abs=1e-9), key
    assert "specificity" not in c and "balance_gap" not in c  # binary-only


def test_multiclass_metrics_without_probabilities_or_a_class():
    y, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1])
    c = metrics.classification_multi(y, pred, None, ["a", "b", "c"])
    assert "log_loss" not in c and "roc_auc" not in c
    assert c["precision_c"] == 0.0 and c["recall_c"] == 0.0  # never predicted: 0, not NaN
    assert c["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    with pytest.raises(ValueError, match="class indices 0..2"):
        metrics.classification_multi([0, 3], [0, 1], None, ["a", "b", "c"])


def test_multiclass_bootstrap_is_stratified_seeded_and_brackets_the_estimate():
    y, pred, proba = multiclass_case(5, n=120, k=3)
    ci = metrics.bootstrap_ci_multi(y, pred, proba, 3, n=500, seed=1)
    assert set(ci) == set(metrics.MULTICLASS_CI_METRICS)
    point = metrics.classification_multi(y, pred, proba, ["a", "b", "c"])
    for m, (low, high) in ci.items():
        assert low <= point[m] <= high and low < high, m
    assert ci == metrics.bootstrap_ci_multi(y, pred, proba, 3, n=500, seed=1)
    # Each resample keeps every class's count (stratified): balanced accuracy of a constant
    # prediction is exactly 1/3 in every resample.
    const = metrics.bootstrap_ci_multi(y, np.zeros_like(y), None, 3, n=200)
    assert const["balanced_accuracy"] == pytest.approx((1 / 3, 1 / 3))


def test_multiclass_log_to_mlflow(mlflow_store, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    exp = mlflow.create_experiment("mc", artifact_location=(tmp_path / "art").as_uri())
    y, pred, proba = multiclass_case(3, n=30, k=3)
    names = ["Nebbiolo", "Grignolino", "Barbera"]
    with mlflow.start_run(experiment_id=exp) as run:
        logged = metrics.log_to_mlflow_multi("test", y, pred, proba, list(range(30)), names,
                                             n_bootstrap=200)
    data = mlflow.get_run(run.info.run_id).data.metrics
    assert data["test_f1_macro"] == pytest.approx(logged["test_f1_macro"])
    assert "test_recall_Grignolino" in data and "test_roc_auc_ci_low" in data
    assert "test_specificity" not in data
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    frame = pd.read_csv(f"{local}/predictions/test.csv")
    assert list(frame.columns)[:4] == ["row_id", "label", "p_yes", "prediction"]
    assert frame["label_name"].tolist() == [names[k] for k in y]
    np.testing.assert_allclose(frame[["p_0", "p_1", "p_2"]].to_numpy(), proba)
    fig = metrics.confusion_figure_multi(y, pred, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    cm = skm.confusion_matrix(y, pred)
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(cm.ravel().tolist())
