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
    r = mlflow.MlflowClient(mlflow_store).get_run(run.info.run_id)
    assert r.data.tags[contract.TAG_SPLIT_HASH] == p.split_hash
    assert r.data.metrics["data_test_rows"] == len(p.split["test"])
    assert r.data.metrics["data_train_positive"] == p.class_counts("train")["positive"]
    assert sorted(i.tags[0].value for i in r.inputs.dataset_inputs) == ["test", "train", "valid"]
    arts = mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id, "data")
    assert [a.path for a in arts] == ["data/split.json"]


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


def test_a_refused_registration_warns_in_one_line_and_goes_on(mlflow_store, capsys):
    # No such logged model: the store refuses, the caller keeps going with "".
    assert tracking.register_model("models:/m-0000nothing", "tiny") == ""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not register")
