"""The comparison's figures (seaborn, bare matplotlib Figures: no GUI backend needed):
metric bars with CIs, confusion matrices, ROC curves, calibration (P(yes) by true class and a
reliability diagram), loss curves, zero-shot -> fine-tuned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import metrics
from helpers.analysis.records import RunRecord, score_key
from helpers.analysis.report import LABELS, Comparison, class_confusion, confusion_counts
from helpers.contract import KIND_LLM


def write_figures(c: Comparison, out: Path) -> list[Path]:
    """Seaborn PNGs in `out`; each figure only when its data exist."""
    import seaborn as sns

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with sns.axes_style("whitegrid"):
        for make in (fig_metric_bars, fig_confusion, fig_roc, fig_calibration, fig_loss,
                     fig_zeroshot):
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


def model_colors(c: Comparison) -> dict[str, str]:
    """One colour per model (by record name), the same in every figure and in MLflow's charts
    (helpers.analysis.compare tags the runs with it): LLMs the strong shades of tab20, baselines
    the light ones, so no two models share a colour and the arms stay apart at a glance."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(col) for col in colormaps["tab20"].colors]
    strong, light = tab20[0::2], tab20[1::2]
    out: dict[str, str] = {}
    for records, shades in ((c.llms, strong), (c.baselines, light)):
        for i, r in enumerate(records):
            if i < len(shades):
                out[r.name] = shades[i]
            else:  # more models than shades: evenly spaced hues
                out[r.name] = to_hex(colormaps["hsv"]((i - len(shades)) / max(len(records), 1)))
    return out


def _legend(fig: Any, models: list[RunRecord], colors: dict[str, str], **style: Any) -> None:
    """A legend of every model, LLMs first, below the panels (never over the data)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ordered = [r for r in models if r.kind == KIND_LLM] + [r for r in models
                                                          if r.kind != KIND_LLM]
    handles = []
    for r in ordered:
        label = f"{r.label} (LLM)" if r.kind == KIND_LLM else r.label
        if style.get("lines"):
            handles.append(Line2D([], [], color=colors[r.name], label=label,
                                  ls="-" if r.kind == KIND_LLM else "--"))
        else:
            handles.append(Patch(facecolor=colors[r.name], edgecolor="black", lw=0.5,
                                 hatch="" if r.kind == KIND_LLM else "//", label=label))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
               fontsize=8, frameon=False)


def fig_metric_bars(c: Comparison) -> Any:
    models = sorted(c.llms + c.baselines, key=score_key, reverse=True)
    names = ("accuracy", "f1_macro" if c.multiclass else "f1", "balanced_accuracy")
    if not models:
        return None
    colors = model_colors(c)
    fig = _figure(4.2 * len(names), 0.45 * len(models) + 2.2)
    axes = fig.subplots(1, len(names), sharey=True)
    for ax, metric in zip(axes, names, strict=True):
        values = [r.value(metric) for r in models]
        low, high = zip(*(_error(r, metric) for r in models), strict=True)
        bars = ax.barh(range(len(models)), np.nan_to_num(values),
                       color=[colors[r.name] for r in models], edgecolor="black", lw=0.5,
                       xerr=[low, high], error_kw={"ecolor": "black", "capsize": 3, "lw": 1})
        for bar, r in zip(bars, models, strict=True):
            if r.kind != KIND_LLM:
                bar.set_hatch("//")
        ax.set(xlim=(0, 1), xlabel=LABELS[metric], ylabel="")
        ax.set_yticks(range(len(models)), [r.label for r in models])
        ax.invert_yaxis()  # best at the top
        _pct_axis(ax)
    _legend(fig, models, colors)
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
    if c.multiclass:
        return _fig_confusion_multi(c)
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


def _fig_confusion_multi(c: Comparison) -> Any:
    """The K x K confusion matrix of each model, with the class names."""
    items = [(r, class_confusion(r)) for r in c.llms + c.baselines]
    items = [(r, cc) for r, cc in items if cc is not None]
    if not items:
        return None
    k = len(items[0][1][0])
    side = 1.6 + 0.55 * k
    fig, axes = _grid(len(items), max_cols=3, width=side + 0.8, height=side)
    for ax, (r, (names, cm)) in zip(axes, items, strict=False):
        metrics.draw_confusion_multi(ax, cm, names, r.label)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    fig.suptitle("Confusion matrices (test)")
    return fig


def fig_roc(c: Comparison) -> Any:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(5.5, 5.8)
    ax = fig.subplots()
    colors = model_colors(c)
    drawn = 0
    for r in c.llms + c.baselines:
        rows = r.rows("test")
        if rows is None or "p_yes" not in rows or rows["p_yes"].isna().any():
            continue
        if rows["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(rows["label"], rows["p_yes"])
        auc = roc_auc_score(rows["label"], rows["p_yes"])
        ax.plot(fpr, tpr, ls="-" if r.kind == KIND_LLM else "--", color=colors[r.name],
                label=f"{r.label}{' (LLM)' if r.kind == KIND_LLM else ''} (AUC {auc:.2f})")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curves (test)")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _scored(c: Comparison) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows with p_yes) of every model with probabilities: each LLM zero-shot and
    fine-tuned, each baseline."""
    out = []
    for r in c.llms + c.baselines:
        for which in ("zeroshot", "test") if r.kind == KIND_LLM else ("test",):
            rows = r.rows(which)
            if rows is None or "p_yes" not in rows or rows["p_yes"].isna().any():
                continue
            out.append((r.label + (" (zero-shot)" if which == "zeroshot" else ""), rows))
    return out


def fig_calibration(c: Comparison, bins: int = 10) -> Any:
    """Left: P(yes) of every test row by true class, per model (a box and the rows): a model
    that puts every row in one narrow band shows it at a glance. Right: the reliability
    diagram (mean P(yes) against the observed rate of Yes in `bins` equal-width bins)."""
    import seaborn as sns

    scored = _scored(c)
    if not scored:
        return None
    df = pd.concat([pd.DataFrame({"model": name, "P(yes)": rows["p_yes"].to_numpy(float),
                                  "true class": np.where(rows["label"] == 1, "Yes", "No")})
                    for name, rows in scored], ignore_index=True)
    fig = _figure(11, 0.5 * len(scored) + 2.2)
    left, right = fig.subplots(1, 2, width_ratios=[1.5, 1])
    palette = {"Yes": "#C44E52", "No": "#4C72B0"}
    sns.boxplot(data=df, x="P(yes)", y="model", hue="true class", ax=left, palette=palette,
                fliersize=0, whis=(5, 95), linewidth=0.8, boxprops={"alpha": 0.5})
    sns.stripplot(data=df, x="P(yes)", y="model", hue="true class", ax=left, palette=palette,
                  dodge=True, size=2.2, alpha=0.6, legend=False)
    left.set(xlim=(-0.02, 1.02), ylabel="", title="P(yes) on test rows, by true class")
    edges = np.linspace(0, 1, bins + 1)
    for name, rows in scored:
        p, y = rows["p_yes"].to_numpy(float), rows["label"].to_numpy(float)
        which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        keep = [k for k in range(bins) if (which == k).any()]
        brier = float(np.mean((p - y) ** 2))
        right.plot([p[which == k].mean() for k in keep], [y[which == k].mean() for k in keep],
                   marker="o", ms=3, lw=1, label=f"{name} (Brier {brier:.3f})")
    right.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    right.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean P(yes) in bin", ylabel="observed rate of Yes",
              title="Reliability (test)")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle("Calibration")
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
        sns.lineplot(data=df, x="step", y="loss", hue="series", marker="o", markersize=3, ax=ax,
                     palette=LOSS_COLORS, legend=False)
        ax.set(title=r.name + (f" (first of {len(r.seeds)} seeds)" if len(r.seeds) > 1 else ""))
    for ax in axes[len(models):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color=col, marker="o", markersize=3, label=name)
                        for name, col in LOSS_COLORS.items()],
               loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Training and validation loss")
    return fig


LOSS_COLORS = {"train_loss": "#1f77b4", "val_loss": "#ff7f0e"}


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
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig

