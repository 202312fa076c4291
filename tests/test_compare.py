"""helpers.analysis.compare (and the report it writes) on a real tiny batch in a temporary MLflow
store (no mocks): tables, verdicts, figures, refusals, round over round, and `recommend` writing
loadable params files."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers import cli, contract, tracking
from helpers.analysis import compare, records, report
from helpers.config import Params, load_params

# The reference's test set: 59 rows, 36 positive.
LABELS = np.array([1] * 36 + [0] * 23)
ROW_IDS = np.arange(59) * 7 + 3
LLAMA3B = "mlx-community/Llama-3.2-3B-Instruct-4bit"
LLAMA8B = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"


def predictions(tp: int, fp: int, seed: int, row_ids=ROW_IDS) -> pd.DataFrame:
    """Predictions with a given confusion matrix: TP of the positives, FP of the negatives."""
    rng = np.random.default_rng(seed)
    pred = np.zeros(LABELS.size, dtype=int)
    pred[rng.choice(np.flatnonzero(LABELS == 1), tp, replace=False)] = 1
    pred[rng.choice(np.flatnonzero(LABELS == 0), fp, replace=False)] = 1
    p_yes = np.where(pred == 1, rng.uniform(0.5, 0.95, pred.size), rng.uniform(0.05, 0.5,
                                                                                pred.size))
    return pd.DataFrame({"row_id": row_ids, "label": LABELS, "p_yes": p_yes.round(4),
                         "prediction": pred})


def metrics(df: pd.DataFrame, prefix: str) -> dict[str, float]:
    """The contract's metric names, with percentile-bootstrap CIs for accuracy and F1."""
    y, p = df["label"].to_numpy(), df["prediction"].to_numpy()

    def counts(yy, pp):
        return (((yy == 1) & (pp == 1)).sum(), ((yy == 0) & (pp == 0)).sum(),
                ((yy == 0) & (pp == 1)).sum(), ((yy == 1) & (pp == 0)).sum())

    tp, tn, fp, fn = counts(y, p)
    rec, spec = tp / (tp + fn), tn / (tn + fp)
    out = {"accuracy": (tp + tn) / y.size, "precision": tp / max(tp + fp, 1), "recall": rec,
           "specificity": spec, "f1": 2 * tp / (2 * tp + fp + fn), "balance_gap": abs(rec - spec),
           "balanced_accuracy": (rec + spec) / 2, "positive_rate": (tp + fp) / y.size,
           "tp": tp, "tn": tn, "fp": fp, "fn": fn}
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(300):
        i = rng.integers(0, y.size, y.size)
        btp, btn, bfp, bfn = counts(y[i], p[i])
        boots.append(((btp + btn) / y.size, 2 * btp / max(2 * btp + bfp + bfn, 1)))
    for k, col in (("accuracy", 0), ("f1", 1)):
        out[f"{k}_ci_low"], out[f"{k}_ci_high"] = np.percentile([b[col] for b in boots],
                                                                 [2.5, 97.5])
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def log_run(name: str, kind: str, test: pd.DataFrame, *, batch: str, parent: str = "",
            split: str = "split-1", model_id: str = "", zeroshot: pd.DataFrame | None = None,
            seed: int | None = None, train_falls: bool = False, tmp=None) -> str:
    tags = {contract.TAG_KIND: kind, contract.TAG_SPLIT_HASH: split,
            contract.TAG_BATCH_ID: batch, contract.TAG_MODEL_NAME: name}
    if parent:
        tags[contract.TAG_PARENT] = parent
    if seed is not None:
        tags[contract.TAG_SEED] = str(seed)
    run_name = name + (f"-seed{seed}" if seed else "")
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_metrics(metrics(test, "test_"))
        test.to_csv(tmp / "test.csv", index=False)
        mlflow.log_artifact(str(tmp / "test.csv"), "predictions")
        if kind == "llm":
            tracking.log_params(Params(name=name, model_id=model_id, num_iters=100,
                                       batch_size=2, learning_rate=1e-5))
            mlflow.log_metrics(metrics(zeroshot, "zeroshot_test_"))
            zeroshot.to_csv(tmp / "zeroshot_test.csv", index=False)
            mlflow.log_artifact(str(tmp / "zeroshot_test.csv"), "predictions")
            mlflow.log_metrics({"train_seconds": 300.0, "tokens_per_sec": 500.0})
            for step in range(10, 110, 10):
                loss = 2.0 - 0.01 * step if train_falls else 1.0 + 0.01 * (-1) ** (step // 10)
                mlflow.log_metric("train_loss", loss, step=step)
            for step, val in ((25, 1.3), (50, 1.1), (75, 1.05), (100, 1.04)):
                mlflow.log_metric("val_loss", val, step=step)
        return run.info.run_id


def log_batch(batch: str, tmp, llm_3b=(20, 11), llm_8b=(10, 5), rf=(22, 11), lasso=(16, 9),
              seeds_8b=(None,)) -> str:
    """A batch parent with 2 LLM runs and 2 baseline runs nested under it (the contract)."""
    with mlflow.start_run(run_name=f"batch-{batch}",
                          tags={contract.TAG_KIND: "batch", contract.TAG_BATCH_ID: batch}) as p:
        parent = p.info.run_id
    zeroshot = predictions(36, 23, seed=9)  # says Yes to everything: 61.0%
    log_run("llama-3.2-3b", "llm", predictions(*llm_3b, seed=1), batch=batch, parent=parent,
            model_id=LLAMA3B, zeroshot=predictions(13, 10, seed=8), tmp=tmp)
    for i, seed in enumerate(seeds_8b):
        log_run("llama-3.1-8b", "llm", predictions(*llm_8b, seed=2 + i), batch=batch,
                parent=parent, model_id=LLAMA8B, zeroshot=zeroshot, seed=seed, train_falls=True,
                tmp=tmp)
    log_run("random_forest", "baseline", predictions(*rf, seed=3), batch=batch, parent=parent,
            tmp=tmp)
    log_run("lasso", "baseline", predictions(*lasso, seed=4), batch=batch, parent=parent,
            tmp=tmp)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: experiment "tablora" with an earlier batch b0 and batch b1
    (8B run with two seeds), plus experiments that must be refused."""
    tmp = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        tracking.setup("tablora")
        log_batch("b0", tmp, llm_3b=(15, 12), llm_8b=(9, 8), rf=(22, 11), lasso=(16, 9))
        parent = log_batch("b1", tmp, seeds_8b=(0, 1))
        # A later batch with one LLM and no baselines of its own (same split).
        log_run("qwen-7b", "llm", predictions(10, 5, seed=5), batch="b2", model_id="q/Qwen-7B",
                zeroshot=predictions(13, 10, 8), tmp=tmp)
        tracking.setup("mixed")
        log_run("a", "llm", predictions(20, 11, 1), batch="x", split="split-1", model_id=LLAMA3B,
                zeroshot=predictions(13, 10, 8), tmp=tmp)
        log_run("b", "baseline", predictions(20, 11, 1), batch="y", split="split-2", tmp=tmp)
        tracking.setup("rows")
        log_run("a", "llm", predictions(20, 11, 1), batch="x", model_id=LLAMA3B,
                zeroshot=predictions(13, 10, 8), tmp=tmp)
        log_run("b", "baseline", predictions(20, 11, 1, row_ids=ROW_IDS + 1), batch="x",
                tmp=tmp)
        mlflow.set_experiment("tablora")
        yield {"tmp": tmp, "parent": parent}


def run_cli(command: str, **options) -> int:
    """`tablora <command> --key value ...` through the real command line."""
    argv = [command]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return cli.main(argv)


def test_compare_batch_prints_tables_verdicts_and_writes_figures(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli("compare", batch="b1", out=out) == 0
    text = capsys.readouterr().out
    for heading in ("## Fine-tuned LLM results", "## Baselines beside the LLMs",
                    "## Paired comparisons", "## Zero-shot → fine-tuned",
                    "## Confusion matrices", "## Summary for a README"):
        assert heading in text
    # The reference's best model: TP=20, TN=12, FP=11, FN=16 -> 54.2% with its CI.
    assert "**54.2%** [" in text
    assert "54.2% vs 57.6% on 59 rows" in text and "exact McNemar p=" in text
    assert "llama-3.1-8b (2 seeds)" in text and " ± " in text
    assert "seed-majority vote" in text
    for name in ("metric_bars", "confusion", "roc", "loss", "zeroshot"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert (out / "REPORT.md").read_text().startswith("# Results: experiment `tablora`, batch")
    # Logged to the batch's parent run.
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(store["parent"], "comparison")}
    assert "comparison/metric_bars.png" in logged and "comparison/REPORT.md" in logged
    assert "comparison/REPORT.html" in logged
    # REPORT.html carries its figures (MLflow's artifact view and a browser show it as is).
    page = (out / "REPORT.html").read_text()
    drawn = len(list(out.glob("*.png")))  # bars, confusion, ROC, loss, zero-shot, calibration
    assert drawn == 6 and "<table>" in page
    assert page.count('<img src="data:image/png;base64,') == drawn
    assert "**" not in page and "](metric_bars.png)" not in page


def test_runs_get_descriptions_and_the_figures_colours(store, tmp_path):
    """Each model's run is described with its headline against the other arm, and tagged with
    the colour the figures give it (MLflow's charts then match the figures)."""
    from helpers.analysis import figures

    c = compare.run("tablora", "b1", out=tmp_path)
    client = mlflow.MlflowClient()
    colors = figures.model_colors(c)
    assert len(set(colors.values())) == len(colors) == 4
    best = c.best_llm
    note = client.get_run(best.run_id).data.tags[contract.TAG_NOTE]
    assert note.startswith(f"**{best.cell('accuracy')}** test accuracy (zero-shot ")
    assert f"best baseline random_forest {c.best_baseline.cell('accuracy', with_ci=False)}" in note
    for r in c.llms + c.baselines:
        for rid in r.run_ids or [r.run_id]:
            assert client.get_run(rid).data.tags[contract.TAG_RUN_COLOR] == colors[r.name]
    parent = client.get_run(store["parent"]).data.tags[contract.TAG_NOTE]
    assert c.headline[0] in parent and "comparison/REPORT.html" in parent


def test_comparison_statistics(store):
    c = compare.run("tablora", "b1", with_figures=False, log=False)
    assert [r.name for r in c.llms] == ["llama-3.2-3b", "llama-3.1-8b"]
    assert [r.name for r in c.baselines] == ["random_forest", "lasso"]
    assert c.best_llm.value("accuracy") == pytest.approx(32 / 59)
    # 3 tests in one Holm family: each LLM vs the forest, the 8B vs the 3B.
    assert len(c.tests) == 3 and all(t.p_adjusted >= t.test.p for t in c.tests)
    assert all(t.test.n == 59 for t in c.tests)
    eight = next(t for t in c.tests if t.family == report.VS_BEST_LLM)
    assert eight.a.name == "llama-3.1-8b" and eight.b is c.best_llm
    # Ranks agree with the tests: the 8B shares rank 1 unless significantly worse.
    assert c.ranks["llama-3.2-3b"] in ("1", "=1")
    assert c.clear_winner == eight.a_worse
    # The merged 8B: mean across seeds, sd as spread, no single-seed CI.
    eight_b = c.llms[1]
    assert eight_b.seeds == [0, 1] and "test_accuracy" in eight_b.spread
    assert eight_b.ci("accuracy") is None
    assert c.summary()["best_llm"] == "llama-3.2-3b"
    frame = report.results_frame(c)
    assert list(frame["Model"])[:2] == ["random_forest", "llama-3.2-3b"]
    assert frame.loc[1, "Accuracy [95% CI]"].startswith("54.2% [")


def test_against_earlier_round(store, tmp_path, capsys):
    assert run_cli("compare", batch="b1", against="b0", out=tmp_path) == 0
    text = capsys.readouterr().out
    assert "## Change from the earlier round (`b0`)" in text
    # b0's 3B had 15+11=26/59 = 44.1% correct; b1's 32/59 = 54.2%: paired on the same rows.
    assert "44.1%" in text and "+10.2 [" in text
    c = compare.run("tablora", "b1", against="b0", with_figures=False, log=False)
    assert {t.a.name for t in c.earlier} == {"llama-3.2-3b", "llama-3.1-8b", "random_forest",
                                             "lasso"}
    assert all(t.test is not None and t.test.n == 59 for t in c.earlier)


def test_whole_experiment_keeps_the_latest_run_per_model(store):
    c = compare.run("tablora", with_figures=False, log=False)
    assert {r.name for r in c.llms} == {"llama-3.2-3b", "llama-3.1-8b", "qwen-7b"}
    assert c.best_llm.name == "llama-3.2-3b" and c.best_llm.batch_id == "b1"
    # The 8B's seeds come from its latest round only (b0's run is superseded, not averaged in).
    eight = next(r for r in c.llms if r.name == "llama-3.1-8b")
    assert eight.seeds == [0, 1] and eight.batch_id == "b1"
    assert sum("llama-3.1-8b" in s and "superseded" in s for s in c.skipped) == 1


def test_batch_without_baselines_borrows_them_from_the_same_split(store):
    c = compare.run("tablora", "b2", with_figures=False, log=False)
    assert [r.name for r in c.llms] == ["qwen-7b"]
    assert [r.name for r in c.baselines] == ["random_forest", "lasso"]
    assert all(r.batch_id == "b1" for r in c.baselines)
    assert any("baseline taken from batch b1 (same split)" in s for s in c.skipped)


def test_mixed_split_hashes_are_refused(store, capsys):
    with pytest.raises(report.ReportError) as e:
        records.load("mixed")
    msg = str(e.value)
    assert "split split-1: a (" in msg and "split split-2: b (" in msg and "--batch" in msg
    assert run_cli("compare", experiment="mixed") == 2
    assert "different data splits" in capsys.readouterr().err


def test_different_test_rows_are_refused(store):
    with pytest.raises(report.ReportError, match="different test rows"):
        compare.run("rows", with_figures=False, log=False)


def test_no_runs_is_a_clear_error(store, capsys):
    assert run_cli("compare", experiment="nothing-here") == 2
    assert "no finished, evaluated model runs in experiment 'nothing-here'" in (
        capsys.readouterr().err)
    assert run_cli("compare", batch="nope") == 2
    assert "known batch ids: b0, b1, b2" in capsys.readouterr().err


def test_report_run_without_a_batch(store, tmp_path):
    compare.run("tablora", out=tmp_path)
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("tablora").experiment_id],
        filter_string="tags.`tablora.kind` = 'report'")
    assert runs and runs[0].info.run_name == "comparison"
    # A report run is not a model: the next comparison ignores it.
    assert len(compare.run("tablora", "b1", with_figures=False, log=False).llms) == 2


def test_recommend_writes_loadable_params(store, tmp_path, capsys):
    out = tmp_path / "next"
    assert run_cli("recommend", batch="b1", out=out) == 0
    printed = capsys.readouterr().out
    assert "too conservative" in printed and "not converged" in printed
    assert f"Next round: tablora batch {out}/config-a {out}/config-b" in printed
    eight = load_params(out / "config-a" / "llama-3.1-8b-v2.yaml")
    assert eight.model_id == LLAMA8B and eight.lora_rank == 16 and eight.num_iters > 100
    best = load_params(out / "config-b" / "llama-3.2-3b-v2.yaml")
    assert best.model_id == LLAMA3B and best.batch_size == 4
    header = (out / "config-a" / "llama-3.1-8b-v2.yaml").read_text()
    assert "Rules that fired" in header and "Expected wall time: ~" in header
    assert "500 tokens/s" in header
    assert "## Recommendations" in (out / "REPORT.md").read_text()


def test_notebook_parameters_and_shape():
    import nbformat

    from helpers.config import NOTEBOOKS_DIR

    nb = nbformat.read(str(NOTEBOOKS_DIR / "compare.ipynb"), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    src = params[0].source
    for line in ('experiment: str = "tablora"', 'batch_id: str = ""', 'against: str = ""',
                 'out_dir: str = ""', 'params_path: str = "../params/demo/smollm2-135m.yaml"',
                 "overrides: dict = {}", 'run_id: str = ""'):
        assert line in src
    # papermill reads the same names (it silently skips a line it cannot parse).
    import papermill

    assert set(papermill.inspect_notebook(str(NOTEBOOKS_DIR / "compare.ipynb"))) == {
        "experiment", "batch_id", "against", "out_dir", "params_path", "overrides", "run_id"}
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code and "class " not in code
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_the_store(store, tmp_path):
    """The notebook's cells, executed in order in this process (what papermill would run)."""
    import nbformat

    from helpers.config import NOTEBOOKS_DIR

    nb = nbformat.read(str(NOTEBOOKS_DIR / "compare.ipynb"), as_version=4)
    ns: dict = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src = cell.source
        if "parameters" in cell.metadata.get("tags", []):
            src += f'\nbatch_id = "b1"\nout_dir = "{tmp_path}"\n'
        src = src.replace("../params/", str(NOTEBOOKS_DIR.parent / "params") + "/")
        exec(compile(src, "compare.ipynb", "exec"), ns)  # noqa: S102
    last = nb.cells[-1].source.strip()
    result = eval(compile(last, "compare.ipynb", "eval"), ns)  # noqa: S307
    assert result["best_llm"] == "llama-3.2-3b" and result["n_baselines"] == 2
    assert (tmp_path / "REPORT.md").is_file()


def test_memorization_check_adds_a_line_to_the_verdict(store, tmp_path):
    """A memcheck run of an LLM's model on its table (any batch) puts a line in the verdict."""
    tracking.setup("memo")
    log_run("llama-3.2-3b", "llm", predictions(20, 11, 1), batch="m", model_id=LLAMA3B,
            zeroshot=predictions(13, 10, 8), tmp=tmp_path)
    log_run("random_forest", "baseline", predictions(22, 11, 3), batch="m", tmp=tmp_path)
    row = {"exact": 7, "trials": 10, "chance_exact": 0, "chance_trials": 10, "flagged": 1}
    with mlflow.start_run(run_name="memcheck", tags={
            contract.TAG_KIND: contract.KIND_MEMCHECK, contract.TAG_MEMCHECK_TEXT: "file"}):
        tracking.log_params(Params(name="llama-3.2-3b", model_id=LLAMA3B))
        mlflow.log_metrics({contract.memcheck_metric("row", k): v for k, v in row.items()})
    try:
        c = compare.run("memo", "m", out=tmp_path / "out", with_figures=False, log=False)
    finally:
        mlflow.set_experiment("tablora")
    assert c.headline[-1] == (
        f"Memorization: {LLAMA3B} has seen builtin:breast_cancer: it completes 7 of 10 rows of "
        "the table verbatim (shuffled copy: 0 of 10) [file text]; its results on this table may "
        "be inflated (tablora memcheck).")
    assert c.headline[-1] in c.markdown
