"""Classification metrics: one code path for the LLMs and the classical baselines (binary; the
`*_multi` functions at the end for a multi-class target).

Conventions (every caller relies on them):
- labels are 0/1 with 1 = the positive label ("Yes"); `p_yes` is P(label = 1);
- a prediction is 1 when p_yes >= threshold (see `predict`);
- a ratio whose denominator is 0 (precision with no positive prediction, recall with no positive
  row, ...) is 0.0, as scikit-learn's `zero_division=0`, so that a degenerate model (always "No")
  scores 0 instead of NaN and still sorts last in a table;
- ROC-AUC and PR-AUC need probabilities and both classes: without them the keys are absent (not
  NaN), and so are their confidence intervals; the Brier score is absent without probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from helpers.contract import (
    ARTIFACT_FIGURES,
    CI_HIGH,
    CI_LOW,
    CLASS_PROBABILITY,
    LABEL_NAME,
    PREDICTION_NAME,
    predictions_path,
)

# Metrics that get a bootstrap confidence interval (roc_auc only when it exists).
CI_METRICS = ("accuracy", "f1", "balanced_accuracy", "roc_auc")
CI_LEVEL = 0.95


def _as_labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (1 = the positive label), got "
                         f"{sorted(set(arr.tolist()))[:5]}")
    return arr.astype(np.int8)


def _as_probs(p: Any, n: int) -> np.ndarray | None:
    if p is None:
        return None
    arr = np.asarray(p, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"p_yes must have one value per row ({n}), got shape {arr.shape}")
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("p_yes must be probabilities in [0, 1] without NaN")
    return arr


def _div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray | float:
    """num / den with 0/0 (and x/0) = 0.0; works elementwise on arrays (the bootstrap)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)
    return out if out.ndim else float(out)


def predict(p_yes: Sequence[float] | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """0/1 predictions from P(yes): 1 where p_yes >= threshold."""
    return (np.asarray(p_yes, dtype=float) >= threshold).astype(np.int8)


def _from_counts(tp, tn, fp, fn) -> dict[str, Any]:
    """Every count-based metric; arguments may be scalars or arrays (one value per resample)."""
    # Floats from here: products of counts overflow int64 on large test sets (MCC).
    tp, tn, fp, fn = (np.asarray(v, dtype=float) for v in (tp, tn, fp, fn))
    n = tp + tn + fp + fn
    recall = _div(tp, tp + fn)
    specificity = _div(tn, tn + fp)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": _div(tp + tn, n),
        "precision": _div(tp, tp + fp),
        "recall": recall,
        "specificity": specificity,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "balance_gap": np.abs(np.asarray(recall) - specificity),
        "balanced_accuracy": (np.asarray(recall) + specificity) / 2.0,
        "mcc": _div(tp * tn - fp * fn, mcc_den),
        "positive_rate": _div(tp + fp, n),
    }


def _roc_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count one half) for each row of `weights` (resample counts per example).

    Mann-Whitney: over pairs (positive i, negative j), P(p_i > p_j) + P(p_i = p_j) / 2, with each
    example counted as often as its weight. Sorting once and summing weights per distinct score
    makes all resamples one (B, n) array operation instead of B calls to scikit-learn.
    """
    order = np.argsort(p, kind="stable")
    p_sorted = p[order]
    starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])  # first of each score
    w = weights[:, order]
    pos = np.add.reduceat(w * (y[order] == 1), starts, axis=1)
    neg = np.add.reduceat(w * (y[order] == 0), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _div(wins, pos.sum(axis=1) * neg.sum(axis=1))


def _pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (scikit-learn's step-wise PR-AUC, no interpolation)."""
    order = np.argsort(-p, kind="stable")
    y_s, p_s = y[order], p[order]
    last = np.r_[p_s[1:] != p_s[:-1], True]  # one threshold per distinct score
    tp = np.cumsum(y_s)[last]
    predicted = (np.arange(1, len(y_s) + 1))[last]
    precision = tp / predicted
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification(y_true: Any, y_pred: Any, p_yes: Any = None) -> dict[str, Any]:
    """Point estimates: accuracy, precision, recall (sensitivity), specificity, f1, balance_gap
    (= |recall - specificity|), balanced_accuracy, mcc, positive_rate, tp/tn/fp/fn (ints), and
    with probabilities brier, plus roc_auc and pr_auc when both classes are present."""
    y = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if y.shape != pred.shape:
        raise ValueError(f"y_true has {len(y)} rows but y_pred has {len(pred)}")
    p = _as_probs(p_yes, len(y))
    tp = int(np.sum((y == 1) & (pred == 1)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    out: dict[str, Any] = {k: float(v) for k, v in _from_counts(tp, tn, fp, fn).items()}
    if p is not None:
        out["brier"] = float(np.mean((p - y) ** 2)) if len(y) else 0.0
        if 0 < y.sum() < len(y):
            out["roc_auc"] = float(_roc_auc(y, p, np.ones((1, len(y))))[0])
            out["pr_auc"] = _pr_auc(y, p)
    out.update(tp=tp, tn=tn, fp=fp, fn=fn)
    return out


def _stratified_counts(y: np.ndarray, n: int, rng: np.random.Generator,
                       classes: Sequence[int] = (0, 1)) -> np.ndarray:
    """(n, len(y)) resample counts: each resample draws, with replacement, as many positives
    and as many negatives as the data has (stratified, so every resample has both classes);
    as many rows of each of `classes` for a multi-class target."""
    weights = np.zeros((n, len(y)))
    for cls in classes:
        idx = np.flatnonzero(y == cls)
        k = len(idx)
        if k:
            # Draw row positions, then count them per resample with one bincount (offsetting
            # resample b by b * k): much faster than n multinomial draws.
            draws = rng.integers(0, k, size=(n, k)) + (np.arange(n) * k)[:, None]
            weights[:, idx] = np.bincount(draws.ravel(), minlength=n * k).reshape(n, k)
    return weights


def bootstrap_ci(y_true: Any, y_pred: Any, p_yes: Any = None, n: int = 1000,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap intervals for accuracy, f1, balanced_accuracy and (with
    probabilities and both classes) roc_auc: {metric: (low, high)}. Stratified by label and
    seeded: the same inputs and seed give the same intervals."""
    if n < 100:
        raise ValueError(f"n = {n} resamples is too few for a 95% interval: use at least 1000")
    y = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    p = _as_probs(p_yes, len(y))
    if len(y) == 0:
        return {}
    w = _stratified_counts(y, n, np.random.default_rng(seed))
    # Counts per resample are weighted sums of the four cell indicators.
    tp, tn, fp, fn = (w @ ((y == a) & (pred == b)).astype(float)
                      for a, b in ((1, 1), (0, 0), (0, 1), (1, 0)))
    values = _from_counts(tp, tn, fp, fn)
    if p is not None and 0 < y.sum() < len(y):
        values["roc_auc"] = _roc_auc(y, p, w)
    alpha = (1 - CI_LEVEL) / 2
    return {m: tuple(float(q) for q in np.quantile(values[m], [alpha, 1 - alpha]))
            for m in CI_METRICS if m in values}


def summary(y_true: Any, y_pred: Any, p_yes: Any = None, prefix: str = "test_",
            n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """classification() and bootstrap_ci() as one flat dict of floats, the MLflow metric names:
    {"test_accuracy": .., "test_accuracy_ci_low": .., "test_accuracy_ci_high": .., ...}."""
    out = {f"{prefix}{k}": float(v) for k, v in classification(y_true, y_pred, p_yes).items()}
    for m, (low, high) in bootstrap_ci(y_true, y_pred, p_yes, n_bootstrap, seed).items():
        out[f"{prefix}{m}{CI_LOW}"] = low
        out[f"{prefix}{m}{CI_HIGH}"] = high
    return out


def tune_threshold(y_true: Any, p_yes: Any) -> float:
    """The threshold (predict 1 where p_yes >= t) that maximises balanced accuracy.

    Candidates are 0.5, 0, 1 and the midpoints between consecutive distinct scores (a midpoint is
    as far as possible from the scores it separates, so it transfers better than a score itself).
    Ties go to the candidate closest to 0.5, the untuned default: tuning only moves the threshold
    when that helps.
    """
    y = _as_labels(y_true, "y_true")
    p = _as_probs(p_yes, len(y))
    if p is None or len(y) == 0:
        return 0.5
    u = np.unique(p)
    cand = np.unique(np.r_[0.0, 0.5, 1.0, (u[1:] + u[:-1]) / 2])
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    # Rows at or above each candidate, by class, via binary search (no (candidates, n) array).
    tp = len(pos) - np.searchsorted(pos, cand, side="left")
    fp = len(neg) - np.searchsorted(neg, cand, side="left")
    bal = (_div(tp, len(pos)) + _div(len(neg) - fp, len(neg))) / 2
    best = np.flatnonzero(np.isclose(bal, bal.max(), rtol=0, atol=1e-12))
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """{"tp", "tn", "fp", "fn"} of 0/1 labels and predictions."""
    c = classification(y_true, y_pred)
    return {k: c[k] for k in ("tp", "tn", "fp", "fn")}


def draw_confusion(ax: Any, counts: dict[str, float], title: str = "") -> None:
    """The 2x2 confusion matrix (rows actual, columns predicted; No first) as a seaborn heatmap
    on `ax`: the one drawing of it, for a run's figure and for the comparison's grid."""
    import seaborn as sns

    cells = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    sns.heatmap(cells, annot=True, fmt=".0f", cbar=False, cmap="Blues", ax=ax,
                xticklabels=["No", "Yes"], yticklabels=["No", "Yes"])
    ax.set(xlabel="predicted", ylabel="actual", title=title)


def confusion_figure(y_true: Any, y_pred: Any, title: str = "") -> Any:
    """The confusion matrix of one model as a figure (a matplotlib Figure, not attached to
    pyplot, so that logging many of them leaks no memory)."""
    from matplotlib.figure import Figure

    c = classification(y_true, y_pred)
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    draw_confusion(fig.subplots(), c, title or f"accuracy {c['accuracy']:.1%}")
    return fig


def predictions_frame(y_true: Any, y_pred: Any, p_yes: Any, row_ids: Sequence[Any],
                      raw: Sequence[str] | None = None) -> Any:
    """The predictions table every run logs: row_id, label, p_yes, prediction[, raw]."""
    import pandas as pd

    y = _as_labels(y_true, "y_true")
    if len(row_ids) != len(y):
        raise ValueError(f"{len(row_ids)} row ids for {len(y)} labels")
    df = pd.DataFrame({"row_id": list(row_ids), "label": y,
                       "p_yes": _as_probs(p_yes, len(y)) if p_yes is not None else np.nan,
                       "prediction": _as_labels(y_pred, "y_pred")})
    if raw is not None:
        df["raw"] = list(raw)
    return df


def log_to_mlflow(prefix: str, y_true: Any, y_pred: Any, p_yes: Any, row_ids: Sequence[Any],
                  raw: Sequence[str] | None = None, n_bootstrap: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """Log to the active run: summary() metrics named `{prefix}_<metric>`, the predictions CSV
    at predictions/{prefix}.csv, and the confusion matrix at figures/confusion_{prefix}.png.
    Returns the metrics logged."""
    import mlflow

    values = summary(y_true, y_pred, p_yes, prefix=f"{prefix}_", n_bootstrap=n_bootstrap,
                     seed=seed)
    mlflow.log_metrics(values)
    frame = predictions_frame(y_true, y_pred, p_yes, row_ids, raw)
    mlflow.log_text(frame.to_csv(index=False), predictions_path(prefix))
    fig = confusion_figure(y_true, y_pred, title=f"{prefix}: accuracy "
                           f"{values[f'{prefix}_accuracy']:.1%}")
    mlflow.log_figure(fig, f"{ARTIFACT_FIGURES}/confusion_{prefix}.png")
    return values


# ---------------------------------------------------------------------------------------------
# Multi-class: labels and predictions are class indices 0..K-1, `proba` is P(class), (n, K).

# Metrics that get a bootstrap confidence interval on a multi-class task.
MULTICLASS_CI_METRICS = ("accuracy", "f1_macro", "balanced_accuracy", "roc_auc")
# What tells a multi-class run from a binary one among its logged metrics.
MULTICLASS_MARKER = "f1_macro"


def class_key(name: Any) -> str:
    """A class name as part of a metric name (MLflow allows letters, digits, _ - . / and
    spaces): recall_<class_key>."""
    import re

    return re.sub(r"[^\w\-. /]", "_", str(name)).strip() or "_"


def _as_classes(y: Any, k: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    arr = arr.astype(int)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise ValueError(f"{name} must hold class indices 0..{k - 1}, got "
                         f"{sorted(set(arr.tolist()))[:5]}")
    return arr


def _as_proba(p: Any, n: int, k: int) -> np.ndarray | None:
    if p is None:
        return None
    arr = np.asarray(p, dtype=float)
    if arr.shape != (n, k):
        raise ValueError(f"proba must be (rows, classes) = ({n}, {k}), got shape {arr.shape}")
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("proba must be probabilities in [0, 1] without NaN")
    return arr


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Count metrics of (..., K, K) confusion matrices (rows actual, columns predicted), one
    value per leading index (the bootstrap's resamples), with 0/0 = 0 as for binary."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    n = support.sum(axis=-1)
    recall, precision = _div(tp, support), _div(tp, predicted)
    f1 = _div(2 * tp, support + predicted)
    present = support > 0
    return {
        "accuracy": _div(tp.sum(axis=-1), n),
        # scikit-learn's balanced accuracy: the mean recall over the classes present.
        "balanced_accuracy": _div((np.asarray(recall) * present).sum(axis=-1),
                                  present.sum(axis=-1)),
        "f1_macro": np.asarray(f1).mean(axis=-1),
        "f1_weighted": _div((np.asarray(f1) * support).sum(axis=-1), n),
        "recall": recall, "precision": precision,
    }


def confusion_matrix(y_true: Any, y_pred: Any, k: int) -> np.ndarray:
    """(K, K) counts, rows actual, columns predicted."""
    y, pred = _as_classes(y_true, k, "y_true"), _as_classes(y_pred, k, "y_pred")
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _ovr_roc_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC averaged over the classes (scikit-learn's multi_class="ovr",
    average="macro"), per row of `weights`."""
    k = p.shape[1]
    return np.mean([_roc_auc((y == c).astype(int), p[:, c], weights) for c in range(k)], axis=0)


def classification_multi(y_true: Any, y_pred: Any, proba: Any = None,
                         class_names: Sequence[Any] = ()) -> dict[str, float]:
    """Point estimates of a multi-class task: accuracy, balanced_accuracy, f1_macro,
    f1_weighted, recall_<class> and precision_<class> per class; with probabilities log_loss,
    and roc_auc (one-vs-rest, macro) when every class is present. class_names: the K classes
    (their number is K)."""
    k = len(class_names)
    if k < 2:
        raise ValueError(f"class_names must name the K >= 2 classes, got {list(class_names)}")
    y, pred = _as_classes(y_true, k, "y_true"), _as_classes(y_pred, k, "y_pred")
    if y.shape != pred.shape:
        raise ValueError(f"y_true has {len(y)} rows but y_pred has {len(pred)}")
    p = _as_proba(proba, len(y), k)
    values = _from_confusion(confusion_matrix(y, pred, k))
    out: dict[str, float] = {m: float(values[m]) for m in
                             ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")}
    for c, name in enumerate(class_names):
        out[f"recall_{class_key(name)}"] = float(values["recall"][c])
        out[f"precision_{class_key(name)}"] = float(values["precision"][c])
    if p is not None and len(y):
        eps = np.finfo(float).eps
        out["log_loss"] = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1))))
        if len(np.unique(y)) == k:
            out["roc_auc"] = float(_ovr_roc_auc(y, p, np.ones((1, len(y))))[0])
    return out


def bootstrap_ci_multi(y_true: Any, y_pred: Any, proba: Any = None, n_classes: int = 0,
                       n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """bootstrap_ci for a multi-class task: 95% percentile intervals of accuracy, f1_macro,
    balanced_accuracy and (with probabilities and every class present) roc_auc; resampled
    within each class, seeded."""
    if n < 100:
        raise ValueError(f"n = {n} resamples is too few for a 95% interval: use at least 1000")
    k = n_classes
    y, pred = _as_classes(y_true, k, "y_true"), _as_classes(y_pred, k, "y_pred")
    p = _as_proba(proba, len(y), k)
    if len(y) == 0:
        return {}
    w = _stratified_counts(y, n, np.random.default_rng(seed), range(k))
    cells = np.stack([w @ ((y == a) & (pred == b)).astype(float)
                      for a in range(k) for b in range(k)], axis=1).reshape(n, k, k)
    values = _from_confusion(cells)
    if p is not None and len(np.unique(y)) == k:
        values["roc_auc"] = _ovr_roc_auc(y, p, w)
    alpha = (1 - CI_LEVEL) / 2
    return {m: tuple(float(q) for q in np.quantile(values[m], [alpha, 1 - alpha]))
            for m in MULTICLASS_CI_METRICS if m in values}


def summary_multi(y_true: Any, y_pred: Any, proba: Any, class_names: Sequence[Any],
                  prefix: str = "test_", n_bootstrap: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """summary() of a multi-class task: classification_multi() and bootstrap_ci_multi() as one
    flat dict of MLflow metric names."""
    out = {f"{prefix}{k}": v
           for k, v in classification_multi(y_true, y_pred, proba, class_names).items()}
    for m, (low, high) in bootstrap_ci_multi(y_true, y_pred, proba, len(class_names),
                                             n_bootstrap, seed).items():
        out[f"{prefix}{m}{CI_LOW}"] = low
        out[f"{prefix}{m}{CI_HIGH}"] = high
    return out


def draw_confusion_multi(ax: Any, cm: np.ndarray, class_names: Sequence[Any],
                         title: str = "") -> None:
    """A K x K confusion matrix (rows actual, columns predicted) with the class names."""
    import seaborn as sns

    names = [str(c) for c in class_names]
    sns.heatmap(np.asarray(cm), annot=True, fmt=".0f", cbar=False, cmap="Blues", ax=ax,
                xticklabels=names, yticklabels=names)
    ax.set(xlabel="predicted", ylabel="actual", title=title)


def confusion_figure_multi(y_true: Any, y_pred: Any, class_names: Sequence[Any],
                           title: str = "") -> Any:
    """The K x K confusion matrix of one model as a figure (not attached to pyplot)."""
    from matplotlib.figure import Figure

    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    side = 2.2 + 0.6 * k
    fig = Figure(figsize=(side + 0.6, side), layout="constrained")
    acc = np.trace(cm) / cm.sum() if cm.sum() else 0.0
    draw_confusion_multi(fig.subplots(), cm, class_names, title or f"accuracy {acc:.1%}")
    return fig


def predictions_frame_multi(y_true: Any, y_pred: Any, proba: Any, row_ids: Sequence[Any],
                            class_names: Sequence[Any],
                            raw: Sequence[str] | None = None) -> Any:
    """A multi-class run's predictions table: row_id, label and prediction (class indices),
    p_yes (empty: no class is 'Yes'), label_name, prediction_name, p_<index> per class[, raw]."""
    import pandas as pd

    k = len(class_names)
    y, pred = _as_classes(y_true, k, "y_true"), _as_classes(y_pred, k, "y_pred")
    if len(row_ids) != len(y):
        raise ValueError(f"{len(row_ids)} row ids for {len(y)} labels")
    names = np.asarray([str(c) for c in class_names], dtype=object)
    df = pd.DataFrame({"row_id": list(row_ids), "label": y, "p_yes": np.nan, "prediction": pred,
                       LABEL_NAME: names[y], PREDICTION_NAME: names[pred]})
    p = _as_proba(proba, len(y), k)
    for c in range(k):
        df[CLASS_PROBABILITY.format(c)] = p[:, c] if p is not None else np.nan
    if raw is not None:
        df["raw"] = list(raw)
    return df


def log_to_mlflow_multi(prefix: str, y_true: Any, y_pred: Any, proba: Any,
                        row_ids: Sequence[Any], class_names: Sequence[Any],
                        raw: Sequence[str] | None = None, n_bootstrap: int = 1000,
                        seed: int = 0) -> dict[str, float]:
    """log_to_mlflow for a multi-class task: summary_multi() metrics, the predictions CSV and
    the K x K confusion matrix with the class names. Returns the metrics logged."""
    import mlflow

    values = summary_multi(y_true, y_pred, proba, class_names, prefix=f"{prefix}_",
                           n_bootstrap=n_bootstrap, seed=seed)
    mlflow.log_metrics(values)
    frame = predictions_frame_multi(y_true, y_pred, proba, row_ids, class_names, raw)
    mlflow.log_text(frame.to_csv(index=False), predictions_path(prefix))
    fig = confusion_figure_multi(y_true, y_pred, class_names, title=f"{prefix}: accuracy "
                                 f"{values[f'{prefix}_accuracy']:.1%}")
    mlflow.log_figure(fig, f"{ARTIFACT_FIGURES}/confusion_{prefix}.png")
    return values
