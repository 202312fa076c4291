"""The `tablora` command: its sub-commands, and clear errors with a non-zero exit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli
from helpers.config import ParamsError


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("model", "prepare", "train", "evaluate", "baselines", "batch", "compare",
                    "recommend", "server", "memcheck", "predict", "export", "tune"):
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
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
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


def test_ctrl_c_prints_interrupted_and_kills_the_run(tmp_path, tiny_model_dir):
    """Ctrl-C (SIGINT to the terminal's process group) while training: "interrupted", exit
    130, no kernel traceback (it printed a ZMQError one, issue 15), the run ends KILLED."""
    import os
    import signal
    import threading

    import mlflow
    import yaml

    rows = [f"{i},{'yes' if i % 2 else 'no'}" for i in range(24)]
    (tmp_path / "t.csv").write_text("a,y\n" + "\n".join(rows) + "\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "model_id": str(tiny_model_dir), "experiment": "ctrl-c", "num_iters": 100000,
        "batch_size": 2, "num_layers": 2, "steps_per_eval": 100000, "val_batches": 1,
        "dataset": {"source": "t.csv", "target": "y", "positive_label": "yes",
                    "test_size": 0.25, "valid_size": 0.25}}))
    env = {k: v for k, v in os.environ.items() if k != "TABLORA_OWNER"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               TABLORA_RUNS=str(tmp_path / "runs"), TABLORA_CACHE=str(tmp_path / "cache"))
    # A short run first: MLX compiles its CPU kernels then (cached). A Ctrl-C during that compile
    # also kills the compiler (the kernel's child, same process group) and the run fails on the
    # missing library instead of ending KILLED; this test is about training.
    warm = subprocess.run([sys.executable, "-m", "helpers", "train", str(tmp_path / "p.yaml"),
                           "--set", "num_iters=4", "--set", "steps_per_eval=2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr[-2000:]
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`,
    # nohup) hands its children SIGINT ignored, and the Ctrl-C below would then do nothing.
    proc = subprocess.Popen([sys.executable, "-m", "helpers", "train", str(tmp_path / "p.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    for line in proc.stdout:
        if "val_loss" in line:  # the first validation: training is under way
            os.killpg(proc.pid, signal.SIGINT)
            break
    assert proc.wait(timeout=300) == 130  # before reading on: a run that ignores it fails here
    proc.stdout.read()
    reader.join(timeout=30)
    text = "".join(err)
    assert "interrupted" in text and "Traceback" not in text and "ZMQError" not in text, text
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]


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
    assert "steps_per_eval  (an integer; default 0)" in text
    assert cli.main(["params", "val_batches", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| `val_batches` | `-1` | ")
    assert cli.main(["params", "--format", "yaml"]) == 0
    (tmp_path / "all.yaml").write_text(capsys.readouterr().out)
    loaded = config.load_params(tmp_path / "all.yaml")
    assert loaded.to_dict() == config.Params(name=loaded.name).to_dict()
    assert cli.main(["params", "no-such-key"]) == 2
    assert "no params key contains 'no-such-key'" in capsys.readouterr().err


def test_memcheck_prints_each_test_and_the_verdict(tmp_path, tiny_model_dir, mlflow_store,
                                                  capsys):
    (tmp_path / "t.csv").write_text("a,b,c\n" + "".join(
        f"{i},{i % 4}.5,{100 + 37 * i % 900}\n" for i in range(12)))
    params = tmp_path / "p.yaml"
    params.write_text(f"model_id: {tiny_model_dir}\ndataset:\n  source: t.csv\n")
    assert cli.main(["memcheck", str(params), "--rows", "3", "--prefix-rows", "4"]) == 0
    out = capsys.readouterr().out
    for test in ("header", "row", "feature", "first_token"):
        assert f"  {test} " in out
    assert "row          exact 0/3" in out and "held-out column 'c'" in out
    assert "verdict: " in out and "shows no memorization" in out
    assert cli.main(["memcheck", str(params), "--prefix-rows", "20"]) == 2
    assert "--prefix-rows 11 or fewer" in capsys.readouterr().err


def test_prepare_names_a_multiclass_answer_clash(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from helpers import cli, config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "wine.yaml").write_text(f"model_id: {tiny_model_dir}\ndataset:\n"
                                        "  source: builtin:wine\n  features: [alcohol]\n")
    base = ["prepare", str(tmp_path / "wine.yaml")]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "'Nebbiolo' (first token 'N')" in out
    assert cli.main([*base, "--set", "prompt.answers={Nebbiolo: Barolo}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "'Barbera'" in err and "'Nebbiolo' ('Barolo')" in err
