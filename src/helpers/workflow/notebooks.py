"""Run the project's notebooks with papermill, the way `tablora train|evaluate|baselines|batch` do.

Every notebook takes the same parameters (see NOTEBOOK_PARAMETERS): the params file, overrides of
its keys, and the MLflow run to write into. papermill only warns about a misspelled parameter, so
the names are checked against the notebook's `parameters` cell first.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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

NOTEBOOKS = ("train", "evaluate", "baselines", "compare", "curve", "tune")
# Every notebook declares these in its `parameters` cell (plain literals: docs/ARCHITECTURE.md).
PARAMETERS = ("params_path", "overrides", "run_id")


class NotebookError(ValueError):
    """A notebook that cannot be run with tablora's parameters (its parameters cell)."""


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the failing cell and the exception, for the batch summary."""

    def __init__(self, notebook: str, output: Path, ename: str, evalue: str, cell: str,
                 traceback: list[str] | None = None):
        self.notebook, self.output, self.ename, self.evalue, self.cell = (
            notebook, output, ename, evalue, cell)
        self.traceback = traceback or []  # the kernel's, as the notebook shows it (ANSI colours)
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


# Each execute() gets its own folder for the kernel's connection file and IPC sockets: with
# jupyter_client's default (relative `kernel-ipc-N`, N = the first free number) two commands
# started together picked the same sockets and broke each other ("Invalid Signature").
KERNEL_DIR_PREFIX = "tablora-kernel-"


def _kernel_config(kernel_dir: Path | None = None) -> Any:
    """Talk to the kernel over local IPC sockets in `kernel_dir`, not TCP on localhost: nothing
    listens on a network port, and ipykernel has no reason to warn about unencrypted TCP for
    every notebook. The kernel's own log is kept to critical messages: on Ctrl-C it logs a
    ZMQError traceback for a reply it can no longer send (a cell's error is in the notebook)."""
    from traitlets.config import Config

    quiet = {"NotebookClient": {"extra_arguments": ["--IPKernelApp.log_level=CRITICAL"]}}
    if os.name != "posix" or kernel_dir is None:
        return Config(quiet)
    return Config({**quiet, "KernelManager": {
        "transport": "ipc", "ip": str(kernel_dir / "kernel-ipc"),
        "connection_file": str(kernel_dir / "kernel.json")}})


def _kernel_dir() -> Path:
    """A fresh private folder for one kernel's sockets; folders left by killed commands (their
    process is gone) are removed on the way."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{KERNEL_DIR_PREFIX}*-*"):
        pid = old.name[len(KERNEL_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not tracking.pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{KERNEL_DIR_PREFIX}{os.getpid()}-", dir=tmp))


def check_data(params: Params) -> None:
    """Load, check and split the table of `params` here, before a kernel starts: a bad table or
    template fails in a second, with its one-line DataError (the kernel then reuses the split)."""
    import warnings

    from helpers import data

    with warnings.catch_warnings():  # the kernel shows them, with its output
        warnings.simplefilter("ignore")
        data.prepare(params)


def check_parameters(path: Path, parameters: dict[str, Any]) -> None:
    import papermill

    declared = papermill.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookError(f"{path}: unknown notebook parameter(s) {unknown}; the notebook's "
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
        # The pid keeps two commands started in the same second apart.
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
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
    # The kernel inherits these: where to list the runs it opens; their owner, this process (a
    # batch: the batch's; when it is gone, tracking.mark_stale_runs may end them KILLED); the
    # notebook, their Source; no MLflow download bar (a widget, saved as first drawn).
    kernel_env = {contract.ENV_RUN_IDS_FILE: str(ids_file), contract.ENV_OWNER: tracking.owner(),
                  contract.ENV_NOTEBOOK: str(src), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    kernel_dir = _kernel_dir()
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(src), str(output), parameters=parameters,
                                   kernel_name=ensure_kernel(), cwd=str(src.parent),
                                   progress_bar=progress and sys.stderr.isatty(),
                                   # the cells' streams, once each (log_output would also
                                   # log stderr as warnings: every line printed twice)
                                   log_output=False, stdout_file=sys.stdout,
                                   stderr_file=sys.stderr, config=_kernel_config(kernel_dir),
                                   # a text progress bar's updates: its last line is kept
                                   coalesce_streams=True)
    except PapermillExecutionError as e:
        raise NotebookFailed(name, output, e.ename, e.evalue, _failing_cell(output, e),
                             list(e.traceback or [])) from None
    finally:
        shutil.rmtree(kernel_dir, ignore_errors=True)
        for key, value in saved.items():
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
