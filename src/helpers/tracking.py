"""MLflow: where runs go, how a params file becomes a run, and what every run carries.

Local store: SQLite at the project root (`mlflow.db`) with artifacts under `mlruns/`, always as
absolute URIs (MLflow 3.x refuses the plain file store, and a stray `mlruns/<n>/meta.yaml` would
silently flip a relative URI back to it). MLFLOW_TRACKING_URI points it at a shared server instead.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.config import PROJECT_ROOT, Params
from helpers.contract import (
    ARTIFACT_DATA,
    ARTIFACT_PARAMS,
    ENV_BATCH_ID,
    ENV_PARENT_RUN_ID,
    ENV_RUN_IDS_FILE,
    ENV_RUN_TAGS,
    ERROR_FILE,
    KIND_LLM,
    SPLITS,
    TAG_BATCH_ID,
    TAG_DATA_SOURCE,
    TAG_ERROR,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_MODEL_FAMILY,
    TAG_MODEL_SIZE,
    TAG_PARAMS_HASH,
    TAG_PARENT,
    TAG_SPLIT_HASH,
    TOKENS_PER_SEC,
)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's SQLite store (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root(uri: str = "") -> str:
    """Artifacts of a local SQLite store live in `mlruns/` beside its database file."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return (PROJECT_ROOT / "mlruns").resolve().as_uri()


def setup(experiment: str = "tablora") -> str:
    """Point MLflow at the store, create the experiment if needed; returns its id.

    Also exports the absolute tracking URI so that notebook kernels started from here inherit it.
    """
    import mlflow

    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # Remote servers choose their own artifact store; locally keep artifacts under mlruns/.
        location = artifact_root(uri) if uri.startswith("sqlite:") else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def model_tags(model_id: str) -> dict[str, str]:
    """Family and size from a model id: 'mlx-community/Llama-3.2-3B-Instruct-4bit' -> llama, 3B."""
    import re

    name = model_id.split("/")[-1].split(":")[-1].lower()
    family = re.split(r"[-_.\d]", name, maxsplit=1)[0] or name
    size = re.search(r"(\d+(?:\.\d+)?)([bm])\b|(\d+(?:\.\d+)?)([bm])[-_]", name)
    size_s = ""
    if size:
        num = size.group(1) or size.group(3)
        unit = size.group(2) or size.group(4)
        size_s = f"{num}{unit.upper()}"
    elif "mini" in name:
        size_s = "mini"
    return {TAG_MODEL_FAMILY: family, TAG_MODEL_SIZE: size_s}


def log_params(params: Params) -> None:
    """Every resolved parameter (flattened), the params hash, and the params file (artifact)."""
    import mlflow

    flat = {k: (v if not isinstance(v, (list, dict)) else repr(v))
            for k, v in params.flat().items()}
    flat["lora_scale"] = params.lora_scale
    # MLflow refuses to change a logged param: log only what is new to this run.
    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params if run else {}
    new = {k: v for k, v in flat.items() if k not in existing}
    if new:
        mlflow.log_params(new)
    mlflow.set_tags({TAG_PARAMS_HASH: params.hash(), TAG_GIT_COMMIT: git_commit(),
                     **model_tags(params.model_id)})
    if params.source_file and Path(params.source_file).is_file():
        mlflow.log_artifact(params.source_file, artifact_path=ARTIFACT_PARAMS)


@contextlib.contextmanager
def run(params: Params, run_id: str = "", kind: str = KIND_LLM, run_name: str = "",
        tags: dict[str, str] | None = None, nested_in: str = "") -> Iterator[Any]:
    """Start (or resume, given `run_id`) the MLflow run of a params file.

    A run that raises is ended FAILED with the error text in a tag and an artifact; one that is
    interrupted (Ctrl-C, kernel interrupt) is ended KILLED.
    """
    import mlflow

    setup(params.experiment)
    if run_id:
        active = mlflow.start_run(run_id=run_id)
    else:
        all_tags = {TAG_KIND: kind, **_batch_tags(), **(tags or {})}
        if nested_in:
            all_tags[TAG_PARENT] = nested_in
        active = mlflow.start_run(run_name=run_name or params.name, tags=all_tags)
    _note_run_id(active.info.run_id)
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as e:
        record_failure(e)
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _note_run_id(run_id: str) -> None:
    path = os.environ.get(ENV_RUN_IDS_FILE)
    if path:
        with open(path, "a") as f:
            f.write(run_id + "\n")


def _batch_tags() -> dict[str, str]:
    import json

    tags = {str(k): str(v) for k, v in json.loads(os.environ.get(ENV_RUN_TAGS) or "{}").items()}
    if os.environ.get(ENV_BATCH_ID):
        tags[TAG_BATCH_ID] = os.environ[ENV_BATCH_ID]
    if os.environ.get(ENV_PARENT_RUN_ID):
        tags[TAG_PARENT] = os.environ[ENV_PARENT_RUN_ID]
    return tags


def log_dataset(prepared: Any) -> None:
    """Into the active run: the split hash tag, each split as a dataset input, class counts, the
    split file (`prepared`: a helpers.data.Prepared)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if mlflow.active_run() is None:
        raise RuntimeError("tracking.log_dataset needs an active MLflow run (tracking.run(...))")
    mlflow.set_tag(TAG_SPLIT_HASH, prepared.split_hash)
    source = CodeDatasetSource(tags={TAG_DATA_SOURCE: prepared.source,
                                     TAG_SPLIT_HASH: prepared.split_hash})
    name = Path(prepared.source.split(":", 1)[-1]).stem
    metrics: dict[str, float] = {"data_duplicates_train_test": prepared.duplicates["count"]}
    for split in SPLITS:
        if not prepared.split[split]:
            continue
        frame = prepared.table.loc[prepared.split[split]].reset_index()
        with warnings.catch_warnings():  # MLflow's own schema/pandas hints: noise here
            warnings.filterwarnings("ignore", message=".*integer column")
            warnings.filterwarnings("ignore", message=".*will be keyword-only")
            ds = mlflow.data.from_pandas(frame, source=source, targets=prepared.target,
                                         name=f"{name}-{split}-{prepared.split_hash[:8]}")
            mlflow.log_input(ds, context=split)
        counts = prepared.class_counts(split)
        metrics[f"data_{split}_rows"] = len(prepared.split[split])
        metrics[f"data_{split}_positive"] = counts["positive"]
        metrics[f"data_{split}_negative"] = counts["negative"]
    for key, value in (prepared.token_budget or {}).items():
        if key != "max_seq_length":
            metrics[f"data_prompt_tokens_{key}"] = value
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(prepared.split_file), artifact_path=ARTIFACT_DATA)
    if prepared.duplicates["count"]:
        mlflow.log_dict(prepared.duplicates, f"{ARTIFACT_DATA}/duplicates.json")



def record_failure(e: BaseException, run_id: str = "") -> None:
    """Write the cause of a failure to the active (or given) run: a short tag and the traceback."""
    import mlflow

    client = mlflow.MlflowClient()
    rid = run_id or mlflow.active_run().info.run_id
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    client.set_tag(rid, TAG_ERROR, f"{type(e).__name__}: {e}"[:4000])
    client.log_text(rid, text, ERROR_FILE)


def find_run(experiment: str, name: str, status: str | None = "FINISHED") -> Any | None:
    """The latest run called `name` in `experiment` (optionally with a given status)."""
    import mlflow

    exp_id = setup(experiment)
    filt = f"attributes.run_name = '{name}'"
    if status:
        filt += f" and attributes.status = '{status}'"
    runs = mlflow.MlflowClient().search_runs([exp_id], filter_string=filt,
                                             order_by=["attributes.start_time DESC"],
                                             max_results=1)
    return runs[0] if runs else None


class TrainingLogger:
    """An mlx-lm training callback that writes its reports to the active MLflow run.

    Duck-types mlx_lm.tuner.callbacks.TrainingCallback (helpers.llm.finetune is the only module
    that imports mlx_lm.tuner). Metric names follow mlx-lm's report keys, with the units spelled
    out: train_loss, val_loss, learning_rate, tokens_per_sec, peak_memory_gb (mlx-lm's
    "tokens_per_second" and "peak_memory" are renamed here, and only here).
    """

    # mlx-lm report key -> MLflow metric name
    METRICS = {"train_loss": "train_loss", "val_loss": "val_loss",
               "learning_rate": "learning_rate", "tokens_per_second": TOKENS_PER_SEC,
               "peak_memory": "peak_memory_gb"}

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self._log(train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._log(val_info)

    def _log(self, info: dict[str, Any]) -> None:
        import mlflow

        metrics = {name: float(info[key]) for key, name in self.METRICS.items() if key in info}
        if metrics:
            mlflow.log_metrics(metrics, step=int(info["iteration"]))
