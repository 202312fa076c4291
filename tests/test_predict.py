"""helpers.serving.predict (and the logged pyfunc model) on the tiny model with real MLflow:
predictions for new rows equal the evaluation's for the same rows, through `tablora predict`,
`mlflow.pyfunc.load_model` and a real `mlflow models serve`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import baselines, contract, data, tracking
from helpers.config import load_params
from helpers.serving import predict
from helpers.serving.pyfunc import PredictError
from helpers.workflow import notebooks

FEATURES = ["mean radius", "mean texture", "mean area"]
TINY = {
    "name": "tiny",
    "experiment": "tablora-test",
    "n_bootstrap": 100,
    "eval_batch_size": 16,
    "threshold_mode": "tune",
    # Zero-shot too: the fine-tuned pass then reads the zero-shot pass's states below the
    # adapter (scoring.FrozenStates), and predict, which runs the whole model, must still give
    # the same numbers.
    "eval_zeroshot": True,
    "dataset": {"source": "builtin:breast_cancer", "target": "target",
                "positive_label": "malignant", "features": FEATURES},
    "baselines": {"models": ["logistic_l2"], "mode": "fixed"},
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, _migrated_store):
    """A training run with a tiny adapter, evaluated by notebooks/evaluate.ipynb (which logs
    and registers the pyfunc model), and one baseline run: made once for this module."""
    import mlflow
    from tiny_adapter import train_tiny_adapter

    tmp = tmp_path_factory.mktemp("predict")
    db = tmp / "mlflow.db"
    shutil.copy(_migrated_store, db)
    uri = f"sqlite:///{db}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        path = tmp / "tiny.yaml"
        path.write_text(yaml.safe_dump({**TINY, "model_id": str(tiny_model_dir)}))
        params = load_params(path)
        prepared = data.prepare(params)
        # LoRA on the top 2 of 4 blocks, as training does (num_layers): the evaluation's
        # fine-tuned pass then starts from the zero-shot pass's block-2 states.
        adapter = train_tiny_adapter(tiny_model_dir, tmp / "adapter",
                                     prepared.messages("train")[:8], steps=3, num_layers=2)
        mlflow.MlflowClient().create_experiment(params.experiment,
                                                artifact_location=(tmp / "art").as_uri())
        with tracking.run(params) as run:  # what the training notebook leaves behind
            tracking.log_dataset(prepared)
            mlflow.log_artifacts(str(adapter), contract.ARTIFACT_ADAPTERS)
        notebooks.execute("evaluate", path, {}, run_id=run.info.run_id,
                          output=tmp / "evaluate.ipynb", progress=False)
        [baseline] = baselines.run_all(prepared, params)
        yield {"uri": uri, "tmp": tmp, "params": params, "prepared": prepared,
               "run_id": run.info.run_id, "baseline": baseline}


def _csv(run_id: str, name: str) -> pd.DataFrame:
    import mlflow

    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{run_id}/predictions/{name}.csv")))


def _new_rows(evaluated, path, columns=None):
    """The test rows' features (no label), as a user's CSV: row_id first."""
    X = evaluated["prepared"].X("test")
    X = X if columns is None else X.reindex(columns=columns)
    X.to_csv(path)
    return path


def test_predict_equals_the_evaluation_bit_for_bit(evaluated, capsys):
    run_id, tmp = evaluated["run_id"], evaluated["tmp"]
    out = tmp / "predictions.csv"
    result = predict.predict(_new_rows(evaluated, tmp / "new.csv"), run_id=run_id, out=out,
                             progress=False)
    logged = _csv(run_id, contract.PREFIX_TEST)
    written = pd.read_csv(out)
    assert list(written.columns) == ["row_id", "p_yes", "prediction"]
    assert written["row_id"].tolist() == logged["row_id"].tolist()
    # Same recipe, same scoring call: the same float64 values, not merely close ones.
    assert written["p_yes"].tolist() == logged["p_yes"].tolist()
    assert written["prediction"].tolist() == logged["prediction"].tolist()
    assert 0 < written["p_yes"].nunique()
    assert result.kind == contract.KIND_LLM and result.metrics == {}  # no labels given
    assert "warning" not in capsys.readouterr().err


def test_labels_in_the_file_give_the_metrics(evaluated):
    import mlflow

    prepared, run_id, tmp = evaluated["prepared"], evaluated["run_id"], evaluated["tmp"]
    table = prepared.X("test").copy()
    table["target"] = prepared.table.loc[prepared.split["test"], "target"]
    table.to_csv(tmp / "labelled.csv")
    result = predict.predict(tmp / "labelled.csv", run_id=run_id, progress=False)
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert result.metrics["accuracy"] == pytest.approx(logged["test_accuracy"])
    assert result.threshold == logged["threshold"]
    assert "accuracy" in predict.summary_line(result)


def test_the_registered_model_loads_with_mlflow_and_gives_the_same_numbers(evaluated):
    import mlflow

    client = mlflow.MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    assert {"tiny", "logistic_l2"} <= names  # the LLM under the params name, each baseline too
    version = client.get_model_version("tiny", "1")
    assert version.run_id == evaluated["run_id"]
    model = mlflow.pyfunc.load_model("models:/tiny/1")
    assert model.metadata.signature.inputs.input_names() == FEATURES
    X = evaluated["prepared"].X("test").reset_index(drop=True)
    got = model.predict(X)
    logged = _csv(evaluated["run_id"], contract.PREFIX_TEST)
    assert got["p_yes"].tolist() == logged["p_yes"].tolist()
    assert got["prediction"].tolist() == logged["prediction"].tolist()


def test_mlflow_models_serve_answers_with_the_same_numbers(evaluated, tmp_path):
    from helpers.workflow import server

    port = server.free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    # `mlflow models serve` starts `uvicorn` by name: the environment's bin/ must be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(1)
        X = evaluated["prepared"].X("test")
        body = {"dataframe_split": {"columns": list(X.columns),
                                    "data": X.to_numpy().tolist()}}
        req = urllib.request.Request(f"{base}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        server.stop_process(proc)
        log.close()
    got = pd.DataFrame(answer["predictions"])
    logged = _csv(evaluated["run_id"], contract.PREFIX_TEST)
    assert got["p_yes"].tolist() == logged["p_yes"].tolist()
    assert got["prediction"].tolist() == logged["prediction"].tolist()


def test_a_baseline_run_predicts_like_its_evaluation(evaluated):
    b, tmp = evaluated["baseline"], evaluated["tmp"]
    result = predict.predict(_new_rows(evaluated, tmp / "for-baseline.csv"), run_id=b.run_id,
                             progress=False)
    assert result.kind == contract.KIND_BASELINE
    assert result.frame["row_id"].tolist() == b.row_ids
    # The fitted pipeline, reloaded: equal to the last bit or two (a frame read from a CSV is
    # laid out in memory unlike the split's, and BLAS sums in another order).
    np.testing.assert_allclose(result.frame["p_yes"].to_numpy(), b.p_yes, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(result.frame["prediction"].to_numpy(), b.y_pred)


# ------------------------------------------------------------------------- bad input


def _fails(evaluated, path, capsys) -> str:
    out = evaluated["tmp"] / "never.csv"
    with pytest.raises(PredictError) as e:
        predict.predict(path, run_id=evaluated["run_id"], out=out, progress=False)
    assert not out.exists()  # nothing written on failure
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_missing_feature_is_named_with_the_expected_list(evaluated, tmp_path, capsys):
    path = _new_rows(evaluated, tmp_path / "rows.csv", columns=FEATURES[:2])
    message = _fails(evaluated, path, capsys)
    assert "'mean area'" in message and all(repr(f) in message for f in FEATURES)


def test_extra_columns_are_ignored_with_one_warning(evaluated, tmp_path, capsys):
    X = evaluated["prepared"].X("test").copy()
    X["note"], X["colour"] = "x", "red"
    X.to_csv(tmp_path / "rows.csv")
    out = tmp_path / "out.csv"
    predict.predict(tmp_path / "rows.csv", run_id=evaluated["run_id"], out=out, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'note'" in warnings[0] and "'colour'" in warnings[0]
    logged = _csv(evaluated["run_id"], contract.PREFIX_TEST)
    assert pd.read_csv(out)["p_yes"].tolist() == logged["p_yes"].tolist()


@pytest.mark.parametrize("name,content,words", [
    ("empty.csv", b"", "empty"),
    ("header.csv", ",".join(FEATURES).encode() + b"\n", "no rows"),
    ("rows.parquet", b"PAR1\x00\x00", "not a CSV"),
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 50, "could not read it as CSV"),
])
def test_unusable_files_get_one_clear_line(evaluated, tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    assert words in _fails(evaluated, path, capsys)


def test_a_run_and_a_model_at_once_is_refused(evaluated):
    with pytest.raises(PredictError, match="not both"):
        predict.model_uri("abc", "models:/tiny/1")


def test_the_command_writes_the_csv_and_says_what_it_did(evaluated, tmp_path, capsys):
    from helpers import cli

    rows, out = _new_rows(evaluated, tmp_path / "new.csv"), tmp_path / "p.csv"
    assert cli.main(["predict", str(rows), "--run", evaluated["run_id"], "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(evaluated['prepared'].split['test'])} rows scored by the llm model" in printed
    logged = _csv(evaluated["run_id"], contract.PREFIX_TEST)
    assert pd.read_csv(out)["p_yes"].tolist() == logged["p_yes"].tolist()
    # A bad file: one `error:` line, exit 2, nothing written.
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert cli.main(["predict", str(tmp_path / "bad.csv"), "--model", "models:/tiny/1", "-o",
                     str(tmp_path / "bad-out.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing feature column(s)" in err[-1]
    assert not (tmp_path / "bad-out.csv").exists()
