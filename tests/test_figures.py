"""helpers.analysis.figures: each figure drawn from hand-built records, or left out without
its data."""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.analysis import figures, report
from helpers.analysis.records import RunRecord

LABELS = np.array([1] * 20 + [0] * 30)


def record(name, kind, wrong, seed, zeroshot=False) -> RunRecord:
    rng = np.random.default_rng(seed)
    pred = LABELS.copy()
    flip = rng.choice(len(LABELS), wrong, replace=False)
    pred[flip] = 1 - pred[flip]
    p_yes = np.clip(pred * 0.6 + rng.uniform(0, 0.4, len(LABELS)), 0, 1)
    df = pd.DataFrame({"row_id": np.arange(len(LABELS)), "label": LABELS, "p_yes": p_yes,
                       "prediction": pred})
    acc = float((pred == LABELS).mean())
    m = {"test_accuracy": acc, "test_f1": acc, "test_balanced_accuracy": acc,
         "test_accuracy_ci_low": acc - 0.1, "test_accuracy_ci_high": min(acc + 0.1, 1)}
    if zeroshot:
        m.update(zeroshot_test_accuracy=0.5, zeroshot_test_accuracy_ci_low=0.4,
                 zeroshot_test_accuracy_ci_high=0.6)
    history = {"train_loss": [(1, 2.0), (2, 1.0)], "val_loss": [(0, 2.5), (2, 1.2)]}
    return RunRecord(name, kind=kind, metrics=m, predictions=df,
                     history=history if kind == "llm" else {})


def test_every_figure_is_written(tmp_path):
    c = report.build([record("llm-a", "llm", 8, 1, zeroshot=True), record("rf", "baseline", 4, 2)])
    paths = figures.write_figures(c, tmp_path)
    assert {p.stem for p in paths} == {"metric_bars", "confusion", "roc", "calibration", "loss",
                                       "zeroshot"}
    assert all(p.stat().st_size > 5000 for p in paths)  # drawn, not blank


def test_figures_without_their_data_are_left_out(tmp_path):
    base = record("rf", "baseline", 4, 2)
    base.predictions = None
    c = report.build([base])
    assert {p.stem for p in figures.write_figures(c, tmp_path)} == {"metric_bars"}


def test_calibration_shows_every_scored_model_by_true_class():
    a = record("llm-a", "llm", 8, 1, zeroshot=True)
    a.zeroshot = a.predictions.assign(p_yes=0.84)  # the whole test split in one narrow band
    c = report.build([a, record("rf", "baseline", 4, 2)])
    fig = figures.fig_calibration(c)
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_yticklabels()] == ["llm-a (zero-shot)", "llm-a", "rf"]
    assert len(right.get_lines()) == 3 + 1  # one reliability curve per model, and the diagonal
    # 0.84 for all: 0.4 x 0.16^2 + 0.6 x 0.84^2 (20 of the 50 rows are Yes)
    assert "(Brier 0.434)" in right.get_legend().get_texts()[0].get_text()
    lines = report.calibration_table(c).splitlines()
    assert len({line.count("|") for line in lines}) == 1  # no "|" inside a cell
    row = next(line for line in lines if line.startswith("| llm-a (zero-shot)"))
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[1:5] == ["0.84 [0.84, 0.84]", "0.84 [0.84, 0.84]", "0.00", "0.434"]


def test_each_model_its_colour_llms_in_the_legend_clear_of_the_data():
    """Regression: two baselines shared a colour, the legend dropped the LLMs and covered the
    top bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [record(f"llm-{i}", "llm", 5 + i, i, zeroshot=True) for i in range(3)]
    records += [record(f"base-{i}", "baseline", 2 + i, 10 + i) for i in range(6)]
    c = report.build(records)
    colors = figures.model_colors(c)
    assert len(set(colors.values())) == len(records)
    for make in (figures.fig_metric_bars, figures.fig_roc, figures.fig_zeroshot):
        fig = make(c)
        FigureCanvasAgg(fig).draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        if make is not figures.fig_zeroshot:
            assert all(any(r.label in lab for lab in labels) for r in c.llms), labels
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), make.__name__


def test_multiclass_confusion_matrices_carry_the_class_names():
    from synthetic_records import CLASSES, record3

    c = report.build([record3("tiny", "llm", 10, 1), record3("majority", "baseline", 66, 3)])
    fig = figures.fig_confusion(c)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    ax = fig.axes[0]
    assert ax.get_title() == "tiny"
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    bars = figures.fig_metric_bars(c)
    assert [ax.get_xlabel() for ax in bars.axes[:3]] == ["Accuracy", "Macro F1",
                                                         "Balanced accuracy"]
