"""Shared fixtures: a tiny model, a temporary MLflow store, tiny params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing outside this machine is reachable


@pytest.fixture(scope="session", autouse=True)
def _output_root(tmp_path_factory):
    """Tests write adapters under their tmp_path: an allowed output_dir root (config.output_roots),
    also for the `tablora` commands and kernels they start (they inherit the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TABLORA_OUTPUT_ROOT", str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random llama model directory that mlx_lm.load and helpers.llm.models.load accept."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An empty SQLite store with MLflow's schema, made once: migrations take ~5 s per store."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _migrated_store) -> str:
    """A fresh SQLite MLflow store for one test; returns its tracking URI."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(_migrated_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow keeps the active store and experiment in module globals: start each test clean.
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id="0")  # "Default", made by the migrations
    return uri


@pytest.fixture(scope="session")
def tracking_server():
    """PostgreSQL (a cluster of its own in a temporary directory, run as the `postgres` user
    when we are root) under `mlflow server` with proxied artifacts, on free loopback ports.
    Shared by the server and cluster tests: starting both takes seconds to a minute."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from helpers.workflow import server

    if server.pg_bin_dir() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (`.ci/run` and `make setup` "
                    "install Debian's postgresql package where they run as root)")
    # Not under pytest's tmp_path: its folders are private to us, and as root PostgreSQL runs
    # as `postgres`, which must reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="tablora-server-"))
    root.chmod(0o755)
    pg = server.LocalPostgres(root / "postgres", server.free_port())
    proc = None
    try:
        pg.start()
        port = server.free_port()
        proc = server.start_mlflow(pg.url(), root / "artifacts", port=port, workers=1,
                                   log=root / "mlflow-server.log")
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", pg=pg,
                              artifacts=root / "artifacts", log=root / "mlflow-server.log")
    finally:
        if proc is not None:
            server.stop_process(proc)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
