"""`tablora predict`: new rows (a CSV, no labels needed) scored by a run's model, LLM or
baseline, at the threshold that run's evaluation chose.

The model comes from the run's logged MLflow model (or a registry URI, models:/NAME/VERSION): its
metadata names the kind, the feature columns and the threshold. LLM rows go through the pyfunc's
classifier (helpers.serving.pyfunc), baselines through their scikit-learn pipeline. Output: the
input's id column (or the row number), p_yes, prediction; with the target column present the
metrics are computed too. Nothing is written unless every row was scored.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import contract, data, metrics, tracking
from helpers.serving.pyfunc import PredictError, check_columns

# What new rows may be read from (the same readers as the training table's CSV/TSV).
SUFFIXES = {".csv": ",", ".txt": ",", ".tsv": "\t"}
# Metrics printed when the rows carry labels.
SHOWN_METRICS = ("accuracy", "balanced_accuracy", "f1", "roc_auc")


@dataclass
class Prediction:
    """One scored file: the output frame and what produced it."""

    frame: pd.DataFrame  # row_id, p_yes, prediction
    kind: str  # contract.KIND_LLM or KIND_BASELINE
    model_uri: str
    threshold: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # when labels were given

    @property
    def examples_per_sec(self) -> float:
        return len(self.frame) / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- which model


def model_uri(run_id: str = "", model: str = "") -> str:
    """The logged model to use: `model` as given (models:/NAME/VERSION, runs:/ID/model), or the
    run's own."""
    if bool(run_id) == bool(model):
        raise PredictError("give either a run (--run RUN_ID) or a model (--model "
                           "models:/NAME/VERSION), not both and not neither.")
    if model:
        return model
    tracking.get_run(run_id)  # a StoreError naming the id
    return f"runs:/{run_id}/{contract.ARTIFACT_MODEL}"


def model_metadata(uri: str) -> dict[str, Any]:
    """The tablora metadata of a logged model, or a PredictError saying what is missing."""
    import mlflow

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing model
        raise PredictError(
            f"{uri}: no logged model there ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ". A run logs its model when it is evaluated (LLM: `tablora evaluate PARAMS.yaml "
            "--run-id ID`; baselines: `tablora baselines PARAMS.yaml`): run that first, or "
            f"check the id in {tracking.tracking_uri()}.") from None
    meta = (info.metadata or {}).get(contract.MODEL_METADATA)
    if not meta:
        raise PredictError(f"{uri}: this model was not logged by this version of tablora (its "
                           f"metadata has no {contract.MODEL_METADATA!r} entry): evaluate the "
                           "run again to log it.")
    return meta


# --------------------------------------------------------------------------- reading rows


def read_rows(path: Path, meta: dict[str, Any]) -> pd.DataFrame:
    """The rows of a CSV/TSV file, text columns read as text (as the training table's were
    written into prompts), checked: one PredictError line for an unreadable, empty or
    incomplete file. Columns the model does not use get one warning."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such file: give the CSV of rows to score.")
    sep = SUFFIXES.get(path.suffix.lower())
    if sep is None:
        raise PredictError(f"{path}: not a CSV file (suffix {path.suffix or '(none)'!r}): save "
                           "the rows as .csv (or .tsv) with a header row of column names.")
    features, kinds = meta["features"], meta.get("kinds", {})
    text = [c for c in features if kinds.get(c) == data.KIND_TEXT]
    try:
        table = pd.read_csv(path, sep=sep, dtype={c: str for c in text})
    except pd.errors.EmptyDataError:
        raise PredictError(f"{path}: the file is empty: give a header row of column names "
                           f"({', '.join(map(repr, features))}) and one row per example."
                           ) from None
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
        raise PredictError(f"{path}: could not read it as CSV ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]}): give a text CSV with a header "
                           "row.") from None
    check_columns(table, features, str(path))
    known = {*features, meta["target"], *data.ID_COLUMNS}
    extra = [str(c) for c in table.columns if c not in known]
    if extra:
        print(f"warning: {path}: ignoring {len(extra)} column(s) the model does not use: "
              f"{', '.join(map(repr, extra[:10]))}{' ...' if len(extra) > 10 else ''}",
              file=sys.stderr)
    return table


def row_ids(table: pd.DataFrame) -> list:
    """The input's id column (as in training: `id` or `row_id`), else the row number."""
    for col in data.ID_COLUMNS:
        if col in table.columns:
            return table[col].tolist()
    return list(range(len(table)))


def labels(table: pd.DataFrame, meta: dict[str, Any]) -> np.ndarray | None:
    """0/1 labels when the target column is there and filled in every row, else None."""
    target = meta["target"]
    if target not in table.columns or table[target].isna().any():
        return None
    return data.positive_labels(table[target], str(meta["positive_label"]))


# --------------------------------------------------------------------------- scoring


_LOADED: dict[str, Any] = {}  # model URI -> loaded model, for repeated calls in one process


def load_llm(uri: str) -> Any:
    """The LLMClassifier inside the logged pyfunc model."""
    import mlflow

    if uri not in _LOADED:
        _LOADED.clear()  # one model in memory at a time
        _LOADED[uri] = mlflow.pyfunc.load_model(uri).unwrap_python_model().classifier
    return _LOADED[uri]


def load_baseline(uri: str) -> Any:
    import mlflow.sklearn

    if uri not in _LOADED:
        _LOADED.clear()
        _LOADED[uri] = mlflow.sklearn.load_model(uri)
    return _LOADED[uri]


def _baseline_frame(model: Any, table: pd.DataFrame, features: list[str],
                    origin: str) -> pd.DataFrame:
    """The feature columns with the dtypes the pipeline was fitted on: a column it imputes as
    numeric is read as numbers (a value that is not one becomes missing, with a warning)."""
    X = table[features].copy()
    numeric = set()
    for name, _, cols in getattr(model.named_steps["prep"], "transformers_", []):
        if name == "num":
            numeric.update(cols)
    for col in numeric & set(features):
        if pd.api.types.is_numeric_dtype(X[col]):
            continue  # untouched: replacing a column changes the memory layout, and with it
            # the last bit of the BLAS's sums
        values = pd.to_numeric(X[col], errors="coerce")
        bad = int((values.isna() & X[col].notna()).sum())
        if bad:
            print(f"warning: {origin}: {bad} value(s) of numeric column {col!r} are not numbers: "
                  "scored as missing (imputed as in training)", file=sys.stderr)
        X[col] = values
    return X


def score(table: pd.DataFrame, meta: dict[str, Any], uri: str, origin: str = "input",
          progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(p_yes, prediction, threshold) for the rows of `table`."""
    kind = meta["kind"]
    threshold = float("nan") if meta.get("threshold") is None else float(meta["threshold"])
    if kind == contract.KIND_LLM:
        classifier = load_llm(uri)
        scores = classifier.score(table, progress=progress, origin=origin)
        return scores.p_yes, classifier.predictions(scores), threshold
    if kind == contract.KIND_BASELINE:
        from threadpoolctl import threadpool_limits

        model = load_baseline(uri)
        X = _baseline_frame(model, table, meta["features"], origin)
        with threadpool_limits(1):  # as when it was fitted (helpers.baselines)
            proba = model.predict_proba(X)
        classes = list(model.classes_)
        p_yes = proba[:, classes.index(1)] if 1 in classes else np.zeros(len(X))
        return p_yes, metrics.predict(p_yes, threshold).astype(int), threshold
    raise PredictError(f"{uri}: a model of kind {kind!r}: expected {contract.KIND_LLM!r} or "
                       f"{contract.KIND_BASELINE!r}.")


def predict(path: Path, run_id: str = "", model: str = "", out: Path | None = None,
            progress: bool = True) -> Prediction:
    """Score the rows of `path` with a run's (or a registry) model; write `out` (CSV) when
    given, and only once every row is scored."""
    uri = model_uri(run_id, model)
    meta = model_metadata(uri)
    table = read_rows(path, meta)
    # Loading is not scoring: out of the examples/s.
    {contract.KIND_LLM: load_llm, contract.KIND_BASELINE: load_baseline}.get(
        meta["kind"], lambda _: None)(uri)
    if meta.get("task") == data.MULTICLASS:
        return _predict_classes(path, table, meta, uri, out, progress)
    t0 = time.perf_counter()
    p_yes, prediction, threshold = score(table, meta, uri, str(path), progress)
    seconds = time.perf_counter() - t0
    frame = pd.DataFrame({"row_id": row_ids(table), "p_yes": p_yes, "prediction": prediction})
    result = Prediction(frame, meta["kind"], uri, threshold, seconds)
    y = labels(table, meta)
    if y is not None:
        scored = prediction >= 0  # generate mode: an unparsable answer counts as wrong
        pred = np.where(scored, prediction, 1 - y)
        has_p = bool(np.isfinite(p_yes).all())
        result.metrics = {k: float(v) for k, v in metrics.classification(
            y, pred, p_yes if has_p else None).items()}
    if out is not None:
        data._atomic_write(Path(out), frame.to_csv(index=False))
    return result


def score_classes(table: pd.DataFrame, meta: dict[str, Any], uri: str, origin: str = "input",
                  progress: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """A multi-class model's (P(class) or None in generate mode, predicted class index or -1)
    for the rows of `table`: the most likely class, no threshold."""
    k = len(meta["classes"])
    if meta["kind"] == contract.KIND_LLM:
        classifier = load_llm(uri)
        scores = classifier.score(table, progress=progress, origin=origin)
        return scores.proba, classifier.predictions(scores)
    from threadpoolctl import threadpool_limits

    model = load_baseline(uri)
    X = _baseline_frame(model, table, meta["features"], origin)
    with threadpool_limits(1):
        fitted = model.predict_proba(X)
    proba = np.zeros((len(X), k))
    proba[:, np.asarray(model.classes_, dtype=int)] = fitted
    return proba, np.argmax(proba, axis=1)


def _predict_classes(path: Path, table: pd.DataFrame, meta: dict[str, Any], uri: str,
                     out: Path | None, progress: bool) -> Prediction:
    """predict() for a multi-class model: row_id, prediction (the class), p_<class>."""
    from helpers.serving.pyfunc import class_frame

    classes = list(meta["classes"])
    t0 = time.perf_counter()
    proba, prediction = score_classes(table, meta, uri, str(path), progress)
    seconds = time.perf_counter() - t0
    frame = class_frame(prediction, proba, classes)
    frame.insert(0, "row_id", row_ids(table))
    result = Prediction(frame, meta["kind"], uri, float("nan"), seconds)
    target = meta["target"]
    if target in table.columns and not table[target].isna().any():
        y = data.class_indices(table[target], classes)
        known = y >= 0  # rows of a class the model never saw cannot be scored against it
        pred = np.where(prediction >= 0, prediction, (y + 1) % len(classes))[known]
        result.metrics = metrics.classification_multi(
            y[known], pred, proba[known] if proba is not None else None, classes)
    if out is not None:
        data._atomic_write(Path(out), frame.to_csv(index=False))
    return result


def summary_line(result: Prediction) -> str:
    """`N rows scored by KIND model URI (threshold T), X examples/s[; metrics]`."""
    if "p_yes" not in result.frame:  # multi-class: the most likely class, no threshold
        counts = result.frame["prediction"].value_counts()
        line = (f"{len(result.frame)} rows scored by the {result.kind} model "
                f"{result.model_uri} (the most likely class) at "
                f"{result.examples_per_sec:.1f} examples/s; predicted "
                + ", ".join(f"{c or '(no answer)'} {n}" for c, n in counts.items()))
        if result.metrics:
            line += "; " + "  ".join(f"{m} {result.metrics[m]:.3f}"
                                     for m in ("accuracy", "balanced_accuracy", "f1_macro",
                                               "roc_auc") if m in result.metrics)
        return line
    line = (f"{len(result.frame)} rows scored by the {result.kind} model {result.model_uri} "
            f"(threshold {result.threshold:.4g}) at {result.examples_per_sec:.1f} examples/s; "
            f"{int((result.frame['prediction'] == 1).sum())} predicted yes")
    if result.metrics:
        line += "; " + "  ".join(f"{m} {result.metrics[m]:.3f}" for m in SHOWN_METRICS
                                 if m in result.metrics and np.isfinite(result.metrics[m]))
    return line
