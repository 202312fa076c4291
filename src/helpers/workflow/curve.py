"""`tablora curve`: a learning curve, one batch whose runs are the curve's points.

A point is a training-set size k and a seed: k rows drawn stratified from the saved training
split (helpers.data: nested, the rows of a smaller k are among those of a larger one at the same
seed), the same validation and test rows at every k. At each point the LLM (train.ipynb, then
evaluate.ipynb) and every baseline (baselines.ipynb) learn from those k rows: a point is a model
Job and its own baselines group of a helpers.workflow.batch, so everything a batch does holds
here (one MLflow parent run, tasks on a Dask executor with --workers/--cluster, failures kept to
their point, --resume continuing an interrupted curve). The zero-shot model is scored once, in the
first point's evaluation: the curve's k = 0. At the end notebooks/curve.ipynb runs the analysis
(helpers.analysis.curve) over the batch's runs and logs it to the parent run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from helpers import config, contract, tracking
from helpers.config import Params, ParamsError, load_params
from helpers.workflow import batch

ALL = batch.ALL
DEFAULT_SIZES = batch.DEFAULT_SIZES
NOTEBOOK = batch.CURVE_NOTEBOOK
Point = batch.Point


@dataclass
class Plan:
    """What a curve will run: its points (as batch Jobs) and what was changed on the way."""

    file: Path
    params: Params
    n_train: int  # rows of the whole training split
    sizes: list[int | str]  # as asked, "all" last
    seeds: list[int]
    points: list[Point]
    jobs: list[batch.Job]
    notes: list[str] = field(default_factory=list)

    def parent_tags(self) -> dict[str, str]:
        return batch.curve_tags(self.jobs)


def parse_sizes(text: str | None) -> list[int | str] | None:
    """--sizes 8,32,128,all -> [8, 32, 128, "all"]."""
    if not text:
        return None
    out: list[int | str] = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if part.lower() == ALL:
            out.append(ALL)
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 2:
            raise ParamsError(f"--sizes {text!r}: {part!r} is not a size: give row counts >= 2 "
                              "and/or 'all', comma-separated, e.g. 8,32,128,all")
        out.append(value)
    return out


def plan(path: str | Path, sizes: list[int | str] | None = None,
         seeds: list[int] | None = None) -> Plan:
    """The points of the curve of the params file `path` (batch.curve_points: sizes from
    `sizes`, else curve.sizes, else DEFAULT_SIZES; seeds likewise)."""
    file = Path(path).expanduser().resolve()
    params = load_params(file)
    c = batch.curve_points(file, params, sizes, seeds)
    return Plan(file, params, c.n_train, c.sizes, c.seeds, c.points, c.jobs, c.notes)


# ---------------------------------------------------------------- the time estimate


@dataclass(frozen=True)
class Timing:
    """Seconds measured on earlier runs of the same model (and baselines) in the store."""

    per_step: float  # training seconds per step (validation included)
    per_run: float  # the rest of an LLM run: kernels, model loading, scoring
    baselines: float  # one split's baselines
    source: str  # which runs


def steps(params: Params, rows: int) -> int:
    from helpers.llm.finetune import total_steps

    return total_steps(params, rows)


def timing(experiment: str, model_id: str) -> Timing | None:
    """From the latest finished LLM runs of `model_id` (and baseline runs) in `experiment`;
    None when there are none. Reads the store without creating one."""
    import mlflow

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    llm = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{contract.TAG_KIND}` = '{contract.KIND_LLM}' "
        "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
        max_results=200)
    llm = [r for r in llm if str(r.data.params.get("model_id", "")) == model_id
           and r.data.metrics.get(contract.TRAIN_STEPS) and r.info.end_time
           and contract.TRAIN_SECONDS in r.data.metrics][:5]
    if not llm:
        return None
    per_step = sum(r.data.metrics[contract.TRAIN_SECONDS] / r.data.metrics[contract.TRAIN_STEPS]
                   for r in llm) / len(llm)
    per_run = sum(max(0.0, (r.info.end_time - r.info.start_time) / 1000
                      - r.data.metrics[contract.TRAIN_SECONDS]) for r in llm) / len(llm)
    base = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{contract.TAG_KIND}` = "
        f"'{contract.KIND_BASELINE}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=60)
    base = [r for r in base if r.info.end_time]
    # One split's baselines: the mean run times the number of baselines in a split.
    n = max(1, len({r.data.tags.get(contract.TAG_MODEL_NAME) for r in base}))
    per_base = (sum((r.info.end_time - r.info.start_time) / 1000 for r in base) / len(base) * n
                if base else 0.0)
    return Timing(per_step, per_run, per_base,
                  f"{len(llm)} earlier run(s) of {model_id} in {experiment!r}")


def estimate(p: Plan, t: Timing | None, slots: int = 1) -> str:
    """The line printed before a curve starts: steps, and seconds when the store can time them."""
    n_steps = sum(steps(j.params, pt.rows) for j, pt in zip(p.jobs, p.points, strict=True))
    head = (f"estimate: {len(p.points)} point(s), {n_steps} LLM training steps in all (the "
            f"budget {batch._budget(p.params)} at each k; early stopping may stop sooner)")
    if t is None:
        return (head + f"; no earlier finished run of {p.params.model_id} in experiment "
                f"{p.params.experiment!r} to time it from: the first point will tell")
    seconds = (n_steps * t.per_step + len(p.points) * (t.per_run + t.baselines)) / max(1, slots)
    return (head + f"; about {_duration(seconds)} at {t.per_step:.2f}s a step, "
            f"{t.per_run:.0f}s a run besides training and {t.baselines:.0f}s of baselines a "
            f"point (from {t.source})" + (f", over {slots} workers" if slots > 1 else ""))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(p: Plan) -> str:
    sizes = ", ".join(f"{pt}" for pt in p.sizes)
    lines = [f"curve plan: {p.params.name} ({p.params.model_id}) on "
             f"{batch._describe_split(p.params)}",
             f"sizes {sizes} of {p.n_train} training rows, seeds "
             f"{', '.join(map(str, p.seeds))}: {len(p.points)} point(s), each train.ipynb -> "
             "evaluate.ipynb and baselines.ipynb on the same rows; the zero-shot model scored "
             "once (k = 0); then curve.ipynb"]
    lines += [f"note: {n}" for n in p.notes]
    for i, (job, pt) in enumerate(zip(p.jobs, p.points, strict=True), 1):
        zs = " + zero-shot" if job.params.eval_zeroshot else ""
        lines.append(f"  [{i}/{len(p.points)}] {job.run_name}: {pt.rows} rows "
                     f"(k = {pt.size}), seed {pt.seed}, "
                     f"{steps(job.params, pt.rows)} steps{zs}")
    return "\n".join(lines)


def run(path: str | Path, sizes: str | None = None, seeds: str | None = None,
        resume: bool = False, dry_run: bool = False, cluster: str = "", workers: int = 0) -> int:
    """Plan the curve of the params file `path` and run it (or print the plan); returns the
    exit code: 1 when any point failed."""
    p = plan(path, parse_sizes(sizes), batch.parse_seeds(seeds))
    print(format_plan(p), flush=True)
    slots = workers or 1
    print(estimate(p, timing(p.params.experiment, p.params.model_id), slots), flush=True)
    if dry_run:
        return 0
    batch._preflight(NOTEBOOK)
    groups = batch.baseline_groups(p.jobs)
    code = batch.run_batch(p.jobs, groups, p.params.experiment, resume=resume, compare=True,
                           cluster=cluster, workers=workers, parent_tags=p.parent_tags(),
                           compare_notebook=NOTEBOOK)
    print(result_text(p))
    return code


def curve_id(p: Plan) -> str:
    """The batch id of the latest curve run for this plan ("" when none)."""
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(p.params.experiment)
    parent = batch._previous_batch(client, exp.experiment_id, batch.plan_hash(p.jobs)) if (
        exp is not None) else None
    return parent.data.tags.get(contract.TAG_BATCH_ID, "") if parent is not None else ""


def result_text(p: Plan) -> str:
    """What the terminal shows last: the crossover sentence, where the figure is, how to see
    the report again."""
    cid = curve_id(p)
    if not cid:
        return "curve: no parent run found"
    out = config.RUNS_DIR / cid / NOTEBOOK
    found = out / "curve.json"
    if not found.is_file():
        return (f"\ncurve {cid}: no analysis (see the curve notebook's error above); once "
                f"points have finished: tablora compare --curve {cid}")
    sentence = json.loads(found.read_text(encoding="utf-8"))["sentence"]
    return (f"\ncurve {cid}: {sentence}\nfigure and report: {out}\nagain: tablora compare "
            f"--experiment {p.params.experiment} --curve {cid}")

