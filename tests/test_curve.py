"""Learning curves: helpers.workflow.curve (the points, run as a batch) and helpers.analysis.curve
(the tests per k and the crossover sentence). The subsets and the sentence are checked without a
kernel; one curve runs for real on the tiny model (papermill, MLflow), is killed mid-point and
resumed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import cli, config, contract, data
from helpers.analysis import curve as analysis
from helpers.analysis import stats
from helpers.config import ParamsError, load_params
from helpers.workflow import curve

ROOT = Path(__file__).resolve().parents[1]


def write_table(folder: Path, n: int = 80) -> Path:
    """n rows, about a third positive, two features."""
    rows = [f"{i},{(i * 7) % 10},{'yes' if i % 3 == 0 else 'no'}" for i in range(n)]
    path = folder / "t.csv"
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return path


def table_params(folder: Path, **extra) -> dict:
    return {"dataset": {"source": str(write_table(folder)), "target": "y",
                        "positive_label": "yes", "test_size": 0.25, "valid_size": 0.25},
            **extra}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


# ---------------------------------------------------------------- the subsets


def test_subsets_are_nested_stratified_and_keep_valid_and_test(tmp_path, cache):
    params = load_params(None).replace(**table_params(tmp_path))
    whole = data.prepare(params)
    train = whole.split["train"]
    share = whole.y("train").mean()
    draws: dict[int, list[set]] = {}
    for seed in (0, 1):
        previous: set = set()
        for k in (3, 4, 8, 16, 25, len(train)):
            p = data.prepare(params.replace(**{"dataset.train_rows": k,
                                               "dataset.train_rows_seed": seed}))
            rows = set(p.split["train"])
            assert len(p.split["train"]) == len(rows) == k and rows <= set(train)
            assert previous <= rows  # nested: a larger k adds rows, never swaps them
            n_pos = int(p.y("train").sum())
            assert 1 <= n_pos <= k - 1 and abs(n_pos - k * share) <= 1  # stratified
            assert p.split["valid"] == whole.split["valid"]
            assert p.split["test"] == whole.split["test"]
            assert p.split_hash != whole.split_hash and p.data_dir.parent == p.split_file.parent
            assert data.table_split_hash(p.params) == p.split_hash  # what a worker checks
            draws.setdefault(k, []).append(rows)
            previous = rows
    assert draws[8][0] != draws[8][1]  # each seed its own draw
    # Drawn again from nothing (another machine): the same rows.
    shutil.rmtree(cache)
    again = data.prepare(params.replace(**{"dataset.train_rows": 8,
                                           "dataset.train_rows_seed": 1}))
    assert set(again.split["train"]) == draws[8][1]
    with pytest.raises(data.DataError, match=r"dataset.train_rows=41 but the training split "
                       r"holds 40 rows: use at most 40"):
        data.prepare(params.replace(**{"dataset.train_rows": 41}))


def test_subset_counts_grow_by_at_most_one_row_per_class():
    """What nesting rests on: k + 1 rows hold the k rows' classes plus one row."""
    for n_pos, n_neg in ((3, 97), (50, 50), (30, 9), (1, 10)):
        last = (1, 1)
        for k in range(2, n_pos + n_neg + 1):
            pos, neg = data.subset_counts(k, n_pos, n_neg)
            assert pos + neg == k and 1 <= pos <= n_pos and 1 <= neg <= n_neg
            assert (pos - last[0], neg - last[1]) in ((0, 1), (1, 0)) or k == 2
            last = (pos, neg)


# ---------------------------------------------------------------- the plan


def test_plan_points_sizes_seeds_and_zero_shot_once(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")  # nothing to time
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(table_params(
        tmp_path, name="c", curve={"sizes": [16, 4, "all", 1000], "seeds": [3, 5]})))
    p = curve.plan(file)
    assert p.n_train == 40 and p.sizes == [4, 16, "all"] and p.seeds == [3, 5]
    assert [(pt.rows, pt.seed) for pt in p.points] == [(4, 3), (16, 3), (40, 3), (4, 5),
                                                       (16, 5), (40, 5)]
    assert p.notes == ["k = 1000 is more than the 40 training rows: it is k = all"]
    assert [j.params.eval_zeroshot for j in p.jobs] == [True] + [False] * 5
    for job, pt in zip(p.jobs, p.points, strict=True):
        assert job.params.dataset.train_rows == pt.rows and job.params.seed == pt.seed
        assert job.params.dataset.train_rows_seed == pt.seed
        assert job.tags == {contract.TAG_TRAIN_ROWS: str(pt.rows)}
        assert job.params.curve == config.CurveSpec()  # a point's hash: not the curve's list
    assert len({j.params.adapter_dir for j in p.jobs}) == 6
    # The command line wins over the file; the dry run prints the plan and the estimate.
    assert curve.plan(file, [8], [0]).points == [curve.Point(8, 8, 0)]
    assert cli.main(["curve", str(file), "--sizes", "4,all", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] c-k40-seed1: 40 rows (k = all), seed 1" in out
    assert "estimate: 2 point(s), " in out
    with pytest.raises(ParamsError, match="--sizes '8,x': 'x' is not a size"):
        curve.parse_sizes("8,x")
    with pytest.raises(ParamsError, match="curve.sizes"):
        load_params(None, {"curve.sizes": [8, "half"]})


def test_a_batch_of_curve_files_runs_their_points(tmp_path, cache, capsys, monkeypatch):
    """curve.sizes in a params file: `tablora batch` of a folder runs each file's points, then
    curve.ipynb; a plain file or another table in the same batch is refused."""
    from helpers.workflow import batch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    folder = tmp_path / "curves"
    folder.mkdir()
    table = table_params(tmp_path, curve={"sizes": [4, "all"], "seeds": [0, 1]})
    for name, lr in (("a", 1e-3), ("b", 1e-4)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**table, "learning_rate": lr}))
    jobs = batch.plan_jobs(batch.expand_paths([folder]))
    assert [j.run_name for j in jobs] == ["a-k4-seed0", "a-k40-seed0", "a-k4-seed1",
                                          "a-k40-seed1", "b-k4-seed0", "b-k40-seed0",
                                          "b-k4-seed1", "b-k40-seed1"]
    assert len(batch.baseline_groups(jobs)) == 4  # one per point, shared by the two LLMs
    assert batch.curve_tags(jobs) == {contract.TAG_CURVE: "sizes 4,all; seeds 0,1"}
    assert cli.main(["batch", str(folder), "--dry-run"]) == 0
    assert "curve: curve.ipynb over the batch's runs" in capsys.readouterr().out
    (folder / "plain.yaml").write_text(yaml.safe_dump({"dataset": table["dataset"]}))
    with pytest.raises(ParamsError, match="plain.yaml: a plain params file in a batch of "
                       "learning curves"):
        batch.curve_tags(batch.plan_jobs(batch.expand_paths([folder])))
    (folder / "plain.yaml").write_text(yaml.safe_dump(
        {**table, "dataset": {**table["dataset"], "test_size": 0.3}}))
    with pytest.raises(ParamsError, match="differ in their dataset or baselines sections"):
        batch.curve_tags(batch.plan_jobs(batch.expand_paths([folder])))


# ---------------------------------------------------------------- the analysis, pure


def _points(model: str, kind: str, k: int, correct: dict[int, np.ndarray]) -> list:
    """One Point per seed whose predictions are right exactly where `correct` says."""
    out = []
    for seed, right in correct.items():
        label = np.arange(len(right)) % 2
        pred = np.where(right, label, 1 - label)
        df = pd.DataFrame({"row_id": np.arange(len(right)), "label": label,
                           "p_yes": pred.astype(float), "prediction": pred})
        out.append(analysis.Point(model, kind, k, seed, {"test_accuracy": float(right.mean()),
                                                         "test_roc_auc": 0.5}, df))
    return out


def _curve(outcomes: dict[int, tuple[int, int]], n: int = 60) -> list:
    """LLM, random_forest (the best), lasso (worse) and a perfect floor at each k: per k the
    LLM is right alone on `a` rows and random_forest alone on `b` rows, in each of two seeds."""
    points = []
    for k, (a, b) in outcomes.items():
        llm, rf = {}, {}
        for seed in (0, 1):
            both = n // 2
            llm[seed] = np.r_[np.ones(both + a), np.zeros(b), np.zeros(n - both - a - b)] > 0
            rf[seed] = np.r_[np.ones(both), np.zeros(a), np.ones(b), np.zeros(n - both - a - b)]
            rf[seed] = rf[seed] > 0
        points += _points("llm", contract.KIND_LLM, k, llm)
        points += _points("random_forest", contract.KIND_BASELINE, k, rf)
        points += _points("lasso", contract.KIND_BASELINE, k,
                          {s: np.zeros(n, bool) for s in (0, 1)})
        points += _points("majority", contract.KIND_BASELINE, k,
                          {s: np.ones(n, bool) for s in (0, 1)})
    return points


def test_the_sentence_finds_a_known_crossover():
    # LLM better at 8, even at 16 and 32, random forest far better from 64.
    points = _curve({8: (12, 0), 16: (3, 3), 32: (4, 2), 64: (0, 14), 128: (1, 20)})
    tests = analysis.size_tests(points)
    assert tests["baseline"].tolist() == ["random_forest"] * 5  # never the floor
    assert tests["n"].tolist() == [120] * 5  # both seeds pooled
    assert tests["outcome"].tolist() == ["llm", "tie", "tie", "baseline", "baseline"]
    assert tests["p_holm"].tolist() == pytest.approx(stats.holm(tests["p"].tolist()))
    sentence = analysis.crossover_sentence(tests, "llm", n_train=128)
    assert sentence == ("llm is not distinguishable from or better than random_forest up to "
                        "k = 32; from k = 64 random_forest is better (Holm-adjusted p<0.001 "
                        "at each of these sizes) (llm is better at k = 8).")


def test_the_sentence_without_a_crossover_and_with_one_from_the_start():
    none = analysis.size_tests(_curve({8: (5, 4), 64: (6, 5)}))
    assert analysis.crossover_sentence(none, "llm") == (
        "llm is not distinguishable from or better than random_forest at every size up to "
        "k = 64: no crossover at these sizes.")
    always = analysis.size_tests(_curve({8: (0, 15), 64: (0, 20)}))
    assert analysis.crossover_sentence(always, "llm") == (
        "random_forest is better than llm at every size from k = 8 (Holm-adjusted p<0.001 at "
        "each of these sizes).")
    late = analysis.size_tests(_curve({8: (2, 2), 64: (2, 9)}))
    assert late["outcome"].tolist() == ["tie", "baseline"]
    p = stats.fmt_p(late["p_holm"].iloc[1], "p")
    assert 0.001 < late["p_holm"].iloc[1] < 0.05
    assert analysis.crossover_sentence(late, "llm", n_train=64) == (
        "llm is not distinguishable from or better than random_forest up to k = 8; from "
        f"k = all (64) random_forest is better ({p}, Holm-adjusted across sizes).")
    passing = analysis.size_tests(_curve({8: (0, 15), 64: (4, 4)}))
    assert analysis.crossover_sentence(passing, "llm").startswith(
        "no lasting crossover at these sizes: the best baseline is better at k = 8 only")


def test_two_llms_are_tested_each_in_its_own_holm_family():
    points = _curve({8: (12, 0), 64: (0, 14)})
    weak = np.arange(60) < 16  # right on 16 rows only: random forest is right on 30 and more
    for k in (8, 64):
        points += _points("llm2", contract.KIND_LLM, k, {0: weak, 1: weak})
    tests = analysis.size_tests(points)
    assert tests["llm"].tolist() == ["llm", "llm", "llm2", "llm2"]
    for name in ("llm", "llm2"):
        family = tests[tests["llm"] == name]
        assert family["p_holm"].tolist() == pytest.approx(stats.holm(family["p"].tolist()))
    assert analysis.crossover_sentence(tests, "llm2").startswith(
        "random_forest is better than llm2 at every size from k = 8")
    assert analysis.crossover_sentence(tests, "llm").startswith(
        "llm is not distinguishable from or better than random_forest up to k = 8; from k = 64")


def test_summary_and_figure_of_a_synthetic_curve(tmp_path):
    points = _curve({8: (12, 0), 64: (0, 14)})
    table = analysis.summary(points)
    row = table[(table["model"] == "llm") & (table["rows"] == 8)].iloc[0]
    assert row["seeds"] == 2 and row["accuracy"] == pytest.approx(42 / 60)
    fig = analysis.figure(table, None, 0, "llm")
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


# ---------------------------------------------------------------- a real curve, killed, resumed


def _split_of(client, run_id: str, tmp: Path) -> dict:
    local = client.download_artifacts(run_id, f"{contract.ARTIFACT_DATA}/split.json", str(tmp))
    return json.loads(Path(local).read_text())["split"]


def test_a_curve_on_the_tiny_model_resumes_a_killed_point(tmp_path, tiny_model_dir,
                                                           monkeypatch):
    """`tablora curve` with the real notebooks: SIGKILL it while its second point trains, then
    --resume. The first point and every baselines run are kept, the killed run continues from
    its checkpoint, and at each k the LLM and every baseline learned from the same k rows (read
    back from MLflow); the zero-shot model was scored once; the analysis ran."""
    home = tmp_path / "home"
    (home / "notebooks").mkdir(parents=True)
    for name in ("train", "evaluate", "baselines", "curve"):
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", home / "notebooks")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(table_params(
        tmp_path, model_id=str(tiny_model_dir), experiment="curve", num_epochs=12,
        save_every=10, batch_size=2, num_layers=2, steps_per_eval=1000, val_batches=1,
        early_stopping_patience=0, steps_per_report=50, n_bootstrap=100,
        baselines={"models": ["random_forest", "logistic_l2", "majority"]},
        curve={"sizes": [6, "all"], "seeds": [0]})))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABLORA_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", TABLORA_HOME=str(home),
               TABLORA_OUTPUT_ROOT=str(tmp_path))
    command = [sys.executable, "-m", "helpers", "curve", str(tmp_path / "tiny.yaml")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    state = home / "runs" / "adapters" / "tiny-k40-seed0" / "checkpoint" / "trainer_state.json"
    try:
        while first.poll() is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if json.loads(state.read_text())["step"] >= 20:
                    break
            time.sleep(0.05)
        assert first.poll() is None, "the curve finished before it could be killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    time.sleep(3)  # the kernel notices its parent is gone
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_id = client.get_experiment_by_name("curve").experiment_id
    killed = client.search_runs([exp_id], f"tags.`{contract.TAG_TRAIN_ROWS}` = '40' and "
                                f"tags.`{contract.TAG_KIND}` = 'llm'")
    assert [r.info.status for r in killed] == ["RUNNING"]

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True,
                             timeout=900)
    out = resumed.stdout
    assert resumed.returncode == 0, out[-3000:] + resumed.stderr[-3000:]
    assert "tiny-k6-seed0: skipped (--resume" in out
    assert f"continuing interrupted run {killed[0].info.run_id}" in out
    assert out.count("skipped (--resume: already in this batch)") == 2  # both baselines
    runs = client.search_runs([exp_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    llm = {int(r.data.tags[contract.TAG_TRAIN_ROWS]): r for r in runs
           if r.data.tags.get(contract.TAG_KIND) == contract.KIND_LLM}
    assert sorted(llm) == [6, 40] and llm[40].info.run_id == killed[0].info.run_id
    zeroshot = [k for k, r in llm.items() if "zeroshot_test_accuracy" in r.data.metrics]
    assert zeroshot == [6]  # scored once: the curve's k = 0
    splits = {}
    for k, run in llm.items():
        split = _split_of(client, run.info.run_id, tmp_path / "dl" / run.info.run_id)
        assert len(split["train"]) == k
        splits[k] = split
        base = [r for r in runs if r.data.tags.get(contract.TAG_KIND) == contract.KIND_BASELINE
                and r.data.tags.get(contract.TAG_TRAIN_ROWS) == str(k)]
        assert sorted(r.data.tags[contract.TAG_MODEL_NAME] for r in base) == [
            "logistic_l2", "majority", "random_forest"]
        for b in base:  # the same rows as the LLM, read back from each run
            assert _split_of(client, b.info.run_id, tmp_path / "dl" / b.info.run_id) == split
            assert b.data.tags[contract.TAG_SPLIT_HASH] == run.data.tags[contract.TAG_SPLIT_HASH]
    assert set(splits[6]["train"]) < set(splits[40]["train"])
    assert splits[6]["test"] == splits[40]["test"] and splits[6]["valid"] == splits[40]["valid"]
    # The analysis ran at the end and is logged to the curve's parent run.
    (parent,) = [r for r in runs if contract.TAG_CURVE in r.data.tags]
    assert parent.data.tags[contract.TAG_CURVE] == "sizes 6,all; seeds 0"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, contract.ARTIFACT_CURVE)}
    assert {"curve/curve.md", "curve/curve.json", "curve/learning_curve.png"} <= logged
    cid = parent.data.tags[contract.TAG_BATCH_ID]
    assert f"curve {cid}: tiny " in out and f"tablora compare --experiment curve --curve {cid}" \
        in out
    # `tablora compare --curve` reads the same runs again.
    buf = io.StringIO()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    with contextlib.redirect_stdout(buf):
        assert cli.main(["compare", "--experiment", "curve", "--curve", cid, "--out",
                         str(tmp_path / "again")]) == 0
    doc = json.loads((tmp_path / "again" / "curve.json").read_text())
    assert [t["rows"] for t in doc["tests"]] == [6, 40] and doc["zeroshot"] is not None
    assert doc["sentence"] in buf.getvalue()
