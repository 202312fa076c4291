"""The MLflow UI in a real browser, as a new user meets it: a batch's runs, its comparison and an
executed notebook in a temporary store (written by tablora's own code: tracking.setup, the
comparison, notebooks.log_executed), the UI on loopback, and headless Chromium finding the
model-training view with test_accuracy, the report's images loaded, and the notebook's HTML.

Set TABLORA_SCREENSHOTS=<folder> to keep a screenshot of each page."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from webdriver import CHROMEDRIVER, CHROMIUM, Browser, free_port, stop_server

from helpers import contract

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: "
                                 "apt-get install chromium chromium-driver; .ci/run installs "
                                 "them where it can)")]
needs_driver = pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed "
                                  "(Debian: apt-get install chromium-driver)")

MLFLOW = Path(sys.executable).with_name("mlflow")
EXPERIMENT = "browser-test"
BATCH = "20261128-000000-beef"
# name -> (kind, correct test rows of 40)
MODELS = {"browser-llm": ("llm", 31), "random_forest": ("baseline", 38),
          "lasso": ("baseline", 36)}
METRIC = "test_accuracy"


def _predictions(correct: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.array([1, 0] * 20)
    pred = label.copy()
    wrong = rng.choice(40, 40 - correct, replace=False)
    pred[wrong] = 1 - pred[wrong]
    p_yes = np.where(pred == 1, rng.uniform(0.55, 0.95, 40), rng.uniform(0.05, 0.45, 40))
    return pd.DataFrame({"row_id": np.arange(40), "label": label, "p_yes": p_yes.round(3),
                         "prediction": pred})


def make_batch(tmp: Path) -> dict[str, str]:
    """A batch as `tablora batch` leaves it: the experiment (tracking.setup), a parent, an LLM
    and two baselines with test metrics and predictions, the comparison (compare.run: REPORT.md,
    REPORT.html, figures, descriptions, colours) and an executed notebook (.ipynb + .html)."""
    import mlflow
    import nbformat

    from helpers import metrics, tracking
    from helpers.analysis import compare
    from helpers.workflow import notebooks

    exp_id = tracking.setup(EXPERIMENT)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp_id, run_name=f"batch-{BATCH}", tags={
        contract.TAG_KIND: contract.KIND_BATCH, contract.TAG_BATCH_ID: BATCH,
        **tracking.run_identity("tablora batch")}).info.run_id
    ids = {}
    for i, (name, (kind, correct)) in enumerate(MODELS.items()):
        run = client.create_run(exp_id, run_name=name, tags={
            contract.TAG_KIND: kind, contract.TAG_PARENT: parent, contract.TAG_BATCH_ID: BATCH,
            contract.TAG_MODEL_NAME: name, contract.TAG_SPLIT_HASH: "0123456789abcdef",
            **tracking.run_identity(f"/x/notebooks/{'train' if kind == 'llm' else 'baselines'}"
                                    ".ipynb")})
        df = _predictions(correct, i)
        values = metrics.summary(df["label"], df["prediction"], df["p_yes"], prefix="test_",
                                 n_bootstrap=200)
        client.log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric(k, float(v), 0, 0) for k, v in values.items()
            if np.isfinite(v)])
        df.to_csv(tmp / "test.csv", index=False)
        client.log_artifact(run.info.run_id, str(tmp / "test.csv"), "predictions")
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    client.set_terminated(parent, "FINISHED")
    compare.run(EXPERIMENT, BATCH, out=tmp / "compare")

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("finetune.train(model, tokenizer, prepared, params)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="train: 32/32\n"),
                    nbformat.v4.new_output("display_data", {"image/png": _png(tmp)})]
    nb.cells = [nbformat.v4.new_markdown_cell("# Train"), cell]
    executed = tmp / "train.ipynb"
    nbformat.write(nb, str(executed))
    notebooks.log_executed(client, ids["browser-llm"], executed)
    return {"experiment": exp_id, "parent": parent, **ids}


def _png(tmp: Path) -> str:
    import base64

    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1, 2], [2, 1, 0.5])
    fig.savefig(tmp / "loss.png")
    return base64.b64encode((tmp / "loss.png").read_bytes()).decode()


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


@pytest.fixture(scope="module")
def ui(tmp_path_factory, _migrated_store):
    """The batch in a temporary store, and `mlflow server` over it on a free loopback port."""
    import shutil

    tmp = tmp_path_factory.mktemp("browser")
    shutil.copy(_migrated_store, tmp / "mlflow.db")  # MLflow's schema, made once per session
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        ids = make_batch(tmp)
    port = free_port()
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--default-artifact-root", (tmp / "mlruns").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/health", server)
        yield {"base": base, "tmp": tmp, **ids}
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def browser(ui):
    if CHROMEDRIVER is None:
        pytest.skip("chromedriver is not installed (Debian: apt-get install chromium-driver)")
    with Browser(ui["tmp"] / "profile") as b:
        yield b


def shot(browser: Browser, name: str) -> None:
    folder = os.environ.get("TABLORA_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.screenshot(Path(folder) / f"{name}.png")


@needs_driver
def test_mlflow_ui_charts_the_batch_runs(ui, browser):
    """The chart view draws a chart of test_accuracy with each run's value."""
    browser.frame(None)
    browser.get(f"{ui['base']}/#/experiments/{ui['experiment']}/runs?{contract.UI_WORKFLOW}"
                f"&orderByKey=metrics.%60{METRIC}%60&orderByAsc=false&compareRunsMode=CHART")
    browser.wait(f"return document.querySelector('[title=\"{METRIC}\"]') !== null", 90)
    text = browser.wait_text("0.95")
    shot(browser, "mlflow-charts")
    for name in MODELS:
        assert name in text, f"run {name!r} not on the chart page"


@needs_driver
def test_the_printed_url_opens_the_model_training_view_with_test_accuracy(ui, browser):
    """Regression: the experiment opened in MLflow's GenAI view (Traces, Judges), its runs
    collapsed under the batch row, without metric columns. The URL tablora prints (make ui, the
    batch's last lines) opens the model-training runs table, every model a row, test_accuracy a
    column."""
    from helpers import tracking

    browser.get(tracking.ui_url(ui["experiment"], ui["base"]))
    text = browser.wait_text("random_forest", timeout=90)
    text = browser.wait_text(METRIC)
    shot(browser, "mlflow-runs")
    assert "Judges" not in text and "Evaluation runs" not in text, "the GenAI view"
    assert all(name in text for name in MODELS), "models hidden under the batch row"
    headers = browser.js("return Array.from(document.querySelectorAll('[role=columnheader]'))"
                         ".map(e => e.innerText.trim())")
    assert METRIC in headers, headers
    # Best first: the forest (38/40) heads the list, the LLM (31/40) follows the baselines.
    order = [name for name in text.split() if name in MODELS]
    assert order[:3] == ["random_forest", "lasso", "browser-llm"], order


@needs_driver
def test_report_html_artifact_shows_its_figures(ui, browser):
    """Regression: REPORT.md's figures were raw `[metric_bars](metric_bars.png)` text in the
    artifact view. REPORT.html embeds them: every image in it has loaded (natural width > 0)."""
    browser.frame(None)
    browser.get(f"{ui['base']}/#/experiments/{ui['experiment']}/runs/{ui['parent']}/artifacts/"
                f"{contract.ARTIFACT_COMPARISON}/{contract.REPORT_HTML}?{contract.UI_WORKFLOW}")
    browser.wait("return document.querySelector('iframe') !== null", 90)
    shot(browser, "mlflow-report-html")
    browser.frame("iframe")
    try:
        browser.wait("return document.images.length >= 3 && Array.from(document.images)"
                     ".every(i => i.complete)", 60)
        widths = browser.js("return Array.from(document.images).map(i => i.naturalWidth)")
        text = browser.text()
    finally:
        browser.frame(None)
    assert widths and all(w > 0 for w in widths), widths
    assert "Results: experiment" in text and "Verdict" in text


@needs_driver
def test_executed_notebook_html_artifact(ui, browser):
    """Regression: executed notebooks previewed as raw JSON. Their HTML shows the cells' output
    and figures."""
    browser.frame(None)
    browser.get(f"{ui['base']}/#/experiments/{ui['experiment']}/runs/{ui['browser-llm']}/"
                f"artifacts/{contract.ARTIFACT_NOTEBOOKS}/train.html?{contract.UI_WORKFLOW}")
    browser.wait("return document.querySelector('iframe') !== null", 90)
    browser.frame("iframe")
    try:
        browser.wait("return document.body && document.body.innerText.includes('train: 32/32')",
                     60)
        browser.wait("return document.images.length > 0 && document.images[0].complete", 30)
        widths = browser.js("return Array.from(document.images).map(i => i.naturalWidth)")
    finally:
        browser.frame(None)
    shot(browser, "mlflow-notebook-html")
    assert widths and all(w > 0 for w in widths), widths


@needs_driver
def test_run_page_shows_source_user_and_description(ui, browser):
    """Regression: Source, Created by and Description were empty on LLM runs."""
    browser.frame(None)
    browser.get(f"{ui['base']}/#/experiments/{ui['experiment']}/runs/{ui['browser-llm']}"
                f"?{contract.UI_WORKFLOW}")
    text = browser.wait_text("best baseline random_forest", timeout=90)
    shot(browser, "mlflow-run-page")
    assert "train.ipynb" in text and "test accuracy" in text
