"""helpers.tracking on a real (temporary) MLflow store: runs, their ends, params, datasets."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
import yaml

from helpers import contract, data, tracking
from helpers.config import load_params


@pytest.fixture
def params(tmp_path):
    frame = pd.DataFrame({"x": range(40), "y": ["a", "b"] * 20})
    frame.to_csv(tmp_path / "t.csv", index=False)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"experiment": "trk", "dataset": {
        "source": "t.csv", "target": "y", "positive_label": "a", "test_size": 0.25,
        "valid_size": 0.25}}))
    return load_params(path)


def test_a_run_ends_finished_failed_or_killed(params, mlflow_store):
    client = mlflow.MlflowClient(mlflow_store)
    with tracking.run(params) as ok:
        pass
    with pytest.raises(ZeroDivisionError), tracking.run(params, run_name="bad") as bad:
        1 / 0  # noqa: B018
    with pytest.raises(KeyboardInterrupt), tracking.run(params, run_name="stop") as stop:
        raise KeyboardInterrupt
    assert client.get_run(ok.info.run_id).info.status == "FINISHED"
    failed = client.get_run(bad.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags[contract.TAG_ERROR].startswith("ZeroDivisionError")
    assert [a.path for a in client.list_artifacts(bad.info.run_id)] == [contract.ERROR_FILE]
    assert client.get_run(stop.info.run_id).info.status == "KILLED"
    assert ok.data.tags[contract.TAG_KIND] == contract.KIND_LLM
    assert tracking.find_run("trk", "toy").info.run_id == ok.info.run_id
    assert tracking.find_run("trk", "nobody") is None


def test_log_params_flattens_and_keeps_the_file(params, mlflow_store):
    with tracking.run(params) as run:
        tracking.log_params(params)
        tracking.log_params(params)  # again (a resumed run): no "param changed" error
    r = mlflow.MlflowClient(mlflow_store).get_run(run.info.run_id)
    assert r.data.params["dataset.target"] == "y" and r.data.params["lora_scale"] == "2.0"
    assert r.data.tags[contract.TAG_PARAMS_HASH] == params.hash()
    arts = mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id,
                                                             contract.ARTIFACT_PARAMS)
    assert [a.path for a in arts] == ["params/toy.yaml"]


def test_log_dataset(params, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TABLORA_CACHE", str(tmp_path / "cache"))
    p = data.prepare(params)
    with tracking.run(params) as run:
        tracking.log_dataset(p)
    client = mlflow.MlflowClient(mlflow_store)
    r = client.get_run(run.info.run_id)
    assert r.data.tags[contract.TAG_SPLIT_HASH] == p.split_hash
    assert sorted(i.tags[0].value for i in r.inputs.dataset_inputs) == ["test", "train", "valid"]
    arts = client.list_artifacts(run.info.run_id, "data")
    assert sorted(a.path for a in arts) == ["data/split.json", contract.DATA_SUMMARY]
    # Bookkeeping is one JSON file, not metrics: the runs table lists results first.
    assert not [k for k in r.data.metrics if k.startswith("data_")]
    summary = mlflow.artifacts.load_dict(f"{r.info.artifact_uri}/{contract.DATA_SUMMARY}")
    assert summary["test"]["rows"] == len(p.split["test"])
    assert summary["train"]["positive"] == p.class_counts("train")["positive"]
    assert summary["split_hash"] == p.split_hash
    # The dry run's split label is this same hash (one id per split).
    assert data.table_split_hash(params) == p.split_hash


def test_training_logger_renames_mlx_lm_keys(params, mlflow_store):
    logger = tracking.TrainingLogger()
    with tracking.run(params) as run:
        logger.on_train_loss_report({"iteration": 3, "train_loss": 0.5,
                                     "tokens_per_second": 100.0, "peak_memory": 1.5,
                                     "learning_rate": 1e-4})
        logger.on_val_loss_report({"iteration": 3, "val_loss": 0.7})
    m = mlflow.MlflowClient(mlflow_store).get_run(run.info.run_id).data.metrics
    assert m == {"train_loss": 0.5, contract.TOKENS_PER_SEC: 100.0, "peak_memory_gb": 1.5,
                 "learning_rate": 1e-4, "val_loss": 0.7}


def test_model_tags_from_ids():
    assert tracking.model_tags("mlx-community/Llama-3.2-3B-Instruct-4bit") == {
        contract.TAG_MODEL_FAMILY: "llama", contract.TAG_MODEL_SIZE: "3B"}
    assert tracking.model_tags("builtin:smollm2-135m-instruct")[contract.TAG_MODEL_SIZE] == "135M"
    assert tracking.model_tags("microsoft/Phi-3-mini-4k")[contract.TAG_MODEL_SIZE] == "mini"


def test_find_run_by_a_name_with_quotes(params, mlflow_store):
    # Regression: a quote in the run name reached MLflow's filter string unescaped (issue 15).
    ids = {}
    for name in ("o'x", 'say "hi"', "it's \"both\"", "o_x"):
        with tracking.run(params, run_name=name) as run:
            ids[name] = run.info.run_id
    for name, run_id in ids.items():
        assert tracking.find_run("trk", name).info.run_id == run_id
    assert tracking.find_run("trk", "o'y") is None


def test_a_run_names_its_owner_and_beats(params, mlflow_store):
    with tracking.run(params) as run:
        tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[contract.TAG_OWNER] == tracking.owner()
    assert abs(float(tags[contract.TAG_HEARTBEAT]) - time.time()) < 120
    client = mlflow.MlflowClient()
    client.set_tag(run.info.run_id, contract.TAG_HEARTBEAT, "0")
    with tracking.heartbeat([run.info.run_id], every=0.05):
        for _ in range(200):  # the tag is refreshed from the background thread
            time.sleep(0.05)
            if client.get_run(run.info.run_id).data.tags[contract.TAG_HEARTBEAT] != "0":
                break
    assert float(client.get_run(run.info.run_id).data.tags[contract.TAG_HEARTBEAT]) > 0


# A process that opens a run and waits (its run stays RUNNING until the process ends).
HOLDER = """
import sys, time
from helpers import tracking
from helpers.config import load_params
with tracking.run(load_params(sys.argv[1]), run_name=sys.argv[2]) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def test_runs_of_a_killed_process_are_marked_killed(params, mlflow_store, tmp_path):
    """SIGKILL leaves a run RUNNING in MLflow; mark_stale_runs ends it KILLED, not a live one."""
    env = {k: v for k, v in os.environ.items() if k != contract.ENV_OWNER}  # each its own owner
    procs = {name: subprocess.Popen([sys.executable, "-c", HOLDER, params.source_file, name],
                                    stdout=subprocess.PIPE, text=True, env=env)
             for name in ("killed", "alive")}
    try:
        ids = {name: p.stdout.readline().strip() for name, p in procs.items()}
        procs["killed"].kill()
        procs["killed"].wait()
        client = mlflow.MlflowClient()
        assert client.get_run(ids["killed"]).info.status == "RUNNING"  # what MLflow leaves
        exp_id = client.get_experiment_by_name("trk").experiment_id

        # A run owned by a process on another machine: judged by its heartbeat alone.
        remote = client.create_run(exp_id, tags={contract.TAG_OWNER: "elsewhere:1",
                                                 contract.TAG_HEARTBEAT: str(time.time() - 7200)})
        fresh = client.create_run(exp_id, tags={contract.TAG_OWNER: "elsewhere:2",
                                                contract.TAG_HEARTBEAT: str(time.time())})
        stale = tracking.mark_stale_runs(exp_id, timeout=3600)

        assert sorted(stale) == sorted([ids["killed"], remote.info.run_id])
        assert client.get_run(ids["killed"]).info.status == "KILLED"
        assert "is gone" in client.get_run(ids["killed"]).data.tags[contract.TAG_ERROR]
        assert client.get_run(remote.info.run_id).info.status == "KILLED"
        assert client.get_run(ids["alive"]).info.status == "RUNNING"
        assert client.get_run(fresh.info.run_id).info.status == "RUNNING"
        # A live process's run cannot be taken over; the killed one can be resumed.
        with pytest.raises(tracking.StoreError, match="is RUNNING in process"):
            with tracking.run(params, run_id=ids["alive"]):
                pass
        with tracking.run(params, run_id=ids["killed"]):
            pass
        assert client.get_run(ids["killed"]).info.status == "FINISHED"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_store_that_cannot_be_opened_is_a_store_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(tracking.StoreError, match="missing"):
        tracking.setup("x")


def test_runs_carry_source_user_and_a_description(params, mlflow_store, monkeypatch):
    """What the UI shows as Source, Created by and Description: a notebook run names its
    notebook; a finished model run describes its headline; a person's own text is kept."""
    import getpass

    client = mlflow.MlflowClient(mlflow_store)
    monkeypatch.setenv(contract.ENV_NOTEBOOK, "/x/notebooks/train.ipynb")
    with tracking.run(params, system_metrics=False) as run:
        mlflow.log_metrics({"test_accuracy": 0.789, "test_accuracy_ci_low": 0.719,
                            "test_accuracy_ci_high": 0.86, "zeroshot_test_accuracy": 0.5})
    tags = client.get_run(run.info.run_id).data.tags
    assert tags[contract.TAG_SOURCE_NAME] == "/x/notebooks/train.ipynb"
    assert tags[contract.TAG_SOURCE_TYPE] == "LOCAL"
    assert tags[contract.TAG_USER] == getpass.getuser()
    assert tags[contract.TAG_NOTE] == "Test accuracy 78.9% [71.9, 86.0]; zero-shot 50.0%"
    assert tracking.describe(run.info.run_id, "updated", client)
    client.set_tag(run.info.run_id, contract.TAG_NOTE, "my own notes")  # edited in the UI
    assert not tracking.describe(run.info.run_id, "tablora again", client)
    assert tracking.description(run.info.run_id, client) == "my own notes"


def test_llm_runs_record_system_metrics(params, mlflow_store, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.run(params) as llm:  # kind llm: sampled by default
        time.sleep(1.5)
    with tracking.run(params, kind=contract.KIND_BASELINE, run_name="rf") as base:
        time.sleep(0.5)
    client = mlflow.MlflowClient(mlflow_store)
    assert any(k.startswith("system/cpu") for k in client.get_run(llm.info.run_id).data.metrics)
    assert not any(k.startswith("system/") for k in client.get_run(base.info.run_id).data.metrics)


def test_experiment_opens_in_the_model_training_view(mlflow_store):
    """MLflow 3 opens an experiment in its GenAI view: tablora's experiments carry the
    model-training kind and a runs view (sorted by test accuracy, headline columns)."""
    import json

    exp_id = tracking.setup("view-test")
    tags = mlflow.MlflowClient(mlflow_store).get_experiment(exp_id).tags
    assert tags[contract.EXPERIMENT_KIND_TAG] == contract.EXPERIMENT_KIND
    view = json.loads(tags[contract.SHARED_VIEW_TAG_PREFIX + contract.SHARED_VIEW])
    assert "metrics.`test_accuracy`" in view["selectedColumns"]
    assert view["orderByKey"] == "metrics.`test_accuracy`"
    url = tracking.ui_url(exp_id, "http://127.0.0.1:5001")
    assert url == (f"http://127.0.0.1:5001/#/experiments/{exp_id}/runs?workflowType="
                   f"machine_learning&viewStateShareKey={contract.SHARED_VIEW}")
    assert any(url in line for line in tracking.ui_lines("http://127.0.0.1:5001"))
    # A person's own choice of kind is kept.
    mlflow.MlflowClient(mlflow_store).set_experiment_tag(exp_id, contract.EXPERIMENT_KIND_TAG,
                                                         "genai_development")
    tracking.setup("view-test")
    assert mlflow.MlflowClient(mlflow_store).get_experiment(exp_id).tags[
        contract.EXPERIMENT_KIND_TAG] == "genai_development"


def test_dataset_inputs_copy_to_a_parent(params, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TABLORA_CACHE", str(tmp_path / "cache"))
    p = data.prepare(params)
    runs = []
    for name in ("a", "b"):
        with tracking.run(params, run_name=name, system_metrics=False) as run:
            tracking.log_dataset(p)
        runs.append(run.info.run_id)
    client = mlflow.MlflowClient(mlflow_store)
    parent = client.create_run(tracking.setup(params.experiment)).info.run_id
    assert tracking.copy_dataset_inputs(client, runs, parent) == 3  # the same three splits
    assert len(client.get_run(parent).inputs.dataset_inputs) == 3


def test_a_refused_registration_warns_in_one_line_and_goes_on(mlflow_store, capsys):
    # No such logged model: the store refuses, the caller keeps going with "".
    assert tracking.register_model("models:/m-0000nothing", "tiny") == ""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not register")


def test_file_lock_excludes_a_second_holder(tmp_path):
    """One holder at a time (flock: two opens conflict even in one process); wait=False says so
    at once; the lock is free again after the with-block."""
    path = tmp_path / "sub" / ".x.lock"
    with tracking.file_lock(path):
        assert path.exists()
        with pytest.raises(tracking.LockHeld), tracking.file_lock(path, wait=False):
            pass
    with tracking.file_lock(path, wait=False):
        pass
