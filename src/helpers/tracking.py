"""MLflow: where runs go, how a params file becomes a run, and what every run carries.

Local store: SQLite at the project root (`mlflow.db`) with artifacts under `mlruns/`, always as
absolute URIs (MLflow 3.x refuses the plain file store, and a stray `mlruns/<n>/meta.yaml` would
silently flip a relative URI back to it). MLFLOW_TRACKING_URI points it at a shared server instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
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
    ENV_OWNER,
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
    TAG_HEARTBEAT,
    TAG_KIND,
    TAG_MODEL_FAMILY,
    TAG_MODEL_SIZE,
    TAG_OWNER,
    TAG_PARAMS_HASH,
    TAG_PARENT,
    TAG_SPLIT_HASH,
    TOKENS_PER_SEC,
)

# A RUNNING run whose owner (TAG_OWNER) is a process of another machine is stale when its
# heartbeat is older than this many seconds (TABLORA_HEARTBEAT_TIMEOUT overrides it).
HEARTBEAT_SECONDS = 30
HEARTBEAT_TIMEOUT = 15 * 60


class StoreError(RuntimeError):
    """The MLflow store cannot be used, or a run id is not in it; the message says which."""


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
    try:
        with _store_lock(uri):
            client = mlflow.MlflowClient(uri)  # a new store's tables are made here
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                # Remote servers choose their own artifact store; locally keep artifacts under
                # mlruns/.
                location = artifact_root(uri) if uri.startswith("sqlite:") else None
                exp_id = client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
    except StoreError:
        raise
    except Exception as e:  # MLflow and SQLAlchemy raise many types for a store they cannot use
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StoreError(f"MLflow store {uri}: cannot use it ({type(e).__name__}: {first}). "
                         "Check MLFLOW_TRACKING_URI (a sqlite:////absolute/path.db in a folder "
                         "that exists, or a running server), or unset it for the project's "
                         "mlflow.db.") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time sets up a SQLite store: commands started together on a fresh store
    would otherwise race in MLflow's schema migrations (and in creating the experiment)."""
    if not uri.startswith("sqlite:///") or os.name != "posix":
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    if not db.parent.is_dir():
        raise StoreError(f"MLflow store {uri}: the folder {db.parent} does not exist. Create it "
                         "or fix MLFLOW_TRACKING_URI.")
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    interrupted (Ctrl-C, kernel interrupt) is ended KILLED. While it runs, its owner tag names
    this process (or the command that started this kernel) and a heartbeat tag is refreshed, so
    that a run whose process was killed outright can be told from a live one (mark_stale_runs).
    """
    import mlflow

    setup(params.experiment)
    owner_tags = {TAG_OWNER: owner(), TAG_HEARTBEAT: str(int(time.time()))}
    if run_id:
        previous = _check_resumable(run_id)
        active = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(owner_tags)
        if TAG_ERROR in previous.data.tags:  # why it stopped last time: no longer true
            mlflow.MlflowClient().delete_tag(run_id, TAG_ERROR)
    else:
        all_tags = {TAG_KIND: kind, **_batch_tags(), **(tags or {}), **owner_tags}
        if nested_in:
            all_tags[TAG_PARENT] = nested_in
        active = mlflow.start_run(run_name=run_name or params.name, tags=all_tags)
    _note_run_id(active.info.run_id)
    try:
        with heartbeat([active.info.run_id]):
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


def owner() -> str:
    """"host:pid" of the process that owns the runs started here (see contract.ENV_OWNER)."""
    return os.environ.get(ENV_OWNER) or f"{socket.gethostname()}:{os.getpid()}"


def get_run(run_id: str) -> Any:
    """The run `run_id` of the store, or a StoreError naming the id and the store."""
    import mlflow

    try:
        return mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except Exception:  # MlflowException (RESOURCE_DOES_NOT_EXIST), or a malformed id
        raise StoreError(f"run {run_id!r} is not in the MLflow store {tracking_uri()}: check "
                         "the run id (the MLflow UI shows it), or leave --run-id out.") from None


def _check_resumable(run_id: str) -> Any:
    """The run `run_id`, in the store and not being written by another live process."""
    found = get_run(run_id)
    who = found.data.tags.get(TAG_OWNER, "")
    if found.info.status == "RUNNING" and who and who != owner() and not _owner_gone(found):
        raise StoreError(f"run {run_id} is RUNNING in process {who}: wait for it to end, or stop "
                         "that process first (a killed process's run is marked KILLED by the "
                         "next `tablora batch` or --run-id).")
    return found


@contextlib.contextmanager
def heartbeat(run_ids: list[str], every: float = HEARTBEAT_SECONDS) -> Iterator[list[str]]:
    """Refresh TAG_HEARTBEAT of `run_ids` (a list the caller may extend) every `every` seconds
    from a background thread, until the block ends."""
    import mlflow

    stop = threading.Event()
    client = mlflow.MlflowClient(tracking_uri())

    def beat() -> None:
        while not stop.wait(every):
            for rid in list(run_ids):
                try:
                    client.set_tag(rid, TAG_HEARTBEAT, str(int(time.time())))
                except Exception:  # noqa: BLE001 - a busy store must not stop the work
                    pass

    thread = threading.Thread(target=beat, name="tablora-heartbeat", daemon=True)
    thread.start()
    try:
        yield run_ids
    finally:
        stop.set()
        thread.join(timeout=5)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _owner_gone(run: Any, timeout: float | None = None) -> str:
    """Why a RUNNING run's process is gone ("" when it may be alive or nothing says)."""
    who = run.data.tags.get(TAG_OWNER, "")
    host, _, pid = who.rpartition(":")
    if not who or not pid.isdigit():
        return ""  # not written by this version of tablora: leave it alone
    if host == socket.gethostname() and not pid_alive(int(pid)):
        return f"its process {who} is gone"
    if timeout is None:
        timeout = float(os.environ.get("TABLORA_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT))
    try:
        beat = float(run.data.tags.get(TAG_HEARTBEAT, ""))
    except ValueError:
        return ""
    age = time.time() - beat
    if age > timeout:
        return f"no heartbeat from its process {who} for {age / 60:.0f} min"
    return ""


def mark_stale_runs(experiment_id: str, timeout: float | None = None) -> list[str]:
    """End KILLED every RUNNING run of the experiment whose process is gone: on this machine its
    owner's pid is not alive, or its heartbeat is older than `timeout` seconds. Returns their ids.
    (MLflow keeps a run RUNNING forever when its process is killed outright, SIGKILL or a crash.)
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    stale = []
    for found in client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                    max_results=1000):
        why = _owner_gone(found, timeout)
        if not why:
            continue
        client.set_tag(found.info.run_id, TAG_ERROR, f"KILLED: {why} (marked by {owner()})")
        client.set_terminated(found.info.run_id, "KILLED")
        stale.append(found.info.run_id)
    return stale


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


def log_dataset(prepared: Any, splits: tuple[str, ...] = SPLITS) -> None:
    """Into the active run: the split hash tag, each split as a dataset input, class counts, the
    split file (`prepared`: a helpers.data.Prepared). `splits`: the ones a run looked at (a
    search's trial: train and valid, never test)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if mlflow.active_run() is None:
        raise RuntimeError("tracking.log_dataset needs an active MLflow run (tracking.run(...))")
    mlflow.set_tag(TAG_SPLIT_HASH, prepared.split_hash)
    source = CodeDatasetSource(tags={TAG_DATA_SOURCE: prepared.source,
                                     TAG_SPLIT_HASH: prepared.split_hash})
    name = Path(prepared.source.split(":", 1)[-1]).stem
    metrics: dict[str, float] = {"data_duplicates_train_test": prepared.duplicates["count"]}
    for split in splits:
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
    quoted = filter_value(name)
    # MLflow's filter strings have no escape: a name holding both quote characters is matched
    # with LIKE ('_' for each quote) and then exactly, here.
    filt = (f"attributes.run_name = {quoted}" if quoted else
            "attributes.run_name LIKE '{}'".format(name.replace("'", "_").replace('"', "_")))
    if status:
        filt += f" and attributes.status = '{status}'"
    runs = mlflow.MlflowClient().search_runs([exp_id], filter_string=filt,
                                             order_by=["attributes.start_time DESC"],
                                             max_results=1 if quoted else 1000)
    runs = [r for r in runs if r.info.run_name == name]
    return runs[0] if runs else None


def filter_value(text: str) -> str:
    """`text` as a string value in an MLflow filter string: 'text', or "text" when it holds a
    single quote; "" when it holds both kinds (MLflow's filter syntax cannot spell it)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return ""


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

    def __init__(self, run_id: str = ""):
        # A resumed run re-does the steps after its last checkpoint: MLflow would append their
        # values a second time, so steps up to the last one already logged are not logged again.
        self.logged = {"train": -1, "val": -1}
        if run_id:
            import mlflow

            client = mlflow.MlflowClient()
            for kind in self.logged:
                steps = [m.step for m in client.get_metric_history(run_id, f"{kind}_loss")]
                self.logged[kind] = max(steps, default=-1)

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        if int(train_info["iteration"]) > self.logged["train"]:
            self._log(train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        if int(val_info["iteration"]) > self.logged["val"]:
            self._log(val_info)

    def _log(self, info: dict[str, Any]) -> None:
        import mlflow

        metrics = {name: float(info[key]) for key, name in self.METRICS.items() if key in info}
        if metrics:
            mlflow.log_metrics(metrics, step=int(info["iteration"]))
