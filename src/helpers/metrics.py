"""Binary-classification metrics: one code path for the LLMs and the classical baselines.

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

from helpers.contract import ARTIFACT_FIGURES, CI_HIGH, CI_LOW, predictions_path

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


def _stratified_counts(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, len(y)) resample counts: each resample draws, with replacement, as many positives
    and as many negatives as the data has (stratified, so every resample has both classes)."""
    weights = np.zeros((n, len(y)))
    for cls in (0, 1):
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
