"""The comparison's entry points: MLflow runs -> REPORT.md, figures and recommendations.

`run` is what `tablora compare` and notebooks/compare.ipynb call; `recommend` what `tablora
recommend` calls. They stand above report (tables, tests), figures and recommend, so that none of
those needs another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import contract
from helpers.analysis import figures, recommend, report
from helpers.analysis.records import Loaded, load, mlflow_client
from helpers.config import RUNS_DIR


def run(experiment: str = "tablora", batch: str | None = None, against: str | None = None,
        out: str | Path | None = None, with_figures: bool = True, log: bool = True
        ) -> report.Comparison:
    """Load, compare, write REPORT.md and the figures into `out`, log them to MLflow."""
    loaded = load(experiment, batch or None)
    c = report.build(loaded.records, experiment, batch or None, loaded.skipped,
                     loaded.memchecks)
    if against:
        report.compare_rounds(c, report.load_against(experiment, against).records, against)
    c.out_dir = Path(out) if out else RUNS_DIR / "compare" / (batch or experiment)
    if with_figures:
        c.figures = figures.write_figures(c, c.out_dir)
    c.markdown = report.markdown(c)
    if with_figures:
        (c.out_dir / "REPORT.md").write_text(c.markdown)
    if log:
        log_report(c, loaded)
    return c


def log_report(c: report.Comparison, loaded: Loaded) -> str:
    """Log the out folder to the batch's parent run, else to a new run of kind "report"."""
    client = mlflow_client()
    run_id = loaded.parent_run_id
    if not run_id:
        tags = {contract.TAG_KIND: contract.KIND_REPORT}
        if c.batch:
            tags[contract.TAG_BATCH_ID] = c.batch
        run_id = client.create_run(loaded.experiment_id, run_name="comparison",
                                   tags=tags).info.run_id
        best = c.best_llm
        if best is not None:
            client.log_metric(run_id, "best_llm_test_accuracy", best.value("accuracy"))
        client.set_terminated(run_id)
    if c.out_dir and c.out_dir.is_dir():
        client.log_artifacts(run_id, str(c.out_dir), contract.ARTIFACT_COMPARISON)
    return run_id


def recommend_next(experiment: str, batch: str | None, out: Path) -> tuple[Any, list[Path]]:
    """Diagnose the runs and write the next round's params files and REPORT.md into `out`;
    returns (the plan, the files written)."""
    loaded = load(experiment, batch or None)
    c = report.build(loaded.records, experiment, batch or None, loaded.skipped)
    plan = recommend.plan(c)
    return plan, recommend.write(plan, c, Path(out))
