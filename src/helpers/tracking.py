"""MLflow: where runs go, how a params file becomes a run, and what every run carries.

Local store: SQLite at the project root (`mlflow.db`) with artifacts under `mlruns/`, always as
absolute URIs (MLflow 3.x refuses the plain file store, and a stray `mlruns/<n>/meta.yaml` would
silently flip a relative URI back to it). MLFLOW_TRACKING_URI points it at a shared server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
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
    DATA_SUMMARY,
    ENV_BATCH_ID,
    ENV_NOTEBOOK,
    ENV_OWNER,
    ENV_PARENT_RUN_ID,
    ENV_RUN_IDS_FILE,
    ENV_RUN_TAGS,
    ERROR_FILE,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KIND_LLM,
    PREFIX_TEST,
    PREFIX_ZEROSHOT,
    SHARED_VIEW,
    SHARED_VIEW_TAG_PREFIX,
    SOURCE_TYPE,
    SPLITS,
    TAG_BATCH_ID,
    TAG_DATA_SOURCE,
    TAG_ERROR,
    TAG_GIT_COMMIT,
    TAG_HEARTBEAT,
    TAG_KIND,
    TAG_MODEL_FAMILY,
    TAG_MODEL_SIZE,
    TAG_NOTE,
    TAG_NOTE_HASH,
    TAG_OWNER,
    TAG_PARAMS_HASH,
    TAG_PARENT,
    TAG_SOURCE_NAME,
    TAG_SOURCE_TYPE,
    TAG_SPLIT_HASH,
    TAG_USER,
    TOKENS_PER_SEC,
    UI_WORKFLOW,
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
            _configure_experiment(client, exp_id, exp.tags if exp is not None else {})
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


class LockHeld(RuntimeError):
    """file_lock(wait=False): another process holds the lock."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the file `path` (made, with its folder, if missing) for the with-block,
    between processes (flock; on non-POSIX systems nothing is locked). wait=False: LockHeld at
    once when another process holds it, instead of waiting."""
    if os.name != "posix":
        yield
        return
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time sets up a SQLite store: commands started together on a fresh store
    would otherwise race in MLflow's schema migrations (and in creating the experiment)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    if not db.parent.is_dir():
        raise StoreError(f"MLflow store {uri}: the folder {db.parent} does not exist. Create it "
                         "or fix MLFLOW_TRACKING_URI.")
    with file_lock(Path(f"{db}.lock")):
        yield


# The runs table a person wants first: every model flat (a sort other than creation time lists
# nested runs flat instead of under a collapsed batch row), best test accuracy first, and the
# point estimates of the headline metrics as columns (intervals are in each run's description).
UI_COLUMNS = ("attributes.`Source`", "attributes.`User`",
              *(f"metrics.`{PREFIX_TEST}_{m}`" for m in ("accuracy", "balanced_accuracy", "f1",
                                                         "roc_auc")),
              f"metrics.`{PREFIX_ZEROSHOT}_accuracy`", f"tags.`{TAG_KIND}`")
UI_VIEW = {"orderByKey": f"metrics.`{PREFIX_TEST}_accuracy`", "orderByAsc": False,
           "selectedColumns": list(UI_COLUMNS), "runsHiddenMode": "SHOW_ALL"}
UI_BASE = "http://127.0.0.1:5000"


def _configure_experiment(client: Any, exp_id: str, tags: dict[str, str]) -> None:
    """MLflow's model-training kind and tablora's runs-table view, on a new experiment or one
    made before tablora set them (a user's own changes to either are kept)."""
    import json

    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
              SHARED_VIEW_TAG_PREFIX + SHARED_VIEW: json.dumps(UI_VIEW)}
    for key, value in wanted.items():
        if key not in tags:
            try:
                client.set_experiment_tag(exp_id, key, value)
            except Exception as e:  # noqa: BLE001 - a read-only store still logs runs
                warnings.warn(f"could not tag experiment {exp_id} ({key}): {e}", stacklevel=3)


def ui_url(experiment_id: str, base: str = UI_BASE) -> str:
    """The MLflow UI page of an experiment's runs, in the model-training view with tablora's
    columns and sort (MLflow 3.x opens an experiment in its GenAI view unless told)."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}"
            f"&viewStateShareKey={SHARED_VIEW}")


def ui_lines(base: str = UI_BASE, default: str = "tablora") -> list[str]:
    """What `make ui` prints: the page of each experiment of the store (tagged for the UI on
    the way), or of `default` (created) in a store without any."""
    import mlflow

    uri = tracking_uri()
    client = mlflow.MlflowClient(uri)
    names = [e.name for e in client.search_experiments() if e.name != "Default"] if (
        not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()) else []
    lines = ["MLflow UI: open the runs of an experiment (model-training view):"]
    for name in names or [default]:
        lines.append(f"  {name}: {ui_url(setup(name), base)}")
    return lines


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


def run_identity(source: str = "") -> dict[str, str]:
    """The tags MLflow's UI shows as a run's Source and Created by: the notebook a kernel runs
    (helpers.workflow.notebooks.execute says which; JupyterLab names it JPY_SESSION_NAME), else
    `source`, else the program; the user; the git commit."""
    import getpass
    import sys

    name = (source or os.environ.get(ENV_NOTEBOOK) or os.environ.get("JPY_SESSION_NAME")
            or (sys.argv[0] if sys.argv and sys.argv[0] else "python"))
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    tags = {TAG_SOURCE_NAME: name, TAG_SOURCE_TYPE: SOURCE_TYPE, TAG_USER: user}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    return tags


def _text_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(run_id: str, text: str, client: Any = None) -> bool:
    """Set a run's description (markdown: the Description column and box of the UI), unless a
    person wrote or edited it there; returns whether it was written."""
    import mlflow

    client = client or mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    current = tags.get(TAG_NOTE)
    if current and tags.get(TAG_NOTE_HASH) != _text_hash(current):
        return False  # not ours (or edited since): keep it
    client.set_tag(run_id, TAG_NOTE, text)
    client.set_tag(run_id, TAG_NOTE_HASH, _text_hash(text))
    return True


def description(run_id: str, client: Any = None) -> str:
    """A run's description, "" when it has none."""
    import mlflow

    return (client or mlflow.MlflowClient()).get_run(run_id).data.tags.get(TAG_NOTE, "")


def headline(metrics: dict[str, float]) -> str:
    """A model run's results in one line, from its metrics: "test accuracy 78.9% [71.9, 86.0];
    zero-shot 65.8% [56.1, 74.6]" (what the run's description starts with)."""
    from helpers.contract import CI_HIGH, CI_LOW

    def pct(prefix: str) -> str:
        v = metrics[f"{prefix}_accuracy"]
        low, high = (metrics.get(f"{prefix}_accuracy{CI_LOW}"),
                     metrics.get(f"{prefix}_accuracy{CI_HIGH}"))
        ci = "" if low is None or high is None else f" [{100 * low:.1f}, {100 * high:.1f}]"
        return f"{100 * v:.1f}%{ci}"

    parts = []
    if f"{PREFIX_TEST}_accuracy" in metrics:
        parts.append(f"test accuracy {pct(PREFIX_TEST)}")
    if f"{PREFIX_ZEROSHOT}_accuracy" in metrics:
        parts.append(f"zero-shot {pct(PREFIX_ZEROSHOT)}")
    return "; ".join(parts)


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


# System metrics (CPU, memory, disk, network) of LLM runs: one sample every this many seconds;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL = 15


@contextlib.contextmanager
def run(params: Params, run_id: str = "", kind: str = KIND_LLM, run_name: str = "",
        tags: dict[str, str] | None = None, nested_in: str = "",
        system_metrics: bool | None = None) -> Iterator[Any]:
    """Start (or resume, given `run_id`) the MLflow run of a params file.

    A run that raises is ended FAILED with the error text in a tag and an artifact; one that is
    interrupted (Ctrl-C, kernel interrupt) is ended KILLED. While it runs, its owner tag names
    this process (or the command that started this kernel) and a heartbeat tag is refreshed, so
    that a run whose process was killed outright can be told from a live one (mark_stale_runs).
    system_metrics: sample CPU and memory into the run (default: for LLM runs, the ones that
    train and score).
    """
    import mlflow

    setup(params.experiment)
    if system_metrics is None:
        system_metrics = kind == KIND_LLM
    if system_metrics:
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
        # Its start/stop/"no GPU" notes would land in every executed notebook's output.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    identity = run_identity()
    owner_tags = {TAG_OWNER: owner(), TAG_HEARTBEAT: str(int(time.time()))}
    if run_id:
        previous = _check_resumable(run_id)
        active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        # A run the batch created has no Source yet: the first notebook that writes it names it.
        known = previous.data.tags
        missing = {k: v for k, v in identity.items() if k not in known}
        mlflow.set_tags({**missing, **owner_tags})
        if TAG_ERROR in known:  # why it stopped last time: no longer true
            mlflow.MlflowClient().delete_tag(run_id, TAG_ERROR)
    else:
        all_tags = {TAG_KIND: kind, **identity, **_batch_tags(), **(tags or {}), **owner_tags}
        if nested_in:
            all_tags[TAG_PARENT] = nested_in
        active = mlflow.start_run(run_name=run_name or params.name, tags=all_tags,
                                  log_system_metrics=system_metrics)
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
        _describe_from_metrics(active.info.run_id)
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


def _describe_from_metrics(run_id: str) -> None:
    """A finished model run's description: its headline (the comparison adds the baselines)."""
    import mlflow

    try:
        client = mlflow.MlflowClient()
        text = headline(client.get_run(run_id).data.metrics)
        if text:
            describe(run_id, text[0].upper() + text[1:], client)
    except Exception as e:  # noqa: BLE001 - a description is never worth failing a run
        warnings.warn(f"could not describe run {run_id}: {e}", stacklevel=3)


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
    """Into the active run: the split hash tag, each split as a dataset input, the split file,
    and the bookkeeping (rows and classes per split, prompt tokens, duplicates) as one JSON
    artifact, DATA_SUMMARY (`prepared`: a helpers.data.Prepared). `splits`: the ones the run
    looks at (a search's trial: train and valid, never test)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if mlflow.active_run() is None:
        raise RuntimeError("tracking.log_dataset needs an active MLflow run (tracking.run(...))")
    mlflow.set_tag(TAG_SPLIT_HASH, prepared.split_hash)
    source = CodeDatasetSource(tags={TAG_DATA_SOURCE: prepared.source,
                                     TAG_SPLIT_HASH: prepared.split_hash})
    name = Path(prepared.source.split(":", 1)[-1]).stem
    summary: dict[str, Any] = {"split_hash": prepared.split_hash, "source": prepared.source,
                               "duplicates_train_test": prepared.duplicates["count"]}
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
        summary[split] = {"rows": len(prepared.split[split]), **prepared.class_counts(split)}
    if prepared.token_budget:
        summary["prompt_tokens"] = dict(prepared.token_budget)
    mlflow.log_dict(summary, DATA_SUMMARY)
    mlflow.log_artifact(str(prepared.split_file), artifact_path=ARTIFACT_DATA)
    if prepared.duplicates["count"]:
        mlflow.log_dict(prepared.duplicates, f"{ARTIFACT_DATA}/duplicates.json")


def copy_dataset_inputs(client: Any, from_run_ids: list[str], to_run_id: str) -> int:
    """Log the dataset inputs of some runs (a batch's children) on another (the batch), each
    dataset and context once; returns how many."""
    from mlflow.entities import DatasetInput

    seen: dict[tuple[str, str], Any] = {}
    for rid in from_run_ids:
        try:
            inputs = client.get_run(rid).inputs
        except Exception:  # noqa: BLE001 - a deleted child: nothing to copy
            continue
        for di in (inputs.dataset_inputs if inputs else []):
            key = (di.dataset.digest, ",".join(sorted(f"{t.key}={t.value}" for t in di.tags)))
            seen.setdefault(key, di)
    if seen:
        client.log_inputs(to_run_id, datasets=[DatasetInput(d.dataset, d.tags)
                                               for d in seen.values()])
    return len(seen)


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


def register_model(model_uri: str, name: str) -> str:
    """Register a logged model under `name` in the MLflow Model Registry; returns the version, or
    "" after one warning line when the store refuses (a registration is a convenience: the run
    and its logged model stand without it)."""
    import io

    import mlflow

    try:
        # MLflow prints "Successfully registered model" and "Created version" lines of its own
        # (one model per run of a batch): one line of ours instead.
        with contextlib.redirect_stderr(io.StringIO()):
            version = str(mlflow.register_model(model_uri, name).version)
    except Exception as e:  # noqa: BLE001 - any store error: warn, keep the run
        print(f"warning: could not register {model_uri} as model {name!r} in "
              f"{tracking_uri()}: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              "(the run and its logged model are kept; register it later from the MLflow UI)",
              file=sys.stderr)
        return ""
    print(f"registered model {name!r} version {version} (models:/{name}/{version})")
    return version
