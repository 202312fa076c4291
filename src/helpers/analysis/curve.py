"""A learning curve's analysis: accuracy and ROC AUC against the training rows k, the LLM against
the best baseline at each k, and the one sentence a user can act on.

Reads the runs of one `tablora curve` (helpers.workflow.curve): at each k and seed an LLM run and
a run per baseline, all tagged with their rows (contract.TAG_TRAIN_ROWS), plus the zero-shot
scores of the first point (the curve's k = 0). Per k, the LLM is tested against the best
non-floor baseline at that k (highest mean test accuracy over the seeds) by an exact McNemar test
on the test predictions of all seeds pooled (each seed's LLM paired with the same seed's
baseline, on the same rows), Holm-adjusted across the sizes. Everything below `load` is a pure
function of plain data, so that the tests can build curves with a known crossover.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import contract
from helpers.analysis import stats
from helpers.analysis.records import (
    ReportError,
    _all_runs,
    _quiet_downloads,
    mlflow_client,
    record_from_run,
)
from helpers.config import RUNS_DIR

METRICS = ("accuracy", "roc_auc")
LLM, TIE, BASELINE = "llm", "tie", "baseline"  # the outcome of a size's test


@dataclass
class Point:
    """One model at one point of the curve (one seed)."""

    model: str
    kind: str  # contract.KIND_LLM | KIND_BASELINE
    rows: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)  # test_accuracy, ...
    predictions: pd.DataFrame | None = None  # row_id, label, p_yes, prediction
    run_id: str = ""
    fallback: str = ""  # a baseline fitted with fixed settings: why


@dataclass
class Curve:
    curve_id: str
    experiment: str
    points: list[Point]
    zeroshot: Point | None = None  # the LLM before fine-tuning: k = 0
    n_train: int = 0  # rows of the whole training split (k = all)
    parent_run_id: str = ""
    table: pd.DataFrame | None = None  # summary(): per model and k
    tests: pd.DataFrame | None = None  # size_tests(): per LLM and k
    sentence: str = ""
    out_dir: Path | None = None
    figures: list[Path] = field(default_factory=list)
    markdown: str = ""

    @property
    def llms(self) -> list[str]:
        """The LLMs of the curve (one per params file of a batch of curves)."""
        return sorted({p.model for p in self.points if p.kind == contract.KIND_LLM})

    @property
    def llm(self) -> str:
        return self.llms[0] if len(self.llms) == 1 else "the LLMs"


# ---------------------------------------------------------------- MLflow -> points


def find_parent(runs: list[Any], curve_id: str) -> Any:
    """The curve's parent run: a batch run tagged contract.TAG_CURVE, by batch id or run id."""
    for run in runs:
        tags = run.data.tags
        if tags.get(contract.TAG_KIND) == contract.KIND_BATCH and (
                tags.get(contract.TAG_BATCH_ID) == curve_id or run.info.run_id == curve_id):
            if contract.TAG_CURVE not in tags:
                raise ReportError(f"batch {curve_id} is not a learning curve (its parent run has "
                                  f"no {contract.TAG_CURVE} tag): use `tablora compare --batch "
                                  f"{curve_id}`")
            return run
    known = [r.data.tags.get(contract.TAG_BATCH_ID) for r in runs
             if contract.TAG_CURVE in r.data.tags]
    raise ReportError(f"no learning curve {curve_id!r} in this experiment"
                      + (f" (curves: {', '.join(known)})" if known else
                         " (no curves: run `tablora curve PARAMS.yaml` first)"))


def _reused_run_ids(client: Any, parent: Any) -> set[str]:
    """Runs a --resume reused from elsewhere are listed in the parent's summary.json only."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, contract.SUMMARY_JSON, tmp)
            summary = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no summary yet (a curve still running): its runs only
        return set()
    return {m["run_id"] for m in summary.get("models", []) if m.get("run_id")}


def load(experiment: str, curve_id: str) -> Curve:
    """The finished, evaluated runs of curve `curve_id` (a batch id), latest per model, k and
    seed. Raises ReportError when there is no such curve or nothing finished in it."""
    client = mlflow_client()
    runs = _all_runs(client, experiment)
    parent = find_parent(runs, curve_id)
    batch_id = parent.data.tags.get(contract.TAG_BATCH_ID, curve_id)
    with _quiet_downloads():
        reused = _reused_run_ids(client, parent)
    mine = [r for r in runs if (r.data.tags.get(contract.TAG_BATCH_ID) == batch_id
                                or r.info.run_id in reused)
            and r.data.tags.get(contract.TAG_KIND) in contract.MODEL_KINDS
            and r.data.tags.get(contract.TAG_TRAIN_ROWS) and r.info.status == "FINISHED"
            and any(k.startswith(contract.PREFIX_TEST + "_") for k in r.data.metrics)]
    latest: dict[tuple, Any] = {}
    for r in sorted(mine, key=lambda r: r.info.start_time or 0):  # the latest wins
        t = r.data.tags
        latest[(t.get(contract.TAG_KIND), t.get(contract.TAG_MODEL_NAME) or r.info.run_name,
                t[contract.TAG_TRAIN_ROWS], t.get(contract.TAG_SEED))] = r
    if not latest:
        raise ReportError(f"curve {curve_id}: no finished, evaluated runs yet (run or resume it: "
                          "`tablora curve PARAMS.yaml --resume`)")
    points, zeroshot = [], None
    with tempfile.TemporaryDirectory(prefix="tablora-curve-") as tmp, _quiet_downloads():
        for run in latest.values():
            rec = record_from_run(client, run, Path(tmp))
            rows = int(run.data.tags[contract.TAG_TRAIN_ROWS])
            points.append(Point(rec.name, rec.kind, rows, rec.seed or 0, dict(rec.metrics),
                                rec.predictions, rec.run_id,
                                run.data.tags.get(contract.TAG_FALLBACK, "")))
            zs = contract.metric(contract.PREFIX_ZEROSHOT, "accuracy")
            if rec.kind == contract.KIND_LLM and zs in rec.metrics and zeroshot is None:
                zeroshot = Point(rec.name, rec.kind, 0, rec.seed or 0, {
                    k.removeprefix("zeroshot_"): v for k, v in rec.metrics.items()
                    if k.startswith(contract.PREFIX_ZEROSHOT + "_")}, rec.zeroshot, rec.run_id)
    n_train = max((p.rows for p in points), default=0)
    tag = parent.data.tags.get(contract.TAG_CURVE, "")
    if "all" not in tag.split(";")[0]:
        n_train = 0  # no k = all point: the largest k is not the whole split
    return Curve(batch_id, experiment, points, zeroshot, n_train, parent.info.run_id)


# ---------------------------------------------------------------- tables and tests


def summary(points: list[Point]) -> pd.DataFrame:
    """Per model and k: seeds, mean / sd / min / max of each metric over the seeds, and the mean
    bootstrap interval (the seeds' mean of each run's 95% bounds)."""
    rows = []
    for (model, kind, k), group in _groups(points).items():
        row: dict[str, Any] = {"model": model, "kind": kind, "rows": k, "seeds": len(group)}
        for m in METRICS:
            vals = np.array([p.metrics.get(f"test_{m}", np.nan) for p in group], dtype=float)
            lows = [p.metrics.get(f"test_{m}{contract.CI_LOW}", np.nan) for p in group]
            highs = [p.metrics.get(f"test_{m}{contract.CI_HIGH}", np.nan) for p in group]
            with warnings.catch_warnings():  # a metric no seed has: NaN, said as "–"
                warnings.simplefilter("ignore", RuntimeWarning)
                row.update({m: np.nanmean(vals), f"{m}_sd": np.nanstd(vals),
                            f"{m}_min": np.nanmin(vals), f"{m}_max": np.nanmax(vals),
                            f"{m}_ci_low": np.nanmean(lows), f"{m}_ci_high": np.nanmean(highs)})
        row["fallback"] = next((p.fallback for p in group if p.fallback), "")
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["kind", "model", "rows"], ignore_index=True)


def _groups(points: list[Point]) -> dict[tuple[str, str, int], list[Point]]:
    out: dict[tuple[str, str, int], list[Point]] = {}
    for p in points:
        out.setdefault((p.model, p.kind, p.rows), []).append(p)
    return out


def best_baselines(points: list[Point]) -> dict[int, str]:
    """Per k, the non-floor baseline with the highest mean test accuracy over the seeds."""
    means: dict[int, dict[str, float]] = {}
    for (model, kind, k), group in _groups(points).items():
        if kind != contract.KIND_BASELINE or model in contract.FLOORS:
            continue
        accs = [p.metrics.get("test_accuracy", np.nan) for p in group]
        means.setdefault(k, {})[model] = float(np.nanmean(accs)) if accs else np.nan
    return {k: max(sorted(m), key=lambda name: (np.nan_to_num(m[name], nan=-1.0)))
            for k, m in sorted(means.items())}


def _correct(p: Point) -> pd.Series:
    df = p.predictions.set_index("row_id")
    return (df["prediction"].astype(int) == df["label"].astype(int))


def size_tests(points: list[Point], alpha: float = stats.ALPHA) -> pd.DataFrame:
    """Per LLM and k: the LLM against the best baseline on the pooled test predictions of the
    seeds both ran (exact McNemar), Holm-adjusted across the sizes (one family per LLM);
    `outcome` is LLM, TIE or BASELINE (significantly better, on the adjusted p)."""
    best = best_baselines(points)
    by_key = {(p.kind, p.model, p.rows, p.seed): p for p in points if p.predictions is not None}
    llms = sorted({p.model for p in points if p.kind == contract.KIND_LLM})
    columns = ["llm", "rows", "baseline", "seeds", "n", "llm_accuracy", "baseline_accuracy",
               "llm_only", "baseline_only", "p"]
    frames = []
    for llm in llms:
        rows = []
        for k, baseline in best.items():
            llm_a, base_b, seeds = [], [], []
            for (kind, model, rows_k, seed), p in sorted(by_key.items(), key=lambda x: x[0][3]):
                if kind != contract.KIND_LLM or model != llm or rows_k != k:
                    continue
                other = by_key.get((contract.KIND_BASELINE, baseline, k, seed))
                if other is None:
                    continue
                a, b = _correct(p), _correct(other)
                common = a.index.intersection(b.index)
                llm_a.append(a.loc[common].to_numpy())
                base_b.append(b.loc[common].to_numpy())
                seeds.append(seed)
            if not seeds:
                continue
            t = stats.mcnemar(np.concatenate(llm_a), np.concatenate(base_b))
            rows.append([llm, k, baseline, len(seeds), t.n, t.acc_a, t.acc_b, t.a_only,
                         t.b_only, t.p])
        frame = pd.DataFrame(rows, columns=columns)
        frame["p_holm"] = stats.holm(frame["p"].tolist()) if len(frame) else []
        frames.append(frame)
    out = (pd.concat(frames, ignore_index=True) if frames
           else pd.DataFrame(columns=[*columns, "p_holm"]))
    out["outcome"] = [
        TIE if p >= alpha else (LLM if a > b else BASELINE)
        for p, a, b in zip(out["p_holm"], out["llm_only"], out["baseline_only"], strict=True)]
    return out


def _k(rows: int, n_train: int) -> str:
    return f"k = all ({rows})" if n_train and rows == n_train else f"k = {rows}"


def crossover_sentence(tests: pd.DataFrame, llm: str = "the LLM", n_train: int = 0) -> str:
    """One sentence: up to which k the LLM holds its own against the best baseline, and from
    which k (to the largest) the baseline is better, with the Holm-adjusted p there."""
    if tests is not None and "llm" in tests and llm in set(tests["llm"]):
        tests = tests[tests["llm"] == llm]
    if tests is None or tests.empty:
        return f"no size has both {llm} and a baseline finished: nothing to compare yet."
    t = tests.sort_values("rows", ignore_index=True)
    sizes = [_k(int(r), n_train) for r in t["rows"]]
    # The crossover: the smallest k from which the baseline is better at every larger k.
    start = len(t)
    while start > 0 and t.loc[start - 1, "outcome"] == BASELINE:
        start -= 1
    better = [k for k, o in zip(sizes, t["outcome"], strict=True) if o == LLM]
    note = f" ({llm} is better at {_list(better)})" if better else ""
    worse = [k for k, o in zip(sizes[:start], t["outcome"][:start], strict=True) if o == BASELINE]
    if worse:  # the baseline wins at some smaller size but not from there on
        note += f" (the baseline is also better at {_list(worse)})"
    if start == len(t):
        if worse:
            return (f"no lasting crossover at these sizes: the best baseline is better at "
                    f"{_list(worse)} only, and {llm} is not distinguishable from or better than "
                    f"{_names(t['baseline'].iloc[-1:])} at {sizes[-1]}.")
        return (f"{llm} is not distinguishable from or better than {_names(t['baseline'])} at "
                f"every size up to {sizes[-1]}: no crossover at these sizes{note}.")
    # The weakest evidence over the sizes the claim covers.
    worst = float(t["p_holm"][start:].max())
    if start == len(t) - 1:
        p_text = f"{stats.fmt_p(worst, 'p')}, Holm-adjusted across sizes"
    else:
        p_text = "Holm-adjusted p" + ("<0.001" if worst < 0.001 else f"<={worst:.2g}") + (
            " at each of these sizes")
    names = _names(t["baseline"][start:])
    if start == 0:
        return f"{names} is better than {llm} at every size from {sizes[0]} ({p_text})."
    return (f"{llm} is not distinguishable from or better than "
            f"{_names(t['baseline'][:start])} up to {sizes[start - 1]}; from {sizes[start]} "
            f"{names} is better ({p_text}){note}.")


def _list(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else items[0]


def _p(p: float) -> str:
    """0.0031 -> '0.0031', 0.0004 -> '<0.001' (a table cell)."""
    return stats.fmt_p(float(p), "p").removeprefix("p=").removeprefix("p")


def _names(baselines: pd.Series) -> str:
    names = list(dict.fromkeys(baselines))
    return names[0] if len(names) == 1 else "the best baseline (" + ", ".join(names) + ")"


# ---------------------------------------------------------------- the figure and the report


def figure(table: pd.DataFrame, zeroshot: Point | None = None, n_train: int = 0,
           llm: str = "") -> Any:
    """Accuracy and ROC AUC against k (log axis): each model's mean over the seeds, its seeds'
    range as error bars and its mean bootstrap interval as a band; zero-shot (k = 0) as a
    dashed line."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    models = list(dict.fromkeys(table.sort_values("kind", key=lambda s: s != contract.KIND_LLM)
                                ["model"]))
    colours = colormaps["tab10"].colors
    for ax, m in zip(axes, METRICS, strict=True):
        for i, model in enumerate(models):
            t = table[table["model"] == model].sort_values("rows")
            llm_like = t["kind"].iloc[0] == contract.KIND_LLM
            colour = colours[i % len(colours)]
            err = np.vstack([t[m] - t[f"{m}_min"], t[f"{m}_max"] - t[m]]).clip(min=0)
            ax.errorbar(t["rows"], t[m], yerr=err, marker="o", capsize=3, color=colour,
                        lw=2.2 if llm_like else 1.2, ls="-" if llm_like else "--",
                        label=model + (" (LLM)" if llm_like else ""))
            ax.fill_between(t["rows"], t[f"{m}_ci_low"], t[f"{m}_ci_high"], color=colour,
                            alpha=0.12 if llm_like else 0.06, lw=0)
        if zeroshot is not None and np.isfinite(zeroshot.metrics.get(f"test_{m}", np.nan)):
            ax.axhline(zeroshot.metrics[f"test_{m}"], color="grey", ls=":", lw=1.5,
                       label=f"{llm or zeroshot.model} zero-shot (k = 0)")
        ax.set_xscale("log", base=2)
        ticks = sorted(table["rows"].unique())
        ax.set_xticks(ticks, [f"all\n({r})" if n_train and r == n_train else str(r)
                              for r in ticks])
        ax.minorticks_off()
        name = {"accuracy": "accuracy", "roc_auc": "ROC AUC"}[m]
        ax.set(xlabel="labelled training rows k (log scale)", ylabel=f"test {name}",
               title=f"{name}: mean of the seeds, their range, bootstrap band")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # Below both panels: inside, the legend hid the lines it names.
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    return fig


def analyse(c: Curve) -> Curve:
    """Fill in the table, the tests and the sentence of `c` (nothing written)."""
    c.table = summary(c.points)
    c.tests = size_tests(c.points)
    c.sentence = " ".join(crossover_sentence(c.tests, llm, c.n_train)
                          for llm in c.llms or ["the LLM"])
    return c


def markdown(c: Curve) -> str:
    lines = [f"# Learning curve {c.curve_id}", "", f"**{c.sentence}**", "",
             "## Test accuracy and ROC AUC by training rows k (mean ± sd over seeds)", "",
             "| model | k | seeds | accuracy | ROC AUC | note |", "|---|---|---|---|---|---|"]
    if c.zeroshot is not None:
        z = c.zeroshot.metrics
        lines.append(f"| {c.zeroshot.model} zero-shot | 0 | 1 | "
                     f"{stats.pct(z.get('test_accuracy', np.nan))} | "
                     f"{z.get('test_roc_auc', np.nan):.3f} | |")
    for r in c.table.itertuples():
        lines.append(f"| {r.model} | {_k(r.rows, c.n_train).removeprefix('k = ')} | {r.seeds} "
                     f"| {stats.pct(r.accuracy)} ± {100 * r.accuracy_sd:.1f} | "
                     f"{r.roc_auc:.3f} ± {r.roc_auc_sd:.3f} | {r.fallback} |")
    lines += ["", f"## {', '.join(c.llms)} against the best baseline at each k", "",
              "Exact McNemar on the test predictions of all seeds pooled (each seed's LLM "
              "against the same seed's baseline, same rows); p Holm-adjusted across sizes.", "",
              "| LLM | k | best baseline | rows | LLM | baseline | discordant (LLM/baseline) | p "
              "| Holm p | outcome |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in c.tests.itertuples():
        lines.append(f"| {r.llm} | {_k(r.rows, c.n_train).removeprefix('k = ')} | "
                     f"{r.baseline} | {r.n} | "
                     f"{stats.pct(r.llm_accuracy)} | {stats.pct(r.baseline_accuracy)} | "
                     f"{r.llm_only}/{r.baseline_only} | {_p(r.p)} | "
                     f"{_p(r.p_holm)} | {r.outcome} |")
    if c.figures:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in c.figures]]
    return "\n".join(lines) + "\n"


def run(experiment: str, curve_id: str, out: str | Path | None = None, log: bool = True
        ) -> Curve:
    """Load curve `curve_id`, analyse it, write curve.md, curve.json and learning_curve.png
    into `out` (default runs/curve/<id>) and log them to the curve's parent run."""
    c = analyse(load(experiment, curve_id))
    c.out_dir = Path(out) if out else RUNS_DIR / "curve" / c.curve_id
    c.out_dir.mkdir(parents=True, exist_ok=True)
    fig = figure(c.table, c.zeroshot, c.n_train, c.llm)
    path = c.out_dir / "learning_curve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    c.figures = [path]
    c.markdown = markdown(c)
    (c.out_dir / "curve.md").write_text(c.markdown, encoding="utf-8")
    doc = {"curve_id": c.curve_id, "sentence": c.sentence, "n_train": c.n_train,
           "table": json.loads(c.table.to_json(orient="records")),
           "tests": json.loads(c.tests.to_json(orient="records")),
           "zeroshot": c.zeroshot.metrics if c.zeroshot else None}
    (c.out_dir / "curve.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if log and c.parent_run_id:
        mlflow_client().log_artifacts(c.parent_run_id, str(c.out_dir), contract.ARTIFACT_CURVE)
    return c


def key_figures(c: Curve) -> dict[str, Any]:
    """The curve in a flat dict (the notebook's last cell): the sentence and each k's test."""
    out: dict[str, Any] = {"curve": c.curve_id, "sentence": c.sentence}
    for r in c.tests.itertuples():
        key = f"k{r.rows}" if len(c.llms) == 1 else f"{r.llm} k{r.rows}"
        out[key] = (f"{r.llm} {stats.pct(r.llm_accuracy)} vs {r.baseline} "
                    f"{stats.pct(r.baseline_accuracy)}, Holm p {_p(r.p_holm)}")
    return out
