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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.config import PROJECT_ROOT, Params

# Tag names, shared by every module that writes or reads runs.
TAG_KIND = "tablora.kind"  # "llm", "baseline", "batch"
TAG_SPLIT_HASH = "tablora.split_hash"
TAG_PARAMS_HASH = "tablora.params_hash"
TAG_BATCH_ID = "tablora.batch_id"
TAG_MODEL_FAMILY = "tablora.model_family"
TAG_MODEL_SIZE = "tablora.model_size"
TAG_SEED = "tablora.seed"
TAG_MODEL_NAME = "tablora.model_name"  # the params name, without a seed suffix
TAG_ERROR = "tablora.error"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"


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
        mlflow.log_artifact(params.source_file, artifact_path="params")


@contextlib.contextmanager
def run(params: Params, run_id: str = "", kind: str = "llm", run_name: str = "",
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


# Set by `tablora batch` for the notebooks it runs (kernels inherit the environment): every run a
# notebook starts on its own (the baselines, the comparison) joins the batch and nests under it.
ENV_BATCH_ID = "TABLORA_BATCH_ID"
ENV_PARENT_RUN_ID = "TABLORA_PARENT_RUN_ID"


# Set by helpers.notebooks.execute: the runs a notebook opens are listed in this file, one id a
# line, so that the executed notebook can be attached to them once the kernel is done.
ENV_RUN_IDS_FILE = "TABLORA_RUN_IDS_FILE"


def _note_run_id(run_id: str) -> None:
    path = os.environ.get(ENV_RUN_IDS_FILE)
    if path:
        with open(path, "a") as f:
            f.write(run_id + "\n")


def _batch_tags() -> dict[str, str]:
    tags = {}
    if os.environ.get(ENV_BATCH_ID):
        tags[TAG_BATCH_ID] = os.environ[ENV_BATCH_ID]
    if os.environ.get(ENV_PARENT_RUN_ID):
        tags[TAG_PARENT] = os.environ[ENV_PARENT_RUN_ID]
    return tags


def record_failure(e: BaseException, run_id: str = "") -> None:
    """Write the cause of a failure to the active (or given) run: a short tag and the traceback."""
    import mlflow

    client = mlflow.MlflowClient()
    rid = run_id or mlflow.active_run().info.run_id
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    client.set_tag(rid, TAG_ERROR, f"{type(e).__name__}: {e}"[:4000])
    client.log_text(rid, text, "error.txt")


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

    Duck-types mlx_lm.tuner.callbacks.TrainingCallback (helpers.finetune is the only module that
    imports mlx_lm.tuner). Metric names follow mlx-lm's report keys, with the units spelled out:
    train_loss, val_loss, learning_rate, tokens_per_sec, peak_memory_gb. `step_offset` shifts
    mlx-lm's iteration numbers, so that a resumed run continues its curves.
    """

    # mlx-lm report key -> MLflow metric name
    METRICS = {"train_loss": "train_loss", "val_loss": "val_loss",
               "learning_rate": "learning_rate", "tokens_per_second": "tokens_per_sec",
               "peak_memory": "peak_memory_gb"}

    def __init__(self, step_offset: int = 0):
        self.step_offset = step_offset

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self._log(train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._log(val_info)

    def _log(self, info: dict[str, Any]) -> None:
        import mlflow

        metrics = {name: float(info[key]) for key, name in self.METRICS.items() if key in info}
        if metrics:
            mlflow.log_metrics(metrics, step=self.step_offset + int(info["iteration"]))
