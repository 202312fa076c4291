"""Classical baselines every LLM is measured against, on the same split and with the same metrics.

Each baseline is a scikit-learn Pipeline: preprocessing (median imputation of numeric columns,
scaled for the linear models; most-frequent imputation and one-hot encoding of categorical/text
columns, rare categories grouped) followed by the model. Hyperparameters come from stratified CV
on the training rows (train + valid: the LLMs use valid only for early stopping and thresholds,
the baselines have neither) or, with `baselines.mode: fixed`, from `baselines.fixed`. The test
split is only ever predicted, never fitted or tuned on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from helpers import contract, metrics, tracking
from helpers.config import Params, ParamsError

# A category seen fewer times than this in training is grouped with the other rare ones into one
# "infrequent" column (a one-off value cannot be learned from, and it would widen the matrix);
# MAX_CATEGORIES caps the columns per feature, so a free-text column stays a few columns wide.
MIN_FREQUENCY = 5
MAX_CATEGORIES = 20
# CV picks the hyperparameters that rank rows best: threshold-free, smoother than accuracy on a
# few hundred rows.
CV_SCORING = "roc_auc"
# The same on a multi-class target: one-vs-rest ROC-AUC, averaged over the classes.
CV_SCORING_MULTICLASS = "roc_auc_ovr"
# A multi-class LASSO: the multinomial L1 logistic regression (liblinear fits one-vs-rest only).
MULTICLASS_HYPER = {"lasso": {"solver": "saga", "max_iter": 5000}}


def preprocessor(scale: bool = False) -> ColumnTransformer:
    """Numeric columns: median imputation (+ standardization when `scale`); everything else
    (strings, booleans, categories): most-frequent imputation + one-hot encoding. Columns are
    picked by dtype when fitted, so one pipeline serves any table."""
    numeric = [SimpleImputer(strategy="median")] + ([StandardScaler()] if scale else [])
    categorical = make_pipeline(
        SimpleImputer(strategy="most_frequent"),
        OneHotEncoder(handle_unknown="ignore", min_frequency=MIN_FREQUENCY,
                      max_categories=MAX_CATEGORIES, sparse_output=False),
    )
    return ColumnTransformer([
        ("num", make_pipeline(*numeric), make_column_selector(dtype_include="number")),
        ("cat", categorical, make_column_selector(dtype_exclude="number")),
    ])


def _pipeline(model: Any, scale: bool) -> Pipeline:
    return Pipeline([("prep", preprocessor(scale)), ("model", model)])


# The factories: an unfitted Pipeline, seeded; keyword arguments go to the model.

def random_forest(seed: int = 0, **hyper: Any) -> Pipeline:
    return _pipeline(RandomForestClassifier(**{"n_estimators": 100, "random_state": seed,
                                               **hyper}), scale=False)


def lasso(seed: int = 0, **hyper: Any) -> Pipeline:
    # scikit-learn >= 1.8: an L1 penalty is `l1_ratio=1` (`penalty="l1"` is deprecated);
    # liblinear handles it fast and deterministically on small tables.
    return _pipeline(LogisticRegression(**{"l1_ratio": 1.0, "solver": "liblinear", "C": 1.0,
                                           "max_iter": 1000, "random_state": seed, **hyper}),
                     scale=True)


def logistic_l2(seed: int = 0, **hyper: Any) -> Pipeline:
    return _pipeline(LogisticRegression(**{"l1_ratio": 0.0, "C": 1.0, "max_iter": 1000,
                                           "random_state": seed, **hyper}), scale=True)


def hist_gradient_boosting(seed: int = 0, **hyper: Any) -> Pipeline:
    # No early stopping: it would hold out part of the (small) training data at random.
    return _pipeline(HistGradientBoostingClassifier(**{"early_stopping": False,
                                                       "random_state": seed, **hyper}),
                     scale=False)


def majority(seed: int = 0, **hyper: Any) -> Pipeline:
    return _pipeline(DummyClassifier(**{"strategy": "most_frequent", **hyper}), scale=False)


def stratified(seed: int = 0, **hyper: Any) -> Pipeline:
    return _pipeline(DummyClassifier(**{"strategy": "stratified", "random_state": seed,
                                        **hyper}), scale=False)


@dataclass(frozen=True)
class Baseline:
    factory: Callable[..., Pipeline]
    # Model hyperparameters searched by CV (small on purpose: the point is a fair floor, fast).
    grid: dict[str, list[Any]] = field(default_factory=dict)


BASELINES: dict[str, Baseline] = {
    "random_forest": Baseline(random_forest, {"min_samples_leaf": [1, 5]}),
    "lasso": Baseline(lasso, {"C": [0.01, 0.1, 1.0, 10.0]}),
    "logistic_l2": Baseline(logistic_l2, {"C": [0.01, 0.1, 1.0, 10.0]}),
    "hist_gradient_boosting": Baseline(hist_gradient_boosting, {"max_leaf_nodes": [7, 31]}),
    "majority": Baseline(majority),
    "stratified": Baseline(stratified),
}


@dataclass
class BaselineResult:
    name: str
    model: Pipeline  # fitted on train + valid
    chosen: dict[str, Any]  # the model hyperparameters used (CV-chosen or fixed)
    cv_score: float | None  # mean CV ROC-AUC of the chosen setting (None: nothing tuned)
    row_ids: list[Any]  # the test split, in order
    y_true: np.ndarray
    p_yes: np.ndarray
    y_pred: np.ndarray
    summary: dict[str, float]  # metrics.summary(): test_accuracy, test_accuracy_ci_low, ...
    fit_seconds: float
    threshold: float = 0.5
    threshold_source: str = contract.THRESHOLD_FIXED  # contract.THRESHOLD_SOURCES
    run_id: str = ""
    # Set when CV could not run on the training rows (a learning curve's few rows): what was
    # used instead (fallback_note), logged as the run's tag contract.TAG_FALLBACK.
    fallback: str = ""
    # A multi-class task: the class values; p_yes then holds P(class), (rows, classes).
    classes: list = field(default_factory=list)


# ---------------------------------------------------------------------------- fitting

def training_data(prepared: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """Train + valid rows (features, 0/1 labels). On a learning curve's point
    (dataset.train_rows) the training rows only: k counts every row a model learns from, and
    the LLM learns from those k alone (valid only stops its training and sets its threshold)."""
    parts = ("train",) if prepared.params.dataset.train_rows else ("train", "valid")
    parts = [s for s in parts if len(prepared.split.get(s, []))]
    X = pd.concat([prepared.X(s) for s in parts])
    y = np.concatenate([prepared.y(s) for s in parts])
    return X, y


def _cv(y: np.ndarray, folds: int, seed: int) -> StratifiedKFold | None:
    """Stratified folds, fewer when the minority class is too small (None: no CV possible)."""
    folds = min(folds, int(np.bincount(y, minlength=2).min()))
    return StratifiedKFold(folds, shuffle=True, random_state=seed) if folds >= 2 else None


def fallback_note(name: str, y: np.ndarray, params: Params) -> str:
    """Why this baseline cannot be tuned as asked on these rows (too few of a class for CV
    folds), in words for the run's tag; "" when it can."""
    counts = np.bincount(np.asarray(y, dtype=int), minlength=2)
    if (params.baselines.mode != "cv" or name in contract.FLOORS
            or _cv(y, params.baselines.cv_folds, params.seed) is not None):
        return ""
    what = "default hyperparameters" if BASELINES[name].grid else "no hyperparameters to tune"
    threshold = (f", threshold fixed at {params.threshold:g}"
                 if params.threshold_mode == "tune" else "")
    return (f"fixed settings ({what}{threshold}): stratified CV needs 2 rows of each class "
            f"and the {len(y)} training rows hold {counts[1]} positive / {counts[0]} negative")


def _positive_proba(model: Pipeline, X: pd.DataFrame) -> np.ndarray:
    proba = model.predict_proba(X)
    classes = list(model.classes_)
    if 1 not in classes:  # training had no positive row
        return np.zeros(len(X))
    return proba[:, classes.index(1)]


def fit_model(name: str, X: pd.DataFrame, y: np.ndarray, params: Params,
              multiclass: bool = False) -> tuple[Pipeline, dict[str, Any], float | None]:
    """Fit one baseline: (fitted pipeline, hyperparameters used, CV score or None).
    multiclass: y holds class indices 0..K-1 (multinomial models, one-vs-rest CV ROC-AUC)."""
    if name not in BASELINES:
        raise ParamsError(f"unknown baseline {name!r} in baselines.models: known are "
                          f"{', '.join(BASELINES)}")
    spec = BASELINES[name]
    task_hyper = MULTICLASS_HYPER.get(name, {}) if multiclass else {}
    if params.baselines.mode == "fixed":
        chosen = dict(params.baselines.fixed.get(name, {}))
        try:
            model = spec.factory(params.seed, **{**task_hyper, **chosen})
        except TypeError as e:
            raise ParamsError(f"baselines.fixed.{name}: {e}") from None
        return model.fit(X, y), chosen, None
    cv = _cv(y, params.baselines.cv_folds, params.seed)
    model = spec.factory(params.seed, **task_hyper)
    if not spec.grid or cv is None:
        return model.fit(X, y), {}, None
    search = GridSearchCV(model, {f"model__{k}": v for k, v in spec.grid.items()}, cv=cv,
                          scoring=CV_SCORING_MULTICLASS if multiclass else CV_SCORING,
                          error_score="raise", n_jobs=1)
    search.fit(X, y)
    chosen = {k.removeprefix("model__"): v for k, v in search.best_params_.items()}
    return search.best_estimator_, chosen, float(search.best_score_)


def oof_threshold(model: Pipeline, X: pd.DataFrame, y: np.ndarray, params: Params) -> float | None:
    """The threshold tuned (metrics.tune_threshold, as for the LLMs on valid) on out-of-fold
    P(yes) of the training rows: each row scored by a copy of `model` (same hyperparameters)
    fitted on the other folds. None when the classes are too small for folds."""
    cv = _cv(y, params.baselines.cv_folds, params.seed)
    if cv is None:
        return None
    proba = cross_val_predict(clone(model), X, y, cv=cv, method="predict_proba")
    return metrics.tune_threshold(y, proba[:, 1])


def fit_baseline(prepared: Any, name: str, params: Params | None = None) -> BaselineResult:
    """Fit one baseline on train + valid and score it on the test split at params.threshold,
    or (threshold_mode: tune; not for the floors) at a threshold tuned out-of-fold on train +
    valid."""
    from threadpoolctl import threadpool_limits

    params = params or prepared.params
    if getattr(prepared, "multiclass", False):
        return _fit_multiclass(prepared, name, params)
    X, y = training_data(prepared)
    X_test, y_test = prepared.X("test"), prepared.y("test")
    # One thread: on tables this small, OpenMP/BLAS threads cost more than they save, and with
    # anything else running (or the second OpenBLAS that helpers.llm.blas loads for MLX) they
    # oversubscribe the cores: measured 20x slower (HistGradientBoosting 3 s -> 66 s on 2 cores).
    with threadpool_limits(1):
        t0 = time.perf_counter()
        model, chosen, cv_score = fit_model(name, X, y, params)
        threshold, source = params.threshold, contract.THRESHOLD_FIXED
        # A floor's P(yes) carries no information (constant, or random): a threshold tuned on
        # it would be tuned on noise, so the floors keep the fixed one.
        if params.threshold_mode == "tune" and name not in contract.FLOORS:
            tuned = oof_threshold(model, X, y, params)
            if tuned is not None:
                threshold, source = tuned, contract.THRESHOLD_OOF
        seconds = time.perf_counter() - t0
        p_yes = _positive_proba(model, X_test)
    y_pred = metrics.predict(p_yes, threshold)
    summary = metrics.summary(y_test, y_pred, p_yes, prefix="test_",
                              n_bootstrap=params.n_bootstrap, seed=params.seed)
    fallback = fallback_note(name, y, params)
    if fallback:
        import warnings

        warnings.warn(f"{name}: {fallback}", stacklevel=2)
    return BaselineResult(name, model, chosen, cv_score, list(prepared.split["test"]), y_test,
                          p_yes, y_pred, summary, seconds, threshold, source, fallback=fallback)


def _class_proba(model: Pipeline, X: pd.DataFrame, k: int) -> np.ndarray:
    """P(class) for classes 0..k-1 (a class the training rows lacked gets 0)."""
    proba = model.predict_proba(X)
    out = np.zeros((len(X), k))
    out[:, np.asarray(model.classes_, dtype=int)] = proba
    return out


def _fit_multiclass(prepared: Any, name: str, params: Params) -> BaselineResult:
    """fit_baseline on a multi-class target: the most likely class, no threshold."""
    from threadpoolctl import threadpool_limits

    X, y = training_data(prepared)
    X_test, y_test = prepared.X("test"), prepared.y("test")
    k = len(prepared.classes)
    with threadpool_limits(1):
        t0 = time.perf_counter()
        model, chosen, cv_score = fit_model(name, X, y, params, multiclass=True)
        seconds = time.perf_counter() - t0
        proba = _class_proba(model, X_test, k)
    y_pred = np.argmax(proba, axis=1)
    summary = metrics.summary_multi(y_test, y_pred, proba, prepared.classes, prefix="test_",
                                    n_bootstrap=params.n_bootstrap, seed=params.seed)
    fallback = fallback_note(name, y, params)
    if fallback:
        import warnings

        warnings.warn(f"{name}: {fallback}", stacklevel=2)
    return BaselineResult(name, model, chosen, cv_score, list(prepared.split["test"]), y_test,
                          proba, y_pred, summary, seconds, float("nan"),
                          contract.THRESHOLD_ARGMAX, fallback=fallback,
                          classes=list(prepared.classes))


def fit_all(prepared: Any, params: Params | None = None) -> list[BaselineResult]:
    """Every baseline in params.baselines.models, fitted and scored (nothing logged)."""
    params = params or prepared.params
    return [fit_baseline(prepared, name, params) for name in params.baselines.models]


# ---------------------------------------------------------------------------- reporting

@dataclass(repr=False)
class PreprocessingReport:
    """What the pipeline does to a table: which columns it imputes and how it encodes."""

    table: pd.DataFrame  # one row per column

    @property
    def imputed(self) -> dict[str, int]:
        """{column: missing values filled}."""
        t = self.table[self.table["missing"] > 0]
        return dict(zip(t["column"], t["missing"].astype(int), strict=True))

    @property
    def encoded(self) -> dict[str, int]:
        """{categorical column: distinct values}."""
        t = self.table[self.table["kind"] == "categorical"]
        return dict(zip(t["column"], t["categories"].astype(int), strict=True))

    def lines(self) -> list[str]:
        out = []
        for r in self.table.itertuples():
            if r.missing:
                out.append(f"imputed {r.column!r}: {r.missing} missing -> {r.imputation} "
                           f"({r.fill_value})")
            if r.kind == "categorical":
                grouped = (f", {r.rare_grouped} rare grouped as 'infrequent'"
                           if r.rare_grouped else "")
                out.append(f"one-hot encoded {r.column!r}: {r.categories} categories -> "
                           f"{r.encoded_columns} columns{grouped}")
        return out or ["nothing imputed or encoded: all columns numeric and complete"]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return str(self) + "\n\n" + self.table.to_string(index=False)

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{line}</li>" for line in self.lines())
        return f"<ul>{items}</ul>" + self.table.to_html(index=False)


def preprocessing_report(X: pd.DataFrame) -> PreprocessingReport:
    """Fit the (unscaled) preprocessor on X and read back what it learned: the fill values of
    imputed columns, and per categorical column its categories and those grouped as rare."""
    prep = preprocessor().fit(X)
    rows = []
    for name, transformer, cols in prep.transformers_:
        if name not in ("num", "cat") or not len(cols):
            continue
        imputer = transformer[0]
        for i, col in enumerate(cols):
            row = {"column": col, "kind": "numeric" if name == "num" else "categorical",
                   "missing": int(X[col].isna().sum()),
                   "imputation": "median" if name == "num" else "most frequent",
                   "fill_value": imputer.statistics_[i], "categories": pd.NA,
                   "rare_grouped": 0, "encoded_columns": 1}
            if name == "cat":
                enc = transformer[-1]
                infrequent = enc.infrequent_categories_[i]
                row["categories"] = int(X[col].nunique())
                row["rare_grouped"] = 0 if infrequent is None else len(infrequent)
                row["encoded_columns"] = len(enc.categories_[i]) - row["rare_grouped"] + (
                    1 if row["rare_grouped"] else 0)
            if not row["missing"]:
                row["imputation"], row["fill_value"] = "", ""
            rows.append(row)
    return PreprocessingReport(pd.DataFrame(rows))


def _feature_names(model: Pipeline) -> list[str]:
    # "num__mean radius" -> "mean radius": the transformer prefix is noise in a figure.
    return [n.split("__", 1)[-1] for n in model.named_steps["prep"].get_feature_names_out()]


def importances(result: BaselineResult) -> pd.DataFrame | None:
    """Impurity importances (forest) or coefficients on standardized features (linear models),
    largest magnitude first; None for models without either."""
    est = result.model.named_steps["model"]
    if hasattr(est, "feature_importances_"):
        values, what = est.feature_importances_, "importance"
    elif hasattr(est, "coef_") and est.coef_.shape[0] > 1:
        # Multinomial: a coefficient per class; a feature's weight is their mean magnitude.
        values, what = np.abs(est.coef_).mean(axis=0), "importance"
    elif hasattr(est, "coef_"):
        values, what = est.coef_[0], "coefficient"
    else:
        return None
    df = pd.DataFrame({"feature": _feature_names(result.model), what: values})
    return df.reindex(df[what].abs().sort_values(ascending=False).index).reset_index(drop=True)


def importance_figure(result: BaselineResult, top: int = 15) -> Any:
    """A seaborn bar chart of importances() (top features), or None."""
    import seaborn as sns
    from matplotlib.figure import Figure

    df = importances(result)
    if df is None:
        return None
    df = df.head(top)
    what = df.columns[1]
    fig = Figure(figsize=(6, 0.3 * len(df) + 1.2), layout="constrained")
    ax = fig.subplots()
    if what == "coefficient":  # the sign matters: red lowers P(yes), blue raises it
        sign = np.where(df[what] < 0, "negative", "positive")
        sns.barplot(df, x=what, y="feature", hue=sign, ax=ax, legend=False,
                    palette={"negative": "tab:red", "positive": "tab:blue"})
    else:
        sns.barplot(df, x=what, y="feature", color="tab:blue", ax=ax)
    ax.set_title(f"{result.name}: {what}s")
    if what == "coefficient":
        ax.set_xlabel("coefficient per standard deviation" + (" (0 = dropped by L1)"
                                                             if result.name == "lasso" else ""))
    ax.set_ylabel("")
    return fig


def importance_figures(results: list[BaselineResult]) -> dict[str, Any]:
    """{baseline: figure} for the forest and the LASSO (the reference's two baselines)."""
    figs = {r.name: importance_figure(r) for r in results
            if r.name in ("random_forest", "lasso")}
    return {k: v for k, v in figs.items() if v is not None}


TABLE_METRICS = ("accuracy", "f1", "balanced_accuracy", "roc_auc", "precision", "recall",
                 "specificity", "mcc", "brier")
MULTICLASS_TABLE_METRICS = ("accuracy", "f1_macro", "balanced_accuracy", "roc_auc",
                            "f1_weighted", "log_loss")


def results_table(results: list[BaselineResult]) -> pd.DataFrame:
    """One row per baseline: test metrics (with 95% CI bounds where computed), the chosen
    hyperparameters and the fit time; sorted by accuracy."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"baseline": r.name}
        for m in MULTICLASS_TABLE_METRICS if r.classes else TABLE_METRICS:
            row[m] = r.summary.get(f"test_{m}", np.nan)
            if f"test_{m}_ci_low" in r.summary:
                row[f"{m}_ci"] = (f"[{r.summary[f'test_{m}_ci_low']:.3f}, "
                                  f"{r.summary[f'test_{m}_ci_high']:.3f}]")
        row.update(threshold=r.threshold,
                   threshold_chosen=contract.THRESHOLD_SOURCES[r.threshold_source],
                   cv_roc_auc=r.cv_score, hyperparameters=r.chosen, fit_s=r.fit_seconds)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("baseline").sort_values("accuracy", ascending=False)
    return table.round(3)


def key_figures(results: list[BaselineResult]) -> dict[str, float]:
    """A flat dict for the notebook's last cell: test accuracy, F1 and ROC-AUC per baseline."""
    out: dict[str, float] = {}
    for r in results:
        for m in ("accuracy", "f1", "f1_macro", "roc_auc"):
            if f"test_{m}" in r.summary:
                out[f"{r.name}_test_{m}"] = round(r.summary[f"test_{m}"], 4)
    return out


# ---------------------------------------------------------------------------- MLflow

@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a logger's warnings for a moment (mlflow.sklearn warns about pickle on every
    model; the warning is about loading untrusted models, which these are not)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def model_metadata(prepared: Any, result: BaselineResult) -> dict[str, Any]:
    """What `tablora predict` reads from a baseline's logged model (contract.MODEL_METADATA)."""
    r = prepared.recipe
    out = {"kind": contract.KIND_BASELINE, "features": list(r.features), "kinds": r.kinds,
           "target": r.target, "positive_label": r.positive_label,
           "threshold": float(result.threshold), "baseline": result.name}
    if result.classes:  # multi-class: what a class index means
        out.update(task=r.task, classes=[str(c) for c in result.classes])
    return out


def _log_model(result: BaselineResult, prepared: Any, register: bool = True) -> None:
    """The fitted pipeline as the run's `model`, registered under the baseline's name."""
    import mlflow.sklearn
    import sklearn

    # Explicit requirements: MLflow would otherwise infer them by importing the model in a
    # subprocess, seconds per model. cloudpickle: skops (MLflow's default) is not installed.
    with _quiet("mlflow.sklearn"):
        info = mlflow.sklearn.log_model(
            result.model, name=contract.ARTIFACT_MODEL, serialization_format="cloudpickle",
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            metadata={contract.MODEL_METADATA: model_metadata(prepared, result)})
    if register:
        tracking.register_model(info.model_uri, result.name)


def _log_params(params: Params, result: BaselineResult) -> None:
    import mlflow

    # The data and baseline settings (the LLM keys would be noise here) + the chosen values.
    keep = ("dataset.", "baselines.", "seed", "n_bootstrap", "experiment")
    flat = {k: (repr(v) if isinstance(v, (list, dict)) else v)
            for k, v in params.flat().items() if k.startswith(keep)}
    flat.update({f"model.{k}": v for k, v in result.chosen.items()})
    flat["baseline"] = result.name
    mlflow.log_params(flat)
    if params.source_file and Path(params.source_file).is_file():
        mlflow.log_artifact(params.source_file, artifact_path=contract.ARTIFACT_PARAMS)


def _log_result(params: Params, result: BaselineResult, prepared: Any) -> None:
    import mlflow

    _log_params(params, result)
    if result.classes:
        metrics.log_to_mlflow_multi(contract.PREFIX_TEST, result.y_true, result.y_pred,
                                    result.p_yes, result.row_ids, result.classes,
                                    n_bootstrap=params.n_bootstrap, seed=params.seed)
        extra = {contract.TRAIN_SECONDS: result.fit_seconds}  # no threshold: the argmax
    else:
        metrics.log_to_mlflow(contract.PREFIX_TEST, result.y_true, result.y_pred, result.p_yes,
                              result.row_ids, n_bootstrap=params.n_bootstrap, seed=params.seed)
        extra = {contract.THRESHOLD_METRICS[contract.PREFIX_TEST]: result.threshold,
                 contract.TRAIN_SECONDS: result.fit_seconds}
    mlflow.set_tag(contract.THRESHOLD_SOURCE_TAGS[contract.PREFIX_TEST], result.threshold_source)
    if result.fallback:
        mlflow.set_tag(contract.TAG_FALLBACK, result.fallback[:500])
    if result.cv_score is not None:
        extra["cv_roc_auc"] = result.cv_score
    mlflow.log_metrics(extra)
    fig = importance_figure(result)
    if fig is not None:
        what = importances(result).columns[1]
        mlflow.log_figure(fig, f"{contract.ARTIFACT_FIGURES}/{what}s.png")
    _log_model(result, prepared)


def run_all(prepared: Any, params: Params | None = None, batch_id: str = "",
            parent_run_id: str = "") -> list[BaselineResult]:
    """Fit and score every baseline, one MLflow run each (kind "baseline", run name = the
    baseline) in params.experiment, nested under `parent_run_id` when given. A baseline that
    raises leaves a FAILED run with the error and stops the loop."""
    params = params or prepared.params
    tags = {contract.TAG_SPLIT_HASH: prepared.split_hash, contract.TAG_SEED: str(params.seed),
            contract.TAG_MODEL_FAMILY: "sklearn", contract.TAG_GIT_COMMIT: tracking.git_commit()}
    if batch_id:
        tags[contract.TAG_BATCH_ID] = batch_id
    results = []
    for name in params.baselines.models:
        with tracking.run(params, kind=contract.KIND_BASELINE, run_name=name,
                          nested_in=parent_run_id,
                          tags={**tags, contract.TAG_MODEL_NAME: name}) as run:
            # Every run names the data it was scored on (the UI's Dataset column), as LLM runs do.
            tracking.log_dataset(prepared)
            result = fit_baseline(prepared, name, params)
            _log_result(params, result, prepared)
            result.run_id = run.info.run_id
        results.append(result)
    return results
