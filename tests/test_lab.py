"""`make lab` as a new user meets it: the exact command the Makefile runs (as root here, as in
containers and CI), on a free loopback port, serves the JupyterLab page; in headless Chromium a
notebook opened there is not marked modified once its kernel is up."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from webdriver import CHROMEDRIVER, CHROMIUM, Browser, free_port, stop_server

from helpers.config import PROJECT_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def lab_command(port: int) -> str:
    """What `make lab` runs, as make prints it (-n: nothing run; -o setup: no set-up step)."""
    out = subprocess.run(["make", "-s", "-n", "-o", "setup", "lab", f"LAB_PORT={port}"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    port, token = free_port(), secrets.token_hex(12)
    command = lab_command(port)
    # Jupyter's runtime files, settings and workspaces go to the test's folder, not ~/.jupyter.
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces")}
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(["bash", "-c", command], cwd=PROJECT_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"`{command}` exited with {server.returncode}:\n"
                            f"{(tmp / 'lab.log').read_text()[-3000:]}")
            try:
                if _get(f"{base}/api/status?token={token}")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {base} within 180 s")
            time.sleep(0.5)
        yield {"base": base, "token": token, "command": command, "tmp": tmp}
    finally:
        stop_server(server)
        log.close()


def test_make_lab_serves_jupyterlab_as_root(lab):
    """Regression: `make lab` failed as root ("Running as root is not recommended")."""
    if os.geteuid() == 0:
        assert "--allow-root" in lab["command"]
    assert "--ip 127.0.0.1" in lab["command"]  # loopback only
    status, page = _get(f"{lab['base']}/lab/tree/notebooks?token={lab['token']}")
    assert status == 200 and "<title>JupyterLab</title>" in page
    # The token stays on: without it the server asks for one.
    status, page = _get(f"{lab['base']}/lab/tree/notebooks")
    assert "/login" in page or "token" in page.lower()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver)")
def test_a_notebook_is_not_modified_by_opening_it(lab):
    """Regression: the notebooks showed as modified as soon as JupyterLab opened them (the
    kernel's language_info differed from the committed one)."""
    checkpoints = PROJECT_ROOT / "notebooks" / ".ipynb_checkpoints"
    existed = checkpoints.exists()  # JupyterLab checkpoints a notebook it opens
    tab = ("return Array.from(document.querySelectorAll('.lm-TabBar-tab'))"
           ".filter(t => t.innerText.includes('train.ipynb')).map(t => t.className).join(' ')")
    try:
        with Browser(lab["tmp"] / "profile") as browser:
            browser.get(f"{lab['base']}/lab/tree/notebooks/train.ipynb?token={lab['token']}")
            browser.wait("return document.querySelector('.jp-Notebook .jp-Cell') !== null", 120)
            # The kernel starts (idle), its session settles (JupyterLab may flag the tab for a
            # moment and start it again), and it tells JupyterLab its language_info: judge the
            # tab once that is over, by its last seconds.
            browser.wait("return document.querySelector('.jp-Notebook-ExecutionIndicator"
                         "[data-status=idle]') !== null", 120)
            seen = []
            for _ in range(40):
                seen.append(browser.js(tab))
                time.sleep(0.5)
            folder = os.environ.get("TABLORA_SCREENSHOTS")
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
                browser.screenshot(Path(folder) / "jupyterlab-train.png")
    finally:
        if not existed:
            shutil.rmtree(checkpoints, ignore_errors=True)
    assert seen[-1] and not any("jp-mod-dirty" in t for t in seen[-10:]), seen
