"""helpers.workflow.notebooks and the notebooks themselves: shape, parameters, resolved params."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import papermill
import pytest

from helpers import config
from helpers.config import NOTEBOOKS_DIR, load_params
from helpers.workflow import notebooks


@pytest.mark.parametrize("name", notebooks.NOTEBOOKS)
def test_every_notebook_is_thin_and_parameterized(name):
    """One `parameters` cell of plain literals holding the shared parameters; no def or class;
    committed without outputs."""
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), ast.dump(node)
        ast.literal_eval(node.value)  # a literal: papermill's override replaces it as is
    assert set(notebooks.PARAMETERS) <= set(papermill.inspect_notebook(str(path)))
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code and "class " not in code
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_resolved_params_load_back_equal(tmp_path):
    """What a batch hands a notebook: every key resolved, the hash kept, paths relative to the
    user's file still found there, no _defaults.yaml merged a second time."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "_defaults.yaml").write_text("num_iters: 7\n")
    (folder / "m.yaml").write_text("lora_rank: 4\ndataset:\n  source: data.csv\n")
    params = load_params(folder / "m.yaml", {"seed": 3})
    path = config.write_resolved(params, tmp_path / "out" / "m.params.yaml")
    (folder / "_defaults.yaml").write_text("num_iters: 99\n")  # edited mid-batch: no effect
    back = load_params(path)
    assert back == params and back.hash() == params.hash()
    assert back.num_iters == 7 and back.seed == 3 and back.source_file == str(folder / "m.yaml")


def test_an_edited_resolved_file_is_refused(tmp_path):
    path = config.write_resolved(load_params(None), tmp_path / "r.yaml")
    path.write_text(path.read_text().replace("lora_rank: 8", "lora_rank: 16"))
    with pytest.raises(config.ParamsError, match="was edited"):
        load_params(path)


def test_a_parameter_the_notebook_does_not_declare_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown notebook parameter"):
        notebooks.check_parameters(NOTEBOOKS_DIR / "train.ipynb", {"params_pth": "x"})


def test_an_unparsable_parameter_line_is_explained(tmp_path):
    """papermill skips a parameters line whose comment holds '=': say so."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": config.KERNEL_NAME, "display_name": "tablora",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('run_id = ""  # a = b breaks the parser')]
    nb.cells[0].metadata["tags"] = ["parameters"]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(ValueError, match="'=' inside a comment"):
        notebooks.check_parameters(path, {"run_id": ""})


def test_a_failing_cell_is_named(tmp_path, mlflow_store, monkeypatch):
    """NotebookFailed carries the exception and the cell that raised; the executed copy stays."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": config.KERNEL_NAME, "display_name": "tablora",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('params_path = ""\noverrides = {}\nrun_id = ""'),
                nbformat.v4.new_code_cell('raise KeyError("no such column")')]
    nb.cells[0].metadata["tags"] = ["parameters"]
    monkeypatch.setattr(notebooks, "NOTEBOOKS_DIR", tmp_path)
    nbformat.write(nb, str(tmp_path / "boom.ipynb"))
    with pytest.raises(notebooks.NotebookFailed) as e:
        notebooks.execute("boom", load_params(None), output=tmp_path / "out.ipynb",
                          progress=False)
    assert e.value.ename == "KeyError" and "no such column" in e.value.evalue
    assert e.value.cell.startswith("raise KeyError") and (tmp_path / "out.ipynb").is_file()
    assert (tmp_path / "out.params.yaml").is_file()  # what the kernel was given


def test_four_commands_at_once_on_one_store(tmp_path, tiny_model_dir):
    """Regression: every command's kernel used `notebooks/kernel-ipc-N` sockets, and two commands
    started together took the same N ("Invalid Signature", no runs). Four at once, on one fresh
    store: all finish, every run is FINISHED, no socket file is left (issue 15)."""
    import os
    import subprocess
    import sys
    import tempfile

    import mlflow
    import yaml

    rows = [f"{i},{(i * 7) % 10},{'yes' if i % 2 else 'no'}" for i in range(24)]
    (tmp_path / "t.csv").write_text("a,b,y\n" + "\n".join(rows) + "\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "model_id": str(tiny_model_dir), "experiment": "together", "num_iters": 3,
        "batch_size": 2, "num_layers": 2, "steps_per_eval": 3, "val_batches": 1,
        "dataset": {"source": "t.csv", "target": "y", "positive_label": "yes",
                    "test_size": 0.25, "valid_size": 0.25},
        "baselines": {"models": ["majority", "logistic_l2"], "cv_folds": 2}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "TABLORA_RUNS": str(tmp_path / "runs"), "TABLORA_CACHE": str(tmp_path / "cache")}
    env.pop("TABLORA_OWNER", None)
    commands = [["baselines"], ["baselines"], ["train", "--set", "name=tiny-a"],
                ["train", "--set", "name=tiny-b"]]
    procs = [subprocess.Popen([sys.executable, "-m", "helpers", c[0], str(tmp_path / "p.yaml"),
                               *c[1:]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.pid, *p.communicate(timeout=900), p.returncode) for p in procs]

    for (_, _out, err, code), command in zip(results, commands, strict=True):
        assert code == 0, (command, err[-3000:])
        assert "Traceback" not in err and "Invalid Signature" not in err, err[-3000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        ["majority", "logistic_l2"] * 2 + ["tiny-a", "tiny-b"])
    assert {r.info.status for r in runs} == {"FINISHED"}
    # No socket or connection file left: not in the project, not in the system's temp folder.
    for folder in (config.PROJECT_ROOT, NOTEBOOKS_DIR, tmp_path, tmp_path / "runs"):
        assert not list(folder.glob("kernel-ipc*")) and not list(folder.glob("kernel-*.json"))
    pids = {str(pid) for pid, *_ in results}
    left = [p for p in Path(tempfile.gettempdir()).glob(f"{notebooks.KERNEL_DIR_PREFIX}*")
            if p.name[len(notebooks.KERNEL_DIR_PREFIX):].split("-")[0] in pids]
    assert not left


def test_a_killed_commands_kernel_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stale = tmp_path / f"{notebooks.KERNEL_DIR_PREFIX}{dead}-abc"
    (stale / "x").mkdir(parents=True)
    (stale / "kernel-ipc-1").write_text("")
    mine = notebooks._kernel_dir()
    assert not stale.exists() and mine.is_dir() and mine.parent == tmp_path
    assert mine.name.startswith(f"{notebooks.KERNEL_DIR_PREFIX}{os.getpid()}-")


@pytest.mark.parametrize("name", notebooks.NOTEBOOKS)
def test_notebooks_are_stored_as_jupyter_writes_them(name, tmp_path):
    """Regression: notebooks showed as modified as soon as JupyterLab opened them. Committed
    byte for byte as nbformat writes them, with the language_info the kernel reports (which
    JupyterLab writes into the notebook when the kernel starts); papermill's parameterized copy
    is stable too: reading and writing it back changes nothing."""
    import sys

    from ipykernel.ipkernel import IPythonKernel

    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    nbformat.write(nbformat.read(str(path), as_version=nbformat.NO_CONVERT), str(tmp_path / "a"))
    assert (tmp_path / "a").read_bytes() == path.read_bytes()
    info = nbformat.read(str(path), as_version=4).metadata["language_info"]
    expected = dict(IPythonKernel.language_info, version=info["version"])
    assert info == expected
    assert info["version"].rsplit(".", 1)[0] == "{}.{}".format(*sys.version_info[:2])
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(path), str(out), parameters={"run_id": "x"},
                               prepare_only=True, kernel_name=config.KERNEL_NAME,
                               progress_bar=False)
    notebooks.store_as_jupyter(out)  # what notebooks.execute does with papermill's copy
    before = out.read_bytes()
    nbformat.write(nbformat.read(str(out), as_version=nbformat.NO_CONVERT), str(out))
    assert out.read_bytes() == before
    assert '"run_id = \\"x\\"' in before.decode()  # papermill's parameters are in it


@pytest.mark.parametrize("name", notebooks.NOTEBOOKS)
def test_notebook_parameters_are_typed_for_papermill(name):
    """`papermill --help-notebook` shows each parameter's type and help, not "Unknown type"."""
    params = papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{name}.ipynb"))
    for key, p in params.items():
        assert p["inferred_type_name"] in ("str", "dict"), (key, p)
        assert p["help"], f"{name}.ipynb: {key} has no comment"


def test_executed_notebooks_are_html_too(tmp_path, mlflow_store):
    """An executed notebook is logged with its HTML (nbconvert) beside it: MLflow's artifact
    view shows that, where the .ipynb is raw JSON. Outputs, images included, are in the page."""
    import mlflow

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('hello from the kernel')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="train: 32/32\n"),
                    nbformat.v4.new_output("display_data", {"image/png": TINY_PNG})]
    nb.cells = [cell]
    executed = tmp_path / "train.ipynb"
    nbformat.write(nb, str(executed))
    client = mlflow.MlflowClient(mlflow_store)
    run = client.create_run("0")
    notebooks.log_executed(client, run.info.run_id, executed)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "notebooks")}
    assert logged == {"notebooks/train.ipynb", "notebooks/train.html"}
    page = (tmp_path / "train.html").read_text()
    assert "train: 32/32" in page and f"data:image/png;base64,{TINY_PNG}" in page


# A 1x1 PNG.
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAAB"
            "JRU5ErkJggg==")


def test_progress_bars_print_text_in_executed_notebooks(monkeypatch):
    """Regression: a papermill run saved tqdm's widget as first drawn ("0/32"); there the text
    bar is used, whose last line (the final count) the saved copy keeps."""
    from tqdm.std import tqdm as text_bar

    from helpers import contract
    from helpers.llm import scoring

    monkeypatch.setenv(contract.ENV_NOTEBOOK, "/x/train.ipynb")
    assert scoring.tqdm_class() is text_bar


def test_cell_output_reaches_the_terminal_once(tmp_path):
    """Regression: papermill printed each stderr line of a cell twice (once more as a logged
    warning), so every progress bar update of a batch came out twice. The kernel knows its
    notebook (the runs' Source; text progress bars) and shows no MLflow download widget (saved
    as first drawn, it read "0/1" forever)."""
    import os
    import subprocess
    import sys

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": config.KERNEL_NAME, "display_name": "tablora",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('params_path = ""\noverrides = {}\nrun_id = ""'),
                nbformat.v4.new_code_cell("import sys\nprint('bar 7/7', file=sys.stderr)\n"
                                          "print('line to stdout')"),
                nbformat.v4.new_code_cell("import os\nprint(os.environ['TABLORA_NOTEBOOK'], os."
                                          "environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'])")]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, str(tmp_path / "echo.ipynb"))
    script = ("import sys\nfrom pathlib import Path\nfrom helpers.config import Params\n"
              "from helpers.workflow import notebooks\n"
              "notebooks.NOTEBOOKS_DIR = Path(sys.argv[1])\n"
              "notebooks.execute('echo', Params(), output=Path(sys.argv[1]) / 'out.ipynb', "
              "progress=False)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("bar 7/7") == 1 and proc.stdout.count("line to stdout") == 1
    assert f"{tmp_path / 'echo.ipynb'} false" in proc.stdout
