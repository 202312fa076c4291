"""helpers.serving.export: mlx-lm's fuse of a run's adapter, on the tiny model and real MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from helpers import contract, data, tracking
from helpers.config import load_params
from helpers.llm import evaluate, models, scoring
from helpers.serving import export
from helpers.serving.pyfunc import PredictError


@pytest.fixture
def trained(tmp_path, tiny_model_dir, mlflow_store):
    """A run holding a tiny adapter and the params (model_id) it was trained with."""
    import mlflow
    from tiny_adapter import train_tiny_adapter

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "experiment": "tablora-test", "model_id": str(tiny_model_dir),
        "eval_batch_size": 16,
        "dataset": {"source": "builtin:breast_cancer", "target": "target",
                    "positive_label": "malignant", "features": ["mean radius", "mean area"]}}))
    params = load_params(path)
    prepared = data.prepare(params)
    adapter = train_tiny_adapter(tiny_model_dir, tmp_path / "adapter",
                                 prepared.messages("train")[:8], steps=3)
    mlflow.MlflowClient().create_experiment(params.experiment,
                                            artifact_location=(tmp_path / "art").as_uri())
    with tracking.run(params) as run:
        tracking.log_params(params)
        mlflow.log_artifacts(str(adapter), contract.ARTIFACT_ADAPTERS)
    return params, prepared, adapter, run.info.run_id


def test_the_fused_model_scores_like_the_adapter(trained, tmp_path):
    params, prepared, adapter, run_id = trained
    out = export.export(run_id, tmp_path / "fused")
    messages = prepared.messages("test", False)[:24]

    model, tokenizer = models.load(params.model_id)
    evaluate.apply_adapter(model, adapter)
    with_adapter = scoring.score(model, tokenizer, messages, params, progress=False).p_yes

    fused, fused_tokenizer = models.load(str(out))  # `model_id: DIR` in a params file
    assert not any(hasattr(m, "lora_a") for _, m in fused.named_modules())  # really fused
    got = scoring.score(fused, fused_tokenizer, messages, params, progress=False).p_yes
    np.testing.assert_allclose(got, with_adapter, atol=1e-4, rtol=0)
    assert np.ptp(got) > 0


def test_export_never_writes_into_a_folder_that_holds_something(trained, tmp_path):
    *_, run_id = trained
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(PredictError, match="already exists"):
        export.export(run_id, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken.")]


def test_a_run_without_an_adapter_is_one_clear_error(trained, tmp_path):
    params, *_ = trained
    with tracking.run(params) as run:
        tracking.log_params(params)
    with pytest.raises(PredictError, match="no adapters/ artifact"):
        export.export(run.info.run_id, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
