"""helpers.llm.evaluate through notebooks/evaluate.ipynb (papermill, tiny model, real MLflow)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import yaml

from helpers import contract, data, tracking
from helpers.config import load_params
from helpers.llm import evaluate
from helpers.workflow import notebooks

TINY_PARAMS = {
    "name": "tiny",
    "experiment": "tablora-test",
    "n_bootstrap": 100,
    "eval_batch_size": 16,
    "threshold_mode": "tune",  # exercises scoring the validation split too
    "dataset": {"source": "builtin:breast_cancer", "target": "target",
                "positive_label": "malignant",
                "features": ["mean radius", "mean texture", "mean area"]},
}


@pytest.fixture
def setup(tmp_path, tiny_model_dir, mlflow_store):
    """A params file for the tiny model, an adapter, and a 'training run' holding it."""
    import mlflow
    from tiny_adapter import train_tiny_adapter

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_PARAMS, "model_id": str(tiny_model_dir)}))
    params = load_params(path)
    prepared = data.prepare(params)
    adapter = train_tiny_adapter(tiny_model_dir, tmp_path / "adapter",
                                 prepared.messages("train")[:8], steps=3)
    # Artifacts in tmp_path, not the project's mlruns/: create the experiment here first.
    mlflow.set_tracking_uri(mlflow_store)  # an earlier test may have set another store
    mlflow.MlflowClient().create_experiment(params.experiment,
                                            artifact_location=(tmp_path / "art").as_uri())
    with tracking.run(params) as run:  # what the training notebook leaves behind
        tracking.log_dataset(prepared)
        mlflow.log_artifacts(str(adapter), contract.ARTIFACT_ADAPTERS)
    return path, params, prepared, adapter, run.info.run_id


def _read_csv(run_id: str, name: str) -> pd.DataFrame:
    import mlflow

    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{run_id}/predictions/{name}.csv")))


def test_evaluate_notebook_logs_both_models_into_the_training_run(setup, tmp_path):
    import mlflow
    import nbformat

    path, params, prepared, _, run_id = setup
    # run_id "" finds the latest finished run named after the params: the one above.
    out = notebooks.execute("evaluate", path, {}, run_id="", output=tmp_path / "out.ipynb",
                            progress=False).output
    shown = [o for c in nbformat.read(out, 4).cells for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in shown) == 2  # the confusion matrices
    run = mlflow.MlflowClient().get_run(run_id)
    m = run.data.metrics
    for prefix in ("test", "zeroshot_test"):
        for metric in ("accuracy", "balanced_accuracy", "f1", "roc_auc"):
            assert 0 <= m[f"{prefix}_{metric}_ci_low"] <= m[f"{prefix}_{metric}_ci_high"] <= 1
            assert f"{prefix}_{metric}" in m
        assert m[f"{prefix}_examples_per_sec"] > 0
        csv = _read_csv(run_id, prefix)
        assert list(csv.columns) == ["row_id", "label", "p_yes", "prediction"]
        assert csv["row_id"].tolist() == prepared.split["test"]
        assert csv["label"].tolist() == prepared.y("test").tolist()
        assert csv["p_yes"].between(0, 1).all()
    assert 0 <= m["threshold"] <= 1 and 0 <= m["zeroshot_threshold"] <= 1
    for tag in contract.THRESHOLD_SOURCE_TAGS.values():  # both tuned on the validation split
        assert run.data.tags[tag] == contract.THRESHOLD_VALID
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "figures")}
    assert {"figures/confusion_test.png", "figures/confusion_zeroshot_test.png"} <= artifacts
    assert run.info.status == "FINISHED"
    notebooks_logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "notebooks")}
    assert "notebooks/out.ipynb" in notebooks_logged  # the executed copy joins the training run


def test_evaluate_an_adapter_directory_on_its_own(setup):
    # The notebook's calls in-process (a second kernel would double this file's run time).
    import mlflow

    from helpers.llm import models

    path, _, prepared, adapter, training_run = setup
    params = load_params(path, {"scoring": "generate", "max_new_tokens": 2,
                                "eval_zeroshot": False})
    target = evaluate.find_target(params, adapter=str(adapter))
    assert target.run_id == "" and target.adapter_dir == adapter
    model, tokenizer = models.load(params.model_id)
    with tracking.run(params, run_id=target.run_id, tags=target.tags) as run:
        results = evaluate.evaluate(params, prepared, model, tokenizer, target)
    new = mlflow.MlflowClient().get_run(run.info.run_id)
    assert new.info.run_id != training_run
    assert new.data.tags[contract.TAG_ADAPTER_DIR] == str(adapter)
    assert new.data.tags[contract.TAG_SPLIT_HASH] == prepared.split_hash
    m = new.data.metrics
    assert "test_accuracy_ci_low" in m and "zeroshot_test_accuracy" not in m
    assert m["test_invalid_rate"] == results["finetuned"].scores.invalid_rate
    csv = _read_csv(new.info.run_id, "test")
    assert list(csv.columns) == ["row_id", "label", "p_yes", "prediction", "raw"]
    assert csv["p_yes"].isna().all()  # generation gives no probabilities
    table = evaluate.comparison_table(results)
    assert list(table.columns) == ["fine-tuned"] and "invalid_rate" in table.index


def test_no_run_and_no_adapter_is_a_clear_error(tmp_path, mlflow_store):
    params = load_params(None, {"name": "never-trained", "experiment": "tablora-test"})
    with pytest.raises(evaluate.EvaluationError, match="train first"):
        evaluate.find_target(params)
    with pytest.raises(evaluate.EvaluationError, match="not an adapter directory"):
        evaluate.find_target(params, adapter=str(tmp_path))


def test_frozen_states_start_below_the_adapters_blocks(tmp_path, tiny_model_dir):
    """The adapter's num_layers says where the zero-shot pass's states can be taken over:
    block 4 - 2 = 2 of the tiny model; an adapter on every block, or no config, none."""
    import json

    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model_dir))
    for adapted, start in ((2, 2), (1, 3), (4, None), (-1, None)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"num_layers": adapted}))
        frozen = evaluate.frozen_states(model, tmp_path)
        assert (frozen and frozen.start) == start
    (tmp_path / "adapter_config.json").unlink()
    assert evaluate.frozen_states(model, tmp_path) is None
