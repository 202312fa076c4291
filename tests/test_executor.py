"""helpers.workflow.executor: tasks here or on Dask, and `tablora batch` on a Dask cluster.

The integration tests run the real thing: PostgreSQL under `mlflow server` (the
`tracking_server` fixture), a two-worker LocalCluster of separate processes, the real train and
evaluate notebooks on the tiny model for a few steps. One kills a worker process mid-task.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import cli, config, contract
from helpers.workflow import executor

# ---------------------------------------------------------------- the executors


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def test_sequential_runs_in_order_here_and_isolates_failures():
    ex = executor.connect()
    assert isinstance(ex, executor.Sequential) and not ex.parallel
    for x in (3, -1, 2):
        ex.submit(_square, x, label=f"x{x}")
    assert ex.counts() == {"running": 0, "waiting": 3}
    events = list(ex.events())
    assert [(e.kind, e.label, e.result) for e in events] == [
        ("done", "x3", 9), ("done", "x-1", None), ("done", "x2", 4)]
    assert events[1].error == "ValueError: negative: -1"
    assert events[0].worker == executor.where() and f"pid {os.getpid()}" in events[0].worker


def test_connect_takes_one_place_to_run():
    with pytest.raises(ValueError, match="give one"):
        executor.connect(cluster="tcp://127.0.0.1:8786", workers=2)
    with pytest.raises(ValueError, match="--workers 0"):
        executor.Dask(workers=0)


def test_no_scheduler_at_the_address_says_how_to_start_one():
    from helpers.workflow.server import free_port

    with pytest.raises(executor.ClusterError, match=r"no Dask scheduler answers there.*"
                       r"dask worker tcp://127\.0\.0\.1:\d+ --nthreads 1 --resources model=1"):
        executor.Dask(address=f"tcp://127.0.0.1:{free_port()}", connect_timeout=2)


def test_workers_without_the_model_resource_are_refused():
    """A task asks for `model`: on workers without it, it would wait forever."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(executor.ClusterError,
                           match=r"none of the 1 worker\(s\).*declares the `model` resource.*"
                           r"--resources model=1"):
            executor.Dask(address=cluster.scheduler_address)


def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_dask_gives_a_free_worker_the_next_task_and_says_where_each_ran():
    """Regression: handed to Dask all at once, resource-bound tasks queued behind a long one
    on one worker while the other worker sat idle."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      dashboard_address=None, resources={executor.RESOURCE: 1}) as cluster:
        with executor.Dask(address=cluster.scheduler_address, poll_seconds=0.2) as ex:
            assert ex.parallel and "Dask: 2 worker(s) on the cluster at tcp://" in ex.describe()
            # The long task first: whichever worker takes it, the others go to the other one.
            for label, seconds in (("long", 4.0), ("a", 0.2), ("b", 0.2), ("c", 0.2)):
                ex.submit(_nap, seconds, label=label)
            assert ex.counts() == {"running": 0, "waiting": 4}
            events = list(ex.events())
    done = {e.label: e for e in events if e.kind == "done"}
    started = [e.label for e in events if e.kind == "started"]
    assert sorted(done) == ["a", "b", "c", "long"] and sorted(started) == sorted(done)
    assert done["long"].result == 4.0 and not done["long"].error
    others = {done[x].worker for x in "abc"}
    assert len(others) == 1 and others != {done["long"].worker}, (done["long"].worker, others)
    assert done["a"].worker.startswith("tcp://127.0.0.1:")


# ---------------------------------------------------------------- a batch on a cluster

EXPERIMENT = "cluster-test"
# Few steps on the tiny model; two cheap baselines with fixed settings. Ten features, as in the
# demo: with all 30 the tiny tokenizer's prompts exceed max_seq_length and lose their answer.
DEFAULTS = """\
experiment: {experiment}
dataset:
  features: [mean radius, mean texture, mean perimeter, mean area, mean smoothness,
             mean compactness, mean concavity, mean concave points, mean symmetry,
             mean fractal dimension]
model_id: {model}
num_iters: 4
batch_size: 2
num_layers: 2
lora_rank: 4
steps_per_report: 2
steps_per_eval: 2
val_batches: 2
save_every: 4
eval_batch_size: 16
n_bootstrap: 100
baselines:
  models: [majority, logistic_l2]
  mode: fixed
"""
MODELS = {"tiny-a": "learning_rate: 1.0e-4\n", "tiny-b": "learning_rate: 3.0e-4\n",
          "tiny-c": "lora_rank: 8\nlora_alpha: 16\n"}


def write_params(folder: Path, model: Path, experiment: str, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "_defaults.yaml").write_text(DEFAULTS.format(experiment=experiment, model=model))
    for name in names:
        (folder / f"{name}.yaml").write_text(MODELS[name])
    return folder


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def runs_of(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def worker_of(run) -> str:
    """The Dask address in tag tablora.worker ('tcp://127.0.0.1:4321 (host, pid 99)')."""
    return run.data.tags[contract.TAG_WORKER].split()[0]


def pid_of(run) -> int:
    return int(re.search(r"pid (\d+)", run.data.tags[contract.TAG_WORKER]).group(1))


@pytest.fixture(scope="module")
def on_cluster(tracking_server, tiny_model_dir, tmp_path_factory):
    """Clients, workers and their kernels all pointed at the server; their files in tmp."""
    import mlflow

    tmp = tmp_path_factory.mktemp("cluster")
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        # LocalCluster workers and the kernels they start inherit this environment.
        mp.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
        mp.setenv("TABLORA_RUNS", str(tmp / "runs"))
        mp.setenv("TABLORA_CACHE", str(tmp / "cache"))
        mp.setattr(config, "RUNS_DIR", tmp / "runs")
        mp.setattr(config, "CACHE_DIR", tmp / "cache")
        for key in (contract.ENV_BATCH_ID, contract.ENV_PARENT_RUN_ID, contract.ENV_RUN_TAGS):
            mp.delenv(key, raising=False)
        yield tmp, mlflow.MlflowClient(tracking_server.uri)
    mlflow.set_tracking_uri(previous_uri)  # the server stops after the session


@pytest.fixture(scope="module")
def spread(on_cluster, tiny_model_dir):
    """Three params files on a two-worker LocalCluster, then `tablora compare` over HTTP."""
    tmp, client = on_cluster
    params = write_params(tmp / "params", tiny_model_dir, EXPERIMENT, list(MODELS))
    t0 = time.perf_counter()
    code, out = run_cli("batch", str(params), "--workers", "2", "--no-compare")
    seconds = time.perf_counter() - t0
    batch_id = re.search(r"^batch (\S+): ", out, re.M).group(1)
    compared = run_cli("compare", "--experiment", EXPERIMENT, "--batch", batch_id,
                       "--out", str(tmp / "compare"))
    resumed = run_cli("batch", str(params), "--resume", "--dry-run")
    print(f"batch of 3 on 2 workers: {seconds:.0f}s")
    return {"code": code, "out": out, "batch_id": batch_id, "compare": compared,
            "resumed": resumed,
            "runs": runs_of(client, EXPERIMENT), "client": client}


@pytest.mark.integration
def test_a_batch_spreads_over_both_workers_into_the_server(spread, tracking_server):
    code, out = spread["code"], spread["out"]
    assert code == 0, out[-5000:]
    assert "Dask: 2 worker(s) on a LocalCluster here" in out and "dashboard: http://" in out
    assert re.search(r"\[\d/4 done, 0 failed, \d running, \d waiting\] tiny-b: started on tcp://",
                     out), out[-3000:]
    assert "[4/4 done, 0 failed, 0 running, 0 waiting]" in out
    runs = spread["runs"]
    models = [r for r in runs if r.data.tags.get(contract.TAG_KIND) == contract.KIND_LLM]
    baselines = [r for r in runs if r.data.tags.get(contract.TAG_KIND) == contract.KIND_BASELINE]
    (parent,) = [r for r in runs if r.data.tags.get(contract.TAG_KIND) == contract.KIND_BATCH]
    assert sorted(r.info.run_name for r in models) == sorted(MODELS)
    assert sorted(r.info.run_name for r in baselines) == ["logistic_l2", "majority"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in models + baselines:
        assert run.data.tags[contract.TAG_PARENT] == parent.info.run_id
        assert run.data.tags[contract.TAG_BATCH_ID] == spread["batch_id"]
        # Artifacts went through the server, not to a path of the machine that ran the model.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    for run in models:
        metrics = run.data.metrics
        assert {"train_loss", "val_loss", "test_accuracy", "test_roc_auc",
                "zeroshot_test_accuracy"} <= set(metrics), (run.info.run_name, sorted(metrics))
        assert run.data.tags[contract.TAG_SPLIT_HASH] == baselines[0].data.tags[
            contract.TAG_SPLIT_HASH]
        files = {a.path for folder in ("adapters", "notebooks", "predictions")
                 for a in spread["client"].list_artifacts(run.info.run_id, folder)}
        assert {"adapters/adapters.safetensors", "notebooks/train.ipynb",
                "notebooks/evaluate.ipynb", "notebooks/output.log",
                contract.predictions_path("test")} <= files, files
        stored = tracking_server.artifacts / run.info.artifact_uri.split(":/", 1)[1]
        assert (stored / "adapters" / "adapters.safetensors").is_file()
    # Both workers ran something (each run says where).
    assert len({worker_of(r) for r in models + baselines}) == 2
    assert len({r.data.tags[contract.TAG_TASK] for r in models}) == 3
    # --resume finds the runs the workers finished, from this machine.
    code, plan = spread["resumed"]
    assert code == 0 and plan.count("--resume: skipped, FINISHED run") == 3, plan
    # `tablora compare` read the batch back over HTTP: every model and baseline in its table.
    code, text = spread["compare"]
    assert code == 0, text[-3000:]
    for name in (*MODELS, "logistic_l2", "majority"):
        assert name in text, name


@pytest.fixture(scope="module")
def killed(on_cluster, tiny_model_dir):
    """A batch whose model task loses its worker (SIGKILL) while train.ipynb is logging."""
    tmp, client = on_cluster
    experiment = "cluster-kill"
    params = write_params(tmp / "kill-params", tiny_model_dir, experiment, ["tiny-a"])
    victim: dict = {}
    stop = threading.Event()

    def kill_when_training() -> None:
        while not stop.wait(0.3):
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                continue
            for run in client.search_runs([exp.experiment_id], filter_string=(
                    f"tags.`{contract.TAG_TASK}` = 'tiny-a' and attributes.status = 'RUNNING'")):
                if run.data.params:  # the kernel is in train.ipynb: mid-task
                    victim.update(run_id=run.info.run_id, worker=worker_of(run),
                                  pid=pid_of(run))
                    os.kill(victim["pid"], signal.SIGKILL)
                    return

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    try:
        code, out = run_cli("batch", str(params), "--workers", "2", "--no-compare")
    finally:
        stop.set()
        killer.join()
    return {"code": code, "out": out, "victim": victim, "runs": runs_of(client, experiment)}


@pytest.mark.integration
def test_a_killed_worker_s_task_finishes_on_another_and_nothing_stays_running(killed):
    code, out, victim = killed["code"], killed["out"], killed["victim"]
    assert victim, "the model's worker was never seen training: nothing was killed\n" + out
    assert code == 0, out[-5000:]
    attempts = {r.info.run_id: r for r in killed["runs"]
                if r.data.tags.get(contract.TAG_TASK) == "tiny-a"}
    assert len(attempts) == 2, [(r.info.run_name, r.info.status) for r in attempts.values()]
    lost = attempts.pop(victim["run_id"])
    (final,) = attempts.values()
    # The dead worker's run is ended KILLED, with why; the task ran again as a new run, on
    # another worker, to the end.
    assert lost.info.status == "KILLED"
    assert lost.data.tags[contract.TAG_ERROR] == (
        f"its worker ({lost.data.tags[contract.TAG_WORKER]}) was lost mid-run; the task ran "
        f"again as run {final.info.run_id}")
    assert final.info.status == "FINISHED" and "test_accuracy" in final.data.metrics
    assert worker_of(final) != victim["worker"] and pid_of(final) != victim["pid"]
    assert not [r.info.run_name for r in killed["runs"] if r.info.status == "RUNNING"]
    assert "tiny-a: ok in" in out and "1/1 models succeeded" in out
