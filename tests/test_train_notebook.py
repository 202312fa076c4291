"""notebooks/train.ipynb executed by papermill with tiny parameters, read back from MLflow."""

from __future__ import annotations

import mlflow
import nbformat

from helpers import contract
from helpers.config import DEMO_PARAMS
from helpers.workflow import notebooks


def test_train_notebook_writes_a_finished_run(tmp_path, tiny_model_dir, mlflow_store,
                                              monkeypatch):
    monkeypatch.setenv("TABLORA_CACHE", str(tmp_path / "cache"))  # the kernel's data cache
    client = mlflow.MlflowClient(mlflow_store)
    overrides = {"model_id": str(tiny_model_dir), "num_iters": 4, "batch_size": 2,
                 "num_layers": 2, "steps_per_eval": 2, "val_batches": 2,
                 "output_dir": str(tmp_path / "adapters")}

    result = notebooks.execute("train", DEMO_PARAMS, overrides,
                               output=tmp_path / "train.ipynb", progress=False)

    (run,) = client.search_runs([client.get_experiment_by_name("tablora").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "smollm2-135m"
    assert run.data.params["num_iters"] == "4"
    assert run.data.params["model_id"] == str(tiny_model_dir)
    assert run.data.tags[contract.TAG_SPLIT_HASH] and run.data.tags[contract.TAG_KIND] == "llm"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 2, 4]
    artifacts = {f.path for folder in ("adapters", "adapters_last", "figures", "notebooks")
                 for f in client.list_artifacts(run.info.run_id, folder)}
    assert {"adapters/adapters.safetensors", "adapters/adapter_config.json",
            "adapters_last/adapters.safetensors", "figures/loss_curves.png",
            "notebooks/train.ipynb"} <= artifacts  # the executed copy, attached after the run
    assert not list(tmp_path.glob(".*.runs"))  # the list of runs it opened is cleaned up

    last = nbformat.read(result.output, as_version=4).cells[-1]
    summary = last.outputs[0]["data"]["text/plain"]
    assert run.info.run_id in summary and "final_train_loss" in summary
