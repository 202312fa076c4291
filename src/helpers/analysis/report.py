"""The comparison: run records -> tables with CIs, paired tests with verdicts, REPORT.md.

The records come from helpers.analysis.records (the runs helpers.contract describes); the
figures (helpers.analysis.figures) and the entry points (helpers.analysis.compare) build on this
module. Design choices that the numbers depend on:
- One row per model (tablora.model_name): the latest FINISHED run per (kind, model, seed). Several
  seeds give the mean ± sd across seeds; their paired tests use the seed-majority vote per row
  (ties go to the first seed) — one deterministic classifier that uses every seed, where "the
  first seed" would throw the other seeds away.
- Runs on different splits (tablora.split_hash) are never compared: the report refuses and names
  them. Paired tests join rows on row_id and refuse rows that differ.
- Floors first: every model (each LLM fine-tuned and zero-shot, each baseline but the floors
  themselves) against the better floor (contract.FLOORS: majority class, stratified random),
  exact McNemar, Holm over that family ("vs floor"). A model not significantly better than the
  floor is "no better than the floor" in the verdict and every table, and takes no rank.
- Then exact McNemar for each LLM against the best classical baseline (the best above the floor)
  and for each LLM above the floor against the best of them: a second Holm family. Ranks tie
  models that the data do not separate; a "clear winner" needs the top LLM to beat every other
  LLM above the floor significantly.
- Zero-shot -> fine-tuned per LLM is a third family, and each model against its earlier round a
  fourth: each Holm-adjusted on its own, since each answers its own question.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import contract, metrics
from helpers.analysis import stats
from helpers.analysis.records import (
    Loaded,
    MemcheckRecord,
    NoRuns,
    ReportError,
    RunRecord,
    class_name_map,
    load,
    score_key,
)
from helpers.contract import KIND_BASELINE, KIND_LLM, PREFIX_TEST, PREFIX_ZEROSHOT

TABLE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "balance_gap", "roc_auc",
                 "brier")
LABELS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
          "specificity": "Specificity", "f1": "F1", "balance_gap": "Balance gap",
          "balanced_accuracy": "Balanced accuracy", "roc_auc": "ROC-AUC", "brier": "Brier"}
LOWER_IS_BETTER = {"balance_gap", "brier"}
# A multi-class comparison's columns (no specificity, balance gap or threshold: no class is Yes).
MULTICLASS_TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted",
                            "roc_auc", "log_loss")
LABELS.update(f1_macro="Macro F1", f1_weighted="Weighted F1", log_loss="Log loss")
LOWER_IS_BETTER.add("log_loss")
VS_BASELINE, VS_BEST_LLM = "vs best baseline", "vs best LLM"
ZEROSHOT, EARLIER = "zero-shot → fine-tuned", "vs earlier round"
VS_FLOOR = "vs floor"
AT_FLOOR = "no better than the floor"  # the label, in verdicts and tables
FLOOR_WORDS = {"majority": "majority-class floor", "stratified": "stratified-random floor"}
NO_RANK = "–"


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
    floor_note: str = ""  # appended to the verdict (both sides at or below the floor)

    @property
    def names(self) -> tuple[str, str]:
        if self.family == ZEROSHOT:
            return f"{self.a.label} (fine-tuned)", f"{self.a.label} (zero-shot)"
        if self.family == VS_FLOOR and self.which_a == "zeroshot":
            return f"{self.a.label} (zero-shot)", self.b.label
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
    def a_better(self) -> bool:
        return self.significant and self.test is not None and self.test.a_only > self.test.b_only

    @property
    def text(self) -> str:
        if self.test is None:
            return self.note
        return stats.verdict(*self.names, self.test, self.p_adjusted) + self.floor_note


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
    floor: RunRecord | None = None  # the better floor baseline (contract.FLOORS)
    multiclass: bool = False  # a multi-class target: its own metrics, no threshold
    floor_tests: list[Paired] = field(default_factory=list)  # every model vs floor: one family
    top_llm: RunRecord | None = None  # the best LLM above the floor (else the best LLM)
    top_baseline: RunRecord | None = None  # the best non-floor baseline above the floor
    against: str | None = None
    earlier: list[Paired] = field(default_factory=list)  # each model vs its earlier round
    unmatched: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    out_dir: Path | None = None
    markdown: str = ""
    memchecks: list[MemcheckRecord] = field(default_factory=list)

    @property
    def best_llm(self) -> RunRecord | None:
        return self.top_llm

    @property
    def best_baseline(self) -> RunRecord | None:
        return self.top_baseline

    def floor_test(self, r: RunRecord, which: str = "test") -> Paired | None:
        return next((t for t in self.floor_tests if t.a is r and t.which_a == which), None)

    def at_floor(self, r: RunRecord, which: str = "test") -> bool:
        """Tested against the floor and not significantly better than it (False: untested)."""
        t = self.floor_test(r, which)
        return t is not None and t.test is not None and not t.a_better

    def rank(self, r: RunRecord) -> str:
        """An LLM's rank; "–" for a model no better than the floor (it takes no rank)."""
        if self.at_floor(r):
            return f"{NO_RANK} ({AT_FLOOR})"
        return self.ranks.get(r.name, "")

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
            "at_floor": [r.label for r in self.llms + self.baselines if self.at_floor(r)],
            "out_dir": str(self.out_dir or ""),
        }


def floor_words(floor: RunRecord) -> str:
    """'the majority-class floor (majority, 66.4%)'."""
    what = FLOOR_WORDS.get(floor.name, f"{floor.name} floor")
    return f"the {what} ({floor.label}, {floor.cell('accuracy', with_ci=False)})"


def build(records: Sequence[RunRecord], experiment: str = "", batch: str | None = None,
          skipped: Sequence[str] = (), memchecks: Sequence[MemcheckRecord] = ()
          ) -> Comparison:
    """Tests, ranks and headline from model records (pure: no MLflow); `memchecks` add a
    memorization line per LLM checked on its table."""
    llms = sorted((r for r in records if r.kind == KIND_LLM), key=score_key, reverse=True)
    baselines = sorted((r for r in records if r.kind == KIND_BASELINE), key=score_key,
                       reverse=True)
    comp = Comparison(experiment, batch, llms, baselines, [], [], {}, [], list(skipped),
                      memchecks=list(memchecks),
                      multiclass=any(r.is_multiclass for r in [*llms, *baselines]))
    floors = [b for b in baselines if b.is_floor]
    comp.floor = floors[0] if floors else None
    if comp.floor is not None:
        for r in llms:
            comp.floor_tests.append(paired(r, comp.floor, VS_FLOOR))
            if r.rows("zeroshot") is not None:
                comp.floor_tests.append(paired(r, comp.floor, VS_FLOOR, "zeroshot", "test"))
        comp.floor_tests += [paired(b, comp.floor, VS_FLOOR) for b in baselines
                             if not b.is_floor]
        adjust(comp.floor_tests)
    working = [r for r in llms if not comp.at_floor(r)]
    others = [b for b in baselines if not b.is_floor]
    comp.top_llm = working[0] if working else (llms[0] if llms else None)
    comp.top_baseline = next((b for b in others if not comp.at_floor(b)),
                             others[0] if others else None)
    for r in llms:
        if comp.top_baseline is not None:
            comp.tests.append(paired(r, comp.top_baseline, VS_BASELINE))
        if r in working and r is not working[0]:
            comp.tests.append(paired(r, working[0], VS_BEST_LLM))
    adjust(comp.tests)
    worse = {c.a.name for c in comp.tests if c.family == VS_BEST_LLM and c.a_worse}
    comp.ranks = stats.tie_ranks([r.name for r in working], worse)
    comp.zeroshot = [paired(r, r, ZEROSHOT, "test", "zeroshot") for r in llms
                     if f"{PREFIX_ZEROSHOT}_accuracy" in r.metrics]
    adjust(comp.zeroshot)
    for z in comp.zeroshot:
        if comp.floor is not None and comp.at_floor(z.a) and comp.at_floor(z.a, "zeroshot"):
            z.floor_note = (f"; both zero-shot and fine-tuned are {AT_FLOOR}: "
                            f"{floor_words(comp.floor)}")
        elif comp.floor is not None and comp.at_floor(z.a):
            z.floor_note = f"; the fine-tuned model is {AT_FLOOR}: {floor_words(comp.floor)}"
    comp.headline = headline(comp)
    return comp


def headline(c: Comparison) -> list[str]:
    """The findings in plain words, only as strong as the tests allow."""
    lines: list[str] = []
    n_rows = next((len(r.predictions) for r in c.llms + c.baselines
                   if r.predictions is not None), None)
    rows = f" on these {n_rows} test rows" if n_rows else ""
    working = [r for r in c.llms if not c.at_floor(r)]
    for r in c.llms + [b for b in c.baselines if not b.is_floor]:
        t = c.floor_test(r)
        if c.at_floor(r) and t is not None:
            kind = "LLM" if r.kind == KIND_LLM else "baseline"
            lines.append(f"{r.label} ({kind}, {r.cell('accuracy')}) is {AT_FLOOR}: "
                         f"{floor_words(c.floor)}; {t.text}"
                         + ("; it takes no rank." if r.kind == KIND_LLM else "."))
    if len(c.llms) == 1 and working:
        lines.append(f"One LLM: {c.llms[0].label} ({c.llms[0].cell('accuracy')}).")
    elif len(working) == 1:
        lines.append(f"One LLM above the floor: {working[0].label} "
                     f"({working[0].cell('accuracy')}).")
    elif working:
        top = [r.label for r in working if c.ranks[r.name].lstrip("=") == "1"]
        best = working[0]
        untested = [t.a.label for t in c.tests if t.family == VS_BEST_LLM and t.test is None]
        if c.clear_winner:
            lines.append(f"Clear winner among the LLMs: {best.label} ({best.cell('accuracy')}) "
                         "is significantly better than every other LLM above the floor (exact "
                         "McNemar, Holm).")
        else:
            lines.append(f"No clear winner among the LLMs: {_join(top)} are not distinguishable "
                         f"from the best ({best.label}, {best.cell('accuracy')}){rows}; they "
                         "share rank =1" + (f" (untested, no predictions logged: "
                                            f"{_join(untested)})" if untested else "") + ".")
    elif c.llms:
        lines.append("No LLM is better than the floor: none takes a rank.")
    base = c.best_baseline
    if base and c.best_llm:
        vs = next(t for t in c.tests if t.a is c.best_llm and t.family == VS_BASELINE)
        lines.append(f"Best LLM vs best baseline ({base.label}): {vs.text}.")
    elif base:
        lines.append(f"Best baseline: {base.label} ({base.cell('accuracy')}); no LLM runs.")
    if c.zeroshot:
        tested = [z for z in c.zeroshot if z.test is not None]
        gains = [z.a.label for z in tested if z.a_better and not c.at_floor(z.a)]
        floor_gains = [z.a.label for z in tested if z.a_better and c.at_floor(z.a)]
        losses = [z.a.label for z in tested if z.a_worse]
        verb = "is" if len(floor_gains) == 1 else "are"
        lines.append(f"Fine-tuning improved accuracy significantly for {len(gains)} of "
                     f"{len(tested)} LLMs" + (f" ({_join(gains)})" if gains else "")
                     + (f"; {_join(floor_gains)} improved but {verb} still {AT_FLOOR}"
                        if floor_gains else "")
                     + (f"; it made {_join(losses)} significantly worse" if losses else "")
                     + ".")
    improving = [r.label for r in c.llms if r.still_improving]
    if improving:
        lines.append(f"Training stopped while validation loss was still falling for "
                     f"{_join(improving)}: under-trained, its verdicts may understate it; raise "
                     "num_epochs (early stopping ends training when it stops improving).")
    if c.floor is None and (c.llms or c.baselines):
        lines.append("No floor baseline ran (majority, stratified): nothing here is checked "
                     "against a model that knows nothing; add them to baselines.models.")
    if any(len(r.seeds) > 1 for r in c.llms + c.baselines):
        lines.append("Models run with several seeds: mean ± sd across seeds; their paired tests "
                     "use the seed-majority vote per row (ties: the first seed).")
    return lines + memcheck_lines(c)


# What each memorization test found, in words: test -> (what the model did, per what).
_MEMCHECK_WORDS = {
    "header": ("continues the table's first rows verbatim", "cuts"),
    "row": ("completes {exact} of {trials} rows of the table verbatim", ""),
    "feature": ("recalls the held-out value of {exact} of {trials} rows", ""),
    "first_token": ("starts {exact} of {trials} next rows with the right first value", ""),
}


def _memcheck_finding(test: str, m: dict[str, float]) -> str:
    words, per = _MEMCHECK_WORDS[test]
    counts = {k: int(m.get(k, 0)) for k in ("exact", "trials", "chance_exact", "chance_trials")}
    text = words.format(**counts)
    if per:
        text += f" at {counts['exact']} of {counts['trials']} {per}"
    return text + f" (shuffled copy: {counts['chance_exact']} of {counts['chance_trials']})"


def memcheck_lines(c: Comparison) -> list[str]:
    """A line per LLM whose model was checked for memorization of the table it was scored on
    (helpers.llm.memcheck): the tests that flagged it, or that none did."""
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for r in c.llms:
        source = str(r.params.get("dataset", {}).get("source", ""))
        key = (r.model_id, source)
        checks = [m for m in c.memchecks if (m.model_id, m.source) == key]
        if not checks or key in seen:
            continue
        seen.add(key)
        flagged = [(m, t) for m in checks for t in m.flagged]
        if flagged:
            found = "; ".join(f"{_memcheck_finding(t, m.tests[t])} [{m.text} text]"
                              for m, t in flagged)
            lines.append(f"Memorization: {r.model_id} has seen {source}: it {found}; its "
                         "results on this table may be inflated (tablora memcheck).")
        else:
            tested = ", ".join(sorted({t for m in checks for t in m.tests}))
            rows = next((m.tests["row"] for m in checks if "row" in m.tests), None)
            detail = f": it {_memcheck_finding('row', rows)}" if rows else ""
            lines.append(f"Memorization check: no sign that {r.model_id} has seen {source} "
                         f"(tests {tested} at chance level{detail}).")
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


def table_metrics(c: Comparison) -> tuple[str, ...]:
    """The metric columns of the comparison's tables: binary's, or a multi-class task's."""
    return MULTICLASS_TABLE_METRICS if c.multiclass else TABLE_METRICS


def llm_table(c: Comparison) -> str:
    names = table_metrics(c)
    best = {m: _best(c.llms, m) for m in names}
    rows = [[r.label] + [_marked(r, m, best[m]) for m in names]
            + [r.threshold_text(), c.rank(r)] for r in c.llms]
    return md_table(["Model"] + [LABELS[m] for m in names] + ["Threshold", "Rank"],
                    rows)


def _type(r: RunRecord) -> str:
    if r.kind == KIND_LLM:
        return "LLM (fine-tuned)"
    return "floor" if r.is_floor else "baseline"


def floor_cell(c: Comparison, r: RunRecord, which: str = "test") -> str:
    """'above' / 'no better than the floor' / 'the floor' / '–' (untested)."""
    if r.is_floor:
        return "the floor" if r is c.floor else "floor"
    t = c.floor_test(r, which)
    if t is None or t.test is None:
        return "–"
    return "above" if t.a_better else AT_FLOOR


def all_models_table(c: Comparison) -> str:
    everyone = sorted(c.llms + c.baselines, key=score_key, reverse=True)
    names = table_metrics(c)
    best = {m: _best(everyone, m) for m in names}
    rows = [[r.label, _type(r)] + [_marked(r, m, best[m]) for m in names]
            + [r.threshold_text(), floor_cell(c, r)] for r in everyone]
    return md_table(["Model", "Type"] + [LABELS[m] for m in names]
                    + ["Threshold", "vs floor"], rows)


def tests_table(tests: Sequence[Paired]) -> str:
    rows = [[" vs ".join(t.names), t.text] for t in tests]
    return md_table(["Comparison", "Verdict"], rows)


def calibration_table(c: Comparison) -> str:
    """P(yes) by true class (quartiles) and the Brier score: a model whose P(yes) sits in a
    narrow band shows it here, whatever its threshold makes of it."""
    rows = []
    for r in c.llms + c.baselines:
        for which in ("zeroshot", "test") if r.kind == KIND_LLM else ("test",):
            df = r.rows(which)
            if df is None or "p_yes" not in df or df["p_yes"].isna().any():
                continue
            name = r.label + {"zeroshot": " (zero-shot)", "test": ""}[which]
            p, y = df["p_yes"].to_numpy(dtype=float), df["label"].to_numpy()
            cells = [_quartiles(p[y == k]) for k in (1, 0)]
            iqr = float(np.subtract(*np.percentile(p, [75, 25])))
            brier = float(np.mean((p - y) ** 2))
            rows.append([name, *cells, f"{iqr:.2f}", f"{brier:.3f}",
                         r.threshold_text(which)])
    return md_table(["Model", "P(yes), Yes rows", "P(yes), No rows", "P(yes) IQR", "Brier",
                     "Threshold"], rows)


def _quartiles(p: np.ndarray) -> str:
    if not len(p):
        return "–"
    q1, q2, q3 = np.percentile(p, [25, 50, 75])
    return f"{q2:.2f} [{q1:.2f}, {q3:.2f}]"


def _change(t: Paired, now: float, before: float) -> str:
    if t.diff is not None:
        d, low, high = t.diff
        return f"{stats.points(d)} [{stats.points(low)}, {stats.points(high)}]"
    return stats.points(now - before) if np.isfinite(now - before) else "–"


def zeroshot_table(c: Comparison) -> str:
    rows = []
    for z in c.zeroshot:
        r = z.a
        zs = f"{PREFIX_ZEROSHOT}_"
        zs_bal = f"{r.cell('recall', zs)} / {r.cell('specificity', zs)}"
        ft_bal = f"{r.cell('recall')} / {r.cell('specificity')}"
        if c.multiclass:  # no class is Yes: the mean recall over the classes instead
            zs_bal, ft_bal = r.cell("balanced_accuracy", zs), r.cell("balanced_accuracy")
        rows.append([r.label, r.cell("accuracy", zs), r.cell("accuracy"),
                     _change(z, r.value("accuracy"), r.value("accuracy", zs)),
                     zs_bal, ft_bal, f"{floor_cell(c, r, 'zeroshot')} / {floor_cell(c, r)}",
                     z.text if z.test else z.note])
    balance = ("balanced accuracy" if c.multiclass else "recall / specificity")
    return md_table(["Model", "Zero-shot", "Fine-tuned", "Change (points) [CI]",
                     f"Zero-shot {balance}", f"Fine-tuned {balance}",
                     "vs floor (zero-shot / fine-tuned)", "Verdict"], rows)


def confusion_counts(r: RunRecord, which: str = "test") -> dict[str, float] | None:
    """TP/TN/FP/FN from the predictions (the seed vote for merged seeds), else the metrics;
    None for a multi-class run (class_confusion)."""
    if r.is_multiclass:
        return None
    rows = r.rows(which)
    if rows is not None:
        counts = metrics.confusion_counts(rows["label"].to_numpy(), rows["prediction"].to_numpy())
        return {k: float(v) for k, v in counts.items()}
    prefix = f"{PREFIX_TEST if which == 'test' else PREFIX_ZEROSHOT}_"
    if all(f"{prefix}{k}" in r.metrics for k in ("tp", "tn", "fp", "fn")):
        return {k: r.metrics[f"{prefix}{k}"] for k in ("tp", "tn", "fp", "fn")}
    return None


def class_confusion(r: RunRecord, which: str = "test") -> tuple[list[str], np.ndarray] | None:
    """A multi-class run's class names and K x K counts (rows actual, columns predicted), from
    its predictions (the seed vote for merged seeds: the names from the first seed's)."""
    rows = r.rows(which)
    names = class_names(r)
    if rows is None or not names:
        return None
    cm = metrics.confusion_matrix(rows["label"].to_numpy(int), rows["prediction"].to_numpy(int),
                                  len(names))
    return names, cm


def class_names(r: RunRecord) -> list[str]:
    """The class names of a multi-class run, by class index, from its predictions' columns."""
    df = r.predictions
    if df is None or contract.LABEL_NAME not in df or not r.is_multiclass:
        return []
    # Every class is among the test labels (the split is stratified on the class).
    k = int(max(df["label"].max(), df["prediction"].max())) + 1
    names = class_name_map([df])
    return [names.get(i) or f"class {i}" for i in range(k)]


def multiclass_confusion_table(c: Comparison) -> str:
    """Per model, each class's row of its confusion matrix: 'Nebbiolo → 11 / 1 / 0'."""
    found = [(r, class_confusion(r)) for r in c.llms + c.baselines]
    found = [(r, cc) for r, cc in found if cc is not None]
    if not found:
        return md_table(["Model"], [])
    names = found[0][1][0]
    rows = [[r.label + (" (seed vote)" if len(r.seeds) > 1 else "")]
            + [" / ".join(str(int(v)) for v in cm[i]) for i in range(len(names))]
            for r, (_, cm) in found]
    return md_table(["Model"] + [f"{n} → {' / '.join(names)}" for n in names], rows)


def confusion_table(c: Comparison) -> str:
    if c.multiclass:
        return multiclass_confusion_table(c)
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
    """The short table for a README: accuracy with CI, F1, recall, balance gap, ROC-AUC, Brier,
    rank (an LLM's; "no better than the floor" for any model that is not above it)."""
    def cells(r: RunRecord) -> list[str]:
        if c.multiclass:
            return [r.cell("accuracy"), r.cell("f1_macro", with_ci=False),
                    r.cell("balanced_accuracy", with_ci=False),
                    r.cell("roc_auc", with_ci=False), r.cell("log_loss")]
        return [r.cell("accuracy"), r.cell("f1", with_ci=False), r.cell("recall"),
                r.cell("balance_gap"), r.cell("roc_auc", with_ci=False), r.cell("brier")]

    rows = [[r.label, *cells(r), c.rank(r)] for r in c.llms]
    for r in c.baselines:
        rank = (f"{NO_RANK} (floor)" if r.is_floor else
                f"{NO_RANK} ({AT_FLOOR})" if c.at_floor(r) else NO_RANK)
        rows.append([f"{r.label} ({'floor' if r.is_floor else 'baseline'})", *cells(r), rank])
    if c.multiclass:
        return md_table(["Model", "Accuracy [95% CI]", "Macro F1", "Balanced accuracy",
                         "ROC-AUC (one-vs-rest)", "Log loss", "Rank"], rows)
    return md_table(["Model", "Accuracy [95% CI]", "F1", "Recall", "Balance gap", "ROC-AUC",
                     "Brier", "Rank"], rows)


def results_frame(c: Comparison) -> pd.DataFrame:
    """Every model, best first, as a DataFrame of formatted cells (the table a notebook shows,
    and that `tablora batch` prints from the executed notebook)."""
    everyone = sorted(c.llms + c.baselines, key=score_key, reverse=True)

    def cells(metric: str, with_ci: bool = True) -> list[str]:
        return [r.cell(metric, with_ci=with_ci) for r in everyone]

    if c.multiclass:
        metrics = {"Macro F1": cells("f1_macro", False), "Weighted F1": cells("f1_weighted"),
                   "Balanced accuracy": cells("balanced_accuracy", False),
                   "ROC-AUC": cells("roc_auc", False), "Log loss": cells("log_loss")}
    else:
        metrics = {"F1": cells("f1", False), "Recall": cells("recall"),
                   "Specificity": cells("specificity"), "Balance gap": cells("balance_gap"),
                   "Brier": cells("brier"), "Threshold": [r.threshold_text() for r in everyone]}
    return pd.DataFrame({
        "Model": [r.label for r in everyone],
        "Type": ["LLM" if r.kind == KIND_LLM else "baseline" for r in everyone],
        "Accuracy [95% CI]": cells("accuracy"),
        **metrics,
        "vs floor": [floor_cell(c, r) for r in everyone],
        "LLM rank": [c.rank(r) if r.kind == KIND_LLM else "" for r in everyone],
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
                  "above the floor (exact McNemar, Holm-adjusted, α = 0.05); the models "
                  "significantly below it share the next rank, because each is tested only "
                  f"against the best; a model {AT_FLOOR} takes no rank (–)."]
    threshold_note = (
        "Threshold: where each model's P(yes) is cut, and how it was chosen: `fixed` "
        "(params `threshold`), tuned on the validation split (LLMs) or on out-of-fold "
        "predictions of train + valid (baselines), by one `threshold_mode` for all; never "
        "on test.")
    if c.multiclass:
        threshold_note = (
            "Multi-class target: every model predicts its most likely class (the argmax of "
            "P(class)); threshold tuning does not apply, and neither do specificity or the "
            "balance gap. Macro F1 and balanced accuracy weigh each class alike; ROC-AUC is "
            "one-vs-rest, averaged over the classes.")
    parts += ["## Baselines beside the LLMs", all_models_table(c), threshold_note]
    if c.floor_tests:
        parts += ["## Against the floor", tests_table(c.floor_tests),
                  f"Each model against {floor_words(c.floor)}: exact McNemar, Holm correction "
                  f"across these {sum(t.test is not None for t in c.floor_tests)} comparisons. "
                  f"A model not significantly better is {AT_FLOOR}."]
    if c.tests:
        parts += ["## Paired comparisons (same test rows)", tests_table(c.tests),
                  f"Exact McNemar on the discordant rows; Holm correction across these "
                  f"{sum(t.test is not None for t in c.tests)} comparisons."]
    if calibration_table(c).count("\n") > 1:
        parts += ["## Calibration (test)", calibration_table(c),
                  "P(yes): median [interquartile range] over the rows of each true class; IQR "
                  "over all test rows; Brier score (mean squared error of P(yes), lower is "
                  "better). A narrow band means a model that barely separates the classes, "
                  "whatever its threshold."]
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
