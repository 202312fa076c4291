"""The fine-tuned LLM classifier as an MLflow pyfunc model: what `mlflow.pyfunc.load_model`
opens, `mlflow models serve` serves and `tablora predict` scores with.

Artifacts: the adapter folder and `tablora_model.json` (the resolved prompt recipe, the scoring
settings, the threshold the evaluation chose, the base model's id). The base model is not copied
into the model: it is named (a hub id, a local directory, or `builtin:...`) and resolved on load
by helpers.llm.models, as training did. Rows go through helpers.data.PromptRecipe (the code that
wrote the training prompts) and helpers.llm.scoring (the code that scored the test split), so the
same rows give the same P(yes) as the evaluation, to the bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from helpers import config, contract, data, metrics, tracking
from helpers.llm import evaluate, models, scoring

# The pyfunc's artifact keys.
ARTIFACT_SPEC, ARTIFACT_ADAPTER = "spec", "adapter"
# Rows of the training table kept as the model's input example (never test rows).
EXAMPLE_ROWS = 2


class PredictError(ValueError):
    """Rows or a model that cannot be scored; the message names the column, file or run and the
    fix."""


@dataclass(frozen=True)
class ModelSpec:
    """What a logged LLM classifier is, besides its adapter (tablora_model.json)."""

    name: str  # the params name (the registered model's name)
    model_id: str  # the base model: hub id, local directory or builtin:...
    dequantize: str
    recipe: data.PromptRecipe
    scoring: str  # "logprob" or "generate"
    length_normalize: bool
    eval_batch_size: int
    max_new_tokens: int
    threshold: float  # NaN in generate mode
    threshold_source: str
    split_hash: str

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["recipe"] = self.recipe.to_dict()
        d["threshold"] = None if math.isnan(self.threshold) else self.threshold
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        values = {k: d[k] for k in cls.__dataclass_fields__}
        values["recipe"] = data.PromptRecipe.from_dict(d["recipe"])
        values["threshold"] = math.nan if d["threshold"] is None else float(d["threshold"])
        return cls(**values)

    def params(self) -> config.Params:
        """The scoring settings as Params (what helpers.llm.scoring reads)."""
        r = self.recipe
        return config.Params(
            name=self.name, model_id=self.model_id, dequantize=self.dequantize,
            scoring=self.scoring, length_normalize=self.length_normalize,
            eval_batch_size=self.eval_batch_size, max_new_tokens=self.max_new_tokens,
            prompt=replace(config.PromptSpec(), answer_yes=r.answer_yes, answer_no=r.answer_no))

    def metadata(self) -> dict[str, Any]:
        """The logged model's metadata (contract.MODEL_METADATA): what `tablora predict` reads
        before it loads anything."""
        r = self.recipe
        out = {"kind": contract.KIND_LLM, "features": r.features, "kinds": r.kinds,
               "target": r.target, "positive_label": r.positive_label,
               "threshold": self.to_dict()["threshold"], "base_model": self.model_id}
        if r.task == data.MULTICLASS:  # what a class index means
            out.update(task=r.task, classes=[str(c) for c in r.classes])
        return out

    @property
    def multiclass(self) -> bool:
        return self.recipe.task == data.MULTICLASS


def spec_for(params: config.Params, prepared: Any, threshold: float,
             threshold_source: str) -> ModelSpec:
    return ModelSpec(params.name, params.model_id, params.dequantize, prepared.recipe,
                     params.scoring, params.length_normalize, params.eval_batch_size,
                     params.max_new_tokens, float(threshold), threshold_source,
                     prepared.split_hash)


def check_columns(table: pd.DataFrame, features: list[str], origin: str) -> None:
    """Every feature column present, or one PredictError naming the missing and the expected."""
    missing = [f for f in features if f not in table.columns]
    if missing:
        raise PredictError(
            f"{origin}: missing feature column(s) {', '.join(map(repr, missing))}; the model "
            f"was trained on {', '.join(map(repr, features))}. Add the missing columns (an "
            "empty value is allowed: it is written as the missing-value text).")
    if len(table) == 0:
        raise PredictError(f"{origin}: no rows to score (only a header): add data rows.")


class LLMClassifier:
    """A base model with its adapter applied, and the recipe that turns rows into prompts."""

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any) -> None:
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self._params = spec.params()

    @classmethod
    def load(cls, spec: ModelSpec, adapter_dir: Path) -> LLMClassifier:
        model, tokenizer = models.load(spec.model_id, spec.dequantize)
        evaluate.apply_adapter(model, adapter_dir)
        return cls(spec, model, tokenizer)

    def messages(self, table: pd.DataFrame) -> list[list[dict[str, str]]]:
        return self.spec.recipe.messages(self.spec.recipe.user_texts(table))

    def score(self, table: pd.DataFrame, progress: bool = False,
              origin: str = "input") -> scoring.Scores:
        """helpers.llm.scoring's pass over the rows (cached shared prefix, batches, lanes):
        the evaluation's own call, so the same rows give the same numbers."""
        check_columns(table, self.spec.recipe.features, origin)
        r = self.spec.recipe
        return scoring.score(self.model, self.tokenizer, self.messages(table), self._params,
                             progress=progress, desc="predict", classes=r.classes,
                             answers=r.answers if self.spec.multiclass else ())

    def predictions(self, scores: scoring.Scores) -> np.ndarray:
        """0/1 at the run's threshold (logprob); the parsed answer, -1 if none (generate).
        Multi-class: the index of the most likely (or the parsed) class."""
        if self.spec.multiclass:
            if scores.mode == "logprob":
                return np.argmax(scores.proba, axis=1).astype(int)
            return scores.parsed.astype(int)
        if scores.mode == "logprob":
            return metrics.predict(scores.p_yes, self.spec.threshold).astype(int)
        return scores.parsed.astype(int)

    def predict_frame(self, table: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
        scores = self.score(table, progress)
        if self.spec.multiclass:
            return class_frame(self.predictions(scores), scores.proba, self.spec.recipe.classes,
                               table.index)
        return pd.DataFrame({"p_yes": scores.p_yes, "prediction": self.predictions(scores)},
                            index=table.index)


def class_frame(prediction: np.ndarray, proba: np.ndarray | None, classes: list,
                index: Any = None) -> pd.DataFrame:
    """A multi-class model's output: `prediction` (the class, as text; "" where a generated
    answer named none) and P(class) per class as `p_<class>` (NaN in generate mode)."""
    names = [str(c) for c in classes]
    out = pd.DataFrame({"prediction": [names[k] if k >= 0 else "" for k in prediction]},
                       index=index)
    for k, name in enumerate(names):
        out[contract.CLASS_PROBABILITY.format(name)] = proba[:, k] if proba is not None else np.nan
    return out


class TabloraLLM(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: a DataFrame of feature columns in, `p_yes` and `prediction` out."""

    def load_context(self, context: Any) -> None:
        spec_path = Path(context.artifacts[ARTIFACT_SPEC])
        spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
        self.classifier = LLMClassifier.load(spec, Path(context.artifacts[ARTIFACT_ADAPTER]))

    # A DataFrame type hint: MLflow infers no schema from it (the signature is the schema) and
    # hands the input over as a DataFrame.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        table = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            model_input)
        return self.classifier.predict_frame(table).reset_index(drop=True)


def _signature(example: pd.DataFrame, classes: list | None = None) -> Any:
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    signature = infer_signature(example)
    signature.outputs = Schema([ColSpec("double", "p_yes"), ColSpec("long", "prediction")])
    if classes:  # multi-class: class_frame's columns
        signature.outputs = Schema([ColSpec("string", "prediction")]
                                   + [ColSpec("double", contract.CLASS_PROBABILITY.format(c))
                                      for c in classes])
    return signature


def requirements() -> list[str]:
    """Pinned like this environment (given, so MLflow does not load the model to infer them)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "mlx", "mlx-lm", "pandas", "numpy")]


def log_model(params: config.Params, prepared: Any, adapter_dir: Path, threshold: float,
              threshold_source: str, register: bool = True) -> Any:
    """Log the fine-tuned classifier as the active run's `model` (a pyfunc with a signature
    and an input example of training rows) and register it under params.name. Returns the
    ModelInfo."""
    import shutil
    import tempfile

    import mlflow

    spec = spec_for(params, prepared, threshold, threshold_source)
    example = prepared.X("train").head(EXAMPLE_ROWS).reset_index(drop=True)
    with tempfile.TemporaryDirectory(prefix="tablora-model-") as tmp:
        # The adapter's two files only: a training folder also holds every checkpoint.
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        for name in contract.ADAPTER_FILES:
            shutil.copy2(Path(adapter_dir) / name, adapter / name)
        spec_path = Path(tmp) / contract.MODEL_SPEC_FILE
        spec_path.write_text(json.dumps(spec.to_dict(), indent=1, ensure_ascii=False),
                             encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name=contract.ARTIFACT_MODEL, python_model=TabloraLLM(),
            artifacts={ARTIFACT_SPEC: str(spec_path), ARTIFACT_ADAPTER: str(adapter)},
            signature=_signature(example, [str(c) for c in spec.recipe.classes]),
            input_example=example,
            pip_requirements=requirements(), metadata={contract.MODEL_METADATA: spec.metadata()})
    if register:
        tracking.register_model(info.model_uri, params.name)
    return info
