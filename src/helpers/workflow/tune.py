"""`tablora tune`: an Optuna search over the `tune:` section of a params file, on validation rows.

A study is one Optuna study in RDB storage (SQLite under runs/tune/ by default, or the shared
PostgreSQL: `--storage URL`) and one MLflow parent run (tablora.kind=tune) with a nested run per
trial (tablora.kind=trial). Each trial is a task for a workflow.executor, like a batch's model:
here one after another, or on a Dask cluster (`--cluster`, `--workers`); it asks the study for
its params (TPE), fine-tunes with them and reports the validation loss at every evaluation to
the pruner (median or Hyperband), which may stop it there (PRUNED, tagged so in MLflow). A trial's
score is its best validation loss, or a metric of P(yes) on the validation rows
(tune.objective); the test split is never looked at during the search. After it, the best
trial's adapter is scored on test once, its params are written as a params file (the format of
`tablora recommend`), and the optimisation history, the intermediate values and the param
importances go on the parent run as figures.

Several `tablora tune` commands (on several machines, with one `--storage`) work on one study:
Optuna's own distributed mode. The study's name is derived from the params and the search space,
so the same command joins (or continues) the same study; the first process makes the parent run
and the others nest their trials under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import config, contract, data, tracking
from helpers.config import Params, ParamsError, TuneSpec
from helpers.workflow import batch, executor

# The study's user attribute that names its MLflow parent run (set by the process that made it).
PARENT_ATTR = "tablora_parent_run_id"
# A process that joins a study waits this long for its creator to name the parent run.
PARENT_WAIT_SECONDS = 60.0
# Seconds a process waits for another one's write lock on a SQLite storage.
SQLITE_TIMEOUT = 120
# A trial whose process stopped beating for 2x this is marked FAIL by the next process.
HEARTBEAT_SECONDS = 60
# Metrics of the best trial's test scoring copied onto the parent run (as best_test_<name>).
HEADLINE = ("accuracy", "balanced_accuracy", "f1", "roc_auc", "pr_auc", "brier", "mcc", "f1_macro")
MARKER = "# Written by `tablora tune`"


class TuneError(RuntimeError):
    """A study that cannot run or produced no usable trial; the message says why and the fix."""


# ---------------------------------------------------------------- storage and study


def default_storage() -> str:
    return f"sqlite:///{config.RUNS_DIR / 'tune' / 'optuna.db'}"


def shown_url(url: str) -> str:
    """The storage URL without its password (for tags and the terminal)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is refused later anyway
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, with heartbeats (a dead process's trial ends FAIL). Two
    processes creating one SQLite file's tables at once would collide: a lock file beside it."""
    import optuna

    kwargs: dict[str, Any] = {}
    lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
        lock = tracking.file_lock(path.parent / f".{path.name}.lock")
    try:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=2 * HEARTBEAT_SECONDS, **kwargs)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and driver errors: one fix for all
        raise TuneError(f"--storage {shown_url(url)}: cannot open it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give an SQLAlchemy URL "
                        "such as sqlite:///runs/tune/optuna.db or "
                        "postgresql+psycopg://user:pass@host:5432/optuna") from None


def study_name(params: Params, spec: TuneSpec) -> str:
    """<params name>-<hash of the params and the search>: the same command finds its study."""
    blob = f"{params.hash()}:{spec.hash()}"
    return f"{params.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def make_sampler(spec: TuneSpec, seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def make_pruner(spec: TuneSpec) -> Any:
    """Steps are evaluation numbers (1, 2, ...): the same point of training for trials of
    different batch sizes (validation runs EVALS_PER_EPOCH times an epoch)."""
    import optuna

    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.warmup_evals + 1)
    # Optuna may prune from step n_warmup_steps on: `warmup_evals` evaluations are spared.
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                       n_warmup_steps=spec.warmup_evals + 1)


def open_study(storage: Any, name: str, spec: TuneSpec, create: bool = True) -> tuple[Any, bool]:
    """(the study, whether this call created it)."""
    import optuna

    kwargs = dict(study_name=name, storage=storage, pruner=make_pruner(spec),
                  sampler=make_sampler(spec, spec.sampler_seed))
    if create:
        try:
            return optuna.create_study(direction=spec.direction, **kwargs), True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(**kwargs)
    except KeyError:
        raise TuneError(f"no study {name!r} in {shown_url(str(storage.url))}") from None
    if study.direction.name.lower() != spec.direction:
        raise TuneError(f"study {name!r} in {shown_url(str(storage.url))} was made to "
                        f"{study.direction.name.lower()} its objective, this search to "
                        f"{spec.direction} it: give this search its own --study name")
    return study, False


def suggest(trial: Any, spec: TuneSpec) -> dict[str, Any]:
    """The params of this trial: one value per dimension of the space."""
    out: dict[str, Any] = {}
    for d in spec.space:
        if d.kind == "categorical":
            out[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log,
                                           step=int(d.step or 1))
        else:
            out[d.key] = trial.suggest_float(d.key, float(d.low), float(d.high), log=d.log,
                                             step=d.step)
    return out


# ---------------------------------------------------------------- one trial (a task)


@dataclass(frozen=True)
class TrialTask:
    """Everything one trial needs, sent to whichever process runs it (it must pickle)."""

    storage: str
    study_name: str
    spec: TuneSpec
    params: Params  # the base params: each trial replaces the searched keys
    tracking_uri: str
    parent_id: str
    out_dir: str  # trials' adapters go to <out_dir>/trials/trial-<n>
    split_hash: str
    split_json: str
    deadline: float = 0.0  # unix time after which no trial starts (--timeout); 0: none


@dataclass
class TrialOutcome:
    """What happened to one trial: the driver's progress line and summary row."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, or SKIPPED (--timeout reached before it started)
    value: float | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the params it tried
    run_id: str = ""
    seconds: float = 0.0
    evaluations: int = 0
    cause: str = ""
    worker: str = ""


def trial_params(base: Params, values: dict[str, Any], out_dir: str | Path, number: int
                 ) -> Params:
    """The resolved params of trial `number`: the base with the searched values, its own
    adapter folder."""
    return base.replace(**values, output_dir=str(Path(out_dir) / "trials" / f"trial-{number}"))


def trial_task(task: TrialTask) -> TrialOutcome:
    """One trial of the study, in whichever process runs the task: Optuna asks (TPE), the trial
    trains and is told its score, PRUNED or FAIL. Through study.optimize, whose heartbeat lets
    the next process end a trial whose process died as FAIL."""
    import mlflow
    import optuna

    if task.deadline and time.time() >= task.deadline:
        return TrialOutcome(-1, "SKIPPED", cause="--timeout reached before it started")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line a trial: the driver's
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or task.tracking_uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if task.split_json:
        data.install_split(task.split_json, task.split_hash)
    study, _ = open_study(open_storage(task.storage), task.study_name, task.spec, create=False)
    outcome = TrialOutcome(-1, "FAIL", worker=executor.where())

    def objective(trial: Any) -> float:
        outcome.number = trial.number
        # Seeded by the trial's number: a sequential study repeats, parallel trials differ.
        study.sampler = make_sampler(task.spec, task.spec.sampler_seed + trial.number)
        t0 = time.perf_counter()
        try:
            _run_trial(task, trial, outcome)
        except Exception as e:  # a trial that fails (diverged, out of memory) is the search's
            outcome.cause = f"{type(e).__name__}: {' '.join(str(e).split())}"
            trial.set_user_attr("cause", outcome.cause[:1000])
            if outcome.run_id:  # tracking.run ended it FAILED with the error in its tags
                mlflow.MlflowClient().set_tag(outcome.run_id, contract.TAG_TRIAL_STATE, "FAIL")
            raise
        finally:
            outcome.seconds = time.perf_counter() - t0
        if outcome.state == "PRUNED":
            raise optuna.TrialPruned()
        return float(outcome.value)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # catch: a failed trial is marked FAIL and told here; the next task goes on.
        study.optimize(objective, n_trials=1, catch=(Exception,))
    return outcome


def _run_trial(task: TrialTask, trial: Any, outcome: TrialOutcome) -> None:
    import mlflow

    from helpers.llm import finetune, models

    spec = task.spec
    outcome.values = suggest(trial, spec)
    params = trial_params(task.params, outcome.values, task.out_dir, trial.number)
    prepared = data.prepare(params)
    if task.split_hash and prepared.split_hash != task.split_hash:
        raise TuneError(f"split hash {prepared.split_hash} on {executor.where()} differs from "
                        f"the study's {task.split_hash}: this machine's "
                        f"{data.describe_source(params)} is not the data the study split")
    model, tokenizer = models.load(params.model_id, params.dequantize)
    # The pruner compares "higher is worse" or "lower is worse" as the study's direction says.
    sign = 1.0 if spec.direction == "minimize" else -1.0

    def on_eval(step: int, n_eval: int, val_loss: float) -> bool:
        outcome.evaluations = n_eval
        trial.report(sign * val_loss, n_eval)
        return bool(trial.should_prune())

    tags = {contract.TAG_STUDY: task.study_name, contract.TAG_TRIAL: str(trial.number),
            contract.TAG_MODEL_NAME: params.name, contract.TAG_PARAMS_HASH: params.hash(),
            contract.TAG_WORKER: outcome.worker}
    with tracking.run(params, kind=contract.KIND_TRIAL, run_name=f"trial-{trial.number}",
                      tags=tags, nested_in=task.parent_id) as run:
        outcome.run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        tracking.log_params(params)
        tracking.log_dataset(prepared, splits=("train", "valid"))
        result = finetune.train(model, tokenizer, prepared, params, on_eval=on_eval)
        if result.pruned:
            outcome.state = "PRUNED"
            outcome.value = result.best_val_loss
        else:
            outcome.value = objective_value(spec, result, model, tokenizer, prepared, params)
            mlflow.log_metric(contract.OBJECTIVE, outcome.value)
            outcome.state = "COMPLETE"
        mlflow.set_tag(contract.TAG_TRIAL_STATE, outcome.state)


def objective_value(spec: TuneSpec, result: Any, model: Any, tokenizer: Any, prepared: Any,
                    params: Params) -> float:
    """The trial's score on the validation rows: its best validation loss, or a metric of P(yes)
    of its best adapter (the one the run keeps)."""
    import mlflow

    from helpers import metrics
    from helpers.contract import ADAPTER_FILE
    from helpers.llm import scoring

    if result.best_val_loss is None:
        raise TuneError("the trial ran no validation (fewer validation rows than batch_size?): "
                        "a search needs validation rows; raise dataset.valid_size")
    if spec.objective == "val_loss":
        return float(result.best_val_loss)
    import mlx.core as mx

    model.load_weights(str(Path(result.adapter_dir) / ADAPTER_FILE), strict=False)
    model.eval()
    mx.eval(model.parameters())
    y = prepared.y("valid")
    name = spec.objective.removeprefix("valid_")
    multiclass = getattr(prepared, "multiclass", False)
    if multiclass:  # one-vs-rest ROC-AUC (no PR-AUC or Brier)
        scores = scoring.score(model, tokenizer, prepared.messages("valid", False), params,
                               desc="valid", classes=prepared.classes,
                               answers=prepared.class_answers)
        values = metrics.classification_multi(y, scores.predict(y), scores.proba,
                                              prepared.classes)
    else:
        scores = scoring.score(model, tokenizer, prepared.messages("valid", False), params,
                               desc="valid")
        values = metrics.classification(y, scores.predict(y, params.threshold), scores.p_yes)
    if name not in values:
        raise TuneError(f"tune.objective {spec.objective}: a binary task's metric; this target "
                        "is multi-class: use objective: val_loss or valid_roc_auc" if multiclass
                        else f"tune.objective {spec.objective}: undefined on these validation "
                        "rows (one class only?): use objective: val_loss")
    mlflow.log_metric(spec.objective, values[name])
    return float(values[name])


# ---------------------------------------------------------------- the study (the command)


@dataclass
class Result:
    """What `tablora tune` did: the terminal's summary."""

    study_name: str
    storage: str
    parent_id: str
    spec: TuneSpec
    outcomes: list[TrialOutcome]
    trials: list[dict[str, Any]] = field(default_factory=list)  # every trial of the study
    best: dict[str, Any] | None = None  # number, value, params, run_id
    best_file: Path | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    test_note: str = ""
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.best is not None else 1

    def text(self) -> str:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        lines = [f"study {self.study_name} ({shown_url(self.storage)}): this command ran "
                 f"{sum(o.state != 'SKIPPED' for o in self.outcomes)} trial(s) in "
                 f"{batch.duration(self.seconds)}; the study has {len(self.trials)} ({done})",
                 f"MLflow parent run: {self.parent_id}"]
        if self.best is not None:
            b = self.best
            lines.append(f"best: trial {b['number']} ({self.spec.objective} {b['value']:.4f} "
                         f"on the validation rows): {_values(b['params'])}  [run {b['run_id']}]")
            if self.test_metrics:
                shown = "  ".join(f"{k} {v:.3f}" for k, v in self.test_metrics.items())
                lines.append(f"best trial on the test split (scored once): {shown}")
            if self.test_note:
                lines.append(self.test_note)
        if self.best_file is not None:
            lines.append(f"best params: {self.best_file}\nnext: tablora batch {self.best_file}")
        lines += self.notes
        return "\n".join(lines)


def parse_timeout(text: str | float | None) -> float:
    """--timeout: seconds, or a number with s, m or h (90m, 2h, 1.5h); 0 or empty: none."""
    if text in (None, "", 0):
        return 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ParamsError(f"--timeout {text!r}: expected seconds or a number with s, m or h, "
                          "e.g. 90m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def run(path: str | Path, trials: int, timeout: str | float | None = None,
        out: str | Path | None = None, storage: str = "", study: str = "",
        overrides: dict[str, Any] | None = None, cluster: str = "", workers: int = 0
        ) -> Result:
    """Run `trials` trials of the study of `path` (created, or joined when it exists), then
    score the best on test, write its params file and the figures. Nothing runs when the params
    or the `tune:` section are wrong."""
    import mlflow

    if trials < 0:
        raise ParamsError(f"--trials {trials}: give 1 or more (0: no new trial, only the "
                          "study's results: the best scored on test, its params file, figures)")
    seconds = parse_timeout(timeout)
    params, spec = config.load_tune(path, overrides)
    t0 = time.perf_counter()
    prepared = _preflight(params, spec)
    url = storage or default_storage()
    name = study or study_name(params, spec)
    out_dir = Path(out) if out else config.RUNS_DIR / "tune" / name
    exp_id = tracking.setup(params.experiment)
    client = mlflow.MlflowClient()
    for rid in tracking.mark_stale_runs(exp_id):
        print(f"run {rid}: its process is gone: marked KILLED", flush=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line a trial: ours
    the_study, created = open_study(open_storage(url), name, spec)
    if trials == 0 and created:  # nothing to finish: leave no empty study behind
        optuna.delete_study(study_name=name, storage=open_storage(url))
        raise TuneError(f"--trials 0: there is no study {name} in {shown_url(url)} yet: run "
                        "trials first (or give its --study name)")
    parent_id = _parent_run(client, exp_id, the_study, created, params, spec, url)
    print(f"study {name} ({'new' if created else 'joined'}; {shown_url(url)}): {trials} "
          f"trial(s) of {', '.join(d.describe() for d in spec.space)}; objective "
          f"{spec.objective} ({spec.direction}) on the validation rows; pruner {spec.pruner}",
          flush=True)
    task = TrialTask(url, name, spec, params, tracking.tracking_uri(), parent_id, str(out_dir),
                     prepared.split_hash, prepared.split_file.read_text("utf-8"),
                     deadline=time.time() + seconds if seconds else 0.0)
    outcomes: list[TrialOutcome] = []
    ex = executor.connect(cluster, workers)
    try:
        if ex.parallel:
            print(ex.describe(), flush=True)
            if cluster and url.startswith("sqlite:"):
                print(f"note: the study's storage {shown_url(url)} is a file on this machine: "
                      "workers elsewhere need --storage of a database they reach "
                      "(postgresql+psycopg://...)", flush=True)
        with tracking.heartbeat([parent_id]):
            for i in range(trials):
                ex.submit(trial_task, task, label=f"trial {i + 1}")
            for event in ex.events():
                if event.kind != "done":
                    continue
                outcome = event.result or TrialOutcome(-1, "FAIL", cause=event.error)
                outcomes.append(outcome)
                print(_progress(outcome, len(outcomes), trials, spec), flush=True)
    except KeyboardInterrupt:
        ex.close()
        client.set_terminated(parent_id, "KILLED")
        raise
    finally:
        ex.close()
    result = finish(url, name, spec, params, parent_id, out_dir, outcomes)
    result.seconds = time.perf_counter() - t0
    return result


def _preflight(params: Params, spec: TuneSpec) -> Any:
    """Before any trial: the data loads and has validation rows for the largest batch, the
    model has the layers the space asks for. Returns the prepared split (drawn once, here)."""
    prepared = data.prepare(params)
    n_valid = len(prepared.split["valid"])
    batch_sizes = [params.batch_size]
    for d in spec.space:
        if d.key == "batch_size":
            batch_sizes = list(d.choices) if d.kind == "categorical" else [int(d.high)]
    if n_valid < max(batch_sizes):
        raise ParamsError(f"{spec.source_file}: the validation split has {n_valid} rows but "
                          f"batch_size goes up to {max(batch_sizes)}: a trial would train "
                          "without validation; raise dataset.valid_size or lower batch_size")
    layers = [d for d in spec.space if d.key == "num_layers"]
    if layers:
        from helpers.llm import finetune, models

        d = layers[0]
        most = max(d.choices) if d.kind == "categorical" else int(d.high)
        model, _ = models.load(params.model_id, params.dequantize)
        finetune.check_num_layers(model, params.replace(num_layers=most))
    return prepared


def _parent_run(client: Any, exp_id: str, study: Any, created: bool, params: Params,
                spec: TuneSpec, url: str) -> str:
    """The study's MLflow parent run: made by the process that created the study (its id kept
    in the study), found by the others."""
    if not created:
        deadline = time.time() + PARENT_WAIT_SECONDS
        while time.time() < deadline:
            parent = study.user_attrs.get(PARENT_ATTR) or _reload_attr(study)
            if parent:
                client.update_run(parent, status="RUNNING")
                return parent
            time.sleep(0.5)
    tags = {contract.TAG_KIND: contract.KIND_TUNE, contract.TAG_STUDY: study.study_name,
            contract.TAG_MODEL_NAME: params.name, contract.TAG_GIT_COMMIT: tracking.git_commit(),
            contract.TAG_OWNER: tracking.owner(),
            contract.TAG_HEARTBEAT: str(int(time.time()))}
    run = client.create_run(exp_id, run_name=f"tune-{study.study_name}", tags=tags)
    parent = run.info.run_id
    study.set_user_attr(PARENT_ATTR, parent)
    client.log_dict(parent, {"study": study.study_name, "storage": shown_url(url),
                             **spec.to_dict()}, f"{contract.ARTIFACT_STUDY}/search.json")
    if params.source_file and Path(params.source_file).is_file():
        client.log_artifact(parent, params.source_file, contract.ARTIFACT_PARAMS)
    return parent


def _reload_attr(study: Any) -> str:
    import optuna

    again = optuna.load_study(study_name=study.study_name, storage=study._storage)
    return again.user_attrs.get(PARENT_ATTR, "")


def _progress(o: TrialOutcome, i: int, n: int, spec: TuneSpec) -> str:
    head = f"[{i}/{n}] trial {o.number}" if o.number >= 0 else f"[{i}/{n}] trial"
    if o.state == "SKIPPED":
        return f"{head}: skipped ({o.cause})"
    where = f" in {batch.duration(o.seconds)}"
    if o.state == "COMPLETE":
        return f"{head}: {spec.objective} {o.value:.4f} ({_values(o.values)}){where}"
    if o.state == "PRUNED":
        return f"{head}: PRUNED at evaluation {o.evaluations} ({_values(o.values)}){where}"
    return f"{head}: FAILED: {o.cause[:300]} ({_values(o.values)}){where}"


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items())


def trials_frame(study: Any) -> Any:
    """One row per trial: number, state, value, params, MLflow run, duration."""
    import pandas as pd

    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     **{f"params.{k}": v for k, v in t.params.items()},
                     "evaluations": len(t.intermediate_values),
                     "run_id": t.user_attrs.get("mlflow_run_id", ""),
                     "seconds": (t.duration.total_seconds() if t.duration else None),
                     "cause": t.user_attrs.get("cause", "")})
    return pd.DataFrame(rows)


def finish(url: str, name: str, spec: TuneSpec, params: Params, parent_id: str,
           out_dir: Path, outcomes: list[TrialOutcome]) -> Result:
    """After the trials: the best trial scored on test once, its params file, the figures, the
    parent run's metrics; the parent run ends."""
    import mlflow
    import optuna

    client = mlflow.MlflowClient()
    study, _ = open_study(open_storage(url), name, spec, create=False)
    frame = trials_frame(study)
    result = Result(name, url, parent_id, spec, outcomes,
                    trials=[{"number": t.number, "state": t.state.name} for t in study.trials])
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "trials.csv", index=False)
    client.log_artifact(parent_id, str(out_dir / "trials.csv"), contract.ARTIFACT_STUDY)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {f"n_{s.name.lower()}": sum(t.state == s for t in study.trials)
              for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                        optuna.trial.TrialState.FAIL)}
    for key, value in counts.items():
        client.log_metric(parent_id, key, value)
    if not complete:
        causes = sorted({o.cause for o in outcomes if o.cause and o.state == "FAIL"})
        why = (f"no trial of study {name} completed"
               + (f"; the failures: {'; '.join(c[:300] for c in causes[:3])}" if causes else "")
               + ": fix the cause (or widen the space), then run the same command again")
        client.set_tag(parent_id, contract.TAG_ERROR, why[:4000])
        client.set_terminated(parent_id, "FAILED")
        result.notes.append(why)
        return result
    best = study.best_trial
    run_id = best.user_attrs.get("mlflow_run_id", "")
    result.best = {"number": best.number, "value": best.value, "params": best.params,
                   "run_id": run_id}
    client.set_tag(parent_id, contract.TAG_BEST_TRIAL, f"{best.number} {run_id}")
    client.log_metric(parent_id, contract.BEST_OBJECTIVE, best.value)
    # A dict artifact, not MLflow params: another command of the study may move the best later
    # (a param cannot change).
    client.log_dict(parent_id, {"trial": best.number, "value": best.value,
                                "params": best.params, "run_id": run_id},
                    f"{contract.ARTIFACT_STUDY}/best.json")
    result.best_file = write_best_params(params, best.params, out_dir, name, best.number,
                                         spec, best.value)
    client.log_artifact(parent_id, str(result.best_file), contract.ARTIFACT_STUDY)
    best_params = trial_params(params, best.params, out_dir, best.number)
    try:
        result.test_metrics, result.test_note = score_best(best_params, run_id)
    except Exception as e:  # noqa: BLE001 - the search's results stand without it
        result.test_note = f"test scoring of the best trial failed: {type(e).__name__}: {e}"
    for key, value in result.test_metrics.items():
        client.log_metric(parent_id, f"best_{key}", value)
    result.figures = write_figures(study, out_dir / "figures", spec.direction)
    for fig in result.figures:
        client.log_artifact(parent_id, str(fig), contract.ARTIFACT_FIGURES)
    if len(result.figures) < 3:
        result.notes.append("param importances: not drawn (they need at least two finished "
                            "trials that differ)")
    client.set_terminated(parent_id, "FINISHED")
    return result


def score_best(params: Params, run_id: str) -> tuple[dict[str, float], str]:
    """The best trial's adapter on the test split, once: logged into its run (test_* metrics,
    predictions). A run already scored (another process of the study did it) is not scored
    again. Returns the headline metrics and a note."""
    import mlflow

    from helpers.llm import evaluate, models

    done = mlflow.MlflowClient().get_run(run_id).data.metrics
    prefix = contract.PREFIX_TEST + "_"
    if any(k.startswith(prefix) for k in done):
        return ({f"test_{m}": done[f"{prefix}{m}"] for m in HEADLINE if f"{prefix}{m}" in done},
                f"the best trial's run {run_id} was scored on test before: not scored again")
    params = params.replace(eval_zeroshot=False)  # the base model is not what was tuned
    prepared = data.prepare(params)
    target = evaluate.find_target(params, run_id=run_id)
    model, tokenizer = models.load(params.model_id, params.dequantize)
    with tracking.run(params, run_id=run_id, tags=target.tags):
        results = evaluate.evaluate(params, prepared, model, tokenizer, target)
    values = results["finetuned"].metrics
    return {f"test_{m}": values[f"{prefix}{m}"] for m in HEADLINE if f"{prefix}{m}" in values}, ""


def write_best_params(base: Params, values: dict[str, Any], out_dir: Path, study: str,
                      number: int, spec: TuneSpec, value: float) -> Path:
    """The best params as a params file on its own (no `_defaults.yaml` needed), in the format
    of `tablora recommend`: a comment header, then the keys that differ from tablora's defaults.
    Checked with the real loader before it is put in place."""
    import tempfile
    import textwrap

    import yaml

    from helpers.analysis import recommend

    best = base.replace(**values, output_dir="", name=f"{base.name}-tuned")
    flat = best.flat()
    defaults = Params().flat()
    # Paths relative to the original params file would break in another folder.
    source = flat["dataset.source"]
    if not str(source).startswith("builtin:"):
        flat["dataset.source"] = str(config.resolve_path(source, _params_dir(base)))
    template = flat["prompt.template"]
    if str(template).endswith((".j2", ".jinja")):
        flat["prompt.template"] = str(config.resolve_path(template, _params_dir(base)))
    order = ["name", "model_id", *values]
    body = {k: flat[k] for k in order}
    body.update({k: v for k, v in flat.items() if k not in body and v != defaults.get(k)})
    header = [MARKER[2:] + f" from study {study}: trial {number} of the search over "
              f"{', '.join(d.describe() for d in spec.space)}.",
              f"Best {spec.objective} on the validation rows: {value:.4f}; the test split was "
              "not used to choose it.",
              f"Searched params: {_values(values)}; the rest from {base.source_file}.",
              f"Run it against the baselines: tablora batch {out_dir}/{best.name}.yaml"]
    wrapped = [w for line in header
               for w in textwrap.wrap(line, 97, subsequent_indent="    ", break_long_words=False,
                                      break_on_hyphens=False)]
    text = "".join(f"# {line}\n" for line in wrapped) + yaml.safe_dump(
        config.unflatten(body), sort_keys=False, default_flow_style=False, allow_unicode=True,
        width=99)
    with tempfile.TemporaryDirectory(prefix="tablora-tune-") as tmp:
        check = Path(tmp) / f"{best.name}.yaml"
        check.write_text(text, encoding="utf-8")
        config.load_params(check)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{best.name}.yaml"
    recommend.atomic_write(path, text)
    return path


def _params_dir(params: Params) -> Path | None:
    return Path(params.source_file).parent if params.source_file else None


def write_figures(study: Any, folder: Path, direction: str = "minimize") -> list[Path]:
    """Optimisation history, intermediate values (what the pruner saw) and param importances,
    as PNG files (importances need two or more finished trials that differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    plots = (("optimization_history", ovm.plot_optimization_history),
             ("intermediate_values", ovm.plot_intermediate_values),
             ("param_importances", ovm.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every plot
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
                continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        if name == "intermediate_values":
            first.set_xlabel("evaluation")
            first.set_ylabel("validation loss" + (" (negated: the study maximizes)"
                                                  if direction == "maximize" else ""))
        fig = first.figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def load_study(storage: str = "", name: str = "", params_path: str = "",
               overrides: dict[str, Any] | None = None) -> Any:
    """A study to look at (notebooks/tune.ipynb): by name, or the one of a params file."""
    import optuna

    url = storage or default_storage()
    if not name:
        if not params_path:
            raise TuneError("give the study's name or the params file it searched")
        params, spec = config.load_tune(params_path, overrides)
        name = study_name(params, spec)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise TuneError(f"no study {name!r} in {shown_url(url)}: `tablora tune` makes "
                        "it") from None


def best_summary(study: Any) -> dict[str, Any]:
    """The notebook's last cell: the best trial in a flat dict."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {"study": study.study_name, "trials": len(study.trials), "best": None}
    best = study.best_trial
    return {"study": study.study_name, "trials": len(study.trials),
            "complete": len(done), "best_trial": best.number,
            "best_value": round(best.value, 4) if math.isfinite(best.value) else best.value,
            **{f"best.{k}": v for k, v in best.params.items()},
            "run_id": best.user_attrs.get("mlflow_run_id", "")}
