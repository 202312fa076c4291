"""A few W3C WebDriver calls over HTTP to Debian's chromedriver (headless Chromium): enough to open
a page, wait for something in it, run a line of JavaScript and take a screenshot. No client
library: the protocol is plain JSON over HTTP. Also what the browser tests share for the servers
they start (a free port, stopping a server with its workers)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# WebDriver's key for an element reference in JSON.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(server: subprocess.Popen) -> None:
    """A server started with start_new_session=True, and its workers: they share its session."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Browser:
    """One headless Chromium session driven through chromedriver; use as a context manager."""

    def __init__(self, profile: Path, width: int = 1600, height: int = 1000):
        self.port = free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait_for_driver()
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-quic",
                     f"--user-data-dir={profile}", f"--window-size={width},{height}"]}}
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = f"/session/{value['sessionId']}"
        self._call("POST", f"{self.session}/timeouts", {"pageLoad": 60000, "script": 30000})

    def _wait_for_driver(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/status", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read().decode()[:500]}") from None

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body: `return ...`) in the page; returns its value."""
        return self._call("POST", f"{self.session}/execute/sync",
                          {"script": script, "args": list(args)})

    def wait(self, script: str, timeout: float = 60, *args: Any) -> Any:
        """Poll `script` until it returns something truthy; returns it (else TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for: {script}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.js("return document.body ? document.body.innerText : ''")

    def wait_text(self, needle: str, timeout: float = 60) -> str:
        """Wait until the page's visible text contains `needle`; returns the text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not on the page after {timeout:.0f}s; it shows: "
                                   f"{text[:800]!r}")
            time.sleep(0.5)

    def frame(self, css: str | None) -> None:
        """Switch into the first iframe matching `css` (None: back to the top page)."""
        if css is None:
            self._call("POST", f"{self.session}/frame", {"id": None})
            return
        el = self._call("POST", f"{self.session}/element", {"using": "css selector",
                                                            "value": css})
        self._call("POST", f"{self.session}/frame", {"id": {ELEMENT: el[ELEMENT]}})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        except Exception:  # noqa: BLE001 - the driver may already be gone
            pass
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
