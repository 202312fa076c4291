"""The comparison's figures (seaborn, bare matplotlib Figures: no GUI backend needed):
metric bars with CIs, confusion matrices, ROC curves, loss curves, zero-shot -> fine-tuned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import metrics
from helpers.analysis.records import RunRecord, score_key
from helpers.analysis.report import LABELS, Comparison, confusion_counts
from helpers.contract import KIND_LLM


def write_figures(c: Comparison, out: Path) -> list[Path]:
    """Seaborn PNGs in `out`; each figure only when its data exist."""
    import seaborn as sns

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with sns.axes_style("whitegrid"):
        for make in (fig_metric_bars, fig_confusion, fig_roc, fig_loss, fig_zeroshot):
            fig = make(c)
            if fig is not None:
                path = out / f"{make.__name__.removeprefix('fig_')}.png"
                fig.savefig(path, dpi=110, bbox_inches="tight")
                paths.append(path)
    return paths


def _figure(w: float, h: float) -> Any:
    # A bare Figure (no pyplot): no GUI backend, nothing left open in a notebook kernel.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _pct_axis(ax: Any, axis: str = "x") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(PercentFormatter(1.0))


def fig_metric_bars(c: Comparison) -> Any:
    import seaborn as sns

    models = sorted(c.llms + c.baselines, key=score_key, reverse=True)
    names = ("accuracy", "f1", "balanced_accuracy")
    if not models:
        return None
    fig = _figure(4.2 * len(names), 0.45 * len(models) + 1.6)
    axes = fig.subplots(1, len(names), sharey=True)
    order = [r.label for r in models]
    for ax, metric in zip(axes, names, strict=True):
        df = pd.DataFrame({"model": order, "value": [r.value(metric) for r in models],
                           "type": ["LLM" if r.kind == KIND_LLM else "baseline" for r in models]})
        sns.barplot(data=df, y="model", x="value", hue="type", order=order, dodge=False, ax=ax,
                    palette={"LLM": "#4C72B0", "baseline": "#A0A0A0"}, legend=ax is axes[0])
        low, high = zip(*(_error(r, metric) for r in models), strict=True)
        ax.errorbar(df["value"].fillna(0), range(len(models)), xerr=[low, high], fmt="none",
                    ecolor="black", capsize=3, lw=1)
        ax.set(xlim=(0, 1), xlabel=LABELS[metric], ylabel="")
        _pct_axis(ax)
    fig.suptitle("Test metrics with 95% bootstrap CIs (± sd across seeds)")
    return fig


def _error(r: RunRecord, metric: str) -> tuple[float, float]:
    """Error bar half-widths: the CI, or the sd across seeds, else none."""
    v = r.value(metric)
    sd = r.spread.get(f"test_{metric}")
    if sd is not None:
        return sd, sd
    ci = r.ci(metric)
    if ci is None or not np.isfinite(v):
        return 0.0, 0.0
    return max(v - ci[0], 0.0), max(ci[1] - v, 0.0)


def _grid(n: int, max_cols: int, width: float, height: float) -> tuple[Any, np.ndarray]:
    """A figure with n panels, at most max_cols a row; returns it and the axes, flattened."""
    cols = min(max_cols, n)
    nrows = -(-n // cols)
    fig = _figure(width * cols, height * nrows)
    return fig, np.atleast_1d(fig.subplots(nrows, cols)).ravel()


def fig_confusion(c: Comparison) -> Any:
    items = [(r, confusion_counts(r)) for r in c.llms + c.baselines]
    items = [(r, cm) for r, cm in items if cm is not None]
    if not items:
        return None
    fig, axes = _grid(len(items), max_cols=4, width=3.1, height=2.8)
    for ax, (r, cm) in zip(axes, items, strict=False):
        metrics.draw_confusion(ax, cm, r.label)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    fig.suptitle("Confusion matrices (test)")
    return fig


def fig_roc(c: Comparison) -> Any:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(5.5, 5)
    ax = fig.subplots()
    drawn = 0
    for r in c.llms + c.baselines:
        rows = r.rows("test")
        if rows is None or "p_yes" not in rows or rows["p_yes"].isna().any():
            continue
        if rows["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(rows["label"], rows["p_yes"])
        auc = roc_auc_score(rows["label"], rows["p_yes"])
        ax.plot(fpr, tpr, ls="-" if r.kind == KIND_LLM else "--",
                label=f"{r.label} (AUC {auc:.2f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curves (test)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def fig_loss(c: Comparison) -> Any:
    import seaborn as sns

    models = [r for r in c.llms if r.history]
    if not models:
        return None
    fig, axes = _grid(len(models), max_cols=3, width=4.2, height=3.2)
    for ax, r in zip(axes, models, strict=False):
        df = pd.DataFrame([(k, s, v) for k, pts in r.history.items() for s, v in pts],
                          columns=["series", "step", "loss"])
        sns.lineplot(data=df, x="step", y="loss", hue="series", marker="o", markersize=3, ax=ax)
        ax.set(title=r.name + (f" (first of {len(r.seeds)} seeds)" if len(r.seeds) > 1 else ""))
    for ax in axes[len(models):]:
        ax.set_visible(False)
    fig.suptitle("Training and validation loss")
    return fig


def fig_zeroshot(c: Comparison) -> Any:
    models = [r for r in c.llms if "zeroshot_test_accuracy" in r.metrics]
    if not models:
        return None
    fig = _figure(6.5, 0.55 * len(models) + 1.5)
    ax = fig.subplots()
    for i, r in enumerate(models):
        for prefix, color, label in (("zeroshot_test_", "#DD8452", "zero-shot"),
                                     ("test_", "#4C72B0", "fine-tuned")):
            v = r.value("accuracy", prefix)
            sd = r.spread.get(f"{prefix}accuracy")
            ci = r.ci("accuracy", prefix)
            err = ([[sd], [sd]] if sd is not None else
                   [[v - ci[0]], [ci[1] - v]] if ci else None)
            ax.errorbar([v], [i], xerr=err, fmt="o", color=color, capsize=3,
                        label=label if i == 0 else None)
        ax.annotate("", xy=(r.value("accuracy"), i), xytext=(r.value("accuracy", "zeroshot_test_"),
                    i), arrowprops={"arrowstyle": "->", "color": "grey"})
    ax.set(yticks=range(len(models)), yticklabels=[r.label for r in models], xlim=(0, 1),
           xlabel="test accuracy", title="Zero-shot → fine-tuned (95% CIs)")
    ax.invert_yaxis()
    _pct_axis(ax)
    ax.legend(fontsize=8)
    return fig

