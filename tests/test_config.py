"""helpers.config: params files are validated with messages that name the file, key and fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.config import DEMO_PARAMS, Params, ParamsError, load_params


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_demo_params_load():
    p = load_params(DEMO_PARAMS)
    assert p.name == "smollm2-135m" and p.model_id.startswith("builtin:")
    assert p.source_file == str(DEMO_PARAMS.resolve())
    # Regression: the demo stopped after a third of an epoch (issue 14); now a budget in epochs
    # with early stopping, and the threshold rule that every model shares.
    assert p.budget[0] == "num_epochs" and p.budget[1] >= 2 and p.early_stopping_patience > 0
    assert p.threshold_mode == "tune"


def test_typo_names_the_file_and_suggests_the_key(tmp_path):
    f = write(tmp_path / "m.yaml", "lora_rnak: 8\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    assert str(f) in str(err.value) and "'lora_rnak'" in str(err.value)
    assert "Did you mean 'lora_rank'?" in str(err.value)


def test_typo_in_a_section(tmp_path):
    f = write(tmp_path / "m.yaml", "dataset:\n  tset_size: 0.3\n")
    with pytest.raises(ParamsError, match=r"'dataset\.tset_size'.*Did you mean 'test_size'"):
        load_params(f)


def test_wrong_type(tmp_path):
    f = write(tmp_path / "m.yaml", "num_iters: many\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    assert str(f) in str(err.value)
    assert "'num_iters' = 'many'" in str(err.value) and "an integer" in str(err.value)


def test_wrong_choice_lists_the_choices(tmp_path):
    f = write(tmp_path / "m.yaml", "scoring: vibes\n")
    with pytest.raises(ParamsError, match="one of 'logprob', 'generate'"):
        load_params(f)


@pytest.mark.parametrize("line, key", [
    ("lora_dropout: 1.5", "lora_dropout"),
    ("lora_rank: 0", "lora_rank"),
    ("learning_rate: 3", "learning_rate"),
    ("dataset:\n  test_size: 1.2", "dataset.test_size"),
])
def test_out_of_range(tmp_path, line, key):
    f = write(tmp_path / "m.yaml", line + "\n")
    with pytest.raises(ParamsError, match=f"{str(f)}: '{key}' = .* out of range"):
        load_params(f)


def test_splits_must_leave_training_rows(tmp_path):
    f = write(tmp_path / "m.yaml", "dataset:\n  test_size: 0.5\n  valid_size: 0.5\n")
    with pytest.raises(ParamsError, match="leaves no training rows"):
        load_params(f)


def test_yaml_1e_minus_5_is_a_float(tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string; the loader turns it into the number meant.
    f = write(tmp_path / "m.yaml", "learning_rate: 1e-5\nlora_alpha: 32\n")
    p = load_params(f)
    assert p.learning_rate == 1e-5 and isinstance(p.learning_rate, float)
    assert p.lora_alpha == 32.0 and isinstance(p.lora_alpha, float)


def test_defaults_file_is_merged_under_the_model_file(tmp_path):
    write(tmp_path / "_defaults.yaml", """\
        num_iters: 7
        batch_size: 2
        dataset:
          test_size: 0.3
          split_seed: 1
    """)
    f = write(tmp_path / "small.yaml", """\
        batch_size: 8
        dataset:
          split_seed: 3
    """)
    p = load_params(f)
    assert p.name == "small"  # the file name when the file has none
    assert (p.num_iters, p.batch_size) == (7, 8)
    assert (p.dataset.test_size, p.dataset.split_seed) == (0.3, 3)
    assert p.dataset.source == "builtin:breast_cancer"  # untouched section keys keep defaults


def test_typo_in_the_defaults_file_names_that_file(tmp_path):
    defaults = write(tmp_path / "_defaults.yaml", "num_itres: 7\n")
    f = write(tmp_path / "m.yaml", "num_iters: 5\n")
    with pytest.raises(ParamsError, match=f"{defaults}: unknown key 'num_itres'"):
        load_params(f)


def test_dotted_overrides(tmp_path):
    f = write(tmp_path / "m.yaml", "num_iters: 5\ndataset:\n  test_size: 0.3\n")
    p = load_params(f, {"num_iters": 9, "dataset.test_size": 0.25, "learning_rate": "2e-4"})
    assert (p.num_iters, p.dataset.test_size, p.learning_rate) == (9, 0.25, 2e-4)
    assert p.flat()["dataset.test_size"] == 0.25
    assert p.replace(**{"prompt.digits": 2}).prompt.digits == 2
    with pytest.raises(ParamsError, match="unknown key 'foo.bar'"):
        load_params(f, {"foo.bar": 1})
    with pytest.raises(ParamsError, match="Did you mean 'valid_size'"):
        load_params(f, {"dataset.valid_sise": 0.1})


def test_hash_follows_the_values_not_the_file(tmp_path):
    a = load_params(write(tmp_path / "a" / "m.yaml", "num_iters: 5\n"))
    b = load_params(write(tmp_path / "b" / "m.yaml", "num_iters: 5\n"))
    assert a.hash() == b.hash() != a.replace(num_iters=6).hash()
    assert isinstance(a, Params) and a.lora_scale == a.lora_alpha / a.lora_rank


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_not_a_mapping(tmp_path):
    f = write(tmp_path / "m.yaml", "- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(f)


def test_cli_prepare_missing_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "helpers", "prepare", "missing.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing.yaml: params file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_dir_must_stay_inside_the_allowed_roots(tmp_path, monkeypatch):
    # Regression: output_dir pointed anywhere, and training then deleted files there (issue 15).
    from helpers import config

    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.delenv(config.ENV_OUTPUT_ROOT, raising=False)
    p = write(tmp_path / "m.yaml", "num_iters: 5\n")
    for outside in (str(tmp_path / "elsewhere"), "/etc", str(tmp_path / "runs"),
                    str(tmp_path / "runs" / ".." / "x"), "runs/../../x"):
        with pytest.raises(ParamsError, match="'output_dir'.*outside the folders"):
            load_params(p, {"output_dir": outside})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ParamsError, match="'output_dir'"):  # a link out of runs/ is out
        load_params(p, {"output_dir": str(tmp_path / "runs" / "link" / "a")})
    assert load_params(p, {"output_dir": str(tmp_path / "runs" / "a")}).adapter_dir == (
        tmp_path / "runs" / "a")
    assert load_params(p, {"output_dir": "runs/adapters/x"}).output_dir == "runs/adapters/x"
    monkeypatch.setenv(config.ENV_OUTPUT_ROOT, str(tmp_path / "elsewhere"))
    assert load_params(p, {"output_dir": str(tmp_path / "elsewhere" / "a")}).output_dir


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "", " a", "-x",
                                  "x" * 101, "a\nb", 'say "hi"'])
def test_name_is_a_plain_file_name(tmp_path, name):
    p = write(tmp_path / "m.yaml", "num_iters: 5\n")
    with pytest.raises(ParamsError, match="'name'.*plain file name"):
        load_params(p, {"name": name})


def test_names_with_quotes_and_spaces_are_fine(tmp_path):
    p = write(tmp_path / "m.yaml", "num_iters: 5\n")
    assert load_params(p, {"name": "o'x v2 (big)"}).name == "o'x v2 (big)"


def test_a_folder_is_not_a_params_file(tmp_path):
    with pytest.raises(ParamsError, match="is a folder, not a params file"):
        load_params(tmp_path)
def test_one_training_budget_num_iters_or_num_epochs(tmp_path):
    from helpers.config import DEFAULT_EPOCHS

    assert load_params(write(tmp_path / "a.yaml", "name: a\n")).budget == (
        "num_epochs", DEFAULT_EPOCHS)
    with pytest.raises(ParamsError, match="both set: keep one of them"):
        load_params(write(tmp_path / "b.yaml", "num_iters: 5\nnum_epochs: 2\n"))
    # A model file's num_epochs replaces the defaults file's num_iters (and the reverse).
    folder = tmp_path / "round"
    write(folder / "_defaults.yaml", "num_iters: 600\n")
    assert load_params(write(folder / "m.yaml", "num_epochs: 2.5\n")).budget == (
        "num_epochs", 2.5)
    p = load_params(write(folder / "n.yaml", "batch_size: 2\n"))
    assert p.budget == ("num_iters", 600)
    assert p.replace(num_epochs=1).budget == ("num_epochs", 1.0)
    assert p.replace(num_epochs=1).replace(num_iters=7).budget == ("num_iters", 7)
    with pytest.raises(ParamsError, match="num_epochs"):
        load_params(write(tmp_path / "c.yaml", "num_epochs: -1\n"))


def test_every_params_key_is_in_the_generated_key_list():
    """`tablora params` lists every key with its meaning, read from the comment above the field
    in config.py: a new field without a comment fails here (the list cannot drift)."""
    from helpers import config

    docs = {d.key: d for d in config.key_docs()}
    assert set(docs) == set(config.flat_types()), "keys missing from or extra in key_docs()"
    undocumented = sorted(k for k, d in docs.items() if not d.doc)
    assert not undocumented, (f"add a comment line above these fields in config.py: "
                              f"{undocumented}")
    assert docs["val_batches"].doc.startswith("Validation batches per evaluation")
    assert docs["dataset.split_seed"].default == 42 and docs["lora_rank"].allowed
    assert docs["baselines.models"].default == Params().baselines.models
    # A section header above a field is not the field's meaning.
    assert not docs["learning_rate"].doc.startswith("Optimisation")


def test_key_docs_read_comments_not_strings(monkeypatch):
    """A regression guard for the parser: only the comment block right above a field counts (a
    blank line ends it), and a '#' inside a default string is not a comment."""
    from helpers import config

    source = textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Params:
            # A header, then a blank line.

            # The meaning of a.
            a: int = 1
            b: str = "# not a comment"
            c: int = 2  # trailing
    ''')
    module = type(sys)("fake_config")
    monkeypatch.setitem(sys.modules, "fake_config", module)
    exec(compile(source, "fake_config.py", "exec"), module.__dict__)  # noqa: S102
    docs = {d.key: d.doc for d in config._key_docs(source, module.Params)}
    assert docs == {"a": "The meaning of a.", "b": "", "c": "trailing"}


def test_task_keys_of_the_other_task_are_refused():
    with pytest.raises(ParamsError, match="positive_label.*multiclass"):
        load_params(None, {"dataset.task": "multiclass", "dataset.positive_label": "yes"})
    with pytest.raises(ParamsError, match="prompt.answers.*binary"):
        load_params(None, {"dataset.task": "binary", "prompt.answers": {"a": "A"}})
    with pytest.raises(ParamsError, match="dataset.task"):
        load_params(None, {"dataset.task": "multi"})
    p = load_params(None, {"dataset.source": "builtin:wine", "prompt.answers": {"Barbera": "B"}})
    assert p.dataset.task == "" and p.prompt.answers == {"Barbera": "B"}
