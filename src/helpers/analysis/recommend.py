"""Recommendations: rules that read a round's results, and the next round's params files.

Each rule is a pure function of RunRecords (helpers.analysis.records) that returns a Finding:
the evidence it rests on, and concrete changes to the params (a factor or a new value). A
model's changes combine in rule order: two factors on one key keep the larger (no
compounding), a set value wins over what came before it. The next round:
  config-a/  the underperformers (every LLM but the best that a rule fired for), one file each
             holding what differs from `_defaults.yaml` (derived from the earlier resolved params);
  config-b/  the best LLM, pushed (more LoRA capacity, bigger batches, more steps);
each file headed by the rules that fired and the expected training time; plus REPORT.md.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers.analysis import report, stats
from helpers.analysis.records import RunRecord, score_key
from helpers.config import (
    DEFAULT_EPOCHS,
    DEFAULTS_FILE_NAME,
    Params,
    flat_types,
    flatten,
    load_params,
    unflatten,
)
from helpers.contract import TRAIN_STEPS

MARKER = "# Written by `tablora recommend`"


@dataclass(frozen=True)
class Thresholds:
    min_gain: float = 0.02  # fine-tuned minus zero-shot accuracy below this: "no gain"
    bias_high: float = 0.9  # positive-prediction rate above this: "says Yes to everything"
    bias_low: float = 0.1  # ... below this: "says No to everything"
    max_balance_gap: float = 0.2  # |recall - specificity| above this
    low_recall: float = 0.4  # "too conservative": recall below this ...
    high_specificity: float = 0.65  # ... with specificity at least this
    loss_window: float = 0.2  # "not converged": the last 20% of train_loss points ...
    loss_min_drop: float = 0.02  # ... fall by at least 2% of their level along the fitted line
    loss_alpha: float = 0.05  # ... and the slope is significantly negative
    overfit_margin: float = 0.05  # last val_loss more than 5% above its minimum: "overfitting"
    size_margin: float = 0.02  # a smaller model this much more accurate than a larger one


@dataclass(frozen=True)
class Change:
    key: str  # params key, dotted for sections: "dataset.balance"
    factor: float | None = None
    value: Any = None

    def describe(self) -> str:
        return f"{self.key} ×{self.factor:g}" if self.factor is not None else (
            f"{self.key} = {self.value}")


def times(key: str, factor: float) -> Change:
    return Change(key, factor=factor)


def set_to(key: str, value: Any) -> Change:
    return Change(key, value=value)


@dataclass(frozen=True)
class Finding:
    rule: str  # machine name: "no_gain"
    title: str  # words: "no gain from fine-tuning"
    model: str
    evidence: str
    changes: tuple[Change, ...]
    reason: str  # why these changes

    def line(self) -> str:
        changes = ", ".join(c.describe() for c in self.changes)
        return f"{self.title}: {self.evidence} → {changes}; why: {self.reason}"


def _param(r: RunRecord, key: str) -> Any:
    """The earlier run's value of a (dotted) params key, else the schema default."""
    flat = {**Params().flat(), **flatten(r.params)}
    return flat.get(key)


# ---------------------------------------------------------------- rules on one model

def rule_no_gain(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    zs, ft = r.value("accuracy", "zeroshot_test_"), r.value("accuracy")
    if not (np.isfinite(zs) and np.isfinite(ft)) or ft - zs >= th.min_gain:
        return None
    test = report.paired(r, r, report.ZEROSHOT, "test", "zeroshot", strict=False).test
    return Finding(
        "no_gain", "no gain from fine-tuning", r.name,
        f"zero-shot {stats.pct(zs)} → fine-tuned {stats.pct(ft)} ({stats.points(ft - zs)} "
        f"points, under +{100 * th.min_gain:g})"
        + (f", paired exact McNemar {stats.fmt_p(test.p)}" if test else ""),
        (times("learning_rate", 2), times("num_iters", 1.5), times("lora_rank", 2),
         times("lora_alpha", 2)),
        "fine-tuning did not beat the zero-shot model: a larger learning rate, more steps and "
        "more LoRA capacity, alpha doubled with the rank to keep the scale alpha/rank")


def positive_rate(r: RunRecord) -> float:
    v = r.value("positive_rate")
    if np.isfinite(v):
        return v
    rows = r.rows("test")
    return float(rows["prediction"].mean()) if rows is not None else float("nan")


def _rule_one_class(r: RunRecord, th: Thresholds) -> Finding | None:
    """rule_bias of a multi-class model: one class predicted for (nearly) every row. No
    threshold to move and no oversampling (binary only): it needs to learn more."""
    rows = r.rows("test")
    if rows is None or not len(rows):
        return None
    shares = rows["prediction"].value_counts(normalize=True)
    if shares.iloc[0] <= th.bias_high:
        return None
    names = report.class_names(r)
    k = int(shares.index[0])
    name = names[k] if k < len(names) else f"class {k}"
    return Finding("bias", "says one class to everything", r.name,
                   f"predicts {name} for {stats.pct(shares.iloc[0])} of the test rows (above "
                   f"{stats.pct(th.bias_high, 0)})",
                   (times("learning_rate", 2), times("num_iters", 1.5)),
                   "a multi-class model predicts its most likely class (no threshold to move): "
                   "it needs to learn more")


def rule_bias(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    if r.is_multiclass:
        return _rule_one_class(r, th)
    rate = positive_rate(r)
    if not np.isfinite(rate) or th.bias_low <= rate <= th.bias_high:
        return None
    word = "Yes" if rate > th.bias_high else "No"
    limit = th.bias_high if rate > th.bias_high else th.bias_low
    if _param(r, "threshold_mode") != "tune":
        changes = (set_to("threshold_mode", "tune"), set_to("dataset.balance", "oversample"))
        reason = ("a threshold tuned on the validation split undoes a shifted P(yes); "
                  "oversampling shows the minority class as often as the majority")
    else:  # already tuned and still one-sided: the scores carry no signal yet
        changes = (times("learning_rate", 2), times("num_iters", 1.5))
        reason = "the threshold is already tuned, so the model needs to learn more"
    return Finding("bias", f"says {word} to everything", r.name,
                   f"predicts Yes for {stats.pct(rate)} of the test rows "
                   f"({'above' if word == 'Yes' else 'below'} {stats.pct(limit, 0)})",
                   changes, reason)


def rule_balance_gap(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    gap, rec, spec = r.value("balance_gap"), r.value("recall"), r.value("specificity")
    if not np.isfinite(gap):
        gap = abs(rec - spec)
    if not np.isfinite(gap) or gap <= th.max_balance_gap:
        return None
    change = (set_to("threshold_mode", "tune") if _param(r, "threshold_mode") != "tune"
              else set_to("dataset.balance", "oversample"))
    return Finding("balance_gap", "large balance gap", r.name,
                   f"recall {stats.pct(rec)} vs specificity {stats.pct(spec)}: gap "
                   f"{100 * gap:.1f} points (above {100 * th.max_balance_gap:g})",
                   (change,), "move the decision threshold (or the class mix) toward balance")


def rule_too_conservative(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    rec, spec = r.value("recall"), r.value("specificity")
    if not (np.isfinite(rec) and np.isfinite(spec)):
        return None
    if rec >= th.low_recall or spec < th.high_specificity:
        return None
    return Finding("too_conservative", "too conservative", r.name,
                   f"recall {stats.pct(rec)} (below {stats.pct(th.low_recall, 0)}) with "
                   f"specificity {stats.pct(spec)}: it misses most positive rows",
                   (set_to("dataset.balance", "oversample"), set_to("threshold_mode", "tune")),
                   "more positive examples in training and a threshold that trades specificity "
                   "for recall")


def rule_not_converged(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    """The fitted line through the last 20% of train_loss points falls clearly: more steps."""
    from scipy.stats import linregress

    pts = r.history.get("train_loss", [])
    if len(pts) < 5:
        return None  # too few points to tell a trend from noise
    k = max(3, math.ceil(len(pts) * th.loss_window))
    steps, losses = (np.array(v, dtype=float) for v in zip(*pts[-k:], strict=True))
    if np.ptp(steps) == 0:
        return None
    fit = linregress(steps, losses)
    drop = -fit.slope * np.ptp(steps) / max(float(np.mean(losses)), 1e-12)
    if fit.slope >= 0 or fit.pvalue >= th.loss_alpha or drop < th.loss_min_drop:
        return None
    factor = 2.0 if drop > 0.1 else 1.5
    return Finding("not_converged", "not converged", r.name,
                   f"train loss still falling over the last {k} points (steps {steps[0]:.0f}–"
                   f"{steps[-1]:.0f}): the fitted line drops {100 * drop:.1f}% of its level "
                   f"(slope {stats.fmt_p(fit.pvalue)})",
                   (times("num_iters", factor),), "training stopped while the loss was falling")


def rule_overfitting(r: RunRecord, th: Thresholds = Thresholds()) -> Finding | None:
    pts = r.history.get("val_loss", [])
    if len(pts) < 3:
        return None
    steps = [s for s, _ in pts]
    losses = np.array([v for _, v in pts], dtype=float)
    i_min = int(np.argmin(losses))
    last, low = float(losses[-1]), float(losses[i_min])
    if i_min == len(pts) - 1 or last <= low * (1 + th.overfit_margin):
        return None
    evidence = (f"validation loss {last:.3f} at step {steps[-1]}, {100 * (last / low - 1):.0f}% "
                f"above its minimum {low:.3f} at step {steps[i_min]}")
    if i_min == 0:  # worse from the first evaluation on: the steps are too large
        return Finding("overfitting", "overfitting", r.name, evidence,
                       (times("learning_rate", 0.5),),
                       "validation loss rose from the first evaluation: a smaller learning rate")
    return Finding("overfitting", "overfitting", r.name, evidence,
                   (set_to("num_iters", max(int(steps[i_min]), 1)),),
                   "stop where validation loss was lowest")


RULES = (rule_no_gain, rule_bias, rule_balance_gap, rule_too_conservative, rule_not_converged,
         rule_overfitting)


# ---------------------------------------------------------------- rules across models

def rule_smaller_beats_larger(llms: Sequence[RunRecord], th: Thresholds = Thresholds()
                              ) -> list[Finding]:
    """A larger model less accurate than a smaller one (tablora.model_size): one finding on the
    larger model, against the best of the smaller ones that beat it."""
    sized = [(r, r.size_in_params()) for r in llms]
    sized = [(r, s) for r, s in sized if s is not None and np.isfinite(r.value("accuracy"))]
    findings = []
    for large, large_size in sized:
        smaller = [r for r, s in sized if s < large_size
                   and r.value("accuracy") - large.value("accuracy") >= th.size_margin]
        if not smaller:
            continue
        small = max(smaller, key=score_key)
        test = report.paired(large, small, "size", strict=False)
        note = (f"; the gap itself: exact McNemar {stats.fmt_p(test.test.p)}"
                if test.test else "")
        findings.append(Finding(
            "smaller_beats_larger", "a smaller model beats it", large.name,
            f"{small.name} ({small.model_size}) {stats.pct(small.value('accuracy'))} vs "
            f"{large.name} ({large.model_size}) {stats.pct(large.value('accuracy'))}{note}",
            (times("learning_rate", 2), times("lora_rank", 2), times("lora_alpha", 2)),
            "the larger model has the capacity but learned less: a larger update"))
    return findings


def diagnose(llms: Sequence[RunRecord], th: Thresholds = Thresholds()) -> dict[str, list[Finding]]:
    """Every rule on every LLM; {model name: findings in rule order}."""
    out: dict[str, list[Finding]] = {r.name: [] for r in llms}
    for r in llms:
        out[r.name] = [f for rule in RULES if (f := rule(r, th)) is not None]
    for f in rule_smaller_beats_larger(llms, th):
        out[f.model].append(f)
    return out


def push_best(best: RunRecord, c: report.Comparison | None = None) -> Finding:
    """Configuration B: more capacity, bigger batches and more steps for the best LLM."""
    vs = ""
    if c is not None and c.best_baseline is not None:
        t = next((t for t in c.tests if t.a is best and t.family == report.VS_BASELINE), None)
        vs = f"; vs {c.best_baseline.label}: {t.text}" if t else ""
    return Finding("push_best", "push the best model", best.name,
                   f"best LLM at {best.cell('accuracy')}{vs}",
                   (times("lora_rank", 2), times("lora_alpha", 2), times("batch_size", 2),
                    times("num_iters", 1.5)),
                   "more LoRA capacity and more examples for the model that learned most")


def merge_changes(findings: Sequence[Finding]) -> dict[str, Change]:
    """Rule order: factors on one key keep the larger; a set value overrides what came before."""
    merged: dict[str, Change] = {}
    for f in findings:
        for ch in f.changes:
            old = merged.get(ch.key)
            if old is not None and old.factor is not None and ch.factor is not None:
                ch = ch if abs(math.log(ch.factor)) >= abs(math.log(old.factor)) else old
            merged[ch.key] = ch
    return merged


def apply_changes(flat: dict[str, Any], changes: dict[str, Change]
                  ) -> tuple[dict[str, Any], list[str]]:
    """New flat params and 'key old -> new' lines; values rounded to what the schema types.

    The rules speak of `num_iters`; a run budgeted in epochs (num_iters 0) has a factor applied
    to num_epochs instead, and a set number of steps replaces its num_epochs."""
    types = flat_types()
    new = dict(flat)
    lines = []
    for key, ch in changes.items():
        if key == "num_iters" and not flat.get("num_iters"):
            if ch.factor is not None:
                key = "num_epochs"
                flat = {**flat, key: flat.get(key) or DEFAULT_EPOCHS}
            else:
                new["num_epochs"] = 0.0
        old = flat.get(key)
        value = old * ch.factor if ch.factor is not None and old is not None else ch.value
        if types.get(key) is int:
            value = max(int(round(value)), 1)
        elif types.get(key) is float:
            value = float(f"{value:.3g}")
        if value != old:
            new[key] = value
            lines.append(f"{key}: {old} → {value}" + (f" (×{ch.factor:g})" if ch.factor else ""))
    return new, lines


# ---------------------------------------------------------------- the next round

@dataclass
class NextRun:
    source: RunRecord
    name: str
    old: dict[str, Any]  # the earlier resolved params, flat
    params: dict[str, Any]  # the new resolved params, flat
    findings: list[Finding]
    changes: list[str]
    seconds: float | None
    time_note: str

    @property
    def changed_keys(self) -> set[str]:
        return {k for k in self.params if self.params[k] != self.old.get(k)} | {"name"}


@dataclass
class Plan:
    config_a: list[NextRun]
    config_b: list[NextRun]
    keep: list[str]  # LLMs no rule fired for
    findings: dict[str, list[Finding]]
    notes: list[str] = field(default_factory=list)


def next_name(name: str) -> str:
    """'Mistral-7B' -> 'Mistral-7B-v2'; 'Mistral-7B-v2' -> 'Mistral-7B-v3'."""
    m = re.fullmatch(r"(.*)-v(\d+)", name)
    return f"{m.group(1)}-v{int(m.group(2)) + 1}" if m else f"{name}-v2"


def estimate_seconds(r: RunRecord, old: dict[str, Any], new: dict[str, Any]
                     ) -> tuple[float | None, str]:
    """Training time of the new params from the earlier run's measured time and throughput:
    tokens per example = tokens/s × seconds / (iterations × batch size), and the new run
    processes new iterations × batch size examples at the same tokens/s."""
    secs, tps = r.metrics.get("train_seconds"), r.metrics.get("tokens_per_sec")
    old_steps = old.get("num_iters") or r.metrics.get(TRAIN_STEPS) or 0
    old_work = old_steps * old["batch_size"]
    if new.get("num_iters"):
        new_steps = new["num_iters"]
        new_work = new_steps * new["batch_size"]
    else:  # epochs: the same rows, so the work scales with the number of passes
        ratio = (new.get("num_epochs") or DEFAULT_EPOCHS) / (old.get("num_epochs")
                                                               or DEFAULT_EPOCHS)
        new_work = old_work * ratio if old.get("num_epochs") or not old.get("num_iters") else 0
        new_steps = round(new_work / new["batch_size"])
    n_seeds = max(1, len(new.get("seeds") or []))
    if not secs or not old_work or not new_work:
        return None, "unknown: the earlier run logged no train_seconds or train_steps"
    seconds = secs * new_work / old_work * n_seeds
    measured = f"{old_steps:.0f} iters × batch {old['batch_size']} took {_duration(secs)}"
    if tps:
        per_example = tps * secs / old_work
        measured += f" at {tps:,.0f} tokens/s (~{per_example:,.0f} tokens per example)"
    seeds = f" × {n_seeds} seeds" if n_seeds > 1 else ""
    return seconds, (f"~{_duration(seconds)} of training ({new_steps:.0f} iters × batch "
                     f"{new['batch_size']}{seeds}; earlier {measured}; evaluation not included)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def next_run(r: RunRecord, findings: list[Finding]) -> NextRun | None:
    if not r.params and not r.model_id:
        return None  # nothing to build a runnable file from
    old = {**Params().flat(), **flatten(r.params)}
    if r.model_id and not r.params.get("model_id"):
        old["model_id"] = r.model_id
    old["name"] = r.name
    if len(r.seeds) > 1 and not old.get("seeds"):  # seeds given on the command line (--seeds)
        old["seeds"] = list(r.seeds)
    # A fixed output_dir would overwrite the earlier adapters: the new name picks a fresh one.
    old["output_dir"] = ""
    new, lines = apply_changes(old, merge_changes(findings))
    new["name"] = next_name(r.name)
    seconds, note = estimate_seconds(r, old, new)
    return NextRun(r, new["name"], old, new, findings, lines, seconds, note)


def plan(c: report.Comparison, th: Thresholds = Thresholds()) -> Plan:
    findings = diagnose(c.llms, th)
    best = c.best_llm
    config_a, config_b, keep, notes = [], [], [], []
    for r in c.llms:
        if r is best:
            continue
        if not findings[r.name]:
            keep.append(r.label)
            continue
        run = next_run(r, findings[r.name])
        if run is None:
            notes.append(f"{r.label}: no params logged, no file written")
        else:
            config_a.append(run)
    if best is not None:
        run = next_run(best, findings[best.name] + [push_best(best, c)])
        if run is None:
            notes.append(f"{best.label}: no params logged, no file written")
        else:
            config_b.append(run)
    return Plan(config_a, config_b, keep, findings, notes)


# ---------------------------------------------------------------- writing

def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(unflatten(data), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=99)


def _comment(lines: Sequence[str]) -> str:
    out = []
    for line in lines:
        wrapped = textwrap.wrap(line, 97, subsequent_indent="    ") or [""]
        out += [f"# {w}".rstrip() for w in wrapped]
    return "\n".join(out) + "\n"


def file_texts(runs: Sequence[NextRun], title: str) -> dict[str, str]:
    """{file name: YAML text}: `_defaults.yaml` holds the values every model here shares (not the
    changed keys, so that each file shows its own changes); each model file the rest."""
    keys = set.intersection(*(set(r.params) for r in runs))
    changed = set().union(*(r.changed_keys for r in runs)) | {"model_id"}
    first = runs[0].params
    defaults = {k: first[k] for k in first if k in keys and k not in changed
                and all(r.params[k] == first[k] for r in runs)}
    texts = {DEFAULTS_FILE_NAME: _comment([
        MARKER[2:], f"{title}: defaults shared by the files in this folder, derived from the "
        "earlier runs' resolved params (" + ", ".join(r.source.run_id[:8] or r.source.name
                                                       for r in runs) + ")."]) + _yaml(defaults)}
    for r in runs:
        header = [MARKER[2:] + f" from {r.source.label} (run {r.source.run_id[:8] or '?'}).",
                  "Rules that fired:"] + [f"  - {f.line()}" for f in r.findings]
        header += ["Changes: " + ("; ".join(r.changes) or "none"),
                   f"Expected wall time: {r.time_note}"]
        order = ["name", "model_id"] + sorted(k for k in r.changed_keys if k not in
                                              ("name", "model_id"))
        body = {k: r.params[k] for k in order if k in r.params}
        body.update({k: v for k, v in r.params.items() if k not in defaults and k not in body})
        texts[f"{r.name}.yaml"] = _comment(header) + _yaml(body)
    return texts


def atomic_write(path: Path, text: str) -> None:
    """Write next to the target, then rename: a reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_config(folder: Path, runs: Sequence[NextRun], title: str) -> list[Path]:
    texts = file_texts(runs, title)
    # Check every file with the real loader before any is put in place.
    with tempfile.TemporaryDirectory(prefix="tablora-recommend-") as tmp:
        for name, text in texts.items():
            (Path(tmp) / name).write_text(text)
        for name in texts:
            if name != DEFAULTS_FILE_NAME:
                load_params(Path(tmp) / name)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):  # files of an earlier recommend, not the user's own
        if stale.name not in texts and stale.read_text().startswith(MARKER):
            stale.unlink()
    paths = []
    for name, text in texts.items():
        atomic_write(folder / name, text)
        paths.append(folder / name)
    return paths


def _total(runs: Sequence[NextRun]) -> str:
    secs = [r.seconds for r in runs]
    if not runs or any(s is None for s in secs):
        return "unknown"
    return "~" + _duration(sum(secs))  # type: ignore[arg-type]


def recommendations_markdown(p: Plan, out: Path | None = None) -> str:
    parts = ["## Recommendations"]
    for name, findings in p.findings.items():
        if findings:
            parts.append(f"**{name}**\n" + "\n".join(f"- {f.line()}" for f in findings))
    if p.keep:
        parts.append("Keep the current settings (no rule fired): " + ", ".join(p.keep) + ".")
    for label, folder, runs in (("Configuration A (the underperformers)", "config-a", p.config_a),
                                ("Configuration B (push the best model)", "config-b", p.config_b)):
        if not runs:
            continue
        where = f"{out}/{folder}" if out else folder
        rows = [[r.name, r.source.label, "; ".join(r.changes) or "none",
                 r.time_note.split(" (")[0]] for r in runs]
        parts += [f"### {label}: `tablora batch {where}` — expected {_total(runs)}",
                  report.md_table(["Params file", "From", "Changes", "Expected time"], rows)]
    parts += [f"- {n}" for n in p.notes]
    return "\n\n".join(parts)


def write(p: Plan, c: report.Comparison, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if p.config_a:
        written += write_config(out / "config-a", p.config_a, "Configuration A (underperformers)")
    if p.config_b:
        written += write_config(out / "config-b", p.config_b, "Configuration B (push the best)")
    c.markdown = report.markdown(c, extra=recommendations_markdown(p, out))
    atomic_write(out / "REPORT.md", c.markdown)
    return written + [out / "REPORT.md"]


def summary(p: Plan) -> str:
    """What the terminal shows after `tablora recommend`."""
    lines = []
    for name, findings in p.findings.items():
        lines.append(f"{name}: no rule fired" if not findings else f"{name}:")
        lines += [f"  - {f.line()}" for f in findings]
    for label, runs in (("Configuration A", p.config_a), ("Configuration B", p.config_b)):
        if runs:
            lines.append(f"{label}: {', '.join(r.name for r in runs)} (expected {_total(runs)})")
    lines += p.notes
    return "\n".join(lines)
