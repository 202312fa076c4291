"""`tablora tune` (helpers.workflow.tune): a real Optuna study on the tiny model, real MLflow."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml

from helpers import cli, config, contract, data
from helpers.config import ParamsError, load_params, load_tune
from helpers.workflow import tune

# The toy table repeats its rows on purpose (a few rows the tiny model can learn).
pytestmark = pytest.mark.filterwarnings("ignore:.*appear identically in train:UserWarning")

# Two learning rates far apart: the tiny one learns nothing, so once a trial of the other has
# finished, the median pruner stops it at its first evaluation.
SPACE = {"learning_rate": ["1.0e-7", "5.0e-3"], "lora_rank": [2, 4],
         "pruner": "median", "startup_trials": 1, "warmup_evals": 0}


def _toy(root: Path, model_dir: Path, space: dict | None = None) -> Path:
    table = pd.DataFrame({"size": [1.0, 2.0, 3.0, 4.0] * 8,
                          "label": ["no", "no", "yes", "yes"] * 8})
    table.to_csv(root / "toy.csv", index=False)
    spec = {"name": "toy", "model_id": str(model_dir), "experiment": "tune-test",
            "num_layers": -1, "batch_size": 2, "num_iters": 12, "steps_per_eval": 3,
            "early_stopping_patience": 0, "save_every": 12, "fast_training": False,
            "n_bootstrap": 100, "eval_zeroshot": False, "threshold_mode": "fixed",
            "dataset": {"source": "toy.csv", "target": "label", "positive_label": "yes",
                        "test_size": 0.25, "valid_size": 0.25},
            "tune": SPACE if space is None else space}
    path = root / "params" / "toy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # relative data path: the best params file must still find it from its own folder
    (path.parent / "toy.csv").write_bytes((root / "toy.csv").read_bytes())
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch, mlflow_store):
    """Runs, caches and the study's SQLite storage under tmp_path."""
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


# ---------------------------------------------------------------- the tune: section


@pytest.mark.parametrize("section, named", [
    ({"lr": [1e-4]}, "'lr' is not a params key"),
    ({"seed": [0, 1]}, "'seed' is not a training hyperparameter"),
    ({"learning_rate": {"low": 1e-3, "high": 1e-5}}, "tune.learning_rate: low = 0.001 is not "
                                                      "below high"),
    ({"lora_rank": {"low": 0, "high": 8}}, "tune.lora_rank.low = 0 is out of range"),
    ({"lora_alpha": {"low": 0.0, "high": 8.0, "log": True}}, "tune.lora_alpha"),
    ({"learning_rate": {"low": 1e-5, "hi": 1e-3}}, "tune.learning_rate: unknown key 'hi'"),
    ({"lora_rank": []}, "tune.lora_rank is an empty list"),
    ({"lr_schedule": {"low": 1, "high": 2}}, "tune.lr_schedule takes a list of choices"),
    ({"num_iters": [5], "num_epochs": [1]}, "both num_iters and num_epochs"),
    ({"lora_rank": [4], "objective": "test_accuracy"}, "'tune.objective'"),
    ({"lora_rank": [4], "pruner": "asha"}, "'tune.pruner'"),
    ({"pruner": "none"}, "names no param to search"),
    ({"lora_rank": 8}, "tune.lora_rank = 8: give a range"),
])
def test_a_bad_tune_section_is_refused_with_the_key_named(tmp_path, section, named):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"tune": section}))
    with pytest.raises(ParamsError, match=named.replace("(", r"\(").replace(".", r"\.")):
        load_tune(path)


def test_the_tune_section_is_parsed_and_ignored_elsewhere(tmp_path):
    (tmp_path / "_defaults.yaml").write_text(yaml.safe_dump(
        {"batch_size": 2, "tune": {"lora_rank": [4, 8], "pruner": "hyperband"}}))
    path = tmp_path / "m.yaml"
    # YAML 1.1 reads 1e-5 as a string: the range still holds numbers
    path.write_text("tune:\n  learning_rate: {low: 1e-5, high: 1e-3, log: true}\n"
                    "  lora_rank: [8, 16]\n")
    params, spec = load_tune(path)
    assert load_params(path) == params and params.batch_size == 2
    dims = {d.key: d for d in spec.space}
    assert dims["learning_rate"].low == 1e-5 and dims["learning_rate"].log
    assert dims["lora_rank"].choices == (8, 16)  # the model file's list wins over _defaults'
    assert spec.pruner == "hyperband" and spec.direction == "minimize"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "plain.yaml").write_text("lora_rank: 4\n")
    with pytest.raises(ParamsError, match="no 'tune' section"):
        load_tune(tmp_path / "other" / "plain.yaml")


def test_a_bad_section_stops_the_command_before_any_trial(home, tiny_model_dir, capsys):
    path = _toy(home, tiny_model_dir, {"learning_rate": {"low": 1e-3, "high": 1e-5}})
    assert cli.main(["tune", str(path), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tune.learning_rate" in err
    assert not (home / "runs" / "tune").exists()  # no storage, no study, no trial
    path = _toy(home, tiny_model_dir, {"num_layers": [2, 9]})  # the tiny model has 4
    assert cli.main(["tune", str(path), "--trials", "2"]) == 2
    assert "num_layers=9 but the model has 4 layers" in capsys.readouterr().err
    assert not (home / "runs" / "tune").exists()


def test_timeouts_parse():
    assert [tune.parse_timeout(t) for t in ("90", "90m", "2h", "1.5h", "", None)] == [
        90, 5400, 7200, 5400, 0, 0]
    with pytest.raises(ParamsError, match="--timeout '2 days'"):
        tune.parse_timeout("2 days")


# ---------------------------------------------------------------- a study


class SplitSpy:
    """Records every look at the test split: its labels, rows or prompts, its JSONL file."""

    def __init__(self, monkeypatch):
        self.events: list[str] = []
        for name in ("y", "X", "messages", "prompts", "answers"):
            original = getattr(data.Prepared, name)
            monkeypatch.setattr(data.Prepared, name, self._wrap(name, original))
        real_open = builtins.open

        def spy_open(file, mode="r", *args, **kwargs):
            if Path(str(file)).name == "test.jsonl" and "r" in mode:
                self.events.append("read test.jsonl")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", spy_open)
        real_score_best = tune.score_best

        def score_best(*args, **kwargs):
            self.events.append("score_best")
            return real_score_best(*args, **kwargs)

        monkeypatch.setattr(tune, "score_best", score_best)
        real_trial = tune._run_trial

        def run_trial(*args, **kwargs):
            self.events.append("trial start")
            try:
                return real_trial(*args, **kwargs)
            finally:
                self.events.append("trial end")

        monkeypatch.setattr(tune, "_run_trial", run_trial)

    def _wrap(self, name, original):
        def spied(prepared, split, *args, **kwargs):
            if split == "test":
                self.events.append(f"Prepared.{name}(test)")
            return original(prepared, split, *args, **kwargs)
        return spied


def test_a_study_with_pruning_finishes_and_never_reads_test_during_trials(
        home, tiny_model_dir, monkeypatch, capsys):
    path = _toy(home, tiny_model_dir)
    spy = SplitSpy(monkeypatch)
    result = tune.run(path, trials=4)
    out = capsys.readouterr().out

    # The test split: untouched by the four trials, scored once for the best trial afterwards.
    # (Before them, data.prepare writes every split's prompts file, as for any command.)
    events = spy.events
    first, best = events.index("trial start"), events.index("score_best")
    assert events[first:best].count("trial end") == 4
    assert set(events[first:best]) == {"trial start", "trial end"}, events
    assert events[best:].count("Prepared.messages(test)") == 1, events
    assert "read test.jsonl" not in events

    study = tune.load_study(name=result.study_name)
    states = [t.state for t in study.trials]
    assert len(states) == 4 and set(states) <= {optuna.trial.TrialState.COMPLETE,
                                                optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.PRUNED in states, out
    assert all(t.intermediate_values for t in study.trials)  # the pruner saw every trial

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tune-test")
    parent = client.get_run(result.parent_id)
    assert parent.data.tags[contract.TAG_KIND] == contract.KIND_TUNE
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{contract.TAG_KIND}` = '{contract.KIND_TRIAL}'")
    assert len(runs) == 4
    assert {r.data.tags[contract.TAG_PARENT] for r in runs} == {result.parent_id}
    by_number = {int(r.data.tags[contract.TAG_TRIAL]): r for r in runs}
    for t in study.trials:
        assert by_number[t.number].data.tags[contract.TAG_TRIAL_STATE] == t.state.name
    # Only the best trial's run holds test metrics; the parent has them as best_test_*.
    best_run = by_number[study.best_trial.number]
    with_test = [r for r in runs if any(k.startswith("test_") for k in r.data.metrics)]
    assert [r.info.run_id for r in with_test] == [best_run.info.run_id]
    assert "best_test_accuracy" in parent.data.metrics
    assert parent.data.metrics[contract.BEST_OBJECTIVE] == pytest.approx(study.best_value)
    assert best_run.data.metrics[contract.OBJECTIVE] == pytest.approx(study.best_value)
    figures = [a.path for a in client.list_artifacts(result.parent_id, contract.ARTIFACT_FIGURES)]
    assert "figures/optimization_history.png" in figures

    # The best params file: the best trial's values, accepted by `tablora batch --dry-run`.
    best = load_params(result.best_file)
    assert best.learning_rate == pytest.approx(study.best_params["learning_rate"])
    assert best.lora_rank == study.best_params["lora_rank"] and best.name == "toy-tuned"
    assert result.best_file.read_text().startswith(tune.MARKER)
    monkeypatch.chdir(home)  # the data path must not depend on where batch runs from
    assert cli.main(["batch", "--dry-run", str(result.best_file)]) == 0
    assert "toy-tuned" in capsys.readouterr().out


def test_two_processes_share_one_study_without_losing_a_trial(home, tiny_model_dir,
                                                              mlflow_store):
    path = _toy(home, tiny_model_dir)
    storage = f"sqlite:///{home / 'shared' / 'optuna.db'}"
    env = {**os.environ, "TABLORA_RUNS": str(home / "runs"), "TABLORA_CACHE": str(home / "cache"),
           "MLFLOW_TRACKING_URI": mlflow_store}
    command = [sys.executable, "-m", "helpers", "tune", str(path), "--trials", "2",
               "--storage", storage]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    params, spec = load_tune(path)
    study = optuna.load_study(study_name=tune.study_name(params, spec), storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{contract.TAG_KIND}` = '{contract.KIND_TRIAL}'")
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`{contract.TAG_KIND}` = '{contract.KIND_TUNE}'")
    assert len(parents) == 1 and len(runs) == 4
    assert {r.data.tags[contract.TAG_PARENT] for r in runs} == {parents[0].info.run_id}
    assert sorted(int(r.data.tags[contract.TAG_TRIAL]) for r in runs) == [0, 1, 2, 3]

    # notebooks/tune.ipynb looks at the study: its last cell names the best trial.
    import nbformat

    from helpers.workflow import notebooks

    res = notebooks.execute("tune", params, output=home / "nb" / "tune.ipynb", attach=False,
                            storage=storage, study_name=study.study_name,
                            figures_dir=str(home / "nb" / "figures"))
    last = nbformat.read(str(res.output), as_version=4).cells[-1]
    assert f"'best_trial': {study.best_trial.number}" in last.outputs[0]["data"]["text/plain"]
    assert (home / "nb" / "figures" / "optimization_history.png").is_file()


def test_a_trial_after_the_timeout_does_not_start(tmp_path):
    params, spec = load_tune(_toy(tmp_path, tmp_path / "no-model"))
    task = tune.TrialTask("sqlite:///nowhere.db", "s", spec, params, "", "", str(tmp_path), "",
                          "", deadline=1.0)
    assert tune.trial_task(task).state == "SKIPPED"  # before any storage or model is touched


@pytest.mark.integration
def test_trials_run_as_tasks_on_workers_into_a_postgresql_study(tracking_server, tiny_model_dir,
                                                                tmp_path, monkeypatch):
    """--workers 2: each trial a Dask task; the study in PostgreSQL (as on several machines),
    the runs on the tracking server."""
    import mlflow

    tracking_server.pg.create_database("optuna_tune_test")
    storage = tracking_server.pg.url("optuna_tune_test")
    for key, value in (("MLFLOW_TRACKING_URI", tracking_server.uri),
                       ("TABLORA_RUNS", str(tmp_path / "runs")),
                       ("TABLORA_CACHE", str(tmp_path / "cache"))):
        monkeypatch.setenv(key, value)  # the workers inherit them
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    mlflow.set_tracking_uri(tracking_server.uri)
    path = _toy(tmp_path, tiny_model_dir)
    result = tune.run(path, trials=2, storage=storage, workers=2)
    assert result.exit_code == 0, result.text()
    study = optuna.load_study(study_name=result.study_name, storage=storage)
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    client = mlflow.MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("tune-test").experiment_id],
                              f"tags.`{contract.TAG_PARENT}` = '{result.parent_id}'")
    assert len(runs) == 2
    assert all(r.data.tags[contract.TAG_WORKER].startswith("tcp://") for r in runs)
    assert "***" in tune.shown_url(storage) and tracking_server.pg.password not in result.text()


def test_tablora_params_documents_the_tune_section(capsys):
    docs = {d.key: d for d in config.tune_key_docs()}
    assert set(docs) == {"tune.<param>", *(f"tune.{k}" for k in config.TUNE_SETTINGS)}
    assert all(d.doc for d in docs.values()), "a TuneSpec setting without its comment line"
    assert "valid_roc_auc" in docs["tune.objective"].allowed
    assert cli.main(["params", "tune"]) == 0
    assert "tune.pruner  (a string; default \"median\")" in capsys.readouterr().out


def test_a_metric_objective_is_maximized_on_the_validation_rows(home, tiny_model_dir):
    path = _toy(home, tiny_model_dir, {"lora_rank": [2], "objective": "valid_roc_auc",
                                       "pruner": "none"})
    result = tune.run(path, trials=1)
    study = tune.load_study(name=result.study_name)
    assert study.direction.name == "MAXIMIZE" and result.exit_code == 0
    run = mlflow.MlflowClient().get_run(result.best["run_id"])
    assert 0 <= run.data.metrics["valid_roc_auc"] <= 1
    assert study.best_value == pytest.approx(run.data.metrics["valid_roc_auc"])
    # the pruner's intermediate values are the negated validation losses (higher is better)
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id,
                                                                        "val_loss") if m.step]
    assert sorted(study.best_trial.intermediate_values.values()) == sorted(-v for v in losses)
    # --trials 0: no new trial, the results again; the best's test scores are not redone.
    again = tune.run(path, trials=0)
    assert len(tune.load_study(name=result.study_name).trials) == 1
    assert again.test_metrics == result.test_metrics and "not scored again" in again.test_note


def test_a_multiclass_study_maximizes_one_vs_rest_roc_auc(home, tiny_model_dir):
    path = _toy(home, tiny_model_dir, {"lora_rank": [2], "objective": "valid_roc_auc",
                                       "pruner": "none"})
    spec = yaml.safe_load(path.read_text())
    pd.DataFrame({"size": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * 8,
                  "fruit": ["apple", "apple", "banana", "banana", "cherry", "cherry"] * 8}
                 ).to_csv(path.parent / "fruit.csv", index=False)
    spec["dataset"] = {"source": "fruit.csv", "target": "fruit", "test_size": 0.25,
                       "valid_size": 0.25}
    path.write_text(yaml.safe_dump(spec))
    result = tune.run(path, trials=1)
    assert result.exit_code == 0
    run = mlflow.MlflowClient().get_run(result.best["run_id"])
    assert 0 <= run.data.metrics["valid_roc_auc"] <= 1
    assert "test_f1_macro" in result.test_metrics  # the best scored on test, multi-class
