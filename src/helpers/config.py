"""Paths, defaults and the params schema: one YAML file per model run, validated when loaded.

Precedence: overrides (papermill / command line) > the model's YAML > `_defaults.yaml` beside it >
the dataclass defaults below. Key names are the same everywhere: YAML, these dataclasses, MLflow
params (nested keys flattened with ".").
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

# src/helpers/config.py -> the repository root (the package is installed editable).
PROJECT_ROOT = Path(os.environ.get("TABLORA_HOME", Path(__file__).resolve().parents[2])).resolve()
CACHE_DIR = Path(os.environ.get("TABLORA_CACHE", PROJECT_ROOT / ".cache")).resolve()
# Executed notebooks, resolved params and adapters (TABLORA_RUNS: elsewhere, e.g. for tests).
RUNS_DIR = Path(os.environ.get("TABLORA_RUNS", PROJECT_ROOT / "runs")).resolve()
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PARAMS_DIR = PROJECT_ROOT / "params"
DEMO_PARAMS = PARAMS_DIR / "demo" / "smollm2-135m.yaml"
DEFAULTS_FILE_NAME = "_defaults.yaml"
KERNEL_NAME = "tablora"
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
# The training budget when a params file sets neither num_iters nor num_epochs, and how often
# validation runs when steps_per_eval is 0 (early stopping counts these evaluations).
DEFAULT_EPOCHS = 3.0
EVALS_PER_EPOCH = 4
# The two budget keys: a layer (defaults file, model file, overrides) that sets one clears the
# other from the layers below it.
BUDGET_KEYS = ("num_iters", "num_epochs")


class ParamsError(ValueError):
    """A params file (or override) that cannot be used; the message names the file, key and fix."""


@dataclass(frozen=True)
class DatasetSpec:
    # CSV/Parquet path (relative to the params file or the project root) or "builtin:<name>".
    source: str = "builtin:breast_cancer"
    # The target column; empty = the built-in data set's own (a CSV/Parquet source must name it).
    target: str = ""
    # "binary" (a Yes/No question) or "multiclass" (3 to 20 classes, one answer word each);
    # empty = from the target: binary with positive_label set or 2 values, 3-20 multiclass.
    task: Literal["", "binary", "multiclass"] = ""
    # The target value that means "Yes"; empty = the built-in's own, or 1/True/"yes" in the data
    # (binary tasks only).
    positive_label: Any = ""
    # A subset of feature columns, in prompt order; empty = all columns but the target.
    features: list[str] = field(default_factory=list)
    # Human names (with units) used in prompts instead of raw column names (a built-in data set
    # brings its own; these win).
    feature_descriptions: dict[str, str] = field(default_factory=dict)
    # Words for coded values, per column: {smoke: {0: "no", 1: "yes"}} (the target's too: its
    # positive label's word goes into the question).
    value_labels: dict[str, dict[Any, str]] = field(default_factory=dict)
    # Fraction of the rows held out for the test split (looked at once per model).
    test_size: float = 0.2
    # Fraction for the validation split (early stopping, thresholds; baselines fit on it).
    valid_size: float = 0.1
    # Seed of the stratified split: same table and seed = same split (and split hash).
    split_seed: int = 42
    # "none", or "oversample" the minority class of the training split only.
    balance: Literal["none", "oversample"] = "none"
    # Train on only this many rows of the training split (0 = all of it), drawn stratified; the
    # validation and test rows stay the same. One point of a learning curve (`tablora curve`).
    train_rows: int = 0
    # Which draw of train_rows rows: the rows drawn for a smaller train_rows are among those for
    # a larger one at the same train_rows_seed (nested), so a curve adds rows, never swaps them.
    train_rows_seed: int = 0


@dataclass(frozen=True)
class PromptSpec:
    # "sentence" ("The mean radius is 18.0."), "list" ("mean radius: 18.0"), or a Jinja2 template
    # (inline text containing "{{", or a path ending in .j2/.jinja).
    template: str = "sentence"
    # Significant digits for numbers in prompts.
    digits: int = 3
    # What a missing value reads as in a prompt.
    missing: str = "unknown"
    # Added before the serialized row (shared by all rows: computed once and cached in scoring).
    # Empty = derived from the data: a built-in data set's own wording, else a neutral sentence
    # (helpers.data.wording).
    task_description: str = ""
    # Asked after the serialized row; empty = derived from the data (a built-in's own, else a
    # question built from the target column and positive label).
    question: str = ""
    # The answer the model is trained to give for the positive class.
    answer_yes: str = "Yes"
    # The answer for the negative class.
    answer_no: str = "No"
    # Multi-class tasks: the answer word of each class, {class value: "word"}; empty = a built-in
    # data set's own, else the class values themselves. Each must start with its own token.
    answers: dict[Any, str] = field(default_factory=dict)
    # A system message before each prompt (empty = none).
    system_prompt: str = ""


@dataclass(frozen=True)
class BaselineSpec:
    # Which classical models to fit (names from helpers.baselines.BASELINES).
    models: list[str] = field(
        default_factory=lambda: [
            "random_forest",
            "lasso",
            "logistic_l2",
            "hist_gradient_boosting",
            "majority",
            "stratified",
        ]
    )
    # "cv": choose hyperparameters by stratified CV on train; "fixed": use `fixed` as given.
    mode: Literal["cv", "fixed"] = "cv"
    # Stratified CV folds for mode "cv" (fewer when the minority class is smaller).
    cv_folds: int = 5
    # {model name: {hyperparameter: value}} for mode "fixed".
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CurveSpec:
    # Training-set sizes of `tablora curve`: row counts and/or "all" (its --sizes wins). Set,
    # they make the file a learning curve for `tablora batch` too (its points, then curve.ipynb).
    sizes: list[int | str] = field(default_factory=list)
    # The curve's seeds: each draws its own nested rows and trains its own adapters (its
    # --seeds wins; empty = the top-level seeds, else seed).
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Params:
    # The run's name in MLflow (default: the params file's name without .yaml).
    name: str = "smollm2-135m"
    # Hub id (mlx-community/...), a local mlx-lm model directory, or a built-in name.
    model_id: str = BUILTIN_MODEL
    # Where adapters and checkpoints go; empty = runs/adapters/<name>[-seed<k>].
    output_dir: str = ""
    # The MLflow experiment the runs go to.
    experiment: str = "tablora"
    # Seeds LoRA initialisation, dropout, batch order and the baselines.
    seed: int = 0
    # Repeats: the batch runs the model once per seed (empty = just `seed`).
    seeds: list[int] = field(default_factory=list)
    # Model loading: on MLX's CPU backend quantized weights are ~20x slower, so "auto" dequantizes
    # to float32 there and keeps them quantized on Metal.
    dequantize: Literal["auto", "always", "never"] = "auto"

    # LoRA. mlx-lm's `scale` = lora_alpha / lora_rank (its default scale 20 = alpha 160 at rank 8).

    # Rank of the LoRA matrices (adapter size).
    lora_rank: int = 8
    # LoRA scaling numerator: the update is scaled by lora_alpha / lora_rank.
    lora_alpha: float = 16.0
    # Dropout on the LoRA input during training.
    lora_dropout: float = 0.0
    # LoRA on the top `num_layers` transformer blocks (-1 = all).
    num_layers: int = 8
    # Which linear layers get adapters (empty = mlx-lm's default for the architecture).
    lora_keys: list[str] = field(default_factory=list)

    # Optimisation.

    # Adam's learning rate (peak, after warm-up). 2e-4 with a cosine decay is the usual LoRA
    # default (QLoRA's); a model as small as the embedded 135M one may need more (the demo: 1e-3).
    learning_rate: float = 2e-4
    # "constant", or "cosine" decay to 0 over the optimizer updates after warm-up.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # Optimizer updates of linear warm-up from 0 to learning_rate (0 = none).
    warmup_steps: int = 0
    # Training budget in iterations (batches); 0 = not set. Set this or num_epochs (neither:
    # DEFAULT_EPOCHS epochs); a file that sets one overrides the other from `_defaults.yaml`,
    # both in one file is an error.
    num_iters: int = 0
    # Training budget in passes over the training split; 0 = not set (see num_iters).
    num_epochs: float = 0.0
    # Examples per iteration.
    batch_size: int = 4
    # Iterations whose gradients are summed into one optimizer update.
    grad_accumulation_steps: int = 1
    # Longest training example in tokens (longer ones are truncated, with a warning).
    max_seq_length: int = 512
    # Loss on the answer tokens only.
    mask_prompt: bool = True
    # Iterations per training-loss report (terminal, MLflow's train_loss).
    steps_per_report: int = 10
    # Iterations between validation-loss evaluations (early stopping, best adapter); 0 =
    # EVALS_PER_EPOCH times per epoch.
    steps_per_eval: int = 0
    # Validation batches per evaluation (-1 = the whole validation split).
    val_batches: int = -1
    # Adapter checkpoint (with optimizer state) every N iterations.
    save_every: int = 50
    # Stop when validation loss has not improved for this many evaluations (0 = off); the
    # adapter with the lowest validation loss is the one evaluated either way.
    early_stopping_patience: int = 3
    # helpers.llm.fast_training: the same losses and gradients with less work (answer-only LM
    # head, frozen lower layers computed once per example, faster kernels, length buckets).
    fast_training: bool = True

    # Evaluation.

    # "logprob": P(yes) from the answers' log-probabilities; "generate": decode and parse.
    scoring: Literal["logprob", "generate"] = "logprob"
    # logprob scoring: compare answers by mean rather than summed token log-probability.
    length_normalize: bool = False
    # One rule for every model of a run: "fixed" cuts every model's P(yes) at `threshold`;
    # "tune" picks the threshold maximising balanced accuracy on rows the model was not fitted
    # on: the validation split for an LLM, out-of-fold predictions of train + valid for a
    # baseline. Never on test.
    threshold_mode: Literal["fixed", "tune"] = "tune"
    # P(yes) at or above which the answer is Yes (threshold_mode "fixed").
    threshold: float = 0.5
    # Examples scored per forward pass.
    eval_batch_size: int = 8
    # generate scoring: tokens decoded per answer.
    max_new_tokens: int = 8
    # Also score the base model before fine-tuning (zeroshot_test_* metrics).
    eval_zeroshot: bool = True
    # Bootstrap resamples for the 95% confidence intervals.
    n_bootstrap: int = 1000

    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    baselines: BaselineSpec = field(default_factory=BaselineSpec)
    # Learning curves (`tablora curve`): which training-set sizes, at which seeds.
    curve: CurveSpec = field(default_factory=CurveSpec)

    # Where the params came from (not a hyperparameter; not part of the hash).
    source_file: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.num_iters and self.num_epochs:
            raise ParamsError(f"num_iters={self.num_iters} and num_epochs={self.num_epochs:g} "
                              "are both set: keep one of them")

    @property
    def budget(self) -> tuple[str, float]:
        """("num_iters", steps) or ("num_epochs", epochs): the training budget as set."""
        if self.num_iters:
            return "num_iters", self.num_iters
        return "num_epochs", self.num_epochs or DEFAULT_EPOCHS

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def adapter_dir(self) -> Path:
        if self.output_dir:
            return resolve_path(self.output_dir)
        return RUNS_DIR / "adapters" / self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d

    def flat(self) -> dict[str, Any]:
        """Resolved params flattened with "." (what MLflow logs)."""
        return flatten(self.to_dict())

    def hash(self) -> str:
        """Content hash of the resolved params (for --resume)."""
        d = self.to_dict()
        # Keys that came with multi-class targets count only when set: a binary run made
        # before them keeps its hash (and --resume still finds it).
        if not d["dataset"]["task"]:
            del d["dataset"]["task"]
        if not d["prompt"]["answers"]:
            del d["prompt"]["answers"]
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **overrides: Any) -> Params:
        """A copy with dotted-key overrides applied and validated."""
        data = self.to_dict()
        _apply_overrides(data, overrides, "overrides")
        return _build(Params, data, self.source_file or "overrides", self.source_file)


# Range checks: key -> (predicate, what is allowed).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "num_layers": (lambda v: v == -1 or v >= 1, "-1 (all) or an integer >= 1"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1), e.g. 1e-5"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "num_iters": (lambda v: v >= 0, "an integer >= 1 (or 0: use num_epochs)"),
    "num_epochs": (lambda v: 0 <= v <= 1000, "a number of epochs > 0, e.g. 3 or 0.5"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "grad_accumulation_steps": (lambda v: v >= 1, "an integer >= 1"),
    "max_seq_length": (lambda v: v >= 8, "an integer >= 8"),
    "steps_per_report": (lambda v: v >= 1, "an integer >= 1"),
    "steps_per_eval": (lambda v: v >= 0, "an integer >= 1 (or 0: EVALS_PER_EPOCH a epoch)"),
    "save_every": (lambda v: v >= 1, "an integer >= 1"),
    "early_stopping_patience": (lambda v: v >= 0, "an integer >= 0"),
    "threshold": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "n_bootstrap": (lambda v: v >= 100, "an integer >= 100"),
    "name": (lambda v: _plain_name(v), "a plain file name: letters, digits, spaces and "
             "punctuation, not starting with '.' or '-', without / \\ : * ? \" < > | or control "
             "characters, at most 100 characters"),
    "dataset.test_size": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "dataset.valid_size": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "dataset.split_seed": (lambda v: v >= 0, "an integer >= 0"),
    "dataset.train_rows": (lambda v: v == 0 or v >= 2,
                           "an integer >= 2 (or 0: the whole training split)"),
    "dataset.train_rows_seed": (lambda v: v >= 0, "an integer >= 0"),
    "curve.sizes": (lambda v: all(x == "all" or (isinstance(x, int) and x >= 2) for x in v),
                    'a list of row counts >= 2 and/or "all", e.g. [8, 32, 128, all]'),
    "prompt.digits": (lambda v: 1 <= v <= 12, "an integer from 1 to 12"),
    "baselines.cv_folds": (lambda v: v >= 2, "an integer >= 2"),
}


def _plain_name(name: str) -> bool:
    """`name` names files and folders (runs/adapters/<name>, notebooks): one plain path part."""
    import re

    return bool(re.fullmatch(r'[^./\-\\:*?"<>|\x00-\x1f\x7f][^/\\:*?"<>|\x00-\x1f\x7f]{0,99}',
                             name)) and name.strip() == name


# TABLORA_OUTPUT_ROOT: folders (separated by os.pathsep) where output_dir may point besides runs/.
ENV_OUTPUT_ROOT = "TABLORA_OUTPUT_ROOT"


def output_roots() -> list[Path]:
    """The folders an output_dir must lie in: the project's runs/ and TABLORA_OUTPUT_ROOT."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_OUTPUT_ROOT, "").split(os.pathsep)
             if p.strip()]
    # PROJECT_ROOT/runs too: a batch's seeds write to runs/adapters/... (relative, see batch).
    roots = [RUNS_DIR.resolve(), (PROJECT_ROOT / "runs").resolve(), *(p.resolve() for p in extra)]
    return list(dict.fromkeys(roots))


def _check_output_dir(output_dir: str, origin: str) -> None:
    """Adapters are written (and old ones deleted) only below the allowed roots."""
    if not output_dir:
        return
    path = resolve_path(output_dir).resolve()  # symlinks followed: a link out of runs/ is out
    roots = output_roots()
    if any(path != root and path.is_relative_to(root) for root in roots):
        return
    raise ParamsError(f"{origin}: 'output_dir' = {output_dir!r} resolves to {path}, outside the "
                      f"folders tablora writes adapters to ({', '.join(map(str, roots))}): use a "
                      f"folder inside {roots[0]}, leave output_dir empty (runs/adapters/<name>), "
                      f"or name its parent in the environment variable {ENV_OUTPUT_ROOT}.")


def resolve_path(p: str | Path, relative_to: Path | None = None) -> Path:
    """Absolute paths stay; relative ones are taken from `relative_to` if the file is there,
    else from the project root."""
    p = Path(p).expanduser()
    if p.is_absolute():
        return p
    if relative_to is not None and (relative_to / p).exists():
        return (relative_to / p).resolve()
    return (PROJECT_ROOT / p).resolve()


# ---------------------------------------------------------------------------------------------
# Flat params: sections joined with "." (what MLflow logs, and what recommend edits)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"dataset": {"target": "y"}} -> {"dataset.target": "y"} (one level: the sections)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and k in _SECTIONS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of flatten: {"dataset.target": "y"} -> {"dataset": {"target": "y"}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, sub = key.partition(".")
        if sub:
            out.setdefault(section, {})[sub] = value
        else:
            out[key] = value
    return out


def flat_types() -> dict[str, Any]:
    """The type annotation of every flat params key ("lora_rank": int, "dataset.target": str)."""
    out: dict[str, Any] = {}
    for key, tp in typing.get_type_hints(Params).items():
        if dataclasses.is_dataclass(tp):
            out.update({f"{key}.{k}": v for k, v in typing.get_type_hints(tp).items()})
        elif key != "source_file":
            out[key] = tp
    return out


def params_from_flat(flat: dict[str, str]) -> dict[str, Any]:
    """MLflow params (strings; lists and dicts as repr) -> a params dict shaped like the YAML,
    each value typed by the schema. Keys the schema does not know (lora_scale, keys of another
    version) are dropped, so that load_params accepts the result."""
    types = flat_types()
    return unflatten({k: _typed(v, types[k]) for k, v in flat.items() if k in types})


def _typed(raw: str, tp: Any) -> Any:
    # Strings stay strings (a model called "123" is still a name); the rest is a Python literal
    # because tracking.log_params logs str() of numbers and repr() of lists and dicts.
    if tp is str or typing.get_origin(tp) is Literal:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


_SECTIONS = {"dataset", "prompt", "baselines", "curve"}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, not a params file: give one .yaml file "
                          "(`tablora batch` takes folders).")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found. Check the path (it is taken relative "
                          f"to the current directory {Path.cwd()}).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _budget_set(data: dict[str, Any]) -> list[str]:
    """The budget keys a layer sets to a non-zero value."""
    return [k for k in BUDGET_KEYS if data.get(k) not in (None, 0, 0.0, "0")]


def _clear_other_budget(out: dict[str, Any], top: dict[str, Any]) -> None:
    # num_epochs in a model file replaces num_iters from _defaults.yaml (and the reverse).
    for k in _budget_set(top):
        for other in BUDGET_KEYS:
            if other != k and other not in top:
                out.pop(other, None)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    _clear_other_budget(out, top)
    for k, v in top.items():
        if k in _SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], origin: str) -> None:
    _clear_other_budget(data, overrides or {})
    for key, value in (overrides or {}).items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in _SECTIONS:
                raise ParamsError(f"{origin}: unknown key {key!r}: only {sorted(_SECTIONS)} "
                                  "have sub-keys")
            data.setdefault(section, {})
            data[section] = {**data[section], sub: value}
        elif key in _SECTIONS and isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load a params YAML (merged over `_defaults.yaml` in its folder) and apply overrides.

    `overrides` takes top-level or dotted keys: {"num_iters": 5, "dataset.test_size": 0.3}.
    A resolved file (write_resolved) is complete: no `_defaults.yaml` is merged under it, and
    relative paths in it are taken from the folder of the params file it was resolved from.
    """
    data: dict[str, Any] = {}
    origin, source_file = "defaults", ""
    if path is not None:
        path = Path(path).expanduser().resolve()
        origin = source_file = str(path)
        top = _read_yaml(path)
        top.pop(TUNE_KEY, None)  # the search space of `tablora tune` (load_tune), not a param
        if RESOLVED_KEY in top:
            source_file = _check_resolved(top, path)
        else:
            defaults = path.parent / DEFAULTS_FILE_NAME
            if defaults.is_file() and defaults != path:
                base = _read_yaml(defaults)
                base.pop(TUNE_KEY, None)
                data = _build_dict_checked(base, defaults)
        data = _merge(data, _build_dict_checked(top, path))
        data.setdefault("name", path.stem)
    _apply_overrides(data, overrides or {}, f"{origin} (overrides)")
    return _build(Params, data, origin, source_file)


# A resolved params file: every key with the value a run used, written once by the process that
# validated the params (a batch, a command) and read by the notebook kernels it starts, so that
# the user's file is parsed once per run and an edit to it mid-batch cannot change a run.
RESOLVED_KEY = "tablora_resolved"


def write_resolved(params: Params, path: Path) -> Path:
    """Write `params` as a complete params file that load_params reads back equal."""
    import yaml

    header = {RESOLVED_KEY: {"source_file": params.source_file, "params_hash": params.hash()}}
    text = ("# Written by tablora: the resolved params of one run (every key). Edit the source "
            "file instead.\n" + yaml.safe_dump(header, sort_keys=False)
            + yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _check_resolved(top: dict[str, Any], path: Path) -> str:
    """Pop the resolved header; returns the source file. A resolved file edited by hand (its
    hash no longer matches) is refused: it would silently run other params than recorded."""
    header = top.pop(RESOLVED_KEY)
    if not isinstance(header, dict) or "params_hash" not in header:
        raise ParamsError(f"{path}: {RESOLVED_KEY!r} is reserved for resolved params files "
                          "written by tablora; remove it")
    saved = str(header["params_hash"])
    params = _build(Params, dict(top), str(path), str(header.get("source_file") or ""))
    if params.hash() != saved:
        raise ParamsError(f"{path}: this resolved params file was edited (hash {params.hash()}, "
                          f"written as {saved}); edit the params file it came from instead")
    return params.source_file


def _build_dict_checked(data: dict[str, Any], path: Path) -> dict[str, Any]:
    # Validate keys of each file on its own so the error names the file that holds the typo.
    _check_keys(Params, data, str(path), "")
    both = _budget_set(data)
    if len(both) > 1:
        raise ParamsError(f"{path}: num_iters ({data['num_iters']}) and num_epochs "
                          f"({data['num_epochs']}) are both set: keep one of them (num_epochs "
                          "counts passes over the training split)")
    return data


def _check_keys(cls: type, data: dict[str, Any], origin: str, prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source_file"}
    for key in data:
        if key not in names:
            import difflib

            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParamsError(f"{origin}: unknown key {prefix + key!r}.{hint} "
                              f"Known keys: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ParamsError(f"{origin}: {prefix + key!r} must be a mapping of its own keys, "
                                  f"got {value!r}")
            _check_keys(sub, value, origin, f"{prefix}{key}.")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`; convert the few safe cases (YAML's '1e-5')."""
    bad = ParamsError(f"{origin}: {key!r} = {value!r} ({type(value).__name__}) "
                      f"but it must be {_describe(tp)}")
    origin_tp = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin_tp is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin_tp in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, origin)
            except ParamsError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-5 as a string: it needs a dot (1.0e-5) to be a float.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin_tp is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise bad
        ktp, vtp = typing.get_args(tp)
        return {_coerce(k, ktp, key, origin): _coerce(v, vtp, f"{key}.{k}", origin)
                for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _describe(tp: Any) -> str:
    origin_tp = typing.get_origin(tp)
    if origin_tp is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin_tp is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin_tp is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp))


def _build(cls: type, data: dict[str, Any], origin: str, source_file: str, prefix: str = ""):
    _check_keys(cls, data, origin, prefix)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, origin, "", f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", origin)
    if cls is Params and kwargs.get("num_iters") and kwargs.get("num_epochs"):
        raise ParamsError(f"{origin}: num_iters={kwargs['num_iters']} and num_epochs="
                          f"{kwargs['num_epochs']:g} are both set: keep one of them")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if full in _CHECKS:
            ok, allowed = _CHECKS[full]
            if not ok(getattr(obj, f.name)):
                raise ParamsError(f"{origin}: {full!r} = {getattr(obj, f.name)!r} is out of "
                                  f"range: it must be {allowed}")
    if cls is Params:
        obj = dataclasses.replace(obj, source_file=source_file)
        _check_output_dir(obj.output_dir, origin)
        if obj.dataset.test_size + obj.dataset.valid_size >= 1:
            raise ParamsError(f"{origin}: dataset.test_size + dataset.valid_size = "
                              f"{obj.dataset.test_size + obj.dataset.valid_size} leaves no "
                              "training rows: make their sum < 1")
        _check_task(obj, origin)
    return obj


def _check_task(params: Params, origin: str) -> None:
    """The keys of one task set for the other: said at once, not ignored."""
    d, p = params.dataset, params.prompt
    if d.task == "multiclass" and d.positive_label not in ("", None):
        raise ParamsError(f"{origin}: dataset.positive_label = {d.positive_label!r} but "
                          "dataset.task is multiclass (no class is 'Yes'): remove "
                          "dataset.positive_label, or set dataset.task: binary")
    if d.task == "binary" and p.answers:
        raise ParamsError(f"{origin}: prompt.answers is set but dataset.task is binary (its "
                          "answers are prompt.answer_yes / prompt.answer_no): remove "
                          "prompt.answers, or set dataset.task: multiclass")


# ---------------------------------------------------------------------------------------------
# The key list (`tablora params`): read from this file, so that it cannot drift from the schema


@dataclass(frozen=True)
class KeyDoc:
    """One params key as `tablora params` lists it."""

    key: str  # flat: "lora_rank", "dataset.target"
    type: str  # "an integer", "one of 'none', 'oversample'"
    default: Any
    doc: str  # the comment right above the field in config.py (and one after it on its line)
    allowed: str = ""  # the range check, if any


def key_docs() -> list[KeyDoc]:
    """Every params key with its type, default, meaning and range, in schema order (the
    sections last). The meaning is the comment block right above the field's line in this
    file, read with tokenize (a field with none gets an empty doc: tests/test_config.py fails).
    """
    import inspect

    return _key_docs(inspect.getsource(inspect.getmodule(key_docs)), Params)


def _key_docs(source: str, root: type) -> list[KeyDoc]:
    """key_docs of the dataclass `root` (and its section dataclasses) defined in `source`."""
    import io
    import tokenize

    comments: dict[int, str] = {}  # line -> comment text
    alone: set[int] = set()  # lines holding nothing but a comment
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                alone.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    classes = {node.name: node for node in ast.parse(source).body
               if isinstance(node, ast.ClassDef)}

    def field_docs(cls: type) -> dict[str, str]:
        out = {}
        for node in classes[cls.__name__].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in alone:
                above.insert(0, comments[line])
                line -= 1
            trailing = comments.get(node.lineno) if node.lineno not in alone else None
            out[node.target.id] = " ".join(above + ([trailing] if trailing else []))
        return out

    def entries(cls: type, prefix: str) -> list[KeyDoc]:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        rows, sections = [], []
        for f in dataclasses.fields(cls):
            if f.name == "source_file":
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                sections += entries(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())  # type: ignore[misc]
            key = prefix + f.name
            allowed = _CHECKS[key][1] if key in _CHECKS else ""
            rows.append(KeyDoc(key, _describe(hints[f.name]), default, docs.get(f.name, ""),
                               allowed))
        return rows + sections

    return entries(root, "")


# ---------------------------------------------------------------------------------------------
# The search space of `tablora tune`: a `tune:` section beside the params (ignored by every other
# command), checked whole before any trial runs.

TUNE_KEY = "tune"
# The params a search may vary: the training hyperparameters (the data, prompt and evaluation
# settings are the question being asked, not knobs to fit to the validation rows).
TUNABLE = ("learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "num_layers",
           "num_epochs", "num_iters", "batch_size", "warmup_steps", "lr_schedule",
           "early_stopping_patience")
# What a trial is scored by, on the validation rows only, and which way is better. A metric of
# hard predictions (accuracy, F1) would need a threshold tuned on those same rows: not offered.
OBJECTIVES = {"val_loss": "minimize", "valid_roc_auc": "maximize", "valid_pr_auc": "maximize",
              "valid_brier": "minimize"}
PRUNERS = ("median", "hyperband", "none")
# The search's own settings in the `tune:` section (every other key there is a dimension).
TUNE_SETTINGS = ("objective", "pruner", "startup_trials", "warmup_evals", "sampler_seed")


@dataclass(frozen=True)
class Dimension:
    """One searched param: a range (low, high, log, step) or a list of choices."""

    key: str
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = ", log" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.key} in [{self.low:g}, {self.high:g}{scale}]"


@dataclass(frozen=True)
class TuneSpec:
    """The `tune:` section of a params file, checked."""

    # The searched params (every key of the section that is not a setting below).
    space: tuple[Dimension, ...] = ()
    # What a trial is scored by, on the validation rows: val_loss (its best validation loss), or
    # valid_roc_auc, valid_pr_auc or valid_brier (its P(yes) there).
    objective: str = "val_loss"
    # median: stop a trial whose validation loss at an evaluation is worse than the median of
    # the earlier trials there; hyperband; or none.
    pruner: str = "median"
    # Trials sampled at random (and never pruned) before TPE and the pruner take over.
    startup_trials: int = 3
    # Evaluations a trial gets before the pruner may stop it.
    warmup_evals: int = 1
    # Seed of the TPE sampler (trial k samples with sampler_seed + k).
    sampler_seed: int = 0
    # Where the section came from (not a setting).
    source_file: str = field(default="", compare=False)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def tune_key_docs() -> list[KeyDoc]:
    """The keys of the `tune:` section for `tablora params`: one line for the searched params,
    then the settings (from their comments in TuneSpec, as key_docs)."""
    import inspect

    settings = [dataclasses.replace(d, key=f"{TUNE_KEY}.{d.key}")
                for d in _key_docs(inspect.getsource(inspect.getmodule(key_docs)), TuneSpec)
                if d.key in TUNE_SETTINGS]
    checks = {"objective": "one of " + ", ".join(OBJECTIVES),
              "pruner": "one of " + ", ".join(PRUNERS)}
    settings = [dataclasses.replace(d, allowed=checks.get(d.key.split(".")[1], d.allowed))
                for d in settings]
    param = KeyDoc(f"{TUNE_KEY}.<param>", "a range {low, high, log: true|false, step} or a list "
                   "of choices", None, "A training hyperparameter to search (`tablora tune`; "
                   "every other command ignores the tune section), e.g. learning_rate: {low: "
                   "1.0e-5, high: 1.0e-3, log: true} or lora_rank: [4, 8, 16].",
                   "one of " + ", ".join(TUNABLE))
    return [param, *settings]


def load_tune(path: str | Path, overrides: dict[str, Any] | None = None
              ) -> tuple[Params, TuneSpec]:
    """The params of `path` (as load_params) and its `tune:` section (over the one of
    `_defaults.yaml` beside it, key by key), checked against them: an unknown key, a value of the
    wrong type or an impossible range is refused with the key named."""
    params = load_params(path, overrides)
    path = Path(path).expanduser().resolve()
    section: dict[str, Any] = {}
    defaults = path.parent / DEFAULTS_FILE_NAME
    for file in ([defaults] if defaults.is_file() and defaults != path else []) + [path]:
        raw = _read_yaml(file).get(TUNE_KEY)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ParamsError(f"{file}: 'tune' must be a mapping of params to search ranges, "
                              f"e.g. tune: {{learning_rate: {{low: 1.0e-5, high: 1.0e-3, log: "
                              f"true}}, lora_rank: [4, 8, 16]}}; got {raw!r}")
        section.update(raw)
    if not section:
        raise ParamsError(f"{path}: no 'tune' section: add one naming what to search, e.g. "
                          "tune: {learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}, "
                          "lora_rank: [4, 8, 16]}")
    return params, _tune_spec(section, params, str(path))


def _tune_spec(section: dict[str, Any], params: Params, origin: str) -> TuneSpec:
    settings = {k: section[k] for k in TUNE_SETTINGS if k in section}
    space = []
    for key, value in section.items():
        if key in TUNE_SETTINGS:
            continue
        if key not in TUNABLE:
            import difflib

            close = difflib.get_close_matches(str(key), TUNABLE + TUNE_SETTINGS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = flat_types()
            why = ("is not a training hyperparameter a search may vary" if key in known
                   else "is not a params key")
            raise ParamsError(f"{origin}: tune: {key!r} {why}.{hint} The search can vary "
                              f"{', '.join(TUNABLE)}; its settings are "
                              f"{', '.join(TUNE_SETTINGS)}.")
        space.append(_dimension(key, value, origin))
    if not space:
        raise ParamsError(f"{origin}: tune: names no param to search: add one, e.g. "
                          "lora_rank: [4, 8, 16]")
    budget = [d.key for d in space if d.key in BUDGET_KEYS]
    if len(budget) > 1:
        raise ParamsError(f"{origin}: tune: searches both num_iters and num_epochs: keep one of "
                          "them")
    spec_kwargs: dict[str, Any] = {}
    checks: dict[str, tuple[Any, typing.Callable[[Any], bool], str]] = {
        "objective": (str, lambda v: v in OBJECTIVES, "one of " + ", ".join(OBJECTIVES)),
        "pruner": (str, lambda v: v in PRUNERS, "one of " + ", ".join(PRUNERS)),
        "startup_trials": (int, lambda v: v >= 0, "an integer >= 0"),
        "warmup_evals": (int, lambda v: v >= 0, "an integer >= 0"),
        "sampler_seed": (int, lambda v: v >= 0, "an integer >= 0"),
    }
    for key, value in settings.items():
        tp, ok, allowed = checks[key]
        value = _coerce(value, tp, f"tune.{key}", origin)
        if not ok(value):
            raise ParamsError(f"{origin}: 'tune.{key}' = {value!r} is out of range: it must be "
                              f"{allowed}")
        spec_kwargs[key] = value
    spec = TuneSpec(space=tuple(space), source_file=origin, **spec_kwargs)
    if spec.objective != "val_loss" and params.scoring != "logprob":
        raise ParamsError(f"{origin}: tune.objective {spec.objective!r} needs P(yes): set "
                          "scoring: logprob, or objective: val_loss")
    if params.dataset.valid_size <= 0:
        raise ParamsError(f"{origin}: dataset.valid_size = 0 leaves no validation rows, and a "
                          "search is scored on them (never on test): set dataset.valid_size, "
                          "e.g. 0.1")
    return spec


def _dimension(key: str, value: Any, origin: str) -> Dimension:
    tp = flat_types()[key]
    name = f"tune.{key}"

    def checked(v: Any, what: str) -> Any:
        v = _coerce(v, tp, f"{name}{what}", origin)
        if key in _CHECKS and not _CHECKS[key][0](v):
            raise ParamsError(f"{origin}: {name}{what} = {v!r} is out of range: {key} must be "
                              f"{_CHECKS[key][1]}")
        if key in BUDGET_KEYS and not v > 0:
            raise ParamsError(f"{origin}: {name}{what} = {v!r}: a searched {key} must be > 0")
        if key == "num_layers" and v == -1 and what.startswith("."):
            raise ParamsError(f"{origin}: {name}{what} = -1 (all) cannot bound a range: list "
                              "the choices instead, e.g. num_layers: [4, 8, -1]")
        return v

    if isinstance(value, (list, tuple)):
        if not value:
            raise ParamsError(f"{origin}: {name} is an empty list: give at least one choice")
        choices = tuple(dict.fromkeys(checked(v, f"[{i}]") for i, v in enumerate(value)))
        return Dimension(key, "categorical", choices=choices)
    if not isinstance(value, dict):
        raise ParamsError(f"{origin}: {name} = {value!r}: give a range {{low: ..., high: ..., "
                          "log: true}} or a list of choices [..]")
    if typing.get_origin(tp) is Literal:
        raise ParamsError(f"{origin}: {name} takes a list of choices, e.g. "
                          f"{list(typing.get_args(tp))}, not a range")
    unknown = sorted(set(value) - {"low", "high", "log", "step"})
    if unknown:
        raise ParamsError(f"{origin}: {name}: unknown key {unknown[0]!r} in the range: a range "
                          "has low, high and optionally log (true/false) or step")
    missing = [k for k in ("low", "high") if k not in value]
    if missing:
        raise ParamsError(f"{origin}: {name}: the range has no {missing[0]!r}: give both low "
                          "and high")
    low, high = checked(value["low"], ".low"), checked(value["high"], ".high")
    log = _coerce(value.get("log", False), bool, f"{name}.log", origin)
    step = value.get("step")
    if not low < high:
        raise ParamsError(f"{origin}: {name}: low = {low!r} is not below high = {high!r}: an "
                          "impossible range (to fix the value, set it outside tune:, or give a "
                          "list of one choice)")
    if log and low <= 0:
        raise ParamsError(f"{origin}: {name}: log: true needs low > 0 (got {low!r})")
    if step is not None:
        step = _coerce(step, tp, f"{name}.step", origin)
        if log:
            raise ParamsError(f"{origin}: {name}: give log or step, not both")
        if not 0 < step <= high - low:
            raise ParamsError(f"{origin}: {name}.step = {step!r} must be > 0 and at most "
                              f"high - low = {high - low:g}")
    return Dimension(key, "int" if tp is int else "float", low=low, high=high, log=log,
                     step=step)
