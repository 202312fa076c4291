"""The `tablora` command: its sub-commands, and clear errors with a non-zero exit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("model", "prepare", "train", "evaluate", "baselines", "batch", "compare",
                    "recommend"):
        assert command in out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "tablora"
    assert script.exists() or shutil.which("tablora")


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fly"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_model_defaults_to_the_builtin_model():
    args = cli.build_parser().parse_args(["model"])
    assert args.model_id == "builtin:smollm2-135m-instruct" and args.dequantize == "auto"


def test_user_facing_errors_print_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such directory" in err
    assert "Traceback" not in err


def test_params_errors_exit_2(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("lora_rnak: 8\n")
    assert cli.main(["prepare", str(tmp_path / "m.yaml")]) == 2
    assert "Did you mean 'lora_rank'?" in capsys.readouterr().err


def test_overrides_are_read_as_yaml():
    assert cli._overrides(["num_iters=5", "dataset.test_size=0.3", "name=a=b"]) == {
        "num_iters": 5, "dataset.test_size": 0.3, "name": "a=b"}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        cli._overrides(["num_iters"])


def test_bad_override_value_exits_2(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("num_iters: 5\n")
    assert cli.main(["prepare", str(tmp_path / "m.yaml"), "--set", "num_iters=lots"]) == 2
    assert "'num_iters' = 'lots'" in capsys.readouterr().err


def test_python_m_helpers_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "helpers", "model", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--dequantize" in proc.stdout


def _subparsers() -> dict:
    import argparse

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_argument_has_help_and_its_default(capsys):
    """Each option of each command says what it is; one with a default says which; each
    command ends with examples."""
    import argparse

    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"tablora {name}: {action.dest} has no help text"
        text = parser.format_help()
        assert "examples:\n  tablora " in text, f"tablora {name}: no examples"
        for action in parser._actions:
            if (action.help and action.help != argparse.SUPPRESS and action.default
                    not in (None, False, [], argparse.SUPPRESS) and not action.required
                    and (action.option_strings or action.nargs == "?")):
                assert f"(default: {action.default})" in " ".join(text.split()), (
                    f"tablora {name}: the default of {action.dest} is not shown")


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tablora {version('tablora')}"


def test_params_lists_every_key(capsys, tmp_path):
    """`tablora params` is generated from config.py: every key with its default and meaning; its
    YAML form is a params file that loads back to the defaults."""
    from helpers import config

    assert cli.main(["params"]) == 0
    text = capsys.readouterr().out
    for d in config.key_docs():
        assert f"\n{d.key}  (" in "\n" + text, d.key
    assert "steps_per_eval  (an integer; default 50)" in text
    assert cli.main(["params", "val_batches", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| `val_batches` | `-1` | ")
    assert cli.main(["params", "--format", "yaml"]) == 0
    (tmp_path / "all.yaml").write_text(capsys.readouterr().out)
    loaded = config.load_params(tmp_path / "all.yaml")
    assert loaded.to_dict() == config.Params(name=loaded.name).to_dict()
    assert cli.main(["params", "no-such-key"]) == 2
    assert "no params key contains 'no-such-key'" in capsys.readouterr().err
