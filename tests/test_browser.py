"""The MLflow UI in a real browser: a batch's runs in a temporary store, the UI on loopback, the
experiment's runs page rendered by headless Chromium, and the runs and a test metric on it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import contract

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MLFLOW = Path(sys.executable).with_name("mlflow")
RUN_NAMES = ("browser-llm-seed0", "browser-llm-seed1", "random_forest")
METRIC = "test_balanced_accuracy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch_runs(tmp: Path) -> str:
    """A batch parent, two LLM seeds and a baseline nested under it; returns the experiment id."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp_id = client.create_experiment("browser-test", artifact_location=(tmp / "mlruns").as_uri())
    parent = client.create_run(exp_id, run_name="batch-20261128-000000-beef", tags={
        contract.TAG_KIND: "batch", contract.TAG_BATCH_ID: "20261128-000000-beef"})
    for i, name in enumerate(RUN_NAMES):
        kind = "baseline" if name == "random_forest" else "llm"
        run = client.create_run(exp_id, run_name=name, tags={
            contract.TAG_KIND: kind, contract.TAG_PARENT: parent.info.run_id,
            contract.TAG_BATCH_ID: "20261128-000000-beef"})
        client.log_metric(run.info.run_id, METRIC, 0.8 + i / 100)
        client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return exp_id


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def render(url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after `budget_ms` of virtual time (Chromium then stops waiting on timers)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--disable-quic", f"--user-data-dir={profile}",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                    "chromium; .ci/run installs it where it can)")
def test_mlflow_ui_shows_the_batch_runs(tmp_path):
    exp_id = make_batch_runs(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--default-artifact-root", (tmp_path / "mlruns").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/health", server)
        # The bare experiment URL opens a GenAI overview; the runs page has the runs. Sorted by
        # anything but creation time it lists nested runs flat (else they hide under the collapsed
        # batch run), and its chart mode draws a chart per metric with each run's value.
        url = (f"{base}/#/experiments/{exp_id}/runs?orderByKey=metrics.%60{METRIC}%60"
               "&orderByAsc=false&compareRunsMode=CHART")
        dom = ""
        # A React app that fetches after load: give a slow machine a second, longer chance.
        for budget_ms in (15000, 45000):
            dom = render(url, tmp_path / f"profile-{budget_ms}", budget_ms)
            if all(name in dom for name in RUN_NAMES) and f'title="{METRIC}"' in dom:
                break
        for name in RUN_NAMES:
            assert name in dom, f"run {name!r} not on the runs page"
        assert f'title="{METRIC}"' in dom, f"no chart of {METRIC!r} on the runs page"
        assert "0.82" in dom, "the metric's values are not drawn"
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """The server and its workers: they share the session the server was started in."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
