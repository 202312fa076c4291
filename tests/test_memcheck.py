"""helpers.llm.memcheck: the memorization tests, their chance level, the positive control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from memorize import memorize, small_table

from helpers import contract
from helpers.config import load_params
from helpers.llm import memcheck
from helpers.llm.memcheck import Query, Settings

SETTINGS = Settings(prefix_rows=3, rows=25)
# The most the shuffled copy may score, as a share of its trials: whole rows and 3-digit values
# are not guessed, but a one-digit first token among 9 is, now and then.
CHANCE = {"header": 0.2, "row": 0.2, "feature": 0.2, "first_token": 0.5}


def table(rows: int = 12, seed: int = 0) -> memcheck.TableText:
    return memcheck.from_text(small_table(rows, seed), "file", "small.csv")


def text_memorizer(text: str):
    """A model that has read `text` and nothing else, in pure Python: it continues a prompt from
    the place where the prompt's longest ending occurs in the text."""

    def complete(prompt: str, q: Query) -> tuple[str, bool]:
        for k in range(len(prompt), 0, -1):
            at = text.find(prompt[-k:])
            if at >= 0:
                return text[at + k: at + k + len(q.target) + 20], False
        return "", False

    return complete


# ---------------------------------------------------------------- strings


def test_levenshtein():
    assert memcheck.levenshtein("kitten", "sitting") == 3
    assert memcheck.levenshtein("", "abc") == 3
    assert memcheck.levenshtein("12.5,3", "12.5,3") == 0


def test_prefix_distance_is_a_lower_bound_of_every_completion():
    rng = np.random.default_rng(0)
    for _ in range(30):
        target = "".join(rng.choice(list("0123,."), size=rng.integers(1, 12)))
        generated = "".join(rng.choice(list("0123,."), size=rng.integers(1, 12)))
        rest = "".join(rng.choice(list("0123,."), size=rng.integers(0, 6)))
        bound = memcheck._PrefixDistance(target).add(generated)
        assert bound <= memcheck.levenshtein(generated + rest, target)
        assert bound == min(memcheck.levenshtein(generated, target[:j])
                            for j in range(len(target) + 1))


# ---------------------------------------------------------------- the table as text


def test_from_text_refuses_ragged_rows_and_tiny_tables():
    with pytest.raises(memcheck.MemcheckError, match="line 3 has 2 fields, line 2 has 3"):
        memcheck.from_text("a,b,c\n1,2,3\n4,5\n", "file", "bad.csv")
    with pytest.raises(memcheck.MemcheckError, match="at least 2 rows"):
        memcheck.from_text("a,b\n1,2\n", "file", "short.csv")


def test_columns_from_header_else_the_tables_names():
    assert table().columns == ("x", "y", "z")
    # scikit-learn's file opens with "569,30,malignant,benign", not with the column names.
    t = memcheck.from_text("3,2,a,b\n1,2\n3,4\n5,6\n", "file", "f", names=["u", "v"])
    assert t.columns == ("u", "v")
    assert memcheck.from_text("3,2,a\n1,2\n3,4\n", "file", "f").columns == ("column 1",
                                                                           "column 2")


def test_shuffled_copy_permutes_each_column_and_keeps_the_header():
    t = table(20)
    s = memcheck.shuffled(t, seed=0)
    assert s.lines[0] == t.lines[0] and len(s.lines) == len(t.lines)
    a, b = np.array(t.cells()), np.array(s.cells())
    for j in range(a.shape[1]):
        assert sorted(a[:, j]) == sorted(b[:, j])
    assert (a != b).any(axis=1).mean() > 0.8  # almost every row is new
    assert memcheck.shuffled(t, seed=0) == s  # seeded


def test_builtin_table_texts(tmp_path):
    params = load_params(overrides={"dataset.source": "builtin:breast_cancer"})
    file, pandas = memcheck.table_texts(params, "both")
    assert file.name == "file" and file.origin.endswith("breast_cancer.csv")
    assert file.lines[0] == "569,30,malignant,benign"  # scikit-learn's file as it ships
    assert file.columns[0] == "mean radius" and len(file.columns) == 31
    assert pandas.lines[0].startswith("mean radius,mean texture,")
    assert len(file.lines) == len(pandas.lines) == 570
    assert [t.name for t in memcheck.table_texts(params)] == ["file"]


def test_parquet_source_is_tested_as_pandas_writes_it(tmp_path):
    import pandas as pd

    pd.DataFrame({"a": range(5), "b": list("xyzxy")}).to_parquet(tmp_path / "t.parquet")
    params = load_params(overrides={"dataset.source": str(tmp_path / "t.parquet")})
    (t,) = memcheck.table_texts(params)
    assert t.name == "pandas"
    with pytest.raises(memcheck.MemcheckError, match="no data file"):
        memcheck.table_texts(params, "file")


# ---------------------------------------------------------------- the trials


def test_queries_keep_tabmemchecks_definitions():
    t = table(12)
    chosen = memcheck.plan(t, SETTINGS)
    qs = memcheck.queries(t, chosen, SETTINGS)
    by = {name: [q for q in qs if q.test == name] for name in ("header", "row", "feature")}
    # 13 lines, 3 of context: two blocks of 5 rows; 12 rows less 5 example rows.
    assert len(by["header"]) == 8 and len(by["row"]) == 10 and len(by["feature"]) <= 7
    for q in by["header"]:
        # The file from its start, cut just after a delimiter of row i; the target runs to the
        # end of the next row.
        assert t.text.startswith(q.prompt + q.target) and q.prompt.endswith(",")
        assert q.target.count("\n") == 1 and q.target.endswith(t.lines[q.line + 1])
    for q in by["row"]:
        assert q.prompt.endswith("\n") and 3 <= q.prompt.count("\n") <= 7
        assert q.prompt + q.target + "\n" in t.text and q.target == t.lines[q.line]
    assert len({q.line for q in by["row"]}) == 10  # no row twice
    # Each prompt starts with the one before it (in a block): the cache serves them.
    pairs = zip(by["row"], by["row"][1:], strict=False)
    assert sum(b.prompt.startswith(a.prompt) for a, b in pairs) == 8
    col = memcheck.distinctive_column(t)
    assert col == 2  # z: three digits, the most distinct values
    for q in by["feature"]:
        row = t.lines[q.line]
        assert q.prompt.endswith("\n" + row[: row.rindex(",") + 1]) and row.endswith(q.target)
        shots = q.prompt.split("\n")[1:-1]
        assert len(shots) == 5 and row not in shots
        assert all(s.split(",")[col] != q.target for s in shots)  # never the answer
    assert len({q.prompt[: q.prompt.rindex("\n")] for q in by["feature"]}) == 1


def test_shuffled_copy_gets_the_same_trials():
    t = table(12)
    chosen = memcheck.plan(t, SETTINGS)
    real = memcheck.queries(t, chosen, SETTINGS)
    fake = memcheck.queries(memcheck.shuffled(t, 0), chosen, SETTINGS)
    assert ([(q.test, q.line) for q in real if q.test != "feature"]
            == [(q.test, q.line) for q in fake if q.test != "feature"])


def test_plan_refuses_more_context_than_the_table():
    with pytest.raises(memcheck.MemcheckError, match="use --prefix-rows 11 or fewer"):
        memcheck.plan(table(12), Settings(prefix_rows=13))


def test_first_token_digits():
    assert memcheck.first_token_digits(table(20)) == 1
    ids = memcheck.from_text("id,v\n" + "".join(f"{i},{i % 3}\n" for i in range(20)), "f", "f")
    assert memcheck.first_token_digits(ids) is None  # a sorted id: predictable unseen


def test_fisher_threshold():
    assert memcheck.fisher_greater(4, 8, 0, 8) < memcheck.ALPHA
    assert memcheck.fisher_greater(3, 8, 0, 8) > memcheck.ALPHA
    assert memcheck.fisher_greater(5, 5, 5, 5) == 1.0


def test_a_reader_of_the_text_is_flagged_and_the_shuffled_copy_stays_at_chance():
    t = table(20)
    result = memcheck.check(text_memorizer(t.text), t, SETTINGS, progress=False)
    assert result.flagged == list(contract.MEMCHECK_TESTS)
    for name, r in result.tests.items():
        assert r.exact == r.trials, name
        assert r.chance_exact <= CHANCE[name] * r.chance_trials, name
    assert result.tests["header"].verbatim_chars > 10


def test_a_model_that_only_knows_the_format_is_not_flagged():
    """Right on the table and on its shuffled copy alike (as a model that guesses a table's
    pattern would be): that is chance level, not memory."""
    t = table(20)

    def oracle(prompt: str, q: Query) -> tuple[str, bool]:
        return ("\n" if q.test == "row" else "") + q.target + "\n", False

    result = memcheck.check(oracle, t, SETTINGS, progress=False)
    assert result.tests["row"].exact == result.tests["row"].chance_exact > 0
    assert result.flagged == []


# ---------------------------------------------------------------- the positive control (MLX)


@pytest.fixture(scope="module")
def memorized(tiny_model_dir):
    """The tiny model trained on the CSV text of a 12-row table until it reproduces it."""
    import mlx_lm

    text = small_table(12)
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    losses = memorize(model, tokenizer, text, steps=300, lr=5e-3, warmup=20)
    return model, tokenizer, text, losses


def test_positive_control_flags_the_trained_model_on_every_test(memorized):
    model, tokenizer, text, losses = memorized
    assert losses[-1] < losses[0] / 10
    t = memcheck.from_text(text, "file", "small.csv")
    result = memcheck.check(memcheck.mlx_completer(model, tokenizer), t, SETTINGS,
                            progress=False)
    assert result.flagged == list(contract.MEMCHECK_TESTS), result.lines()
    for name, r in result.tests.items():
        assert r.exact >= 0.7 * r.trials, (name, result.lines())
        assert r.chance_exact <= CHANCE[name] * r.chance_trials, (name, result.lines())


def test_untrained_model_is_not_flagged(tiny_model_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    t = memcheck.from_text(small_table(12), "file", "small.csv")
    result = memcheck.check(memcheck.mlx_completer(model, tokenizer), t, SETTINGS,
                            progress=False)
    assert result.flagged == [], result.lines()
    assert all(r.exact <= 1 for r in result.tests.values()), result.lines()


def test_the_shared_cache_changes_no_completion(memorized):
    """One cache for all prompts (cut back to what each shares with the one before) gives the
    completions that a fresh cache per prompt gives."""
    model, tokenizer, text, _ = memorized
    t = memcheck.from_text(text, "file", "small.csv")
    qs = [q for copy in (t, memcheck.shuffled(t, 0))
          for q in memcheck.queries(copy, memcheck.plan(t, SETTINGS), SETTINGS)]
    shared = memcheck.mlx_completer(model, tokenizer)
    for q in qs:
        assert shared(q.prompt, q) == memcheck.mlx_completer(model, tokenizer)(q.prompt, q), q


def test_generation_stops_once_no_near_match_is_possible(tiny_model_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    complete = memcheck.mlx_completer(model, tokenizer)
    q = Query("row", 0, "x,y,z\n", "11,2.2,621", 1)
    completion, cut_short = complete(q.prompt, q)
    if cut_short:  # the random model's first characters are not the row's
        assert memcheck.levenshtein(completion, q.target) > memcheck.near_bound(q.target)
        assert len(completion) <= memcheck.near_bound(q.target) + 6 + 8


# ---------------------------------------------------------------- MLflow


def params_file(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "small.csv").write_text(small_table(12))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "model_id": str(model_dir),
                                    "dataset": {"source": "small.csv", "target": "x"}}))
    return path


def test_run_logs_counts_flag_and_completions(tmp_path, mlflow_store, memorized,
                                              tiny_model_dir):
    import mlflow

    model, tokenizer, _, _ = memorized
    params = load_params(params_file(tmp_path, tiny_model_dir))
    settings = Settings(prefix_rows=3, rows=6)
    ((result, run_id),) = memcheck.run(params, settings=settings, progress=False,
                                       model=(model, tokenizer))
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[contract.TAG_KIND] == contract.KIND_MEMCHECK
    assert run.data.tags[contract.TAG_MEMCHECK_TEXT] == "file"
    assert run.data.tags[contract.TAG_MEMCHECK_FLAGGED] == ",".join(result.flagged)
    m = run.data.metrics
    assert m[contract.memcheck_metric("row", "trials")] == 6
    assert m[contract.memcheck_metric("row", "exact")] == result.tests["row"].exact
    assert m[contract.MEMCHECK_FLAGGED] == 1.0
    assert run.data.params["dataset.source"] == "small.csv"
    local = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                artifact_path=contract.ARTIFACT_MEMCHECK,
                                                dst_path=str(tmp_path / "dl"))
    logged = json.loads(Path(local).read_text())
    assert len(logged["trials"]) == len(result.trials)
    assert {"prompt", "target", "completion", "exact", "near"} <= set(logged["trials"][0])
    # The batch reuses a finished check of the same model, table and settings.
    ((again, same),) = memcheck.run(params, settings=settings, reuse=True, progress=False,
                                    model=(model, tokenizer))
    assert again is None and same == run_id


@pytest.mark.slow
def test_embedded_model_on_the_demo_table(mlflow_store):
    """End to end on the embedded model (a few trials): it runs, logs and says something."""
    import mlflow

    from helpers.config import DEMO_PARAMS

    params = load_params(DEMO_PARAMS)
    settings = Settings(rows=2, prefix_rows=2, header_cuts=1, few_shot=1)
    ((result, run_id),) = memcheck.run(params, settings=settings, progress=False)
    assert result.table.origin.endswith("breast_cancer.csv")
    assert result.tests["row"].trials == result.tests["row"].chance_trials == 2
    assert result.tests["header"].trials == 1 and result.tests["feature"].trials == 2
    assert len(result.trials) == 10 and any(t.completion for t in result.trials)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and contract.MEMCHECK_FLAGGED in run.data.metrics
