"""The comparison's entry points: MLflow runs -> REPORT.md, figures and recommendations.

`run` is what `tablora compare` and notebooks/compare.ipynb call; `recommend` what `tablora
recommend` calls. They stand above report (tables, tests), figures and recommend, so that none of
those needs another.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from pathlib import Path
from typing import Any

from helpers import contract, tracking
from helpers.analysis import figures, recommend, report
from helpers.analysis.records import Loaded, RunRecord, load, mlflow_client
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
        (c.out_dir / contract.REPORT_MD).write_text(c.markdown)
        (c.out_dir / contract.REPORT_HTML).write_text(report_html(c), encoding="utf-8")
    if log:
        log_report(c, loaded)
    return c


def log_report(c: report.Comparison, loaded: Loaded) -> str:
    """Log the out folder to the batch's parent run, else to a new run of kind "report"."""
    client = mlflow_client()
    run_id = loaded.parent_run_id
    if not run_id:
        tags = {contract.TAG_KIND: contract.KIND_REPORT, **tracking.run_identity()}
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
    mark_runs(c, run_id, client)
    return run_id


# ---------------------------------------------------------------- what people open first

def notebook_markdown(c: report.Comparison) -> str:
    """REPORT.md without its Figures section: a notebook shows the figures as images itself
    (the report's links are relative to its own folder, not to the notebook's)."""
    return report.markdown(dataclasses.replace(c, figures=[]))


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code, pre { background: #f6f6f6; }
pre { padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
"""


def report_html(c: report.Comparison) -> str:
    """REPORT.md as one HTML file with its figures embedded (data: URIs): it displays alike in
    MLflow's artifact view, in a browser and in JupyterLab, wherever the file is copied."""
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    # nbconvert's markdown (its tables, as in notebooks); escaped: model names are user text.
    renderer = IPythonRenderer(escape=True, exclude_anchor_links=True)
    body = MarkdownWithMath(renderer=renderer).render(notebook_markdown(c))
    figs = []
    for path in c.figures:
        if Path(path).is_file():
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            name = html.escape(Path(path).stem)
            figs.append(f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
                        f"<figcaption>{name}</figcaption></figure>")
    if figs:
        body += "\n<h2>Figures</h2>\n" + "\n".join(figs)
    where = html.escape(c.experiment + (f" / {c.batch}" if c.batch else ""))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>tablora report: {where}</title>\n<style>{HTML_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def run_notes(c: report.Comparison) -> dict[str, str]:
    """{record name: its description}: the model's headline against the other arm."""
    base, llm = c.best_baseline, c.best_llm
    notes = {}
    for r in c.llms:
        text = f"**{r.cell('accuracy')}** test accuracy"
        if "zeroshot_test_accuracy" in r.metrics:
            text += f" (zero-shot {r.cell('accuracy', 'zeroshot_test_')})"
        if base is not None:
            text += f"; best baseline {base.label} {base.cell('accuracy', with_ci=False)}"
        if len(c.llms) > 1:
            text += f"; LLM rank {c.ranks.get(r.name, '?')} of {len(c.llms)}"
        notes[r.name] = text
    for r in c.baselines:
        text = f"**{r.cell('accuracy')}** test accuracy"
        if llm is not None:
            text += f"; best LLM {llm.label} {llm.cell('accuracy', with_ci=False)}"
        notes[r.name] = text
    return notes


def mark_runs(c: report.Comparison, report_run_id: str, client: Any = None) -> None:
    """Descriptions and colours in MLflow: each model's run gets its headline and the colour the
    figures give it; the batch (or report) run the verdict and where the report is."""
    client = client or mlflow_client()
    colors = figures.model_colors(c)
    notes = run_notes(c)
    for r in c.llms + c.baselines:
        for rid in _run_ids(r):
            tracking.describe(rid, notes[r.name], client)
            client.set_tag(rid, contract.TAG_RUN_COLOR, colors[r.name])
    verdict = "\n".join(f"- {line}" for line in c.headline)
    where = f"{contract.ARTIFACT_COMPARISON}/{contract.REPORT_HTML}"
    tracking.describe(report_run_id, f"{verdict}\n\nReport: `{where}` (artifacts).", client)
    # Not a model: dark, so that it takes no model's colour in the charts.
    client.set_tag(report_run_id, contract.TAG_RUN_COLOR, BATCH_COLOR)


BATCH_COLOR = "#333333"  # near black: not one of the models' tab20 colours


def _run_ids(r: RunRecord) -> list[str]:
    return list(r.run_ids) or ([r.run_id] if r.run_id else [])


def recommend_next(experiment: str, batch: str | None, out: Path) -> tuple[Any, list[Path]]:
    """Diagnose the runs and write the next round's params files and REPORT.md into `out`;
    returns (the plan, the files written)."""
    loaded = load(experiment, batch or None)
    c = report.build(loaded.records, experiment, batch or None, loaded.skipped)
    plan = recommend.plan(c)
    return plan, recommend.write(plan, c, Path(out))
