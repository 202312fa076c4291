"""`tablora batch`: each params file through train.ipynb then evaluate.ipynb, failures isolated.

A batch is one MLflow parent run (tablora.kind=batch) with a child run per model and seed, the
baselines run once per distinct split, then the comparison. A model that fails is recorded (FAILED
run, cause in a tag, the executed notebook as an artifact) and the batch goes on; the summary at
the end says which failed and why, and the exit code is non-zero when any did.

The models and the baselines are tasks for a workflow.executor: here one after another, or on a
Dask cluster (`--cluster`, `--workers`). A task gets everything it needs as picklable arguments
(the resolved params, the batch's MLflow ids and tracking URI, the split the batch drew) and
makes its own MLflow run, so it runs the same on another machine; a run whose worker died is
ended KILLED by the batch once its task has run again elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import config, contract, data, tracking
from helpers.config import Params, ParamsError, load_params
from helpers.workflow import executor, notebooks

MODEL_NOTEBOOKS = ("train", "evaluate")
# The analysis a batch of learning curves ends with, instead of compare.ipynb.
CURVE_NOTEBOOK = "curve"
# Every notebook the batch runs must declare these (see docs/ARCHITECTURE.md).
NOTEBOOK_PARAMETERS = notebooks.PARAMETERS
# Cause texts are cut to this in the terminal table (the full text is in MLflow and summary.json).
CAUSE_CHARS = 300


@dataclass
class Job:
    """One model run: a params file at one seed (or a params file that could not be loaded)."""

    file: Path
    name: str  # the params name: tablora.model_name
    run_name: str  # name + "-seed<k>" when the file runs with several seeds
    params: Params | None = None  # resolved: the file, its _defaults.yaml, the seed
    base: Params | None = None  # the file as loaded (before the seed): its baselines' params
    error: str = ""  # why the file cannot be used
    tags: dict[str, str] = field(default_factory=dict)  # more tags for its run (a curve's point)
    point: Point | None = None  # the learning curve's point it is (curve.sizes)


@dataclass
class Outcome:
    """What happened to a Job (or to a baselines split): the summary's row."""

    label: str
    status: str = "pending"  # "ok", "failed", "skipped"
    run_id: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # notebook -> wall time
    cause: str = ""
    note: str = ""
    worker: str = ""  # where it ran (executor.where())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass
class BaselineGroup:
    """Models sharing a split: the baselines notebook runs once for all of them."""

    key: str  # the split hash (tablora.split_hash); "-2", "-3" for other settings on that split
    file: Path  # the first model file of the group: its dataset and baselines sections
    params: Params
    models: list[str]
    split_hash: str = ""
    error: str = ""  # why the table could not be read (the split hash is then unknown)
    # More tags for its runs: those of its first model's Job (a curve's point).
    tags: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- planning (no MLflow, no kernels)


def new_batch_id() -> str:
    """20261128-231500-ab12: sortable by time, unique across machines."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def expand_paths(paths: list[Path]) -> list[Path]:
    """Params files from files and folders (recursively); `_*` files such as `_defaults.yaml` are
    not models."""
    files: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            # Sub-folders too: `tablora recommend --out DIR` writes DIR/config-a and DIR/config-b.
            found = sorted(p for p in path.rglob("*.y*ml")
                           if p.suffix in (".yaml", ".yml") and not p.name.startswith("_"))
            if not found:
                raise FileNotFoundError(f"{path}: no params files (*.yaml) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such params file or folder")
    # The same file named twice (a folder and a file in it) runs once.
    return list(dict.fromkeys(p.resolve() for p in files))


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ParamsError(f"--seeds {text!r}: expected comma-separated integers, "
                         "e.g. 0,1,2") from None


def plan_jobs(files: list[Path], seeds: list[int] | None = None) -> list[Job]:
    """A Job per file and seed (a file with curve.sizes: per point of its learning curve); a
    file that does not load is a Job with its error."""
    jobs: list[Job] = []
    for file in files:
        try:
            params = load_params(file)
            if params.curve.sizes:
                jobs.extend(curve_points(file, params, seeds=seeds).jobs)
                continue
        except (ParamsError, data.DataError) as e:
            jobs.append(Job(file, file.stem, file.stem, error=str(e)))
            continue
        jobs.extend(_seed_jobs(file, params, seeds or params.seeds))
    return jobs


# ---------------------------------------------------------------- learning curves

ALL = "all"
# A curve's sizes when neither --sizes nor curve.sizes gives them (TabLLM's, up to 256).
DEFAULT_SIZES: tuple[int | str, ...] = (8, 16, 32, 64, 128, 256, ALL)


@dataclass(frozen=True)
class Point:
    """One point of a learning curve: `rows` training rows drawn with `seed` (size: as asked)."""

    size: int | str
    rows: int
    seed: int

    @property
    def label(self) -> str:
        return f"k{self.rows}-seed{self.seed}"


@dataclass
class CurvePoints:
    """The points of one params file's learning curve, as Jobs, and what was changed on the
    way (helpers.workflow.curve prints and runs them; a batch runs those of its files)."""

    sizes: list[int | str]  # as asked, "all" last
    seeds: list[int]
    n_train: int  # rows of the whole training split
    points: list[Point]
    jobs: list[Job]
    notes: list[str] = field(default_factory=list)


def curve_points(file: Path, params: Params, sizes: list[int | str] | None = None,
                 seeds: list[int] | None = None) -> CurvePoints:
    """The points of the curve of `params`: sizes from `sizes`, else curve.sizes, else
    DEFAULT_SIZES; seeds from `seeds`, else curve.seeds, else seeds, else seed. A size at or
    above the training split's rows is "all" (said in the notes). Each point is a Job whose
    params draw its rows (dataset.train_rows, nested per seed: helpers.data) and whose run is
    tagged with them; the zero-shot model is scored at the first point only (k = 0)."""
    if params.dataset.train_rows:
        raise ParamsError(f"{file}: dataset.train_rows={params.dataset.train_rows} is set: a "
                          "curve draws its own training rows; remove it (or set it to 0)")
    asked = sizes or list(params.curve.sizes) or list(DEFAULT_SIZES)
    seed_list = list(dict.fromkeys(seeds or params.curve.seeds or params.seeds
                                   or [params.seed]))
    whole = data.prepare(params.replace(**{"dataset.train_rows": 0}))
    n_train = len(set(whole.split["train"]))  # distinct: oversampling comes after a draw
    notes: list[str] = []
    by_rows: dict[int, int | str] = {}
    for size in asked:
        rows = n_train if size == ALL else int(size)
        if rows > n_train:
            notes.append(f"k = {size} is more than the {n_train} training rows: it is k = all")
            rows = n_train
        by_rows.setdefault(rows, ALL if rows == n_train else size)
    ordered = sorted(by_rows)
    points = [Point(by_rows[r], r, s) for s in seed_list for r in ordered]
    jobs = [_point_job(file, params, pt, zeroshot=i == 0) for i, pt in enumerate(points)]
    return CurvePoints([by_rows[r] for r in ordered], seed_list, n_train, points, jobs, notes)


def point_params(params: Params, point: Point, zeroshot: bool) -> Params:
    """The resolved params of one point: its rows, its seed, its own adapter folder; zero-shot
    scored at one point only (it does not depend on k). The curve's own keys are emptied so that
    a point's params (and hash: --resume) do not depend on which other points the curve has."""
    base = params.output_dir or f"runs/adapters/{params.name}"
    return params.replace(**{
        "seed": point.seed, "seeds": [], "curve": {"sizes": [], "seeds": []},
        "dataset.train_rows": point.rows, "dataset.train_rows_seed": point.seed,
        "output_dir": f"{base}-{point.label}", "eval_zeroshot": zeroshot and params.eval_zeroshot})


def _point_job(file: Path, params: Params, point: Point, zeroshot: bool) -> Job:
    p = point_params(params, point, zeroshot)
    return Job(file, params.name, f"{params.name}-{point.label}", p, p,
               tags={contract.TAG_TRAIN_ROWS: str(point.rows)}, point=point)


def curve_tags(jobs: list[Job]) -> dict[str, str]:
    """The parent run's tag of a batch of learning curves ({} for a plain batch). Its LLMs are
    compared at each k with one set of baselines: every file must name the same table, split
    and baselines, and a batch does not mix curves with plain runs."""
    points = [j for j in jobs if j.point is not None]
    if not points:
        return {}
    plain = sorted({str(j.file) for j in jobs if j.point is None and j.params is not None})
    if plain:
        raise ParamsError(f"{plain[0]}: a plain params file in a batch of learning curves (files "
                          "with curve.sizes): run it in a batch of its own, or give it "
                          "curve.sizes too")
    keys = {baselines_key(j.params.replace(**{"dataset.train_rows": 0,
                                               "dataset.train_rows_seed": 0, "seed": 0}))
            for j in points}
    if len(keys) > 1:
        raise ParamsError("the learning curves of a batch compare their LLMs at each k on one "
                          "table: these files differ in their dataset or baselines sections "
                          f"({', '.join(sorted({str(j.file) for j in points}))}); run them as "
                          "separate batches")
    sizes = ",".join(str(s) for s in dict.fromkeys(
        j.point.size for j in sorted(points, key=lambda j: j.point.rows)))
    seeds = ",".join(str(s) for s in dict.fromkeys(j.point.seed for j in points))
    return {contract.TAG_CURVE: f"sizes {sizes}; seeds {seeds}"}


def _seed_jobs(file: Path, params: Params, seeds: list[int]) -> list[Job]:
    if not seeds:
        return [Job(file, params.name, params.name, params)]
    jobs = []
    for seed in dict.fromkeys(seeds):
        # `seeds: []` so that a run's params (and hash) describe that one run, whichever seed
        # list it came from: --resume then recognises it.
        overrides: dict[str, Any] = {"seed": seed, "seeds": []}
        run_name = params.name
        if len(set(seeds)) > 1:
            run_name = f"{params.name}-seed{seed}"
            # Each seed trains its own adapter; a relative path keeps the hash machine-independent.
            base = params.output_dir or f"runs/adapters/{params.name}"
            overrides["output_dir"] = f"{base}-seed{seed}"
        jobs.append(Job(file, params.name, run_name, params.replace(**overrides), params))
    return jobs


def select(jobs: list[Job], only: list[str]) -> list[Job]:
    """--only NAME: a params name, a run name (name-seed1) or a file name without .yaml."""
    if not only:
        return jobs
    wanted = set(only)
    picked = [j for j in jobs if wanted & {j.name, j.run_name, j.file.stem}]
    unknown = wanted - {n for j in jobs for n in (j.name, j.run_name, j.file.stem)}
    if unknown:
        known = ", ".join(sorted({j.name for j in jobs}))
        raise ParamsError(f"--only {', '.join(sorted(unknown))}: no such model in this batch "
                         f"(models: {known})")
    return picked


def baselines_key(params: Params) -> str:
    """Same dataset section, baselines settings and experiment = same baselines runs (the group,
    not the split's id: that is the split hash)."""
    blob = json.dumps({"experiment": params.experiment,
                       "dataset": dataclasses.asdict(params.dataset),
                       "baselines": dataclasses.asdict(params.baselines)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def baseline_groups(jobs: list[Job]) -> list[BaselineGroup]:
    """One group per baselines setting, named by its split hash: the id MLflow tags the runs
    with (tablora.split_hash), read from the table without writing anything."""
    groups: dict[str, BaselineGroup] = {}
    hashes: dict[str, tuple[str, str]] = {}
    for job in jobs:
        if job.params is None:
            continue
        config_key = baselines_key(job.params)
        if config_key not in groups:
            split, error = _split_hash(job.params, hashes)
            same = sum(g.split_hash == split for g in groups.values())
            key = split if not same else f"{split}-{same + 1}"
            groups[config_key] = BaselineGroup(key, job.file, job.base or job.params, [],
                                               split_hash=split, error=error,
                                               tags=dict(job.tags))
        if job.name not in groups[config_key].models:
            groups[config_key].models.append(job.name)
    return list(groups.values())


def _split_hash(params: Params, cache: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(split hash, "") or, when the table cannot be read, (a settings hash, the error)."""
    blob = json.dumps(dataclasses.asdict(params.dataset), sort_keys=True, default=str)
    key = f"{params.source_file}|{blob}"
    if key not in cache:
        try:
            cache[key] = (data.table_split_hash(params), "")
        except Exception as e:  # noqa: BLE001 - the run itself reports it; the plan says so
            cache[key] = (baselines_key(params), f"{type(e).__name__}: {_one_line(str(e))}")
    return cache[key]


def experiment_of(jobs: list[Job]) -> str:
    names = {j.params.experiment for j in jobs if j.params is not None}
    if len(names) > 1:
        raise ParamsError(f"a batch writes to one MLflow experiment, but its files name "
                          f"{sorted(names)}: give them the same `experiment`, or run them apart")
    return names.pop() if names else Params().experiment


def plan_hash(jobs: list[Job]) -> str:
    """Identifies "the same batch command" for --resume: the resolved params of every run."""
    items = sorted(j.params.hash() if j.params else f"broken:{j.file}" for j in jobs)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


# The Source the MLflow UI shows for a batch's parent run.
BATCH_SOURCE = "tablora batch"


def _source(notebook: str) -> str:
    path = _notebook_file(notebook)
    return str(path) if path else f"{notebook}.ipynb"


def _notebook_file(name: str) -> Path | None:
    try:
        return notebooks.notebook_path(name)
    except FileNotFoundError:
        return None


def format_plan(jobs: list[Job], groups: list[BaselineGroup], experiment: str,
                compare: bool, skips: dict[str, str] | None = None,
                notebook: str = "compare") -> str:
    """The dry-run text: runs, notebooks, the baselines per split."""
    skips = skips or {}
    n_files = len({j.file for j in jobs})
    lines = [f"batch plan: {len(jobs)} model run(s) from {n_files} params file(s), "
             f"MLflow experiment {experiment!r}"]
    nbs = [f"{n}.ipynb{'' if _notebook_file(n) else ' (MISSING)'}" for n in MODEL_NOTEBOOKS]
    lines.append(f"each run: {' -> '.join(nbs)}, in one MLflow run nested under the batch run")
    for i, job in enumerate(jobs, 1):
        lines.append(f"  [{i}/{len(jobs)}] {_describe_job(job)}")
        if job.run_name in skips:
            lines.append(f"        --resume: skipped, {skips[job.run_name]}")
    lines.append(_baselines_plan(groups))
    lines.extend(f"  split {g.key}: {_describe_split(g.params)} for {', '.join(g.models)}"
                 f" (with {_rel(g.file)})"
                 + (f"\n        the table cannot be read: {_short(g.error)}" if g.error else "")
                 for g in groups)
    if not compare:
        lines.append(f"{notebook}: skipped (--no-compare)")
    else:
        found = _notebook_file(notebook)
        lines.append(f"{notebook}: {notebook}.ipynb over the batch's runs" if found else
                     f"{notebook}: notebooks/{notebook}.ipynb not found, skipped")
    return "\n".join(lines)


def _describe_job(job: Job) -> str:
    if job.params is None:
        return f"{job.run_name}: BROKEN params file ({_rel(job.file)}): {job.error}"
    p = job.params
    return (f"{job.run_name}: {p.model_id} seed {p.seed}, lr {p.learning_rate:g}, "
            f"{_budget(p)}, LoRA r{p.lora_rank}/a{p.lora_alpha:g}, batch {p.batch_size}"
            f" ({_rel(job.file)})")


def _budget(p: Params) -> str:
    key, value = p.budget
    return f"{value:g} iters" if key == "num_iters" else f"{value:g} epochs"


def _baselines_plan(groups: list[BaselineGroup]) -> str:
    if not _notebook_file("baselines"):
        return "baselines: notebooks/baselines.ipynb not found, skipped"
    return f"baselines: baselines.ipynb once per distinct split ({len(groups)})"


def _describe_split(p: Params) -> str:
    d = p.dataset
    features = f"{len(d.features)} features" if d.features else "all features"
    target = d.target or "(its target)"
    positive = "" if d.positive_label in ("", None) else f"={d.positive_label!r}"
    return (f"{d.source} -> {target}{positive}, {features}, test {d.test_size:g}, "
            f"valid {d.valid_size:g}, split_seed {d.split_seed}")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- running


@dataclass
class Batch:
    """The MLflow side of one batch: where its runs and executed notebooks go."""

    batch_id: str
    experiment_id: str
    parent_id: str
    out_dir: Path
    client: Any
    # The runs this process keeps alive (their heartbeat, see tracking.mark_stale_runs).
    beating: list[str] = field(default_factory=list)

    def model_tags(self, job: Job) -> dict[str, str]:
        p = job.params
        tags = {contract.TAG_KIND: contract.KIND_LLM, contract.TAG_PARENT: self.parent_id,
                contract.TAG_BATCH_ID: self.batch_id, contract.TAG_MODEL_NAME: job.name,
                **_owner_tags(), **tracking.run_identity(_source("train"))}
        if p is not None:
            tags.update({contract.TAG_SEED: str(p.seed), contract.TAG_PARAMS_HASH: p.hash(),
                         **tracking.model_tags(p.model_id)})
        return {**tags, **job.tags}

    def ref(self, quiet: bool = False) -> BatchRef:
        return BatchRef(self.batch_id, self.experiment_id, self.parent_id,
                        tracking.tracking_uri(), quiet)


@dataclass(frozen=True)
class BatchRef:
    """A Batch as a task carries it to a worker: ids and the tracking URI, no client."""

    batch_id: str
    experiment_id: str
    parent_id: str
    tracking_uri: str
    quiet: bool = False  # notebook output to a log file (on a cluster), not the terminal

    def open(self) -> Batch:
        """The Batch on the machine that runs the task. The worker's own MLFLOW_TRACKING_URI
        wins (the batch's may name a host as only the batch's machine sees it); either way the
        store must hold the batch's parent run."""
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or self.tracking_uri
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the notebook kernels inherit it
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        try:
            client.get_run(self.parent_id)
        except Exception as e:  # noqa: BLE001 - any store error means the same fix
            raise RuntimeError(
                f"{executor.where()}: the MLflow store {uri} has no run {self.parent_id} (batch "
                f"{self.batch_id}; {type(e).__name__}): set MLFLOW_TRACKING_URI on this worker "
                f"to the batch's tracking server ({self.tracking_uri})") from None
        return Batch(self.batch_id, self.experiment_id, self.parent_id,
                     config.RUNS_DIR / self.batch_id, client)


@dataclass(frozen=True)
class ModelTask:
    """One model run, as sent to whichever worker runs it."""

    batch: BatchRef
    task: str  # unique in the batch: tag tablora.task of every attempt's run
    counter: str  # "[2/5]"
    run_name: str
    params: Params
    tags: dict[str, str]
    split_hash: str  # drawn by the batch; "" when its data did not load there
    split_json: str
    # --resume: the interrupted (KILLED) run to continue, and the notebooks it still needs.
    resume_run_id: str = ""
    notebooks: tuple[str, ...] = MODEL_NOTEBOOKS


@dataclass(frozen=True)
class BaselinesTask:
    batch: BatchRef
    task: str
    group: BaselineGroup
    split_hash: str
    split_json: str


class SplitMismatch(RuntimeError):
    """The worker reads other data than the batch split: its runs would not be comparable."""


def run(paths: list[Path], seeds: str | None = None, only: list[str] | None = None,
        resume: bool = False, dry_run: bool = False, compare: bool = True,
        cluster: str = "", workers: int = 0, memcheck: bool = False) -> int:
    """Plan the batch of `paths` (files or folders) and run it (or print the plan); returns the
    exit code: 1 when any model failed. cluster/workers: see executor.connect. `memcheck`:
    check each model once per table for memorization first (helpers.llm.memcheck)."""
    jobs = select(plan_jobs(expand_paths(paths), parse_seeds(seeds)), only or [])
    groups = baseline_groups(jobs)
    experiment = experiment_of(jobs)
    # Files with curve.sizes: their points, then the curve's analysis instead of compare.
    parent_tags = curve_tags(jobs)
    notebook = CURVE_NOTEBOOK if parent_tags else "compare"
    if dry_run:
        skips = _resume_skips_readonly(jobs, experiment) if resume else {}
        print(format_plan(jobs, groups, experiment, compare, skips, notebook))
        return 0
    _preflight(notebook)
    return run_batch(jobs, groups, experiment, resume=resume, compare=compare, cluster=cluster,
                     workers=workers, memcheck=memcheck, parent_tags=parent_tags,
                     compare_notebook=notebook)


def _preflight(compare_notebook: str = "compare") -> None:
    """Refuse to start a batch whose notebooks are missing or take other parameters."""
    for name in (*MODEL_NOTEBOOKS, "baselines", compare_notebook):
        path = _notebook_file(name)
        if path is None and name in MODEL_NOTEBOOKS:
            notebooks.notebook_path(name)  # raises FileNotFoundError with the path
        if path is not None:
            notebooks.check_parameters(path, dict.fromkeys(NOTEBOOK_PARAMETERS))


def run_batch(jobs: list[Job], groups: list[BaselineGroup], experiment: str,
              resume: bool = False, compare: bool = True, cluster: str = "",
              workers: int = 0, memcheck: bool = False,
              parent_tags: dict[str, str] | None = None,
              compare_notebook: str = "compare") -> int:
    """parent_tags: more tags for the parent run (a curve's); compare_notebook: the notebook
    run over the batch's runs at the end (a curve's: "curve")."""
    import mlflow

    t0 = time.perf_counter()
    # Create the store and the experiment here, once: kernels creating a new SQLite store at the
    # same time crash in its schema set-up. setup() also exports the absolute tracking URI (and
    # LocalCluster workers, started below, inherit it).
    exp_id = tracking.setup(experiment)
    client = mlflow.MlflowClient()
    ex = executor.connect(cluster, workers)
    try:
        if ex.parallel:
            print(ex.describe(), flush=True)
            _warn_local_store(cluster)
        splits = _splits(groups)
        # Runs left RUNNING by a process killed outright (SIGKILL, a crash, a reboot) end KILLED.
        for rid in tracking.mark_stale_runs(exp_id):
            print(f"run {rid}: its process is gone: marked KILLED", flush=True)
        batch = _open_batch(client, exp_id, plan_hash(jobs), resume, parent_tags or {})
        print(f"batch {batch.batch_id}: {len(jobs)} model run(s), experiment {experiment!r}; "
              f"executed notebooks in {batch.out_dir}", flush=True)
        compare_outcome: Outcome | None = None
        try:
            with _batch_env(batch):
                if memcheck:  # in this process, before any model trains
                    _run_memchecks(jobs)
                outcomes, baseline_outcomes = _run_tasks(ex, batch, jobs, groups, splits,
                                                         resume)
                if compare:
                    compare_outcome = _run_compare(batch, jobs, compare_notebook)
        except KeyboardInterrupt:
            ex.close()  # a LocalCluster's workers stop; a remote cluster's tasks are cancelled
            _reap(batch, why="the batch was interrupted while it ran on {worker}")
            client.set_terminated(batch.parent_id, "KILLED")
            raise
    finally:
        ex.close()
    summary = Summary(batch.batch_id, experiment, outcomes, baseline_outcomes, compare_outcome,
                      time.perf_counter() - t0, workers=ex.parallel)
    _log_summary(batch, summary)
    print()
    print(summary.text())
    if compare_outcome is not None and compare_outcome.status == "ok":
        table = results_table(batch.out_dir / f"{compare_notebook}.ipynb")
        if table:
            print(f"\nResults (from {compare_notebook}.ipynb):\n" + table)
    print(f"\nBrowse the runs:    make ui   then {tracking.ui_url(exp_id)}"
          f"\nOpen the notebooks: make lab  (this batch's executed copies, as .ipynb and .html: "
          f"{batch.out_dir})")
    return 1 if summary.failed else 0


def _warn_local_store(cluster: str) -> None:
    """Workers on other machines cannot write into this machine's SQLite file or loopback."""
    from urllib.parse import urlparse

    uri = tracking.tracking_uri()
    host = urlparse(uri).hostname or ""
    if cluster and (uri.startswith(("sqlite:", "file:")) or host in ("127.0.0.1", "localhost")):
        print(f"note: MLflow store {uri} is only reachable from this machine: workers on other "
              "machines need MLFLOW_TRACKING_URI set to a tracking server they can reach "
              "(`tablora server --host 0.0.0.0`, see README: several machines)", flush=True)


def _splits(groups: list[BaselineGroup]) -> dict[str, tuple[str, str]]:
    """Each distinct split drawn here, once: group key -> (split hash, split file). Workers check
    the hash against their copy of the data and use these rows. A split whose data does not
    load here gets ("", ""): its notebooks fail with the data's own message, as they would
    without a batch."""
    from helpers import data

    out: dict[str, tuple[str, str]] = {}
    for group in groups:
        try:
            prepared = data.prepare(group.params)
            out[group.key] = (prepared.split_hash, prepared.split_file.read_text("utf-8"))
        except Exception:  # noqa: BLE001 - reported by the notebooks, per model
            out[group.key] = ("", "")
    return out


def _task_labels(jobs: list[Job]) -> list[str]:
    """A label per job, unique in the batch (the run name, numbered when two jobs share it)."""
    seen: dict[str, int] = {}
    labels = []
    for job in jobs:
        seen[job.run_name] = seen.get(job.run_name, 0) + 1
        n = seen[job.run_name]
        labels.append(job.run_name if n == 1 else f"{job.run_name}#{n}")
    # tablora.task values go inside MLflow filter strings
    return [label.replace("'", "_") for label in labels]


def _run_tasks(ex: executor.Executor, batch: Batch, jobs: list[Job],
               groups: list[BaselineGroup], splits: dict[str, tuple[str, str]],
               resume: bool) -> tuple[list[Outcome], list[Outcome]]:
    """The baselines of each split and every model, as tasks of `ex`; outcomes in plan order.
    What needs no worker (a broken params file, a run --resume skips) is settled here."""
    ref = batch.ref(quiet=ex.parallel)
    results: dict[str, Outcome] = {}
    base_labels = [f"baselines {g.key}" for g in groups]
    for label, group in zip(base_labels, groups, strict=True):
        settled = _baselines_settled(batch, group, resume)
        if settled is not None:
            results[label] = settled
        else:
            ex.submit(baselines_task, BaselinesTask(ref, label, group, *splits[group.key]),
                      label=label)
    # A model's split is its baselines group's, found by the same key that grouped them (the
    # group's name is its split hash). Not by model name: a curve's points share one name and
    # each has a split of its own.
    group_of = {baselines_key(g.params): g.key for g in groups}
    labels = _task_labels(jobs)
    for i, (label, job) in enumerate(zip(labels, jobs, strict=True), 1):
        counter = f"[{i}/{len(jobs)}]"
        settled = _run_model(batch, job, counter, resume)
        if settled is not None:
            results[label] = settled
            continue
        split = splits[group_of[baselines_key(job.params)]]
        task = ModelTask(ref, label, counter, job.run_name, job.params, batch.model_tags(job),
                         *split, *_continued(batch, job, counter, resume))
        ex.submit(model_task, task, label=label)
    total = len(jobs) + len(groups)
    for event in ex.events():
        if event.kind == "started":
            if ex.parallel:
                print(f"{_progress(results, total, ex)} {event.label}: started on "
                      f"{event.worker}", flush=True)
            continue
        outcome = event.result
        if outcome is None:  # the task raised on every try, or its workers kept dying
            outcome = Outcome(_outcome_label(event.label, jobs, labels), status="failed",
                              cause=f"the task failed: {event.error}")
        if event.result is None:
            again = f"the task gave up: {event.error}"
        else:
            again = "the task ran again" + (f" as run {outcome.run_id}" if outcome.run_id else "")
        reaped = _reap(batch, task=event.label, keep=outcome.run_id,
                       why=f"its worker ({{worker}}) was lost mid-run; {again}")
        if not outcome.run_id and reaped:
            outcome.run_id = reaped[0].info.run_id
        outcome.worker = outcome.worker or event.worker
        results[event.label] = outcome
        if ex.parallel:
            status = outcome.status if outcome.status != "failed" else (
                f"FAILED: {_short(outcome.cause)}")
            print(f"{_progress(results, total, ex)} {event.label}: {status} in "
                  f"{duration(outcome.total_seconds)} on {outcome.worker or '?'}", flush=True)
    # Nothing of this batch runs now: a run still RUNNING lost its worker for good.
    _reap(batch, why="its worker ({worker}) was lost mid-run and the batch ended")
    return ([results[label] for label in labels],
            [results[label] for label in base_labels])


def _outcome_label(label: str, jobs: list[Job], labels: list[str]) -> str:
    """The summary's row name of a task's label: the run name, or the baselines label."""
    return jobs[labels.index(label)].run_name if label in labels else label


def _progress(results: dict[str, Outcome], total: int, ex: executor.Executor) -> str:
    failed = sum(o.status == "failed" for o in results.values())
    counts = ex.counts()
    return (f"[{len(results)}/{total} done, {failed} failed, {counts['running']} running, "
            f"{counts['waiting']} waiting]")


def _reap(batch: Batch, task: str = "", keep: str = "", why: str = "") -> list[Any]:
    """End KILLED the runs of this batch (of one task, or all) that are still RUNNING, but
    `keep`: their worker died under them (the task ran again as a new run, or the batch is
    over). Returns them, latest first. `why` may name the run's worker as {worker}."""
    filt = (f"tags.`{contract.TAG_PARENT}` = '{batch.parent_id}' and "
            "attributes.status = 'RUNNING'")
    if task:
        filt += f" and tags.`{contract.TAG_TASK}` = '{task}'"
    runs = batch.client.search_runs([batch.experiment_id], filter_string=filt,
                                    order_by=["attributes.start_time DESC"], max_results=1000)
    reaped = [r for r in runs if r.info.run_id != keep]
    for run in reaped:
        worker = run.data.tags.get(contract.TAG_WORKER, "unknown")
        batch.client.set_tag(run.info.run_id, contract.TAG_ERROR,
                             why.replace("{worker}", worker)[:4000])
        batch.client.set_terminated(run.info.run_id, "KILLED")
    return reaped


def _open_batch(client: Any, exp_id: str, plan: str, resume: bool,
                parent_tags: dict[str, str] | None = None) -> Batch:
    """The parent run: a new one, or with --resume the latest batch that ran the same plan, so
    that the finished runs it skips and the new ones end up in one batch for the comparison."""
    previous = _previous_batch(client, exp_id, plan) if resume else None
    if previous is not None:
        batch_id = previous.data.tags[contract.TAG_BATCH_ID]
        client.update_run(previous.info.run_id, status="RUNNING")
        if contract.TAG_ERROR in previous.data.tags:  # e.g. "KILLED: its process is gone"
            client.delete_tag(previous.info.run_id, contract.TAG_ERROR)
        for key, value in _owner_tags().items():
            client.set_tag(previous.info.run_id, key, value)
        parent_id = previous.info.run_id
        print(f"--resume: continuing batch {batch_id}")
    else:
        batch_id = new_batch_id()
        parent = client.create_run(exp_id, run_name=f"batch-{batch_id}", tags={
            contract.TAG_KIND: contract.KIND_BATCH, contract.TAG_BATCH_ID: batch_id,
            contract.TAG_PLAN_HASH: plan, **_owner_tags(),
            **tracking.run_identity(BATCH_SOURCE), **(parent_tags or {})})
        parent_id = parent.info.run_id
    out_dir = config.RUNS_DIR / batch_id
    out_dir.mkdir(parents=True, exist_ok=True)
    return Batch(batch_id, exp_id, parent_id, out_dir, client)


def _owner_tags() -> dict[str, str]:
    return {contract.TAG_OWNER: tracking.owner(), contract.TAG_HEARTBEAT: str(int(time.time()))}


def _previous_batch(client: Any, exp_id: str, plan: str) -> Any | None:
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{contract.TAG_KIND}` = '{contract.KIND_BATCH}' and "
        f"tags.`{contract.TAG_PLAN_HASH}` = '{plan}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


@contextmanager
def _batch_env(batch: Batch) -> Iterator[None]:
    """Runs a notebook starts by itself (baselines, comparison) join the batch: tracking.run()
    reads these; kernels inherit the environment."""
    saved = {k: os.environ.get(k) for k in (contract.ENV_BATCH_ID, contract.ENV_PARENT_RUN_ID)}
    os.environ[contract.ENV_BATCH_ID] = batch.batch_id
    os.environ[contract.ENV_PARENT_RUN_ID] = batch.parent_id
    batch.beating[:] = [batch.parent_id]
    try:
        with tracking.heartbeat(batch.beating):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _finished_run(client: Any, exp_id: str, params_hash: str) -> Any | None:
    """A FINISHED LLM run with these exact params that got as far as test metrics (a run that
    ended after train.ipynb alone is FINISHED too, but not done)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{contract.TAG_PARAMS_HASH}` = '{params_hash}' and "
        f"tags.`{contract.TAG_KIND}` = '{contract.KIND_LLM}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if any(k.startswith(contract.PREFIX_TEST + "_") for k in run.data.metrics):
            return run
    return None


def _skip_note(run: Any) -> str:
    batch_id = run.data.tags.get(contract.TAG_BATCH_ID, "no batch")
    return f"FINISHED run {run.info.run_id} ({batch_id}) has the same params"


def _resume_skips_readonly(jobs: list[Job], experiment: str) -> dict[str, str]:
    """--dry-run --resume: which runs would be skipped, without creating a store."""
    import mlflow

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    skips = {}
    for job in jobs:
        run = _finished_run(client, exp.experiment_id, job.params.hash()) if job.params else None
        if run is not None:
            skips[job.run_name] = _skip_note(run)
    return skips


def _continued(batch: Batch, job: Job, counter: str, resume: bool) -> tuple[str, tuple[str, ...]]:
    """With --resume, the latest interrupted (KILLED) run of these params continues: training
    from its checkpoint (finetune resumes a run's own checkpoint) or, trained already,
    evaluating only. Returns (its run id, the notebooks to run), or ("", all of them)."""
    interrupted = _interrupted_run(batch, job.params.hash()) if resume else None
    if interrupted is None:
        return "", MODEL_NOTEBOOKS
    trained = "final_train_loss" in interrupted.data.metrics
    print(f"{counter} {job.run_name}: --resume: continuing interrupted run "
          f"{interrupted.info.run_id} ("
          f"{'trained, evaluating' if trained else 'training from its last checkpoint'})",
          flush=True)
    return interrupted.info.run_id, ("evaluate",) if trained else MODEL_NOTEBOOKS


def _interrupted_run(batch: Batch, params_hash: str) -> Any | None:
    runs = batch.client.search_runs(
        [batch.experiment_id], filter_string=f"tags.`{contract.TAG_PARAMS_HASH}` = "
        f"'{params_hash}' and tags.`{contract.TAG_KIND}` = '{contract.KIND_LLM}' and "
        "attributes.status = 'KILLED'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _run_model(batch: Batch, job: Job, counter: str, resume: bool) -> Outcome | None:
    """What the batch settles without a worker: a broken params file, a run --resume skips;
    None when the model must run (model_task)."""
    outcome = Outcome(job.run_name)
    if job.params is None:
        return _broken_file(batch, job, counter, outcome)
    if resume:
        done = _finished_run(batch.client, batch.experiment_id, job.params.hash())
        if done is not None:
            outcome.status, outcome.run_id, outcome.note = "skipped", done.info.run_id, (
                _skip_note(done))
            print(f"{counter} {job.run_name}: skipped (--resume: {outcome.note})", flush=True)
            return outcome
    return None


def model_task(task: ModelTask) -> Outcome:
    """One model: its MLflow run, train.ipynb then evaluate.ipynb, on whichever machine runs
    the task (a Dask worker, or here). Each attempt makes its own run."""
    batch = task.batch.open()
    outcome = Outcome(task.run_name, worker=executor.where())
    run_tags = {contract.TAG_TASK: task.task, contract.TAG_WORKER: outcome.worker}
    # The process that runs the task owns the run (its heartbeat; stale when it dies).
    tags = {**task.tags, **_owner_tags(), **run_tags}
    if task.resume_run_id:
        outcome.run_id = task.resume_run_id
        batch.client.update_run(outcome.run_id, status="RUNNING")
        for key, value in tags.items():
            batch.client.set_tag(outcome.run_id, key, value)
    else:  # the task creates the run so that train.ipynb and evaluate.ipynb both write into it
        outcome.run_id = batch.client.create_run(batch.experiment_id, run_name=task.run_name,
                                                 tags=tags).info.run_id
    log = batch.out_dir / task.run_name / "output.log"
    with (tracking.heartbeat([outcome.run_id]),
          _task_env(batch, task.batch.quiet, run_tags, log, outcome.run_id)):
        mismatch = _split_mismatch(task.params, task.split_hash, task.split_json)
        if mismatch is not None:
            _fail(batch, outcome, mismatch)
            print(f"{task.counter} {task.run_name}: FAILED: {_short(outcome.cause)}",
                  flush=True)
            return outcome
        for name in task.notebooks:
            print(f"{task.counter} {task.run_name}: {name} ...", flush=True)
            output = batch.out_dir / task.run_name / f"{name}.ipynb"
            error = _execute(batch, outcome, name, task.params, outcome.run_id, output)
            _log_notebook(batch, outcome.run_id, output)
            secs = outcome.seconds[name]
            if error is not None:
                _fail(batch, outcome, error)
                print(f"{task.counter} {task.run_name}: {name} ... {secs:.0f}s FAILED: "
                      f"{_short(outcome.cause)}", flush=True)
                return outcome
            print(f"{task.counter} {task.run_name}: {name} ... {secs:.0f}s ok", flush=True)
    outcome.status = "ok"
    # A notebook that did not end the run itself leaves it RUNNING forever in the UI.
    if batch.client.get_run(outcome.run_id).info.status == "RUNNING":
        batch.client.set_terminated(outcome.run_id, "FINISHED")
    return outcome


def _split_mismatch(params: Params, expected: str, split_json: str) -> SplitMismatch | None:
    """The batch drew the split once: this machine must read the same table (same hash), and
    then uses the batch's rows. None when all is well (or the batch could not load the data:
    the notebook then fails with the data's own message)."""
    from helpers import data

    if not expected:
        return None
    try:
        actual = data.table_split_hash(params)
    except Exception:  # noqa: BLE001 - the notebook reports the data error itself
        return None
    if actual != expected:
        return SplitMismatch(
            f"split hash {actual} on {executor.where()} differs from the batch's {expected}: "
            f"this machine's {data.describe_source(params)} is not the data the batch split; "
            "give every worker the same file (and dataset settings)")
    data.install_split(split_json, expected)
    return None


@contextmanager
def _task_env(batch: Batch, quiet: bool, run_tags: dict[str, str], log: Path,
              log_run_id: str) -> Iterator[None]:
    """Around a task on its worker: the batch's environment for the kernels, tags for every run
    they start, and (on a cluster) the notebooks' output in a log file, attached to the run."""
    import contextlib
    import sys

    saved = os.environ.get(contract.ENV_RUN_TAGS)
    os.environ[contract.ENV_RUN_TAGS] = json.dumps(run_tags)
    try:
        with _batch_env(batch), contextlib.ExitStack() as stack:
            if quiet:
                log.parent.mkdir(parents=True, exist_ok=True)
                f = stack.enter_context(open(log, "w", encoding="utf-8"))
                stack.enter_context(contextlib.redirect_stdout(f))
                stack.enter_context(contextlib.redirect_stderr(f))
            try:
                yield
            finally:
                sys.stdout.flush()
    finally:
        if saved is None:
            os.environ.pop(contract.ENV_RUN_TAGS, None)
        else:
            os.environ[contract.ENV_RUN_TAGS] = saved
        if quiet and log.is_file():
            batch.client.log_artifact(log_run_id, str(log), contract.ARTIFACT_NOTEBOOKS)


def _execute(batch: Batch, outcome: Outcome, name: str, params: Params,
             run_id: str, output: Path, **extra: Any) -> BaseException | None:
    """Run one notebook; its wall time goes to outcome.seconds; returns the error, if any."""
    t0 = time.perf_counter()
    try:
        notebooks.execute(name, params, run_id=run_id, output=output, attach=False,
                          **extra)
    except KeyboardInterrupt:
        if run_id:
            batch.client.set_terminated(run_id, "KILLED")
        raise
    except Exception as e:  # isolation: any failure is this model's, never the batch's
        return e
    finally:
        outcome.seconds[name] = time.perf_counter() - t0
    return None


def describe_error(e: BaseException) -> tuple[str, str]:
    """(the exception, the failing cell's first line) for the summary and the run's tags."""
    if isinstance(e, notebooks.NotebookFailed):
        lines = e.cell.strip().splitlines()
        return f"{e.ename}: {_one_line(e.evalue)}", (lines[0] if lines else "")
    return f"{type(e).__name__}: {_one_line(str(e))}", ""


def _fail(batch: Batch, outcome: Outcome, error: BaseException) -> None:
    """The run ends FAILED with its cause, whether or not the notebook got as far as saying so."""
    exc, cell = describe_error(error)
    outcome.status = "failed"
    outcome.cause = f"{exc} (cell: `{cell}`)" if cell else exc
    client = batch.client
    if contract.TAG_ERROR not in client.get_run(outcome.run_id).data.tags:
        client.set_tag(outcome.run_id, contract.TAG_ERROR, exc[:4000])
    if cell:
        client.set_tag(outcome.run_id, contract.TAG_ERROR_CELL, cell[:500])
    client.set_terminated(outcome.run_id, "FAILED")


def _broken_file(batch: Batch, job: Job, counter: str, outcome: Outcome) -> Outcome:
    """A params file that does not load is still a FAILED run, so the UI lists it too."""
    run = batch.client.create_run(batch.experiment_id, run_name=job.run_name,
                                  tags={**batch.model_tags(job), contract.TAG_ERROR: job.error})
    outcome.run_id = run.info.run_id
    if job.file.is_file():
        batch.client.log_artifact(outcome.run_id, str(job.file), contract.ARTIFACT_PARAMS)
    batch.client.set_terminated(outcome.run_id, "FAILED")
    outcome.status, outcome.cause = "failed", f"ParamsError: {_one_line(job.error)}"
    print(f"{counter} {job.run_name}: FAILED before training: {_short(outcome.cause)}",
          flush=True)
    return outcome


def _log_notebook(batch: Batch, run_id: str, output: Path) -> None:
    if output.is_file():
        notebooks.log_executed(batch.client, run_id, output)


def _baselines_settled(batch: Batch, group: BaselineGroup, resume: bool) -> Outcome | None:
    """Baselines that need no worker (no notebook, or --resume finds them done); else None."""
    outcome = Outcome(f"baselines {group.key}")
    if _notebook_file("baselines") is None:
        outcome.status, outcome.note = "skipped", "notebooks/baselines.ipynb not found"
        print(f"baselines {group.key}: skipped ({outcome.note})", flush=True)
        return outcome
    if resume and _baseline_runs(batch, group.key, status="FINISHED"):
        outcome.status, outcome.note = "skipped", "--resume: already in this batch"
        print(f"baselines {group.key}: skipped ({outcome.note})", flush=True)
        return outcome
    return None


def baselines_task(task: BaselinesTask) -> Outcome:
    """The baselines notebook of one split, on whichever machine runs the task."""
    batch, group = task.batch.open(), task.group
    outcome = Outcome(f"baselines {group.key}", worker=executor.where())
    run_tags = {contract.TAG_TASK: task.task, contract.TAG_WORKER: outcome.worker,
                contract.TAG_BASELINES_KEY: group.key, **group.tags}
    output = batch.out_dir / "baselines" / f"baselines-{group.key}.ipynb"
    with _task_env(batch, task.batch.quiet, run_tags, output.with_suffix(".log"),
                   batch.parent_id):
        print(f"baselines {group.key}: {_describe_split(group.params)} ...", flush=True)
        started_ms = int(time.time() * 1000)
        error: BaseException | None = _split_mismatch(group.params, task.split_hash,
                                                      task.split_json)
        if error is None:
            # baselines.ipynb nests its runs under `run_id` and tags them with `batch_id`; the
            # batch environment (TABLORA_*) covers a notebook that declares neither.
            extra = _declared(_notebook_file("baselines"), batch_id=batch.batch_id)
            run_id = batch.parent_id if "batch_id" in extra else ""
            error = _execute(batch, outcome, "baselines", group.params, run_id, output,
                             **extra)
            _log_notebook(batch, batch.parent_id, output)
            _tag_new_baseline_runs(batch, group.key, started_ms)
        secs = outcome.seconds.get("baselines", 0.0)
        if error is None:
            outcome.status = "ok"
            print(f"baselines {group.key}: {secs:.0f}s ok", flush=True)
            return outcome
        _baselines_failed(batch, group, outcome, error)
        print(f"baselines {group.key}: {secs:.0f}s FAILED: {_short(outcome.cause)}",
              flush=True)
    return outcome


def _baseline_runs(batch: Batch, key: str, status: str = "", since_ms: int = 0) -> list[Any]:
    filt = (f"tags.`{contract.TAG_PARENT}` = '{batch.parent_id}' and "
            f"tags.`{contract.TAG_KIND}` = '{contract.KIND_BASELINE}'")
    if key:
        filt += f" and tags.`{contract.TAG_BASELINES_KEY}` = '{key}'"
    if status:
        filt += f" and attributes.status = '{status}'"
    if since_ms:
        filt += f" and attributes.start_time >= {since_ms}"
    return batch.client.search_runs([batch.experiment_id], filter_string=filt, max_results=1000)


def _tag_new_baseline_runs(batch: Batch, key: str, since_ms: int) -> None:
    """Mark the runs this split's baselines notebook made, so --resume can find them."""
    for run in _baseline_runs(batch, "", since_ms=since_ms):
        if contract.TAG_BASELINES_KEY not in run.data.tags:
            batch.client.set_tag(run.info.run_id, contract.TAG_BASELINES_KEY, key)


def _baselines_failed(batch: Batch, group: BaselineGroup, outcome: Outcome,
                      error: BaseException) -> None:
    exc, cell = describe_error(error)
    outcome.status = "failed"
    outcome.cause = f"{exc} (cell: `{cell}`)" if cell else exc
    failed = _baseline_runs(batch, group.key, status="FAILED")
    if failed:
        outcome.run_id = failed[0].info.run_id
        return
    # The notebook failed before it started a run of its own: make one to carry the cause.
    run = batch.client.create_run(batch.experiment_id, run_name=f"baselines-{group.key}", tags={
        **tracking.run_identity(_source("baselines")),
        contract.TAG_KIND: contract.KIND_BASELINE, contract.TAG_PARENT: batch.parent_id,
        contract.TAG_BATCH_ID: batch.batch_id, contract.TAG_BASELINES_KEY: group.key,
        contract.TAG_ERROR: exc[:4000], **({contract.TAG_ERROR_CELL: cell[:500]} if cell else {})})
    outcome.run_id = run.info.run_id
    batch.client.set_terminated(outcome.run_id, "FAILED")


def _run_memchecks(jobs: list[Job]) -> None:
    """The memorization check once per (model, table), before any training: a check that
    already FINISHED with the same model, table and settings (in any batch) is reused. A
    failure is reported and the batch goes on: it is no model's failure."""
    from helpers.llm import memcheck

    pairs: dict[tuple[str, str], Params] = {}
    for job in jobs:
        if job.params is not None:
            pairs.setdefault((job.params.model_id, job.params.dataset.source), job.params)
    for (model_id, source), params in pairs.items():
        print(f"memcheck: {model_id} on {source} ...", flush=True)
        try:
            for result, run_id in memcheck.run(params, reuse=True, progress=False):
                verdict = ("reused" if result is None else
                           f"flagged by {', '.join(result.flagged)}" if result.flagged
                           else "at chance level")
                print(f"memcheck: {model_id} on {source}: {verdict} (run {run_id})", flush=True)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # isolation: the models still run
            print(f"memcheck: {model_id} on {source}: FAILED: {_short(str(e))}", flush=True)


def _run_compare(batch: Batch, jobs: list[Job], notebook: str = "compare") -> Outcome | None:
    path = _notebook_file(notebook)
    first = next((j for j in jobs if j.params is not None), None)
    if path is None or first is None:
        why = f"notebooks/{notebook}.ipynb not found" if path is None else "no model to compare"
        print(f"{notebook}: skipped ({why})", flush=True)
        return None
    outcome = Outcome(notebook)
    print(f"{notebook} ...", flush=True)
    output = batch.out_dir / f"{notebook}.ipynb"
    extra = _declared(path, batch_id=batch.batch_id, experiment=first.params.experiment,
                      out_dir=str(batch.out_dir / notebook))
    error = _execute(batch, outcome, notebook, first.params, "", output, **extra)
    _log_notebook(batch, batch.parent_id, output)
    if error is None:
        outcome.status = "ok"
    else:
        exc, cell = describe_error(error)
        outcome.status, outcome.cause = "failed", f"{exc} (cell: `{cell}`)" if cell else exc
    print(f"{notebook} ... {outcome.total_seconds:.0f}s {outcome.status}", flush=True)
    return outcome


def _declared(path: Path | None, **candidates: Any) -> dict[str, Any]:
    """The batch-level parameters (batch id, ...) that this notebook's parameters cell declares:
    passing others would be refused."""
    import papermill

    declared = papermill.inspect_notebook(str(path)) if path else {}
    return {k: v for k, v in candidates.items() if k in declared}


def results_table(executed: Path) -> str:
    """The first table the comparison notebook displayed (else its last cell's output)."""
    import nbformat

    if not executed.is_file():
        return ""
    texts, first_table = [], ""
    for cell in nbformat.read(str(executed), as_version=4).cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "<table" in data.get("text/html", "") and not first_table:
                first_table = data.get("text/plain", "")
            if "text/plain" in data:
                texts.append(data["text/plain"])
    return first_table or (texts[-1] if texts else "")


# ---------------------------------------------------------------- the summary


@dataclass
class Summary:
    batch_id: str
    experiment: str
    models: list[Outcome]
    baselines: list[Outcome]
    compare: Outcome | None
    seconds: float
    workers: bool = False  # ran on a cluster: the table says where each model ran

    @property
    def failed(self) -> list[Outcome]:
        steps = [*self.models, *self.baselines, *([self.compare] if self.compare else [])]
        return [o for o in steps if o.status == "failed"]

    @property
    def n_ok(self) -> int:
        return sum(o.status in ("ok", "skipped") for o in self.models)

    @property
    def success_rate(self) -> float:
        return self.n_ok / len(self.models) if self.models else 0.0

    def text(self) -> str:
        reused = sum(o.status == "skipped" for o in self.models)
        lines = [f"batch {self.batch_id}: {self.n_ok}/{len(self.models)} models succeeded"
                 + (f" ({reused} reused from earlier runs)" if reused else "")
                 + f", total {duration(self.seconds)}"]
        width = max([len(o.label) for o in self.models + self.baselines] + [8])
        head = f"  {'model':<{width}}  {'status':<7}  {'train':>7}  {'evaluate':>8}  {'total':>7}"
        lines.append(head + "  run" + ("  worker" if self.workers else ""))
        for o in self.models + self.baselines:
            lines.append(f"  {o.label:<{width}}  {o.status:<7}  {_secs(o, 'train'):>7}  "
                         f"{_secs(o, 'evaluate'):>8}  {duration(o.total_seconds):>7}  "
                         f"{o.run_id or '-'}" + (f"  {o.worker or '-'}" if self.workers else ""))
        if self.compare is not None:
            lines.append(f"  {self.compare.label}: {self.compare.status} in "
                         f"{duration(self.compare.total_seconds)}")
        if self.failed:
            lines.append(f"failures ({len(self.failed)}):")
            lines.extend(f"  {o.label}: {_short(o.cause)}" for o in self.failed)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def row(o: Outcome) -> dict[str, Any]:
            return {"name": o.label, "status": o.status, "run_id": o.run_id,
                    "seconds": {k: round(v, 1) for k, v in o.seconds.items()},
                    "total_seconds": round(o.total_seconds, 1), "cause": o.cause,
                    "note": o.note, "worker": o.worker}

        return {"batch_id": self.batch_id, "experiment": self.experiment,
                "success_rate": self.success_rate, "n_models": len(self.models),
                "n_ok": self.n_ok, "n_failed": sum(o.status == "failed" for o in self.models),
                "total_seconds": round(self.seconds, 1),
                "models": [row(o) for o in self.models],
                "baselines": [row(o) for o in self.baselines],
                "compare": row(self.compare) if self.compare else None}


def _log_summary(batch: Batch, summary: Summary) -> None:
    d = summary.to_dict()
    client = batch.client
    client.log_text(batch.parent_id, summary.text(), contract.SUMMARY_TEXT)
    client.log_dict(batch.parent_id, d, contract.SUMMARY_JSON)
    for key in ("success_rate", "n_failed", "n_models", "total_seconds"):
        client.log_metric(batch.parent_id, key, d[key])
    _describe_batch(batch, summary)
    client.set_terminated(batch.parent_id, "FAILED" if summary.failed else "FINISHED")


def _describe_batch(batch: Batch, summary: Summary) -> None:
    """The parent run's description (its status line over the comparison's verdict, which the
    comparison wrote) and the datasets its runs used."""
    client = batch.client
    try:
        children = [o.run_id for o in summary.models + summary.baselines if o.run_id]
        children += [r.info.run_id for r in _baseline_runs(batch, "")]
        tracking.copy_dataset_inputs(client, list(dict.fromkeys(children)), batch.parent_id)
        status = summary.text().splitlines()[0]
        if summary.failed:
            status += "; failed: " + ", ".join(o.label for o in summary.failed)
        verdict = tracking.description(batch.parent_id, client)
        if verdict.startswith("batch "):  # an earlier status line (--resume): replace it
            verdict = verdict.split("\n\n", 1)[1] if "\n\n" in verdict else ""
        tracking.describe(batch.parent_id, status + (f"\n\n{verdict}" if verdict else ""),
                          client)
    except Exception as e:  # noqa: BLE001 - the summary is logged already; this is decoration
        print(f"warning: could not describe batch run {batch.parent_id}: {e}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(text: str) -> str:
    return text if len(text) <= CAUSE_CHARS else text[:CAUSE_CHARS - 3] + "..."


def _secs(o: Outcome, name: str) -> str:
    return duration(o.seconds[name]) if name in o.seconds else "-"


def duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.1f}min"

