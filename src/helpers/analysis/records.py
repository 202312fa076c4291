"""MLflow runs -> RunRecord: one model's metrics, predictions and loss history, as the report
(helpers.analysis.report) and the recommendations (helpers.analysis.recommend) read them.

Which runs count: the latest FINISHED run per (kind, model, seed) of a batch or experiment;
runs on different splits (tablora.split_hash) are refused; several seeds merge into one record
(mean ± sd of each metric, the seed-majority vote per row for paired tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import contract, metrics, tracking
from helpers.analysis import stats
from helpers.config import params_from_flat
from helpers.contract import KIND_BASELINE, KIND_LLM

# Which predictions a record holds: "test" (the fine-tuned LLM or the baseline), "zeroshot".
PREDICTIONS = {"test": contract.predictions_path(contract.PREFIX_TEST),
               "zeroshot": contract.predictions_path(contract.PREFIX_ZEROSHOT)}
HISTORIES = (contract.TRAIN_LOSS, contract.VAL_LOSS)
# Scores shown as plain numbers (0.966), not percentages: they are not rates of rows.
PLAIN_METRICS = ("brier", "roc_auc", "pr_auc", "log_loss")


class ReportError(ValueError):
    """Runs that cannot be compared (none, mixed splits, different test rows): said plainly."""


class NoRuns(ReportError):
    """No finished, evaluated model runs where the user pointed."""


# ---------------------------------------------------------------- run records

@dataclass
class RunRecord:
    """One model's results as the report needs them; plain data so that rules and tables can be
    tested on hand-built records, without MLflow."""

    name: str  # tablora.model_name (the params name without seed suffix), else the run name
    kind: str = KIND_LLM  # "llm" | "baseline"
    metrics: dict[str, float] = field(default_factory=dict)  # test_*, zeroshot_test_*, ...
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # train/val loss
    params: dict[str, Any] = field(default_factory=dict)  # resolved params, shaped like the YAML
    model_id: str = ""
    model_size: str = ""  # tablora.model_size: "3B", "135M", "mini", ""
    split_hash: str = ""
    batch_id: str = ""
    seed: int | None = None
    run_id: str = ""
    start_time: int = 0
    predictions: pd.DataFrame | None = None  # row_id, label, p_yes, prediction
    zeroshot: pd.DataFrame | None = None
    # Set when several seeds were merged into this record.
    seeds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)  # sd across seeds, per metric
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags (the first seed's)

    @property
    def is_floor(self) -> bool:
        """A floor baseline (contract.FLOORS): knows nothing about the rows."""
        return self.kind == KIND_BASELINE and self.name in contract.FLOORS

    @property
    def is_multiclass(self) -> bool:
        """A run on a multi-class target (its metrics are metrics.classification_multi's)."""
        return any(k.endswith(f"_{metrics.MULTICLASS_MARKER}") for k in self.metrics)

    @property
    def still_improving(self) -> bool:
        """Training ended by its budget while validation loss was still falling."""
        return self.tags.get(contract.TAG_STILL_IMPROVING) == "true"

    def threshold(self, which: str = "test") -> tuple[float, str]:
        """(threshold, how it was chosen in words) of the fine-tuned/baseline ("test") or the
        zero-shot model; (NaN, "") when none was logged (generate mode)."""
        prefix = contract.PREFIX_TEST if which == "test" else contract.PREFIX_ZEROSHOT
        value = float(self.metrics.get(contract.THRESHOLD_METRICS[prefix], np.nan))
        source = self.tags.get(contract.THRESHOLD_SOURCE_TAGS[prefix], "")
        return value, contract.THRESHOLD_SOURCES.get(source, source)

    def threshold_text(self, which: str = "test") -> str:
        """'0.153 (tuned on valid)', '0.500 (fixed)'; '–' without one."""
        value, how = self.threshold(which)
        if not np.isfinite(value):
            # A multi-class model has none: it predicts its most likely class.
            return how if how == contract.THRESHOLD_SOURCES[contract.THRESHOLD_ARGMAX] else "–"
        return f"{value:.3f}" + (f" ({how})" if how else "")

    @property
    def label(self) -> str:
        return f"{self.name} ({len(self.seeds)} seeds)" if len(self.seeds) > 1 else self.name

    def value(self, metric: str, prefix: str = "test_") -> float:
        return float(self.metrics.get(f"{prefix}{metric}", np.nan))

    def ci(self, metric: str, prefix: str = "test_") -> tuple[float, float] | None:
        low = self.metrics.get(f"{prefix}{metric}{contract.CI_LOW}")
        high = self.metrics.get(f"{prefix}{metric}{contract.CI_HIGH}")
        return None if low is None or high is None else (float(low), float(high))

    def cell(self, metric: str, prefix: str = "test_", with_ci: bool = True) -> str:
        """'54.2% [41.5, 66.9]', or '54.2% ± 3.1' across seeds; a score that is not a rate
        (PLAIN_METRICS: the Brier score) as '0.072'."""
        v = self.value(metric, prefix)
        sd = self.spread.get(f"{prefix}{metric}")
        if metric in PLAIN_METRICS:
            if not np.isfinite(v):
                return "–"
            ci = self.ci(metric, prefix) if with_ci and sd is None else None
            return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else
                                 f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        if sd is not None:
            return f"{stats.pct(v)} ± {100 * sd:.1f}"
        ci = self.ci(metric, prefix) if with_ci else None
        return stats.pct_ci(v, *ci) if ci else stats.pct(v)

    def rows(self, which: str = "test") -> pd.DataFrame | None:
        """Predictions indexed by row_id ("test" = fine-tuned/baseline, "zeroshot")."""
        df = self.predictions if which == "test" else self.zeroshot
        if df is None or df.empty:
            return None
        return df.set_index("row_id", drop=False)

    def size_in_params(self) -> float | None:
        """'3B' -> 3e9, '135M' -> 1.35e8; None when unknown ('mini', '')."""
        size = self.model_size or tracking.model_tags(self.model_id)[contract.TAG_MODEL_SIZE]
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([BM])", size.upper())
        if not m:
            return None
        return float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6)


def score_key(r: RunRecord) -> tuple[float, float, float]:
    """Best first: accuracy, then F1, then balanced accuracy (NaN last)."""
    vals = (r.value("accuracy"), r.value("f1"), r.value("balanced_accuracy"))
    return tuple(-np.inf if not np.isfinite(v) else v for v in vals)  # type: ignore[return-value]


# ---------------------------------------------------------------- MLflow -> records

def mlflow_client() -> Any:
    """An MlflowClient on the project's tracking URI (also made mlflow's default)."""
    import mlflow

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def _all_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _in_batch(run: Any, batch: str, parent_ids: set[str]) -> bool:
    tags = run.data.tags
    return tags.get(contract.TAG_BATCH_ID) == batch or tags.get(contract.TAG_PARENT) in parent_ids


def batch_parent(runs: Sequence[Any], batch: str) -> Any | None:
    """The batch's parent run (tablora.kind = batch): where its report is logged."""
    for run in runs:
        tags = run.data.tags
        if tags.get(contract.TAG_KIND) == contract.KIND_BATCH and (
                tags.get(contract.TAG_BATCH_ID) == batch or run.info.run_id == batch):
            return run
    return None


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    # MLflow draws a progress bar per downloaded file: noise around the printed tables.
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _download_csv(client: Any, run_id: str, path: str, dst: Path) -> pd.DataFrame | None:
    folder, name = path.rsplit("/", 1)
    if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder)}:
        return None
    local = client.download_artifacts(run_id, path, str(dst))
    df = pd.read_csv(local)
    missing = set(contract.PREDICTION_COLUMNS) - {"p_yes"} - set(df.columns)
    if missing:
        raise ReportError(f"run {run_id}: {path} lacks column(s) {sorted(missing)}; the contract "
                          "is row_id,label,p_yes,prediction")
    return df


def record_from_run(client: Any, run: Any, dst: Path) -> RunRecord:
    tags, info = run.data.tags, run.info
    kind = tags.get(contract.TAG_KIND, "")
    seed = tags.get(contract.TAG_SEED)
    params = params_from_flat(run.data.params)
    history = {}
    if kind == KIND_LLM:
        for key in HISTORIES:
            points = client.get_metric_history(info.run_id, key)
            if points:
                history[key] = sorted((int(m.step), float(m.value)) for m in points)
    run_dst = dst / info.run_id
    return RunRecord(
        name=tags.get(contract.TAG_MODEL_NAME) or info.run_name or info.run_id[:8],
        kind=kind, metrics=dict(run.data.metrics), history=history, params=params,
        model_id=str(params.get("model_id", "")),
        model_size=tags.get(contract.TAG_MODEL_SIZE, ""),
        split_hash=tags.get(contract.TAG_SPLIT_HASH, ""),
        batch_id=tags.get(contract.TAG_BATCH_ID, ""),
        seed=int(seed) if seed not in (None, "") else None,
        run_id=info.run_id, start_time=int(info.start_time or 0), tags=dict(tags),
        predictions=_download_csv(client, info.run_id, PREDICTIONS["test"], run_dst),
        zeroshot=(_download_csv(client, info.run_id, PREDICTIONS["zeroshot"], run_dst)
                  if kind == KIND_LLM else None),
    )


@dataclass
class Loaded:
    """The model records of one experiment (or batch) and what was left out, and why."""

    experiment: str
    batch: str | None
    records: list[RunRecord]  # one per model, seeds merged
    skipped: list[str]
    parent_run_id: str = ""
    experiment_id: str = ""
    memchecks: list[MemcheckRecord] = field(default_factory=list)


def load(experiment: str = "tablora", batch: str | None = None) -> Loaded:
    """Read, filter, de-duplicate, check and merge the runs. Raises NoRuns when there are none."""
    client = mlflow_client()
    all_runs = _all_runs(client, experiment)
    where = f"experiment {experiment!r}" + (f", batch {batch!r}" if batch else "")
    parent = batch_parent(all_runs, batch) if batch else None
    runs = all_runs
    if batch:
        parent_ids = {parent.info.run_id} if parent else set()
        runs = [r for r in all_runs if _in_batch(r, batch, parent_ids)]
    candidates, skipped = _usable(runs)
    if not candidates:
        known = _batch_ids(all_runs)
        hint = f" (known batch ids: {', '.join(known)})" if batch and known else ""
        raise NoRuns(f"no finished, evaluated model runs in {where}{hint}"
                     + ("; skipped: " + "; ".join(skipped) if skipped else ""))
    latest, superseded = latest_per_model(candidates)
    check_split(latest, batch)
    if batch:
        latest, borrowed = _borrow_baselines(latest, all_runs)
        skipped += borrowed
    with tempfile.TemporaryDirectory(prefix="tablora-report-") as tmp, _quiet_downloads():
        records = [record_from_run(client, r, Path(tmp)) for r in latest]
    exp = client.get_experiment_by_name(experiment)
    return Loaded(experiment, batch, merge_all(records), skipped + superseded,
                  parent.info.run_id if parent else "", exp.experiment_id,
                  load_memchecks(all_runs))


def _borrow_baselines(runs: list[Any], all_runs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """A batch without baseline runs (they had run already for its split) gets the experiment's
    latest baselines on the same split: the LLMs still have something to be measured against."""
    if any(r.data.tags.get(contract.TAG_KIND) == KIND_BASELINE for r in runs):
        return runs, []
    split = runs[0].data.tags.get(contract.TAG_SPLIT_HASH, "")
    usable, _ = _usable(r for r in all_runs if r.data.tags.get(contract.TAG_KIND) == KIND_BASELINE
                        and r.data.tags.get(contract.TAG_SPLIT_HASH, "") == split)
    baselines, _ = latest_per_model(usable)
    notes = [f"{r.info.run_name}: baseline taken from batch "
             f"{r.data.tags.get(contract.TAG_BATCH_ID) or '(none)'} (same split)"
             for r in baselines]
    return runs + baselines, notes


def _batch_ids(runs: Sequence[Any]) -> list[str]:
    return sorted({i for r in runs if (i := r.data.tags.get(contract.TAG_BATCH_ID))})


def _usable(runs: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """Model runs (kind llm/baseline) that finished with test metrics; the rest named, with why."""
    usable, skipped = [], []
    curves: dict[str, int] = {}
    for run in runs:
        tags, info = run.data.tags, run.info
        if tags.get(contract.TAG_KIND) not in contract.MODEL_KINDS:
            continue  # batch parents, reports, foreign runs: not models
        if contract.TAG_TRAIN_ROWS in tags:  # trained on k rows: a learning curve's point
            batch = tags.get(contract.TAG_BATCH_ID, "?")
            curves[batch] = curves.get(batch, 0) + 1
            continue
        name = info.run_name or info.run_id[:8]
        if info.status != "FINISHED":
            err = tags.get(contract.TAG_ERROR, "")
            skipped.append(f"{name}: {info.status}" + (f" ({err[:120]})" if err else ""))
        elif "test_accuracy" not in run.data.metrics:
            skipped.append(f"{name}: no test metrics (not evaluated)")
        else:
            usable.append(run)
    skipped += [f"{n} run(s) of learning curve {batch}: see `tablora compare --curve {batch}`"
                for batch, n in curves.items()]
    return usable, skipped


def latest_per_model(runs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Per model, the runs of its latest batch, and of those the latest per seed: a re-run
    replaces the earlier one, and seeds of different rounds are never averaged together."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags.get(contract.TAG_KIND, ""), tags.get(contract.TAG_MODEL_NAME)
               or run.info.run_name)
        groups.setdefault(key, []).append(run)
    kept: list[Any] = []
    for group in groups.values():
        newest = max(group, key=lambda r: r.info.start_time)
        batch = newest.data.tags.get(contract.TAG_BATCH_ID, "")
        same_round = [r for r in group if r.data.tags.get(contract.TAG_BATCH_ID, "") == batch]
        by_seed: dict[str, Any] = {}
        for run in same_round:
            seed = run.data.tags.get(contract.TAG_SEED, "")
            if seed not in by_seed or run.info.start_time > by_seed[seed].info.start_time:
                by_seed[seed] = run
        kept += by_seed.values()
    ids = {id(r) for r in kept}
    superseded = [f"{r.info.run_name} ({r.info.run_id[:8]}): superseded by a later run"
                  for r in runs if id(r) not in ids]
    return kept, superseded


def check_split(runs: Sequence[Any], batch: str | None = None) -> None:
    """Refuse runs made on different splits: their test rows differ, so nothing is comparable."""
    by_hash: dict[str, list[str]] = {}
    for run in runs:
        h = run.data.tags.get(contract.TAG_SPLIT_HASH, "") or "(no split hash)"
        by_hash.setdefault(h, []).append(f"{run.info.run_name} ({run.info.run_id[:8]})")
    if len(by_hash) > 1:
        detail = "; ".join(f"split {h}: {', '.join(sorted(names))}"
                           for h, names in sorted(by_hash.items()))
        hint = "" if batch else " Pick one round with --batch <batch id>."
        raise ReportError(f"these runs were made on different data splits and cannot be compared "
                          f"— {detail}.{hint}")


# ---------------------------------------------------------------- memorization checks

@dataclass
class MemcheckRecord:
    """One memorization check (helpers.llm.memcheck): a model against one text of a table."""

    model_id: str
    source: str  # dataset.source as the params file gave it
    text: str  # "file" or "pandas"
    tests: dict[str, dict[str, float]]  # test -> exact, trials, chance_exact, ..., flagged
    run_id: str = ""
    start_time: int = 0

    @property
    def flagged(self) -> list[str]:
        return [t for t, m in self.tests.items() if m.get("flagged")]


def memcheck_record(run: Any) -> MemcheckRecord:
    params = params_from_flat(run.data.params)
    tests: dict[str, dict[str, float]] = {}
    for name in contract.MEMCHECK_TESTS:
        head = contract.memcheck_metric(name, "")
        values = {k[len(head):]: float(v) for k, v in run.data.metrics.items()
                  if k.startswith(head)}
        if "trials" in values:
            tests[name] = values
    return MemcheckRecord(model_id=str(params.get("model_id", "")),
                          source=str(params.get("dataset", {}).get("source", "")),
                          text=run.data.tags.get(contract.TAG_MEMCHECK_TEXT, ""), tests=tests,
                          run_id=run.info.run_id, start_time=int(run.info.start_time or 0))


def load_memchecks(runs: Iterable[Any]) -> list[MemcheckRecord]:
    """The latest FINISHED memorization check per (model, table, text), from any batch: what a
    model has memorized does not depend on the round that asked."""
    latest: dict[tuple[str, str, str], MemcheckRecord] = {}
    for run in runs:
        if (run.data.tags.get(contract.TAG_KIND) != contract.KIND_MEMCHECK
                or run.info.status != "FINISHED"):
            continue
        rec = memcheck_record(run)
        key = (rec.model_id, rec.source, rec.text)
        if key not in latest or rec.start_time > latest[key].start_time:
            latest[key] = rec
    return list(latest.values())


# ---------------------------------------------------------------- seeds

def merge_all(records: Sequence[RunRecord]) -> list[RunRecord]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.kind, r.name), []).append(r)
    return [merge_seeds(g) for g in groups.values()]


def merge_seeds(group: Sequence[RunRecord]) -> RunRecord:
    """Several seeds of one model -> one record: metrics are means, `spread` the sd across seeds,
    CIs dropped (one seed's CI does not describe the mean), predictions the seed-majority vote,
    loss curves and params those of the first seed."""
    group = sorted(group, key=lambda r: (r.seed is None, r.seed or 0))
    if len(group) == 1:
        return group[0]
    keys = set.intersection(*(set(r.metrics) for r in group))
    keys = {k for k in keys if not k.endswith((contract.CI_LOW, contract.CI_HIGH))}
    values = {k: np.array([r.metrics[k] for r in group], dtype=float) for k in keys}
    first = group[0]
    return dataclasses.replace(
        first,
        metrics={k: float(v.mean()) for k, v in values.items()},
        spread={k: float(v.std(ddof=1)) for k, v in values.items()
                if k.startswith((f"{contract.PREFIX_TEST}_", f"{contract.PREFIX_ZEROSHOT}_"))},
        seeds=[r.seed if r.seed is not None else i for i, r in enumerate(group)],
        run_ids=[r.run_id for r in group],
        predictions=majority_vote([r.predictions for r in group], first.name),
        zeroshot=majority_vote([r.zeroshot for r in group], first.name),
    )


def class_name_map(frames: Sequence[pd.DataFrame]) -> dict[int, str]:
    """Class index -> name, from multi-class predictions frames (metrics.predictions_frame_multi:
    label/prediction and their *_name columns; a prediction's name read after its label's)."""
    names: dict[int, str] = {}
    for f in frames:
        for col, name_col in (("label", contract.LABEL_NAME),
                              ("prediction", contract.PREDICTION_NAME)):
            names.update(zip(f[col].astype(int), f[name_col].astype(str), strict=True))
    return names


def _class_vote(frames: Sequence[pd.DataFrame], base: pd.DataFrame,
                preds: np.ndarray) -> pd.DataFrame:
    """majority_vote of a multi-class model's seeds: per row the class most seeds predicted (a
    tie goes to the first seed's), with the class names and P(class) averaged."""
    preds = preds.astype(int)
    k = int(max(preds.max(), base["label"].max())) + 1
    counts = np.stack([(preds == c).sum(axis=0) for c in range(k)])  # (k, rows)
    first = preds[0]
    best = counts.max(axis=0)
    vote = np.where(counts[first, np.arange(preds.shape[1])] == best, first,
                    counts.argmax(axis=0))
    names = class_name_map(frames)
    out = base[["label", contract.LABEL_NAME]].copy()
    out["p_yes"] = np.nan
    out["prediction"] = vote
    out[contract.PREDICTION_NAME] = [names.get(int(v), "") for v in vote]
    for col in [contract.CLASS_PROBABILITY.format(c) for c in range(k)]:
        if col not in base:
            continue
        out[col] = np.mean([f.set_index("row_id").loc[base.index, col].to_numpy()
                            for f in frames], axis=0)
    return out.reset_index()


def majority_vote(frames: Sequence[pd.DataFrame | None], name: str) -> pd.DataFrame | None:
    """Per row, the prediction most seeds made (a tie goes to the first seed); p_yes averaged."""
    if not frames or any(f is None for f in frames):
        return None
    base = frames[0].set_index("row_id")
    for f in frames[1:]:
        if set(f["row_id"]) != set(base.index):
            raise ReportError(f"{name}: its seeds were scored on different test rows; re-run "
                              "the evaluation so that every seed uses the same split")
    preds = np.stack([f.set_index("row_id").loc[base.index, "prediction"].to_numpy()
                      for f in frames])
    if contract.LABEL_NAME in base:  # multi-class (metrics.predictions_frame_multi)
        return _class_vote(frames, base, preds)
    yes = preds.sum(axis=0)
    n = len(frames)
    vote = np.where(2 * yes > n, 1, np.where(2 * yes < n, 0, preds[0]))
    out = base[["label"]].copy()
    if "p_yes" in base:
        out["p_yes"] = np.mean([f.set_index("row_id").loc[base.index, "p_yes"].to_numpy()
                                for f in frames], axis=0)
    out["prediction"] = vote.astype(int)
    return out.reset_index()

