"""Run the project's notebooks with papermill, the way `tablora train|evaluate|baselines|batch` do.

Every notebook takes the same parameters (see NOTEBOOK_PARAMETERS): the params file, overrides of
its keys, and the MLflow run to write into. papermill only warns about a misspelled parameter, so
the names are checked against the notebook's `parameters` cell first.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import contract, tracking
from helpers.config import (
    KERNEL_NAME,
    NOTEBOOKS_DIR,
    RUNS_DIR,
    Params,
    load_params,
    write_resolved,
)

NOTEBOOKS = ("train", "evaluate", "baselines", "compare")
# Every notebook declares these in its `parameters` cell (plain literals: docs/ARCHITECTURE.md).
PARAMETERS = ("params_path", "overrides", "run_id")


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the failing cell and the exception, for the batch summary."""

    def __init__(self, notebook: str, output: Path, ename: str, evalue: str, cell: str):
        self.notebook, self.output, self.ename, self.evalue, self.cell = (
            notebook, output, ename, evalue, cell)
        first = cell.strip().splitlines()[0] if cell.strip() else "?"
        super().__init__(f"{notebook}: {ename}: {evalue} (in cell starting `{first[:80]}`; "
                         f"executed notebook: {output})")


@dataclass
class NotebookResult:
    notebook: str
    output: Path
    seconds: float


def notebook_path(name: str) -> Path:
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: notebook not found (known: {', '.join(NOTEBOOKS)})")
    return path


def ensure_kernel() -> str:
    """The Jupyter kernel papermill uses: `tablora`, registered by `make setup` for .venv."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        # Not registered (e.g. installed without `make setup`): register this interpreter.
        from ipykernel.kernelspec import install

        install(kernel_name=KERNEL_NAME, display_name="Python (tablora)", prefix=sys.prefix)
    return KERNEL_NAME


def _kernel_config() -> Any:
    """Talk to the kernel over local IPC sockets, not TCP on localhost: nothing listens on a
    network port, and ipykernel has no reason to warn about unencrypted TCP for every notebook."""
    from traitlets.config import Config

    if os.name != "posix":
        return Config()
    return Config({"KernelManager": {"transport": "ipc"}})


def check_parameters(path: Path, parameters: dict[str, Any]) -> None:
    import papermill

    declared = papermill.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{path}: unknown notebook parameter(s) {unknown}; the notebook's "
                         f"parameters cell declares {sorted(declared)}"
                         f"{_unparsed_hint(path, unknown)}")


def _unparsed_hint(path: Path, names: list[str]) -> str:
    """papermill skips a parameter line whose comment holds a '=' ("Unable to parse line"):
    the name is then missing although the cell assigns it. Say so, since the cell looks fine."""
    import re

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    source = cells[0].source if cells else ""
    assigned = [n for n in names if re.search(rf"^\s*{re.escape(n)}\s*(:[^=]*)?=", source, re.M)]
    if not assigned:
        return ""
    return (f". The cell does assign {assigned}, but papermill could not parse those lines: "
            "a '=' inside a comment breaks its parser; remove it from the comment")


def execute(name: str, params: Params | str | Path, overrides: dict[str, Any] | None = None,
            run_id: str = "", output: str | Path | None = None, progress: bool = True,
            attach: bool = True, **extra: Any) -> NotebookResult:
    """Execute notebooks/<name>.ipynb on resolved params; returns where the executed copy is.

    params: the resolved Params (or a params file, loaded here with `overrides`, so that a bad
    file fails fast with its own message instead of inside a kernel). They are written beside the
    executed copy as a resolved params file (config.write_resolved), the notebook's params_path:
    the kernel reads every value from there, nothing from the user's file again.
    Raises NotebookFailed (with the failing cell) when a cell raises.
    attach: log the executed copy, failed or not, as `notebooks/<file>` to every MLflow run the
    notebook opened (`tablora batch` passes False: it files notebooks under its own runs).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(params, Params):
        params = load_params(params, overrides)
    elif overrides:
        params = params.replace(**overrides)
    src = notebook_path(name)
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = RUNS_DIR / "notebooks" / f"{stamp}-{name}-{params.name}.ipynb"
    output = Path(output)
    resolved = write_resolved(params, output.with_name(f"{output.stem}.params.yaml"))
    parameters = {"params_path": str(resolved), "overrides": {}, "run_id": run_id, **extra}
    check_parameters(src, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The kernel inherits our environment: give it the absolute tracking URI.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    ids_file = output.with_name(f".{output.name}.runs")
    ids_file.unlink(missing_ok=True)
    previous = os.environ.get(contract.ENV_RUN_IDS_FILE)
    os.environ[contract.ENV_RUN_IDS_FILE] = str(ids_file)
    # The kernel's runs name this notebook as their Source, and its progress bars print text;
    # MLflow's artifact-download bar, a widget, would be saved as first drawn: none.
    kernel_env = {contract.ENV_NOTEBOOK: str(src), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved_env = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(src), str(output), parameters=parameters,
                                   kernel_name=ensure_kernel(), cwd=str(src.parent),
                                   progress_bar=progress and sys.stderr.isatty(),
                                   # the cells' streams, once each (log_output would also
                                   # log stderr as warnings: every line printed twice)
                                   log_output=False, stdout_file=sys.stdout,
                                   stderr_file=sys.stderr, config=_kernel_config(),
                                   # a text progress bar's updates: its last line is kept
                                   coalesce_streams=True)
    except PapermillExecutionError as e:
        raise NotebookFailed(name, output, e.ename, e.evalue, _failing_cell(output, e)) from None
    finally:
        if previous is None:
            os.environ.pop(contract.ENV_RUN_IDS_FILE, None)
        else:
            os.environ[contract.ENV_RUN_IDS_FILE] = previous
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        store_as_jupyter(output)
        if attach:
            _attach(output, ids_file)
        ids_file.unlink(missing_ok=True)
    return NotebookResult(name, output, time.perf_counter() - t0)


def _attach(output: Path, ids_file: Path) -> None:
    """Log the executed notebook to the runs listed in ids_file (a failure here only warns:
    the notebook's own results are already in MLflow)."""
    import mlflow

    try:
        run_ids = list(dict.fromkeys(ids_file.read_text().split()))
    except OSError:
        return  # the notebook opened no run (e.g. it failed before)
    if not output.is_file():
        return
    client = mlflow.MlflowClient(tracking.tracking_uri())
    html = to_html(output)
    for rid in run_ids:
        try:
            log_executed(client, rid, output, html)
        except Exception as e:  # noqa: BLE001 - a store hiccup must not hide the notebook's result
            print(f"warning: could not attach {output} to run {rid}: {e}", file=sys.stderr)


def store_as_jupyter(path: Path) -> None:
    """Rewrite a notebook file as nbformat (and so JupyterLab) writes it: papermill leaves out
    the final newline, so opening and saving an executed copy would change it."""
    import nbformat

    try:
        nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    except Exception:  # noqa: BLE001 - missing or half-written after a crash: leave it
        return
    nbformat.write(nb, str(path))


def to_html(executed: Path) -> Path | None:
    """The executed notebook as HTML beside it (nbconvert's lab template, figures embedded):
    what MLflow's artifact view and a browser display, where the .ipynb shows as raw JSON.
    None (with a warning) when it cannot be converted: the .ipynb still counts."""
    from nbconvert import HTMLExporter

    out = executed.with_suffix(".html")
    try:
        import nbformat

        body, _ = HTMLExporter(template_name="lab").from_notebook_node(
            nbformat.read(str(executed), as_version=4))
        out.write_text(body, encoding="utf-8")
    except Exception as e:  # noqa: BLE001 - a half-written notebook after a crash, say
        print(f"warning: could not convert {executed} to HTML: {e}", file=sys.stderr)
        return None
    return out


def log_executed(client: Any, run_id: str, executed: Path, html: Path | None = None) -> None:
    """Log an executed notebook to a run under notebooks/: the .ipynb, and its HTML (made here
    unless given) beside it."""
    if html is None:
        html = to_html(executed)
    client.log_artifact(run_id, str(executed), contract.ARTIFACT_NOTEBOOKS)
    if html is not None:
        client.log_artifact(run_id, str(html), contract.ARTIFACT_NOTEBOOKS)


def _failing_cell(output: Path, e: Any) -> str:
    try:
        import nbformat

        nb = nbformat.read(str(output), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.get("execution_count") == e.exec_count:
                return cell.source
    except Exception:  # the executed copy may be unreadable after a crash
        pass
    return ""
