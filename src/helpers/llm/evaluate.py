"""Evaluation: the base model zero-shot, then the same model with a training run's adapter, on the
saved test split; metrics, predictions and confusion matrices logged into that training run.

The notebook (notebooks/evaluate.ipynb) calls, in order: find_target (which run, which adapter),
models.load (once), evaluate (inside tracking.run), then comparison_table / confusion_figures /
key_figures for display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers import config, metrics, tracking
from helpers.config import Params
from helpers.contract import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ARTIFACT_ADAPTERS,
    EVALUATION_SETTINGS,
    PREFIX_TEST,
    PREFIX_ZEROSHOT,
    TAG_ADAPTER_DIR,
    TAG_SPLIT_HASH,
    THRESHOLD_ARGMAX,
    THRESHOLD_FIXED,
    THRESHOLD_METRICS,
    THRESHOLD_SOURCE_TAGS,
    THRESHOLD_SOURCES,
    THRESHOLD_VALID,
)
from helpers.llm import scoring

# The two models an evaluation scores, and their metric prefixes (helpers.contract).
PREFIXES = {"zeroshot": PREFIX_ZEROSHOT, "finetuned": PREFIX_TEST}


class EvaluationError(RuntimeError):
    """No adapter or run to evaluate, or a mismatch; the message says what to pass instead."""


@dataclass
class Target:
    """Which MLflow run gets the results and which adapter is scored."""

    run_id: str  # "" = a new run (an adapter directory evaluated on its own)
    adapter_dir: Path
    source: str  # how the adapter was found, for the reader

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_ADAPTER_DIR: str(self.adapter_dir)}


@dataclass
class Result:
    """One model scored on the test split."""

    prefix: str  # "test" (fine-tuned) or "zeroshot_test"
    scores: scoring.Scores
    y: np.ndarray
    prediction: np.ndarray
    row_ids: list
    threshold: float  # NaN in generate mode
    threshold_source: str = THRESHOLD_FIXED  # contract.THRESHOLD_SOURCES; "" in generate mode
    metrics: dict[str, float] = field(default_factory=dict)
    classes: list = field(default_factory=list)  # multi-class: the class values (no threshold)


# --------------------------------------------------------------------------- which adapter


def is_adapter_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


def _checked_adapter(path: Path, what: str) -> Path:
    if not is_adapter_dir(path):
        raise EvaluationError(f"{what} {path}: not an adapter directory (it needs "
                              f"{' and '.join(ADAPTER_FILES)}). Pass the folder that training "
                              "wrote (params output_dir, default runs/adapters/<name>).")
    return path


def download_adapter(run_id: str) -> Path | None:
    """The run's `adapters/` artifact, downloaded to the cache; None when it has none."""
    import mlflow

    dst = config.CACHE_DIR / "adapters" / run_id
    if is_adapter_dir(dst / ARTIFACT_ADAPTERS):
        return dst / ARTIFACT_ADAPTERS  # artifacts of a run are immutable: reuse the download
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=ARTIFACT_ADAPTERS, dst_path=str(dst)))
    except Exception:  # MLflow raises several types for a missing artifact
        return None
    return local if is_adapter_dir(local) else None


def find_target(params: Params, run_id: str = "", adapter: str = "") -> Target:
    """The run to write into and the adapter to score.

    adapter given: that directory (into `run_id`, or a new run). run_id given: its `adapters/`
    artifact, else params.adapter_dir. Neither: the latest FINISHED run named params.name.
    """

    tracking.setup(params.experiment)
    if adapter:
        path = config.resolve_path(adapter, Path.cwd())
        return Target(run_id, _checked_adapter(path, "adapter"), "adapter directory")
    if not run_id:
        found = tracking.find_run(params.experiment, params.name)
        if found is None:
            raise EvaluationError(
                f"no FINISHED run named {params.name!r} in experiment {params.experiment!r} "
                f"({tracking.tracking_uri()}): train first (`tablora train "
                f"{params.source_file or 'PARAMS.yaml'}`), or pass --run-id or --adapter.")
        run_id = found.info.run_id
    else:
        tracking.get_run(run_id)  # a StoreError naming the id
    local = download_adapter(run_id)
    if local is not None:
        return Target(run_id, local, f"artifact {ARTIFACT_ADAPTERS}/ of run {run_id}")
    fallback = params.adapter_dir
    if is_adapter_dir(fallback):
        print(f"run {run_id} has no {ARTIFACT_ADAPTERS}/ artifact: scoring {fallback} "
              "(params output_dir) instead")
        return Target(run_id, fallback, f"params adapter_dir {fallback}")
    raise EvaluationError(f"run {run_id} has no {ARTIFACT_ADAPTERS}/ artifact and {fallback} "
                          "holds no adapter: pass --adapter DIR, or train again.")


def apply_adapter(model: Any, adapter_dir: Path) -> Any:
    """Add the LoRA layers of `adapter_dir` to the loaded model, in place (no second load)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    load_adapters(model, str(adapter_dir))
    model.eval()  # new LoRA layers start in training mode: dropout would be on
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- scoring


def score_model(model: Any, tokenizer: Any, prepared: Any, params: Params,
                prefix: str, frozen: scoring.FrozenStates | None = None) -> Result:
    """Score the test split; the threshold is params.threshold or tuned on the valid split.
    A multi-class task predicts the most likely class: no threshold.
    frozen: states shared between the zero-shot and the fine-tuned pass (frozen_states)."""
    if getattr(prepared, "multiclass", False):
        scores = scoring.score(model, tokenizer, prepared.messages("test", False), params,
                               desc=prefix, classes=prepared.classes,
                               answers=prepared.class_answers, frozen=frozen)
        y = prepared.y("test")
        return Result(prefix, scores, y, scores.predict(y), list(prepared.split["test"]),
                      math.nan, THRESHOLD_ARGMAX, classes=list(prepared.classes))
    threshold, source = math.nan, ""
    if params.scoring == "logprob":
        threshold, source = params.threshold, THRESHOLD_FIXED
        if params.threshold_mode == "tune":
            if not prepared.split["valid"]:
                raise EvaluationError("threshold_mode: tune needs a validation split: set "
                                      "dataset.valid_size > 0, or threshold_mode: fixed.")
            valid = scoring.score(model, tokenizer, prepared.messages("valid", False), params,
                                  desc=f"{prefix} (valid)", frozen=frozen)
            threshold = metrics.tune_threshold(prepared.y("valid"), valid.p_yes)
            source = THRESHOLD_VALID
    scores = scoring.score(model, tokenizer, prepared.messages("test", False), params,
                           desc=prefix, frozen=frozen)
    y = prepared.y("test")
    return Result(prefix, scores, y, scores.predict(y, threshold), list(prepared.split["test"]),
                  threshold, source)


def frozen_states(model: Any, adapter_dir: Path) -> scoring.FrozenStates | None:
    """What the fine-tuned pass can take over from the zero-shot one: the adapter's LoRA layers
    sit in the top `num_layers` blocks (mlx-lm's adapter_config.json), so the blocks below give
    the same states in both passes and run once (scoring.FrozenStates). None when every block
    is adapted or the config does not say."""
    import json

    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
        adapted = int(config["num_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    n_blocks = len(getattr(getattr(model, "model", None), "layers", []))
    if not 0 < adapted < n_blocks:
        return None
    return scoring.FrozenStates(start=n_blocks - adapted)


def log_result(result: Result, params: Params) -> dict[str, float]:
    """Log to the active run: metrics with CIs, predictions CSV, confusion matrix, examples/s,
    and the threshold (logprob) or the invalid-answer rate (generate)."""
    import mlflow

    s = result.scores
    if result.classes:
        return _log_multiclass(result, params)
    p_yes = s.p_yes if s.mode == "logprob" else None  # generate mode has no probabilities
    values = metrics.log_to_mlflow(result.prefix, result.y, result.prediction, p_yes,
                                   result.row_ids, raw=s.raw, n_bootstrap=params.n_bootstrap,
                                   seed=params.seed)
    extra = {f"{result.prefix}_examples_per_sec": s.examples_per_sec}
    if s.mode == "generate":
        extra[f"{result.prefix}_invalid_rate"] = s.invalid_rate
    else:
        extra[THRESHOLD_METRICS[result.prefix]] = result.threshold
        mlflow.set_tag(THRESHOLD_SOURCE_TAGS[result.prefix], result.threshold_source)
    mlflow.log_metrics(extra)
    result.metrics = {**values, **extra}
    return result.metrics


def _log_multiclass(result: Result, params: Params) -> dict[str, float]:
    """log_result of a multi-class task: its metrics, predictions and K x K confusion matrix."""
    import mlflow

    s = result.scores
    values = metrics.log_to_mlflow_multi(result.prefix, result.y, result.prediction, s.proba,
                                         result.row_ids, result.classes, raw=s.raw,
                                         n_bootstrap=params.n_bootstrap, seed=params.seed)
    extra = {f"{result.prefix}_examples_per_sec": s.examples_per_sec}
    if s.mode == "generate":
        extra[f"{result.prefix}_invalid_rate"] = s.invalid_rate
    mlflow.set_tag(THRESHOLD_SOURCE_TAGS[result.prefix], THRESHOLD_ARGMAX)
    mlflow.log_metrics(extra)
    result.metrics = {**values, **extra}
    return result.metrics


def _check_split(prepared: Any, run_id: str) -> None:
    """The run must have been trained on the split that is scored here."""
    import mlflow

    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    trained_on = tags.get(TAG_SPLIT_HASH)
    if trained_on is None:
        tracking.log_dataset(prepared)
    elif trained_on != prepared.split_hash:
        raise EvaluationError(
            f"run {run_id} was trained on split {trained_on} but these params give split "
            f"{prepared.split_hash}: evaluate with the params file (and overrides) it was "
            "trained with.")


def evaluate(params: Params, prepared: Any, model: Any, tokenizer: Any,
             target: Target) -> dict[str, Result]:
    """Zero-shot (if params.eval_zeroshot), then with the adapter; logged to the active run.

    Call inside `tracking.run(params, run_id=target.run_id, tags=target.tags)`.
    """
    import mlflow

    run_id = mlflow.active_run().info.run_id
    if target.run_id:
        _check_split(prepared, run_id)
    else:  # a new run for an adapter directory on its own
        tracking.log_params(params)
        tracking.log_dataset(prepared)
    results: dict[str, Result] = {}
    frozen = None
    if params.eval_zeroshot:
        frozen = frozen_states(model, target.adapter_dir)
        results["zeroshot"] = score_model(model, tokenizer, prepared, params,
                                          PREFIXES["zeroshot"], frozen)
        log_result(results["zeroshot"], params)
    apply_adapter(model, target.adapter_dir)
    if frozen is not None:
        frozen.replay_on(model)
    results["finetuned"] = score_model(model, tokenizer, prepared, params,
                                       PREFIXES["finetuned"], frozen)
    if frozen is not None and frozen.hits:
        print(f"fine-tuned scoring started {frozen.hits} batches at block {frozen.start} from "
              "the zero-shot pass's states (the blocks below the adapter ran once)")
    log_result(results["finetuned"], params)
    # Evaluation settings may differ from the ones the run was trained with (MLflow params
    # cannot change): record what this evaluation used.
    mlflow.log_dict({"adapter": target.source, "adapter_dir": str(target.adapter_dir),
                     "scoring": params.scoring, "length_normalize": params.length_normalize,
                     "threshold_mode": params.threshold_mode,
                     "eval_batch_size": params.eval_batch_size,
                     "max_new_tokens": params.max_new_tokens, "split_hash": prepared.split_hash},
                    EVALUATION_SETTINGS)
    return results


# --------------------------------------------------------------------------- display


TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "specificity",
                 "balance_gap", "mcc", "roc_auc", "pr_auc", "brier", "positive_rate",
                 "invalid_rate", "examples_per_sec")
# A multi-class task's rows (per-class recall and precision follow them).
MULTICLASS_TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted",
                            "roc_auc", "log_loss", "invalid_rate", "examples_per_sec")
LABELS = {"zeroshot": "zero-shot", "finetuned": "fine-tuned"}


def comparison_table(results: dict[str, Result]) -> Any:
    """Metrics by model (zero-shot, fine-tuned), with the 95% CI where there is one."""
    import pandas as pd

    columns = {}
    for key, r in results.items():
        col = {}
        names = TABLE_METRICS
        if r.classes:  # multi-class: its own metrics, then recall and precision per class
            names = (*MULTICLASS_TABLE_METRICS,
                     *(f"{w}_{metrics.class_key(c)}" for c in r.classes
                       for w in ("recall", "precision")))
        for m in names:
            v = r.metrics.get(f"{r.prefix}_{m}")
            if v is None:
                continue
            low, high = (r.metrics.get(f"{r.prefix}_{m}_ci_{b}") for b in ("low", "high"))
            col[m] = f"{v:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
        col["threshold"] = "" if math.isnan(r.threshold) else (
            f"{r.threshold:.3f} ({THRESHOLD_SOURCES[r.threshold_source]})")
        columns[LABELS[key]] = col
    return pd.DataFrame(columns)


def confusion_figures(results: dict[str, Result]) -> list[Any]:
    figures = []
    for key, r in results.items():
        accuracy = float(np.mean(r.y == r.prediction))
        if r.classes:
            figures.append(metrics.confusion_figure_multi(
                r.y, r.prediction, r.classes, f"{LABELS[key]}: accuracy {accuracy:.1%}"))
            continue
        figures.append(metrics.confusion_figure(r.y, r.prediction,
                                                f"{LABELS[key]}: accuracy {accuracy:.1%}"))
    return figures


KEY_METRICS = ("accuracy", "balanced_accuracy", "f1", "f1_macro", "roc_auc", "examples_per_sec")


def key_figures(results: dict[str, Result], run_id: str, target: Target) -> dict[str, Any]:
    """The notebook's last cell: a flat dict of the headline numbers."""
    out: dict[str, Any] = {"run_id": run_id, "adapter_dir": str(target.adapter_dir)}
    for r in results.values():
        for m in KEY_METRICS:
            if f"{r.prefix}_{m}" in r.metrics:
                out[f"{r.prefix}_{m}"] = round(r.metrics[f"{r.prefix}_{m}"], 4)
        out[THRESHOLD_METRICS[r.prefix]] = r.threshold
    return out
