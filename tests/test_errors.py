"""Bad input, as a hostile or unlucky user gives it: every command that reads params or data
answers with exactly one `error:` line that names the key, column or file, exits 2, and prints no
traceback (issue 15). The table below runs in-process on prepare, train, evaluate and baselines
(errors found before a kernel starts); the last tests go through a notebook kernel.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from helpers import cli, config
from helpers.workflow import notebooks

COMMANDS = ("prepare", "train", "evaluate", "baselines")
GOOD = ("dataset:\n  source: good.csv\n  target: y\n  positive_label: 'yes'\n"
        "  test_size: 0.25\n  valid_size: 0.25\n")
SANDBOX_PAYLOAD = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"


def _csv(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


ROWS = [f"{20 + i},{1000 * (i % 5)},{'ab'[i % 2]},{'yes' if i % 2 else 'no'}" for i in range(24)]
DATA = {
    "good.csv": _csv("age,income,city,y", ROWS),
    "three.csv": _csv("age,y", [f"{i},{'abc'[i % 3]}" for i in range(24)]),
    "one.csv": _csv("age,y", [f"{i},yes" for i in range(24)]),
    "gaps.csv": _csv("age,y", [f"{i},{'yes' if i % 2 else ''}" for i in range(24)]),
    "header.csv": "age,y\n",
    "empty0.csv": "",
    "dup.csv": _csv("age,age,y", [f"{i},{i + 1},{'yes' if i % 2 else 'no'}" for i in range(24)]),
    "ids.csv": _csv("id,age,y", [f"{i % 3},{i},{'yes' if i % 2 else 'no'}" for i in range(24)]),
    "few.csv": _csv("age,y", ["1,yes", "2,no", "3,yes", "4,no"]),
    "data.xlsx": "not a spreadsheet",
}


def P(text: str) -> dict[str, str]:  # noqa: N802 - reads as a table column
    """The params file p.yaml with `text` (YAML, dedented)."""
    return {"p.yaml": textwrap.dedent(text)}


def D(**dataset: str) -> dict[str, str]:  # noqa: N802
    """p.yaml: the good dataset section with some keys replaced (values are YAML text)."""
    keys = {"source": "good.csv", "target": "y", "positive_label": "'yes'", "test_size": "0.25",
            "valid_size": "0.25", **dataset}
    return {"p.yaml": "dataset:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())}


# (id, files to write beside the data, arguments after `tablora <command>`, what the error line
# names). "{d}" is the folder of the files.
CASES = [
    # ---- the params file and its keys
    ("unknown key", P("lora_rnak: 8\n" + GOOD), ["{d}/p.yaml"], ["lora_rnak", "lora_rank"]),
    ("unknown dataset key", P("dataset:\n  tagret: y\n"), ["{d}/p.yaml"], ["dataset.tagret"]),
    ("wrong type", P("num_iters: lots\n" + GOOD), ["{d}/p.yaml"], ["'num_iters'", "integer"]),
    ("number as text", P("learning_rate: fast\n" + GOOD), ["{d}/p.yaml"], ["'learning_rate'"]),
    ("out of range", P("lora_dropout: 1.5\n" + GOOD), ["{d}/p.yaml"], ["'lora_dropout'"]),
    ("zero learning rate", P("learning_rate: 0\n" + GOOD), ["{d}/p.yaml"], ["'learning_rate'"]),
    ("not a choice", P("lr_schedule: linear\n" + GOOD), ["{d}/p.yaml"], ["'lr_schedule'"]),
    ("not a bool", P("mask_prompt: maybe\n" + GOOD), ["{d}/p.yaml"], ["'mask_prompt'"]),
    ("no training rows", D(test_size="0.5", valid_size="0.5"), ["{d}/p.yaml"],
     ["dataset.test_size + dataset.valid_size"]),
    ("name ..", P("name: '..'\n" + GOOD), ["{d}/p.yaml"], ["'name'", "plain file name"]),
    ("name with /", P("name: a/b\n" + GOOD), ["{d}/p.yaml"], ["'name'"]),
    ("output_dir outside", P("output_dir: /etc/tablora\n" + GOOD), ["{d}/p.yaml"],
     ["'output_dir'", "TABLORA_OUTPUT_ROOT"]),
    ("output_dir escapes runs/", P("output_dir: runs/../../elsewhere\n" + GOOD), ["{d}/p.yaml"],
     ["'output_dir'"]),
    ("section not a mapping", P("dataset: 5\n"), ["{d}/p.yaml"], ["'dataset'", "mapping"]),
    ("features not a list", D(features="5"), ["{d}/p.yaml"], ["'dataset.features'"]),
    ("YAML syntax", P("num_iters: [1, 2\n"), ["{d}/p.yaml"], ["p.yaml", "not valid YAML"]),
    ("not a mapping", P("- a\n- b\n"), ["{d}/p.yaml"], ["p.yaml", "mapping"]),
    ("reserved key", P("tablora_resolved: 1\n" + GOOD), ["{d}/p.yaml"], ["tablora_resolved"]),
    ("no such file", {}, ["{d}/nope.yaml"], ["nope.yaml", "not found"]),
    ("a folder", {}, ["{d}"], ["is a folder"]),
    ("--set without =", P(GOOD), ["{d}/p.yaml", "--set", "num_iters"], ["--set 'num_iters'"]),
    ("--set bad value", P(GOOD), ["{d}/p.yaml", "--set", "num_iters=lots"], ["'num_iters'"]),
    ("--set bad YAML", P(GOOD), ["{d}/p.yaml", "--set", "lora_keys=[q"], ["--set 'lora_keys"]),
    ("--set no section", P(GOOD), ["{d}/p.yaml", "--set", "foo.bar=1"], ["'foo.bar'"]),
    ("--set bad name", P(GOOD), ["{d}/p.yaml", "--set", "name=../x"], ["'name'"]),
    # ---- the prompt template (a params value that must not run code)
    ("template syntax", P(GOOD + "prompt: {template: '{{ row[ }}'}\n"), ["{d}/p.yaml"],
     ["prompt.template", "syntax"]),
    ("template sandbox", P(GOOD + f'prompt: {{template: "{SANDBOX_PAYLOAD}"}}\n'),
     ["{d}/p.yaml"], ["prompt.template", "sandbox"]),
    ("template variable", P(GOOD + "prompt: {template: '{{ nope }}'}\n"), ["{d}/p.yaml"],
     ["prompt.template", "nope"]),
    ("template file", P(GOOD + "prompt: {template: mine.j2}\n"), ["{d}/p.yaml"],
     ["prompt.template", "mine.j2"]),
    ("template name", P(GOOD + "prompt: {template: fancy}\n"), ["{d}/p.yaml"],
     ["prompt.template", "fancy"]),
    ("template error", P(GOOD + "prompt: {template: \"{{ row['age'] + 1 }}\"}\n"),
     ["{d}/p.yaml"], ["prompt.template", "TypeError"]),
    # ---- the table (issue 3's list, and what it missed)
    ("source missing", D(source="missing.csv"), ["{d}/p.yaml"], ["dataset.source", "missing.csv"]),
    ("unknown built-in", D(source="builtin:iris"), ["{d}/p.yaml"], ["builtin:iris"]),
    ("source a folder", D(source="."), ["{d}/p.yaml"], ["dataset.source", "folder"]),
    ("file type", D(source="data.xlsx"), ["{d}/p.yaml"], ["data.xlsx", "unsupported"]),
    ("not UTF-8", D(source="latin1.csv"), ["{d}/p.yaml"], ["latin1.csv"]),
    ("empty file", D(source="empty0.csv"), ["{d}/p.yaml"], ["empty0.csv"]),
    ("header only", D(source="header.csv"), ["{d}/p.yaml"], ["header.csv", "no rows"]),
    ("repeated column", D(source="dup.csv"), ["{d}/p.yaml"], ["'age'", "more than once"]),
    ("no target", D(target="nope"), ["{d}/p.yaml"], ["'nope'", "dataset.target"]),
    ("three classes", D(source="three.csv"), ["{d}/p.yaml"], ["'y'", "3 classes"]),
    ("one class", D(source="one.csv"), ["{d}/p.yaml"], ["'y'", "1 classes"]),
    ("target gaps", D(source="gaps.csv"), ["{d}/p.yaml"], ["'y'", "empty in 12 rows"]),
    ("label not a value", D(positive_label="maybe"), ["{d}/p.yaml"],
     ["dataset.positive_label", "'maybe'"]),
    ("unquoted yes", D(positive_label="yes"), ["{d}/p.yaml"],
     ["dataset.positive_label", 'positive_label: "yes"']),
    ("no such feature", D(features="[agee]"), ["{d}/p.yaml"], ["'agee'", "'age'"]),
    ("target as feature", D(features="[age, y]"), ["{d}/p.yaml"], ["target 'y'"]),
    ("feature twice", D(features="[age, age]"), ["{d}/p.yaml"], ["['age']", "more than once"]),
    ("description of nothing", D(feature_descriptions="{salary: pay}"), ["{d}/p.yaml"],
     ["'salary'"]),
    ("repeated row ids", D(source="ids.csv"), ["{d}/p.yaml"], ["'id'", "repeated"]),
    ("too few rows", D(source="few.csv"), ["{d}/p.yaml"], ["dataset.test_size"]),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The data files, a temporary MLflow store, cache and runs folder for the whole table."""
    d = tmp_path_factory.mktemp("bad-input")
    for name, text in DATA.items():
        (d / name).write_text(text)
    (d / "latin1.csv").write_bytes(_csv("âge,y", ["1,oui", "2,non"] * 6).encode("latin-1"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d}/mlflow.db")
        mp.setattr(config, "CACHE_DIR", d / "cache")
        mp.setattr(config, "RUNS_DIR", d / "runs")
        mp.setattr(notebooks, "RUNS_DIR", d / "runs")
        yield d


def _one_error(capsys, argv: list[str]) -> str:
    """Run `tablora argv` in-process; assert exit 2, one `error:` line, no traceback; return it."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (argv, code, out[-2000:], err[-2000:])
    assert len(errors) == 1, err
    assert "Traceback" not in err + out
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_on_every_command(case, folder, capsys):
    _, files, args, expected = case
    d = folder / case[0].replace(" ", "_").replace("/", "_")
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text.replace("MARKER", str(d / "MARKER")))
    for name in DATA:
        if not (d / name).exists():
            (d / name).symlink_to(folder / name)
    if not (d / "latin1.csv").exists():
        (d / "latin1.csv").symlink_to(folder / "latin1.csv")
    argv = [a.format(d=d) for a in args]
    for command in COMMANDS:
        line = _one_error(capsys, [command, *argv])
        for text in expected:
            assert text in line, (command, line)
    assert not (d / "MARKER").exists()  # nothing ran from the params


def test_batch_errors_before_it_starts(folder, capsys, tmp_path):
    """Whole-batch problems (its paths and options): one line, exit 2. (A broken params file
    inside a batch is that model's FAILED run: test_batch.py.)"""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.yaml").write_text(GOOD.replace("good.csv", str(folder / "good.csv")))
    (tmp_path / "a" / "n.yaml").write_text("experiment: other\n")
    (tmp_path / "empty").mkdir()
    a = str(tmp_path / "a" / "m.yaml")
    for argv, expected in [
        (["batch", str(tmp_path / "nope")], "no such params file or folder"),
        (["batch", str(tmp_path / "empty")], "no params files"),
        (["batch", a, "--seeds", "1,x"], "--seeds '1,x'"),
        (["batch", a, "--only", "ghost"], "--only ghost"),
        (["batch", str(tmp_path / "a")], "experiment"),
    ]:
        assert expected in _one_error(capsys, argv)


def test_store_errors_name_the_store_or_the_run(folder, capsys, monkeypatch):
    p = folder / "store.yaml"
    p.write_text(GOOD.replace("good.csv", str(folder / "good.csv")))
    line = _one_error(capsys, ["train", str(p), "--run-id", "0123456789abcdef"])
    assert "run '0123456789abcdef' is not in the MLflow store" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/no/such/dir/mlflow.db")
    line = _one_error(capsys, ["batch", str(p)])
    assert "MLFLOW_TRACKING_URI" in line and "no/such/dir" in line
    line = _one_error(capsys, ["train", str(p), "--run-id", "0123456789abcdef"])
    assert "MLFLOW_TRACKING_URI" in line


def test_debug_shows_the_traceback(folder, capsys, monkeypatch):
    p = folder / "debug.yaml"
    p.write_text("lora_rnak: 8\n")
    with pytest.raises(config.ParamsError):
        cli.main(["prepare", str(p), "--debug"])
    monkeypatch.setenv("TABLORA_DEBUG", "1")
    with pytest.raises(config.ParamsError):
        cli.main(["prepare", str(p)])
    monkeypatch.setenv("TABLORA_DEBUG", "0")
    assert cli.main(["prepare", str(p)]) == 2


# ---------------------------------------------------------------- raised inside the kernel


@pytest.fixture
def kernel_folder(folder, tmp_path, tiny_model_dir, mlflow_store, monkeypatch):
    monkeypatch.setenv("TABLORA_CACHE", str(folder / "cache"))  # the kernel's data cache
    monkeypatch.setenv("TABLORA_RUNS", str(tmp_path / "runs"))  # and its adapters
    return tmp_path


KERNEL_CASES = [
    # (id, command, params lines over the good table, extra args, what the error line names)
    ("model unavailable", "train", "model_id: /no/such/model\n", [],
     ["model '/no/such/model'", "no such directory"]),
    # Regression: a quote in the run name broke MLflow's filter string (issue 15).
    ("quote in the name", "evaluate", "model_id: {tiny}\nname: o'x\n", [],
     ["no FINISHED run named \"o'x\""]),
    ("unknown baseline", "baselines", "baselines: {{models: [svm]}}\n", [],
     ["unknown baseline 'svm'", "baselines.models"]),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_known_errors_inside_the_kernel_are_one_line(case, folder, kernel_folder,
                                                     tiny_model_dir, capfd):
    _, command, lines, args, expected = case
    p = kernel_folder / "p.yaml"
    p.write_text(lines.format(tiny=tiny_model_dir) + "max_seq_length: 2048\n"
                 + GOOD.replace("good.csv", str(folder / "good.csv")))
    code = cli.main([command, str(p), *args])
    out, err = capfd.readouterr()  # the kernel's own output included (fd level)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    for text in expected:
        assert text in errors[0], errors[0]


def test_an_unknown_error_keeps_its_traceback(folder, kernel_folder, capfd, monkeypatch):
    """A bug is not a known error: the kernel's traceback is shown, then ours."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": config.KERNEL_NAME, "display_name": "tablora",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('params_path = ""\noverrides = {}\nrun_id = ""'),
                nbformat.v4.new_code_cell('{}["no such key"]')]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, str(kernel_folder / "baselines.ipynb"))
    monkeypatch.setattr(notebooks, "NOTEBOOKS_DIR", kernel_folder)
    p = Path(kernel_folder / "p.yaml")
    p.write_text(GOOD.replace("good.csv", str(folder / "good.csv")))
    with pytest.raises(notebooks.NotebookFailed, match="KeyError"):
        cli.main(["baselines", str(p)])
    err = capfd.readouterr().err
    assert "the notebook's kernel raised" in err and "KeyError" in err
    assert not any(line.startswith("error:") for line in err.splitlines())
