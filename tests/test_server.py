"""helpers.workflow.server: PostgreSQL from its own binaries under a real `mlflow server`.

The `tracking_server` fixture (conftest.py) starts both with this module's functions, the way
`tablora server` does; nothing is mocked.
"""

from __future__ import annotations

import os

import pytest

from helpers import cli
from helpers.workflow import server

pytestmark = pytest.mark.integration


def test_runs_go_to_postgres_and_artifacts_through_the_server(tracking_server, tmp_path):
    import mlflow
    import psycopg

    client = mlflow.MlflowClient(tracking_server.uri)
    exp = client.create_experiment("server-test")
    run = client.create_run(exp, run_name="r")
    client.log_metric(run.info.run_id, "test_accuracy", 0.75)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "notes")
    client.set_terminated(run.info.run_id)

    # The artifact went through the server (proxied) into its folder, not to a client path.
    artifact_uri = client.get_run(run.info.run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    stored = list(tracking_server.artifacts.rglob("note.txt"))
    assert len(stored) == 1 and run.info.run_id in str(stored[0])
    fetched = client.download_artifacts(run.info.run_id, "notes/note.txt", str(tmp_path / "d"))
    assert open(fetched).read() == "hello"
    # The run and its metric are rows of PostgreSQL.
    pg = tracking_server.pg
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=server.DB_USER,
                         password=pg.password, dbname=server.DB_NAME) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s",
                              (run.info.run_id,)).fetchone()
        value = conn.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s",
                             (run.info.run_id, "test_accuracy")).fetchone()
    assert status == ("FINISHED",) and value == (0.75,)


def test_the_database_password_is_not_on_a_command_line(tracking_server):
    """`ps` shows command lines to every user: the URL goes through the environment."""
    password = tracking_server.pg.password
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        assert password not in cmdline, f"pid {pid}: {cmdline[:200]}"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to `postgres`")
def test_a_folder_postgres_cannot_reach_is_named(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    pg = server.LocalPostgres(private / "postgres" / "x", server.free_port())
    with pytest.raises(server.ServerError, match=r"private is not searchable by the `postgres` "
                       r"user, who runs PostgreSQL here \(we are root\): `chmod o\+x .*private`"):
        pg.init()


def test_without_postgres_the_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "pg_bin_dir", lambda: None)
    with pytest.raises(server.ServerError, match="apt-get install -y postgresql"):
        server.LocalPostgres(tmp_path / "pg", 5432)


def test_server_command_options():
    a = cli.build_parser().parse_args(["server"])
    assert (a.host, a.port, a.db, a.artifacts) == ("127.0.0.1", 5000, None, None)
    a = cli.build_parser().parse_args(["server", "--host", "0.0.0.0", "--db",
                                       "postgresql+psycopg://u:p@db:5432/mlflow"])
    assert a.host == "0.0.0.0" and a.db.endswith("/mlflow") and a.func is cli.cmd_server
