"""The comparison: MLflow runs -> tables with CIs, paired tests with verdicts, figures, REPORT.md.

Reads the runs that notes/CONTRACTS.md "MLflow run records" describes. Design choices that the
numbers depend on:
- One row per model (tablora.model_name): the latest FINISHED run per (kind, model, seed). Several
  seeds give the mean ± sd across seeds; their paired tests use the seed-majority vote per row
  (ties go to the first seed) — one deterministic classifier that uses every seed, where "the
  first seed" would throw the other seeds away.
- Runs on different splits (tablora.split_hash) are never compared: the report refuses and names
  them. Paired tests join rows on row_id and refuse rows that differ.
- Exact McNemar for each LLM against the best classical baseline and against the best LLM, Holm
  over that family; significance is judged on the adjusted p. Ranks tie models that the data do
  not separate; a "clear winner" needs the top LLM to beat every other LLM significantly.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import stats, tracking
from helpers.config import RUNS_DIR, Params

LLM, BASELINE = "llm", "baseline"
TABLE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "balance_gap")
LABELS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
          "specificity": "Specificity", "f1": "F1", "balance_gap": "Balance gap",
          "balanced_accuracy": "Balanced accuracy", "roc_auc": "ROC-AUC"}
LOWER_IS_BETTER = {"balance_gap"}
VS_BASELINE, VS_BEST_LLM = "vs best baseline", "vs best LLM"
ZEROSHOT, EARLIER = "zero-shot → fine-tuned", "vs earlier round"
PREDICTIONS = {"test": "predictions/test.csv", "zeroshot": "predictions/zeroshot_test.csv"}
HISTORIES = ("train_loss", "val_loss")


class ReportError(ValueError):
    """Runs that cannot be compared (none, mixed splits, different test rows): said plainly."""

    user_facing = True


class NoRuns(ReportError):
    """No finished, evaluated model runs where the user pointed."""


# ---------------------------------------------------------------- run records

@dataclass
class RunRecord:
    """One model's results as the report needs them; plain data so that rules and tables can be
    tested on hand-built records, without MLflow."""

    name: str  # tablora.model_name (the params name without seed suffix), else the run name
    kind: str = LLM  # "llm" | "baseline"
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

    @property
    def label(self) -> str:
        return f"{self.name} ({len(self.seeds)} seeds)" if len(self.seeds) > 1 else self.name

    def value(self, metric: str, prefix: str = "test_") -> float:
        return float(self.metrics.get(f"{prefix}{metric}", np.nan))

    def ci(self, metric: str, prefix: str = "test_") -> tuple[float, float] | None:
        low = self.metrics.get(f"{prefix}{metric}_ci_low")
        high = self.metrics.get(f"{prefix}{metric}_ci_high")
        return None if low is None or high is None else (float(low), float(high))

    def cell(self, metric: str, prefix: str = "test_", with_ci: bool = True) -> str:
        """'54.2% [41.5, 66.9]', or '54.2% ± 3.1' across seeds."""
        v = self.value(metric, prefix)
        sd = self.spread.get(f"{prefix}{metric}")
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
        size = self.model_size or tracking.model_tags(self.model_id)[tracking.TAG_MODEL_SIZE]
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([BM])", size.upper())
        if not m:
            return None
        return float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6)


def score_key(r: RunRecord) -> tuple[float, float, float]:
    """Best first: accuracy, then F1, then balanced accuracy (NaN last)."""
    vals = (r.value("accuracy"), r.value("f1"), r.value("balanced_accuracy"))
    return tuple(-np.inf if not np.isfinite(v) else v for v in vals)  # type: ignore[return-value]


# ---------------------------------------------------------------- MLflow -> records

def params_from_flat(flat: dict[str, str]) -> dict[str, Any]:
    """MLflow params (strings; sections flattened with '.'; lists/dicts as repr) -> a params dict
    shaped like the YAML, each value typed by the Params schema. Keys the schema does not know
    (lora_scale, keys of another version) are dropped, so load_params accepts the result."""
    hints = typing.get_type_hints(Params)
    out: dict[str, Any] = {}
    for key, raw in flat.items():
        section, _, sub = key.partition(".")
        if sub:
            tp = hints.get(section)
            if tp is None or not dataclasses.is_dataclass(tp):
                continue
            sub_tp = typing.get_type_hints(tp).get(sub)
            if sub_tp is not None:
                out.setdefault(section, {})[sub] = _typed(raw, sub_tp)
        elif key in hints and key != "source_file" and not dataclasses.is_dataclass(hints[key]):
            out[key] = _typed(raw, hints[key])
    return out


def _typed(raw: str, tp: Any) -> Any:
    # Strings stay strings (a model called "123" is still a name); the rest is a Python literal
    # because tracking.log_params logs str() of numbers and repr() of lists and dicts.
    if tp is str or typing.get_origin(tp) is typing.Literal:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _client() -> Any:
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
    return tags.get(tracking.TAG_BATCH_ID) == batch or tags.get(tracking.TAG_PARENT) in parent_ids


def batch_parent(runs: Sequence[Any], batch: str) -> Any | None:
    """The batch's parent run (tablora.kind = batch): where its report is logged."""
    for run in runs:
        tags = run.data.tags
        if tags.get(tracking.TAG_KIND) == "batch" and (
                tags.get(tracking.TAG_BATCH_ID) == batch or run.info.run_id == batch):
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
    missing = {"row_id", "label", "prediction"} - set(df.columns)
    if missing:
        raise ReportError(f"run {run_id}: {path} lacks column(s) {sorted(missing)}; the contract "
                          "is row_id,label,p_yes,prediction")
    return df


def record_from_run(client: Any, run: Any, dst: Path) -> RunRecord:
    tags, info = run.data.tags, run.info
    kind = tags.get(tracking.TAG_KIND, "")
    seed = tags.get(tracking.TAG_SEED)
    params = params_from_flat(run.data.params)
    history = {}
    if kind == LLM:
        for key in HISTORIES:
            points = client.get_metric_history(info.run_id, key)
            if points:
                history[key] = sorted((int(m.step), float(m.value)) for m in points)
    run_dst = dst / info.run_id
    return RunRecord(
        name=tags.get(tracking.TAG_MODEL_NAME) or info.run_name or info.run_id[:8],
        kind=kind, metrics=dict(run.data.metrics), history=history, params=params,
        model_id=str(params.get("model_id", "")),
        model_size=tags.get(tracking.TAG_MODEL_SIZE, ""),
        split_hash=tags.get(tracking.TAG_SPLIT_HASH, ""),
        batch_id=tags.get(tracking.TAG_BATCH_ID, ""),
        seed=int(seed) if seed not in (None, "") else None,
        run_id=info.run_id, start_time=int(info.start_time or 0),
        predictions=_download_csv(client, info.run_id, PREDICTIONS["test"], run_dst),
        zeroshot=(_download_csv(client, info.run_id, PREDICTIONS["zeroshot"], run_dst)
                  if kind == LLM else None),
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


def load(experiment: str = "tablora", batch: str | None = None) -> Loaded:
    """Read, filter, de-duplicate, check and merge the runs. Raises NoRuns when there are none."""
    client = _client()
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
                  parent.info.run_id if parent else "", exp.experiment_id)


def _borrow_baselines(runs: list[Any], all_runs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """A batch without baseline runs (they had run already for its split) gets the experiment's
    latest baselines on the same split: the LLMs still have something to be measured against."""
    if any(r.data.tags.get(tracking.TAG_KIND) == BASELINE for r in runs):
        return runs, []
    split = runs[0].data.tags.get(tracking.TAG_SPLIT_HASH, "")
    usable, _ = _usable(r for r in all_runs if r.data.tags.get(tracking.TAG_KIND) == BASELINE
                        and r.data.tags.get(tracking.TAG_SPLIT_HASH, "") == split)
    baselines, _ = latest_per_model(usable)
    notes = [f"{r.info.run_name}: baseline taken from batch "
             f"{r.data.tags.get(tracking.TAG_BATCH_ID) or '(none)'} (same split)"
             for r in baselines]
    return runs + baselines, notes


def _batch_ids(runs: Sequence[Any]) -> list[str]:
    return sorted({i for r in runs if (i := r.data.tags.get(tracking.TAG_BATCH_ID))})


def _usable(runs: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """Model runs (kind llm/baseline) that finished with test metrics; the rest named, with why."""
    usable, skipped = [], []
    for run in runs:
        tags, info = run.data.tags, run.info
        if tags.get(tracking.TAG_KIND) not in (LLM, BASELINE):
            continue  # batch parents, reports, foreign runs: not models
        name = info.run_name or info.run_id[:8]
        if info.status != "FINISHED":
            err = tags.get(tracking.TAG_ERROR, "")
            skipped.append(f"{name}: {info.status}" + (f" ({err[:120]})" if err else ""))
        elif "test_accuracy" not in run.data.metrics:
            skipped.append(f"{name}: no test metrics (not evaluated)")
        else:
            usable.append(run)
    return usable, skipped


def latest_per_model(runs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Per model, the runs of its latest batch, and of those the latest per seed: a re-run
    replaces the earlier one, and seeds of different rounds are never averaged together."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags.get(tracking.TAG_KIND, ""), tags.get(tracking.TAG_MODEL_NAME)
               or run.info.run_name)
        groups.setdefault(key, []).append(run)
    kept: list[Any] = []
    for group in groups.values():
        newest = max(group, key=lambda r: r.info.start_time)
        batch = newest.data.tags.get(tracking.TAG_BATCH_ID, "")
        same_round = [r for r in group if r.data.tags.get(tracking.TAG_BATCH_ID, "") == batch]
        by_seed: dict[str, Any] = {}
        for run in same_round:
            seed = run.data.tags.get(tracking.TAG_SEED, "")
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
        h = run.data.tags.get(tracking.TAG_SPLIT_HASH, "") or "(no split hash)"
        by_hash.setdefault(h, []).append(f"{run.info.run_name} ({run.info.run_id[:8]})")
    if len(by_hash) > 1:
        detail = "; ".join(f"split {h}: {', '.join(sorted(names))}"
                           for h, names in sorted(by_hash.items()))
        hint = "" if batch else " Pick one round with --batch <batch id>."
        raise ReportError(f"these runs were made on different data splits and cannot be compared "
                          f"— {detail}.{hint}")


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
    keys = {k for k in keys if not k.endswith(("_ci_low", "_ci_high"))}
    values = {k: np.array([r.metrics[k] for r in group], dtype=float) for k in keys}
    first = group[0]
    return dataclasses.replace(
        first,
        metrics={k: float(v.mean()) for k, v in values.items()},
        spread={k: float(v.std(ddof=1)) for k, v in values.items()
                if k.startswith(("test_", "zeroshot_test_"))},
        seeds=[r.seed if r.seed is not None else i for i, r in enumerate(group)],
        run_ids=[r.run_id for r in group],
        predictions=majority_vote([r.predictions for r in group], first.name),
        zeroshot=majority_vote([r.zeroshot for r in group], first.name),
    )


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
    yes = preds.sum(axis=0)
    n = len(frames)
    vote = np.where(2 * yes > n, 1, np.where(2 * yes < n, 0, preds[0]))
    out = base[["label"]].copy()
    if "p_yes" in base:
        out["p_yes"] = np.mean([f.set_index("row_id").loc[base.index, "p_yes"].to_numpy()
                                for f in frames], axis=0)
    out["prediction"] = vote.astype(int)
    return out.reset_index()


# ---------------------------------------------------------------- paired comparisons

@dataclass
class Paired:
    """Model A against model B on the same rows: McNemar, its Holm-adjusted p, and the paired
    bootstrap CI of the accuracy difference; `note` says why there is no test."""

    a: RunRecord
    b: RunRecord
    family: str
    which_a: str = "test"
    which_b: str = "test"
    test: stats.McNemar | None = None
    diff: tuple[float, float, float] | None = None
    p_adjusted: float | None = None
    note: str = ""

    @property
    def names(self) -> tuple[str, str]:
        if self.family == ZEROSHOT:
            return f"{self.a.label} (fine-tuned)", f"{self.a.label} (zero-shot)"
        if self.family == EARLIER:
            return f"{self.a.label} (now)", f"{self.b.label} (earlier)"
        return self.a.label, self.b.label

    @property
    def significant(self) -> bool:
        p = self.p_adjusted if self.p_adjusted is not None else (self.test.p if self.test else 1)
        return self.test is not None and p < stats.ALPHA

    @property
    def a_worse(self) -> bool:
        return self.significant and self.test is not None and self.test.b_only > self.test.a_only

    @property
    def text(self) -> str:
        if self.test is None:
            return self.note
        return stats.verdict(*self.names, self.test, self.p_adjusted)


def paired(a: RunRecord, b: RunRecord, family: str, which_a: str = "test",
           which_b: str = "test", strict: bool = True) -> Paired:
    """Join A's and B's predictions on row_id and test them. Different rows on the same split are
    an error (strict); across rounds (not strict) they only mean "no paired test"."""
    out = Paired(a, b, family, which_a, which_b)
    ra, rb = a.rows(which_a), b.rows(which_b)
    if ra is None or rb is None:
        missing = a.label if ra is None else b.label
        out.note = f"no predictions CSV logged for {missing}: no paired test"
        return out
    if set(ra.index) != set(rb.index):
        common = len(set(ra.index) & set(rb.index))
        msg = (f"{a.label} and {b.label} were scored on different test rows ({len(ra)} and "
               f"{len(rb)} rows, {common} in common)")
        if strict:
            raise ReportError(msg + " although their split hash is the same; re-run their "
                              "evaluation")
        out.note = msg + ": no paired test"
        return out
    rb = rb.loc[ra.index]
    if not np.array_equal(ra["label"].to_numpy(), rb["label"].to_numpy()):
        raise ReportError(f"{a.label} and {b.label} disagree on the labels of the same row ids")
    correct_a = (ra["prediction"] == ra["label"]).to_numpy()
    correct_b = (rb["prediction"] == rb["label"]).to_numpy()
    out.test = stats.mcnemar(correct_a, correct_b)
    out.diff = stats.paired_bootstrap_diff(correct_a, correct_b)
    return out


def adjust(family: Sequence[Paired]) -> None:
    """Holm across the comparisons that have a test (in place)."""
    tested = [c for c in family if c.test is not None]
    for c, p in zip(tested, stats.holm([c.test.p for c in tested]), strict=True):
        c.p_adjusted = p


# ---------------------------------------------------------------- the comparison

@dataclass
class Comparison:
    experiment: str
    batch: str | None
    llms: list[RunRecord]  # best first
    baselines: list[RunRecord]  # best first
    tests: list[Paired]  # each LLM vs best baseline and vs best LLM: one Holm family
    zeroshot: list[Paired]  # each LLM, zero-shot -> fine-tuned: its own Holm family
    ranks: dict[str, str]
    headline: list[str]
    skipped: list[str] = field(default_factory=list)
    against: str | None = None
    earlier: list[Paired] = field(default_factory=list)  # each model vs its earlier round
    unmatched: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    out_dir: Path | None = None
    markdown: str = ""

    @property
    def best_llm(self) -> RunRecord | None:
        return self.llms[0] if self.llms else None

    @property
    def best_baseline(self) -> RunRecord | None:
        return self.baselines[0] if self.baselines else None

    @property
    def clear_winner(self) -> bool:
        others = [c for c in self.tests if c.family == VS_BEST_LLM]
        return bool(others) and all(c.a_worse for c in others)

    def summary(self) -> dict[str, Any]:
        """Key figures, flat (the notebook's last cell)."""
        llm, base = self.best_llm, self.best_baseline
        return {
            "experiment": self.experiment, "batch": self.batch or "",
            "n_llms": len(self.llms), "n_baselines": len(self.baselines),
            "best_llm": llm.name if llm else "",
            "best_llm_accuracy": llm.value("accuracy") if llm else float("nan"),
            "best_baseline": base.name if base else "",
            "best_baseline_accuracy": base.value("accuracy") if base else float("nan"),
            "clear_winner": self.clear_winner,
            "n_significant": sum(c.significant for c in self.tests),
            "out_dir": str(self.out_dir or ""),
        }


def build(records: Sequence[RunRecord], experiment: str = "", batch: str | None = None,
          skipped: Sequence[str] = ()) -> Comparison:
    """Tests, ranks and headline from model records (pure: no MLflow)."""
    llms = sorted((r for r in records if r.kind == LLM), key=score_key, reverse=True)
    baselines = sorted((r for r in records if r.kind == BASELINE), key=score_key, reverse=True)
    tests: list[Paired] = []
    for r in llms:
        if baselines:
            tests.append(paired(r, baselines[0], VS_BASELINE))
        if r is not llms[0]:
            tests.append(paired(r, llms[0], VS_BEST_LLM))
    adjust(tests)
    worse = {c.a.name for c in tests if c.family == VS_BEST_LLM and c.a_worse}
    ranks = stats.tie_ranks([r.name for r in llms], worse)
    zeroshot = [paired(r, r, ZEROSHOT, "test", "zeroshot") for r in llms
                if "zeroshot_test_accuracy" in r.metrics]
    adjust(zeroshot)
    comp = Comparison(experiment, batch, llms, baselines, tests, zeroshot, ranks, [],
                      list(skipped))
    comp.headline = headline(comp)
    return comp


def headline(c: Comparison) -> list[str]:
    """The findings in plain words, only as strong as the tests allow."""
    lines: list[str] = []
    n_rows = next((len(r.predictions) for r in c.llms + c.baselines
                   if r.predictions is not None), None)
    rows = f" on these {n_rows} test rows" if n_rows else ""
    if len(c.llms) == 1:
        lines.append(f"One LLM: {c.llms[0].label} ({c.llms[0].cell('accuracy')}).")
    elif c.llms:
        top = [r.label for r in c.llms if c.ranks[r.name].lstrip("=") == "1"]
        best = c.llms[0]
        untested = [t.a.label for t in c.tests if t.family == VS_BEST_LLM and t.test is None]
        if c.clear_winner:
            lines.append(f"Clear winner among the LLMs: {best.label} ({best.cell('accuracy')}) "
                         "is significantly better than every other LLM (exact McNemar, Holm).")
        else:
            lines.append(f"No clear winner among the LLMs: {_join(top)} are not distinguishable "
                         f"from the best ({best.label}, {best.cell('accuracy')}){rows}; they "
                         "share rank =1" + (f" (untested, no predictions logged: "
                                            f"{_join(untested)})" if untested else "") + ".")
    base = c.best_baseline
    if base and c.best_llm:
        vs = next(t for t in c.tests if t.a is c.best_llm and t.family == VS_BASELINE)
        lines.append(f"Best LLM vs best baseline ({base.label}): {vs.text}.")
    elif base:
        lines.append(f"Best baseline: {base.label} ({base.cell('accuracy')}); no LLM runs.")
    if c.zeroshot:
        tested = [z for z in c.zeroshot if z.test is not None]
        gains = [z.a.label for z in tested if z.significant and not z.a_worse]
        losses = [z.a.label for z in tested if z.a_worse]
        lines.append(f"Fine-tuning improved accuracy significantly for {len(gains)} of "
                     f"{len(tested)} LLMs" + (f" ({_join(gains)})" if gains else "")
                     + (f"; it made {_join(losses)} significantly worse" if losses else "")
                     + ".")
    if any(len(r.seeds) > 1 for r in c.llms + c.baselines):
        lines.append("Models run with several seeds: mean ± sd across seeds; their paired tests "
                     "use the seed-majority vote per row (ties: the first seed).")
    return lines


def _join(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------- round over round

def match_earlier(now: Sequence[RunRecord], earlier: Sequence[RunRecord]
                  ) -> tuple[list[tuple[RunRecord, RunRecord]], list[str]]:
    """Pair each model with its earlier round: same name, else the name without a -vN suffix
    (recommend names the next round "<name>-v2"), else the same model_id (when unique)."""
    by_name = {(r.kind, r.name): r for r in earlier}
    pairs, unmatched = [], []
    for r in now:
        base = re.sub(r"-v\d+$", "", r.name)
        match = by_name.get((r.kind, r.name)) or by_name.get((r.kind, base))
        if match is None and r.model_id:
            same = [e for e in earlier if e.kind == r.kind and e.model_id == r.model_id]
            match = same[0] if len(same) == 1 else None
        if match is None:
            unmatched.append(r.label)
        else:
            pairs.append((r, match))
    return pairs, unmatched


def compare_rounds(c: Comparison, earlier: Sequence[RunRecord], against: str) -> None:
    pairs, unmatched = match_earlier(c.llms + c.baselines, earlier)
    c.against = against
    c.earlier = [paired(now, old, EARLIER, strict=False) for now, old in pairs]
    c.unmatched = unmatched
    adjust(c.earlier)


def load_against(experiment: str, against: str) -> Loaded:
    """An earlier batch id of this experiment, else an experiment name."""
    try:
        return load(experiment, against)
    except NoRuns:
        try:
            return load(against)
        except NoRuns:
            raise ReportError(f"--against {against!r}: no finished runs in a batch {against!r} "
                              f"of experiment {experiment!r} nor in an experiment of that "
                              "name") from None


# ---------------------------------------------------------------- tables

def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to line up in a terminal too."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def _best(records: Sequence[RunRecord], metric: str) -> float:
    vals = [r.value(metric) for r in records if np.isfinite(r.value(metric))]
    if not vals:
        return np.nan
    return min(vals) if metric in LOWER_IS_BETTER else max(vals)


def _marked(r: RunRecord, metric: str, best: float, with_ci: bool = True) -> str:
    """Bold the value (not the CI) when it is the column's best."""
    text = r.cell(metric, with_ci=with_ci)
    if np.isfinite(best) and np.isclose(r.value(metric), best):
        head, sep, tail = text.partition(" ")
        return f"**{head}**{sep}{tail}"
    return text


def llm_table(c: Comparison) -> str:
    best = {m: _best(c.llms, m) for m in TABLE_METRICS}
    rows = [[r.label] + [_marked(r, m, best[m]) for m in TABLE_METRICS] + [c.ranks[r.name]]
            for r in c.llms]
    return md_table(["Model"] + [LABELS[m] for m in TABLE_METRICS] + ["Rank"], rows)


def all_models_table(c: Comparison) -> str:
    everyone = sorted(c.llms + c.baselines, key=score_key, reverse=True)
    best = {m: _best(everyone, m) for m in TABLE_METRICS}
    rows = [[r.label, "LLM (fine-tuned)" if r.kind == LLM else "baseline"]
            + [_marked(r, m, best[m]) for m in TABLE_METRICS] for r in everyone]
    return md_table(["Model", "Type"] + [LABELS[m] for m in TABLE_METRICS], rows)


def tests_table(tests: Sequence[Paired]) -> str:
    rows = [[" vs ".join(t.names), t.text] for t in tests]
    return md_table(["Comparison", "Verdict"], rows)


def _change(t: Paired, now: float, before: float) -> str:
    if t.diff is not None:
        d, low, high = t.diff
        return f"{stats.points(d)} [{stats.points(low)}, {stats.points(high)}]"
    return stats.points(now - before) if np.isfinite(now - before) else "–"


def zeroshot_table(c: Comparison) -> str:
    rows = []
    for z in c.zeroshot:
        r = z.a
        zs = "zeroshot_test_"
        zs_bal = f"{r.cell('recall', zs)} / {r.cell('specificity', zs)}"
        ft_bal = f"{r.cell('recall')} / {r.cell('specificity')}"
        rows.append([r.label, r.cell("accuracy", "zeroshot_test_"), r.cell("accuracy"),
                     _change(z, r.value("accuracy"), r.value("accuracy", "zeroshot_test_")),
                     zs_bal, ft_bal, z.text if z.test else z.note])
    return md_table(["Model", "Zero-shot", "Fine-tuned", "Change (points) [CI]",
                     "Zero-shot recall / specificity", "Fine-tuned recall / specificity",
                     "Verdict"], rows)


def confusion_counts(r: RunRecord, which: str = "test") -> dict[str, float] | None:
    """TP/TN/FP/FN from the predictions (the seed vote for merged seeds), else the metrics."""
    rows = r.rows(which)
    if rows is not None:
        y, p = rows["label"].to_numpy(), rows["prediction"].to_numpy()
        return {"tp": float(((y == 1) & (p == 1)).sum()), "tn": float(((y == 0) & (p == 0)).sum()),
                "fp": float(((y == 0) & (p == 1)).sum()), "fn": float(((y == 1) & (p == 0)).sum())}
    prefix = "test_" if which == "test" else "zeroshot_test_"
    if all(f"{prefix}{k}" in r.metrics for k in ("tp", "tn", "fp", "fn")):
        return {k: r.metrics[f"{prefix}{k}"] for k in ("tp", "tn", "fp", "fn")}
    return None


def confusion_table(c: Comparison) -> str:
    rows = []
    for r in c.llms + c.baselines:
        cm = confusion_counts(r)
        if cm is None:
            continue
        n = sum(cm.values())
        says_yes = (cm["tp"] + cm["fp"]) / n if n else np.nan
        vote = " (seed vote)" if len(r.seeds) > 1 else ""
        rows.append([r.label + vote, *(f"{cm[k]:.0f}" for k in ("tp", "tn", "fp", "fn")),
                     stats.pct(says_yes)])
    return md_table(["Model", "TP", "TN", "FP", "FN", "Says Yes"], rows)


def earlier_table(c: Comparison) -> str:
    rows = []
    for t in c.earlier:
        now, before = t.a.value("accuracy"), t.b.value("accuracy")
        rows.append([t.a.label, t.b.label, t.b.cell("accuracy"), t.a.cell("accuracy"),
                     _change(t, now, before), t.text])
    return md_table(["Model", "Earlier model", "Earlier", "Now", "Change (points) [CI]",
                     "Verdict"], rows)


def readme_table(c: Comparison) -> str:
    """The short table for a README: accuracy with CI, F1, recall, balance gap, rank."""
    rows = [[r.label, r.cell("accuracy"), r.cell("f1", with_ci=False), r.cell("recall"),
             r.cell("balance_gap"), c.ranks.get(r.name, "")] for r in c.llms]
    rows += [[f"{r.label} (baseline)", r.cell("accuracy"), r.cell("f1", with_ci=False),
              r.cell("recall"), r.cell("balance_gap"), "–"] for r in c.baselines]
    return md_table(["Model", "Accuracy [95% CI]", "F1", "Recall", "Balance gap", "Rank"], rows)


def results_frame(c: Comparison) -> pd.DataFrame:
    """Every model, best first, as a DataFrame of formatted cells (the table a notebook shows,
    and that `tablora batch` prints from the executed notebook)."""
    everyone = sorted(c.llms + c.baselines, key=score_key, reverse=True)
    return pd.DataFrame({
        "Model": [r.label for r in everyone],
        "Type": ["LLM" if r.kind == LLM else "baseline" for r in everyone],
        "Accuracy [95% CI]": [r.cell("accuracy") for r in everyone],
        "F1": [r.cell("f1", with_ci=False) for r in everyone],
        "Recall": [r.cell("recall") for r in everyone],
        "Specificity": [r.cell("specificity") for r in everyone],
        "Balance gap": [r.cell("balance_gap") for r in everyone],
        "LLM rank": [c.ranks.get(r.name, "") if r.kind == LLM else "" for r in everyone],
    })


def markdown(c: Comparison, extra: str = "") -> str:
    """The whole write-up: verdicts, tables, figures (and `extra`, e.g. recommendations)."""
    where = f"experiment `{c.experiment}`" + (f", batch `{c.batch}`" if c.batch else "")
    n_rows = next((len(r.predictions) for r in c.llms + c.baselines
                   if r.predictions is not None), None)
    parts = [f"# Results: {where}",
             f"{len(c.llms)} fine-tuned LLM(s) and {len(c.baselines)} classical baseline(s)"
             + (f", {n_rows} test rows" if n_rows else "") + f"; {time.strftime('%Y-%m-%d')}.",
             "## Verdict", "\n".join(f"- {line}" for line in c.headline)]
    if c.llms:
        parts += ["## Fine-tuned LLM results", llm_table(c),
                  "Value [95% bootstrap CI] (mean ± sd across seeds where several ran); the best "
                  "of each column in bold. Rank =1: not significantly worse than the best LLM "
                  "(exact McNemar, Holm-adjusted, α = 0.05); the models significantly below it "
                  "share the next rank, because each is tested only against the best."]
    parts += ["## Baselines beside the LLMs", all_models_table(c)]
    if c.tests:
        parts += ["## Paired comparisons (same test rows)", tests_table(c.tests),
                  f"Exact McNemar on the discordant rows; Holm correction across these "
                  f"{sum(t.test is not None for t in c.tests)} comparisons."]
    if c.zeroshot:
        parts += ["## Zero-shot → fine-tuned", zeroshot_table(c),
                  "Change: paired bootstrap 95% CI; verdict: exact McNemar, Holm across models."]
    if confusion_table(c).count("\n") > 1:
        parts += ["## Confusion matrices (test)", confusion_table(c)]
    if c.against is not None:
        parts += [f"## Change from the earlier round (`{c.against}`)",
                  earlier_table(c) if c.earlier else "No model matched the earlier round."]
        if c.unmatched:
            parts.append("New this round (no earlier match): " + ", ".join(c.unmatched) + ".")
    parts += ["## Summary for a README", "```markdown\n" + readme_table(c) + "\n```"]
    if extra:
        parts.append(extra)
    if c.figures:
        parts += ["## Figures", "\n".join(f"![{p.stem}]({p.name})" for p in c.figures)]
    if c.skipped:
        parts += ["## Runs left out", "\n".join(f"- {s}" for s in c.skipped)]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- figures

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
    metrics = ("accuracy", "f1", "balanced_accuracy")
    if not models:
        return None
    fig = _figure(4.2 * len(metrics), 0.45 * len(models) + 1.6)
    axes = fig.subplots(1, len(metrics), sharey=True)
    order = [r.label for r in models]
    for ax, metric in zip(axes, metrics, strict=True):
        df = pd.DataFrame({"model": order, "value": [r.value(metric) for r in models],
                           "type": ["LLM" if r.kind == LLM else "baseline" for r in models]})
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
    import seaborn as sns

    items = [(r, confusion_counts(r)) for r in c.llms + c.baselines]
    items = [(r, cm) for r, cm in items if cm is not None]
    if not items:
        return None
    fig, axes = _grid(len(items), max_cols=4, width=3.1, height=2.8)
    for ax, (r, cm) in zip(axes, items, strict=False):
        mat = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        sns.heatmap(mat, annot=True, fmt=".0f", cbar=False, cmap="Blues", ax=ax,
                    xticklabels=["No", "Yes"], yticklabels=["No", "Yes"])
        ax.set(title=r.label, xlabel="predicted", ylabel="actual")
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
        ax.plot(fpr, tpr, ls="-" if r.kind == LLM else "--", label=f"{r.label} (AUC {auc:.2f})")
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


# ---------------------------------------------------------------- entry points

def compare(experiment: str = "tablora", batch: str | None = None, against: str | None = None,
            out: str | Path | None = None, figures: bool = True, log: bool = True
            ) -> Comparison:
    """Load, compare, write REPORT.md and the figures into `out`, log them to MLflow."""
    loaded = load(experiment, batch or None)
    c = build(loaded.records, experiment, batch or None, loaded.skipped)
    if against:
        compare_rounds(c, load_against(experiment, against).records, against)
    c.out_dir = Path(out) if out else RUNS_DIR / "compare" / (batch or experiment)
    if figures:
        c.figures = write_figures(c, c.out_dir)
    c.markdown = markdown(c)
    if figures:
        (c.out_dir / "REPORT.md").write_text(c.markdown)
    if log:
        log_report(c, loaded)
    return c


def log_report(c: Comparison, loaded: Loaded) -> str:
    """Log the out folder to the batch's parent run, else to a new run tagged kind=report."""
    client = _client()
    run_id = loaded.parent_run_id
    if not run_id:
        tags = {tracking.TAG_KIND: "report"}
        if c.batch:
            tags[tracking.TAG_BATCH_ID] = c.batch
        run_id = client.create_run(loaded.experiment_id, run_name="comparison",
                                   tags=tags).info.run_id
        best = c.best_llm
        if best is not None:
            client.log_metric(run_id, "best_llm_test_accuracy", best.value("accuracy"))
        client.set_terminated(run_id)
    if c.out_dir and c.out_dir.is_dir():
        client.log_artifacts(run_id, str(c.out_dir), "comparison")
    return run_id


def cli_compare(args: Any) -> int:
    try:
        c = compare(args.experiment, getattr(args, "batch", None), getattr(args, "against", None),
                    getattr(args, "out", None))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(c.markdown)
    print(f"Report and figures: {c.out_dir}")
    return 0


def cli_recommend(args: Any) -> int:
    from helpers import recommend

    try:
        loaded = load(args.experiment, getattr(args, "batch", None))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = build(loaded.records, args.experiment, getattr(args, "batch", None), loaded.skipped)
    plan = recommend.plan(c)
    written = recommend.write(plan, c, Path(args.out))
    print(recommend.summary(plan))
    print("Written: " + ", ".join(str(p) for p in written))
    folders = sorted({str(p.parent) for p in written if p.suffix == ".yaml"})
    if folders:
        print("Next round: tablora batch " + " ".join(folders))
    return 0
