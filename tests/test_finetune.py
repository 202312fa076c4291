"""helpers.llm.finetune on the tiny random llama model: the real mlx-lm and MLflow code path."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import config, contract, data, tracking
from helpers.config import ParamsError, load_params
from helpers.llm import batches, finetune, models

# The toy table repeats its rows on purpose (a few rows the tiny model can learn).
pytestmark = pytest.mark.filterwarnings("ignore:.*appear identically in train:UserWarning")


@pytest.fixture
def toy(tmp_path, tiny_model_dir, mlflow_store, monkeypatch):
    """params(**overrides) for a few repeated rows of a two-class table, in temporary stores."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")  # artifacts: tmp_path/mlruns
    table = pd.DataFrame({"size": [1.0, 2.0, 3.0, 4.0] * 6,
                          "label": ["no", "no", "yes", "yes"] * 6})
    table.to_csv(tmp_path / "toy.csv", index=False)
    spec = {"name": "toy", "model_id": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
            "num_layers": -1, "batch_size": 2, "learning_rate": 2e-3, "steps_per_report": 5,
            # mlx-lm's own loss and batches: tests/test_speed.py checks the fast path equals it.
            "fast_training": False,
            "dataset": {"source": str(tmp_path / "toy.csv"), "target": "label",
                        "positive_label": "yes", "test_size": 0.25, "valid_size": 0.25}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return lambda **overrides: load_params(path, overrides)


def _train(params, run_id="", **kwargs):
    model, tokenizer = models.load(params.model_id)
    prepared = data.prepare(params)
    with tracking.run(params, run_id=run_id) as run:
        result = finetune.train(model, tokenizer, prepared, params, **kwargs)
    return result, run.info.run_id


def _losses(run_id, key="train_loss"):
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def _weights(folder):
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / contract.ADAPTER_FILE)).items()}


def test_loss_falls_and_the_run_records_it(toy):
    params = toy(num_iters=20, steps_per_eval=10, save_every=10)
    result, run_id = _train(params)

    losses = [v for _, v in sorted(_losses(run_id).items())]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert sorted(_losses(run_id, "val_loss")) == [0, 10, 20]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    m, tags = run.data.metrics, run.data.tags
    assert m["trainable_parameters"] == result.trainable_parameters > 0
    assert m["tokens_per_sec"] > 0 and m["train_seconds"] > 0 and m["peak_memory_gb"] > 0
    assert tags[contract.TAG_SEED] == "0" and tags[contract.TAG_MODEL_NAME] == "toy"
    client = mlflow.MlflowClient()
    for folder in (contract.ARTIFACT_ADAPTERS, contract.ARTIFACT_ADAPTERS_LAST):
        names = {f.path.split("/")[-1] for f in client.list_artifacts(run_id, folder)}
        assert names == {contract.ADAPTER_FILE, contract.ADAPTER_CONFIG}

    # The saved adapter is one mlx-lm loads as it is.
    import mlx_lm
    from mlx.utils import tree_flatten

    tuned, _ = mlx_lm.load(params.model_id, adapter_path=str(result.adapter_dir))
    loaded = dict(tree_flatten(tuned.parameters()))
    saved = _weights(result.adapter_dir)
    assert all(np.allclose(w, np.array(loaded[k])) for k, w in saved.items())


class _InterruptAfter(batches.Batches):
    """Training batches that stop the run (like Ctrl-C) when step `n + 1` asks for its batch."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, **kwargs):
        stream = super().__call__(dataset, batch_size, max_seq_length, loop=loop, **kwargs)
        for i, batch in enumerate(stream):
            if loop and i == self.n:
                raise KeyboardInterrupt
            yield batch


def test_resume_after_interruption_matches_an_uninterrupted_run(toy, tmp_path):
    # Cosine schedule with warm-up and dropout: the LR step counter and RNG must carry over too.
    kw = {"num_iters": 6, "save_every": 3, "steps_per_eval": 100, "lr_schedule": "cosine",
          "warmup_steps": 2, "lora_dropout": 0.1}
    straight, straight_id = _train(toy(**kw, output_dir=str(tmp_path / "a")))

    params = toy(**kw, output_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        _train(params, batches=_InterruptAfter(3, seed=params.seed))
    run_id = mlflow.search_runs(filter_string="attributes.status = 'KILLED'",
                                output_format="list")[0].info.run_id
    resumed, _ = _train(params, run_id=run_id)

    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    a, b = _losses(straight_id), _losses(run_id)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # one run, continuing steps
    assert np.allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=1e-4)
    lr = "learning_rate"
    assert np.isclose(_losses(straight_id, lr)[6], _losses(run_id, lr)[6])
    wa, wb = _weights(straight.last_dir), _weights(resumed.last_dir)
    assert all(np.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_early_stopping_keeps_the_best_adapter(toy):
    params = toy(num_iters=60, learning_rate=1e-2, steps_per_eval=3, early_stopping_patience=2)
    result, run_id = _train(params)

    val = _losses(run_id, "val_loss")
    assert result.stopped_early and result.steps < 60
    assert result.best_step == min(val, key=val.get) and result.best_val_loss == min(val.values())
    assert result.steps == max(val) == result.best_step + 2 * params.steps_per_eval
    best = json.loads((result.adapter_dir / contract.ADAPTER_CONFIG).read_text())
    last = json.loads((result.last_dir / contract.ADAPTER_CONFIG).read_text())
    assert (best["step"], last["step"]) == (result.best_step, result.steps)
    logged = mlflow.artifacts.load_dict(
        f"runs:/{run_id}/{contract.ARTIFACT_ADAPTERS}/{contract.ADAPTER_CONFIG}")
    assert logged["step"] == result.best_step
    wb, wl = _weights(result.adapter_dir), _weights(result.last_dir)
    assert any(not np.allclose(wb[k], wl[k]) for k in wb)


def test_too_many_layers_is_refused_before_training(toy):
    params = toy(num_layers=16, num_iters=5)
    with pytest.raises(ParamsError, match="num_layers=16 but the model has 4 layers"):
        _train(params)
    run = mlflow.search_runs(output_format="list")[0]
    assert run.info.status == "FAILED"
    assert "num_layers=16 but the model has 4 layers" in run.data.tags[contract.TAG_ERROR]
    assert "train_loss" not in run.data.metrics and not params.adapter_dir.exists()


def test_nan_loss_stops_the_run_as_failed(toy):
    # Adam moves each weight by ~lr per step: with a scale of 1.25e19 that overflows at step 2.
    params = toy(num_iters=20, learning_rate=0.99, lora_alpha=1e20, steps_per_eval=100)
    with pytest.raises(finetune.TrainingDiverged, match="training loss became nan at step 2"):
        _train(params)
    run = mlflow.search_runs(output_format="list")[0]
    assert run.info.status == "FAILED"
    assert "the learning rate 0.99 is too high" in run.data.tags[contract.TAG_ERROR]
    assert max(_losses(run.info.run_id)) == 2


def test_learning_rate_schedule_warms_up_then_decays():
    params = config.Params(learning_rate=1e-3, lr_schedule="cosine", warmup_steps=4,
                           num_iters=24, grad_accumulation_steps=2)  # 12 optimizer updates
    import mlx.core as mx

    schedule = finetune.learning_rate_schedule(params)
    lrs = [schedule(mx.array(s)).item() for s in range(13)]
    assert lrs[0] == 0 and np.isclose(lrs[2], 5e-4) and np.isclose(lrs[4], 1e-3)
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13], strict=False)) and lrs[12] < 1e-5
    assert finetune.learning_rate_schedule(config.Params(learning_rate=1e-3,
                                                         lr_schedule="constant")) == 1e-3


def test_resumed_steps_are_logged_once(toy):
    # Regression: steps re-done after the last checkpoint appeared twice in the loss history.
    params = toy(num_iters=8, save_every=3, steps_per_eval=4)
    with pytest.raises(KeyboardInterrupt):
        _train(params, batches=_InterruptAfter(5, seed=params.seed))  # checkpoint at 3, 5 logged
    run_id = mlflow.search_runs(filter_string="attributes.status = 'KILLED'",
                                output_format="list")[0].info.run_id
    resumed, _ = _train(params, run_id=run_id)
    assert resumed.resumed_from == 3
    client = mlflow.MlflowClient()
    for key, steps in (("train_loss", list(range(1, 9))), ("val_loss", [0, 4, 8])):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key


def test_output_dir_with_foreign_files_is_refused_and_kept(toy, tmp_path):
    # Regression: training cleared checkpoint/ and last/ of any output_dir (issue 15).
    out = tmp_path / "theirs"
    for rel, text in (("checkpoint/notes.txt", "keep"), ("last/keep.txt", "keep"),
                      ("adapter_config.json", '{"mine": 1}')):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ParamsError, match="files that tablora did not write"):
        _train(toy(num_iters=2, output_dir=str(out)))
    assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == before
    # A folder tablora made carries its marker, and is reused (cleared) by the next run.
    ours = tmp_path / "ours"
    _train(toy(num_iters=2, output_dir=str(ours)))
    assert (ours / finetune.OUTPUT_MARKER).is_file()
    (ours / "stray.txt").write_text("a user's file in tablora's folder")
    _train(toy(num_iters=2, output_dir=str(ours)))
    assert (ours / "stray.txt").is_file() and (ours / contract.ADAPTER_FILE).is_file()


def test_one_training_at_a_time_per_output_dir(toy, tmp_path):
    params = toy(num_iters=2)
    with finetune._output_lock(params.adapter_dir):
        with pytest.raises(ParamsError, match="another training run is writing"):
            finetune.train(None, None, None, params)
    _train(params)  # released



def test_num_epochs_is_a_budget_in_passes_over_the_training_rows(toy):
    params = toy(num_epochs=2, early_stopping_patience=0, lr_schedule="cosine")
    result, run_id = _train(params)
    n_train = len(data.prepare(params).split["train"])
    per_epoch = batches.steps_per_epoch(n_train, params.batch_size)
    assert result.steps == 2 * per_epoch == finetune.total_steps(params, n_train)
    run = mlflow.get_run(run_id)
    assert run.data.metrics[contract.TRAIN_STEPS] == 2 * per_epoch
    # Validated EVALS_PER_EPOCH times an epoch (steps_per_eval 0), and at the end.
    every = finetune.eval_every(params, n_train)
    assert sorted(_losses(run_id, "val_loss")) == sorted(
        {0, *range(every, result.steps + 1, every), result.steps})
    assert run.data.tags[contract.TAG_STILL_IMPROVING] == str(result.still_improving).lower()
    # The cosine schedule decays over the resolved steps, not over num_iters (0 here): half-way
    # through, the rate is about half of it.
    lrs = _losses(run_id, "learning_rate")
    assert 0.3 < lrs[result.steps // 2] / params.learning_rate < 0.8
    assert lrs[result.steps] < 0.1 * params.learning_rate


def test_still_improving_is_told_only_when_the_budget_ended_a_falling_loss():
    state = {"stopped_early": False, "val_losses": [2.0, 1.0, 0.5]}
    assert finetune.still_improving(state)
    assert not finetune.still_improving({**state, "stopped_early": True})
    assert not finetune.still_improving({**state, "val_losses": [2.0, 0.5, 0.6]})
    assert not finetune.still_improving({**state, "val_losses": [2.0, 0.5, 0.4999]})
    assert not finetune.still_improving({**state, "val_losses": [2.0]})


def test_mlx_lm_progress_stays_out_of_notebooks(monkeypatch):
    """Regression: in a notebook mlx-lm's rich progress displayed a widget and routed stderr into
    it, so the executed notebook kept a stale copy of our progress bar ("6/32")."""
    import sys

    from mlx_lm.cli_ui import make_console, make_train_progress

    console = make_console()
    monkeypatch.setattr(console, "is_jupyter", True)  # as in a Jupyter kernel
    stderr = sys.stderr
    with finetune._QuietMlxConsole(), make_train_progress(console):
        assert sys.stderr is stderr
    assert console.is_jupyter is True


def test_the_on_eval_hook_stops_training_as_a_pruned_run(toy):
    """A search's pruner (helpers.workflow.tune) stops a trial through this hook."""
    seen = []

    def on_eval(step, n_eval, val_loss):
        seen.append((step, n_eval))
        return n_eval == 2  # prune at the second evaluation

    result, _ = _train(toy(num_iters=20, steps_per_eval=4, early_stopping_patience=0),
                       on_eval=on_eval)
    assert seen == [(4, 1), (8, 2)]  # not called for the base model at step 0
    assert result.pruned and not result.stopped_early and result.steps == 8
    assert (result.adapter_dir / "adapters.safetensors").is_file()  # the best one so far
