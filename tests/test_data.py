"""helpers.data: sources, checks, the split, serialization, JSONL, token budget, MLflow."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import config, data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test gets its own cache: no shared splits or prompt files."""
    d = tmp_path / "cache"
    monkeypatch.setattr(config, "CACHE_DIR", d)
    return d


def table(n_pos: int = 24, n_neg: int = 36, seed: int = 0) -> pd.DataFrame:
    """A small mixed-type table: ints, floats with a gap, strings, and a yes/no target."""
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    bmi = rng.normal(27, 4, n).round(2)
    bmi[3] = np.nan
    return pd.DataFrame({
        "age": rng.integers(20, 80, n),
        "bmi": bmi,
        "smoker": rng.choice(["yes", "no"], n),
        "outcome": ["sick"] * n_pos + ["well"] * n_neg,
    })


def make_params(tmp_path: Path, df: pd.DataFrame | None = None, file: str = "data.csv",
                **overrides):
    """A params YAML in tmp_path pointing (relatively) at `df` written as a CSV."""
    if df is None:
        df = table()
    df.to_csv(tmp_path / file, index=False)
    dataset = {"source": file, "target": "outcome", "positive_label": "sick",
               "test_size": 0.25, "valid_size": 0.15, "split_seed": 7}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "dataset": dataset}))
    return config.load_params(path, overrides)


def error_of(params) -> str:
    with pytest.raises(data.DataError) as e:
        data.prepare(params)
    return str(e.value)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path, cache):
    msg = error_of(make_params(tmp_path, **{"dataset.source": "nope.csv"}))
    assert "nope.csv" in msg and "not found" in msg and "dataset.source" in msg
    assert not cache.exists()  # nothing half-written


def test_missing_target_lists_columns(tmp_path, cache):
    msg = error_of(make_params(tmp_path, **{"dataset.target": "label"}))
    assert "'label' not found" in msg and "'outcome'" in msg and "'bmi'" in msg
    assert "data.csv" in msg
    assert not cache.exists()


def test_three_classes(tmp_path):
    df = table()
    df.loc[:4, "outcome"] = "maybe"
    msg = error_of(make_params(tmp_path, df))
    assert "3 classes" in msg and "'maybe'" in msg and "'outcome'" in msg


def test_one_class(tmp_path):
    msg = error_of(make_params(tmp_path, table(n_pos=0)))
    assert "1 classes" in msg and "'well'" in msg


def test_missing_target_values(tmp_path):
    df = table()
    df.loc[5, "outcome"] = None
    msg = error_of(make_params(tmp_path, df))
    assert "empty in 1 rows" in msg and "[5]" in msg


def test_positive_label_not_a_value(tmp_path):
    msg = error_of(make_params(tmp_path, **{"dataset.positive_label": "ill"}))
    assert "'ill'" in msg and "'sick'" in msg and "'well'" in msg and "positive_label" in msg


def test_positive_label_matched_across_types(tmp_path):
    df = table()
    df["outcome"] = (df["outcome"] == "sick").astype(int)
    prepared = data.prepare(make_params(tmp_path, df, **{"dataset.positive_label": "1"}))
    assert prepared.y("train").sum() > 0 and prepared.positive_label == 1


def test_feature_not_found_suggests(tmp_path):
    msg = error_of(make_params(tmp_path, **{"dataset.features": ["age", "bmii"]}))
    assert "'bmii'" in msg and "Close matches: 'bmi'" in msg


def test_description_for_unknown_column(tmp_path):
    msg = error_of(make_params(tmp_path, **{"dataset.feature_descriptions": {"agee": "Age"}}))
    assert "'agee'" in msg and "'age'" in msg


def test_target_listed_as_feature(tmp_path):
    assert "also listed" in error_of(make_params(tmp_path, **{"dataset.features": ["outcome"]}))


def test_split_too_small(tmp_path, cache):
    msg = error_of(make_params(tmp_path, table(n_pos=2, n_neg=6),
                               **{"dataset.test_size": 0.1, "dataset.valid_size": 0.1}))
    assert "test_size" in msg and "2 positive / 6 negative" in msg
    assert not cache.exists()


def test_single_class_split(tmp_path):
    # 3 positives: the validation split (8% of 40 rows) can get at most one class.
    msg = error_of(make_params(tmp_path, table(n_pos=3, n_neg=37),
                               **{"dataset.test_size": 0.5, "dataset.valid_size": 0.08}))
    assert "split" in msg and "positive" in msg and "test_size" in msg


def test_unreadable_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    msg = error_of(make_params(tmp_path, **{"dataset.source": "empty.csv"}))
    assert "empty.csv" in msg and "could not read" in msg
    (tmp_path / "bad.parquet").write_text("a,b\n1,2\n")
    msg = error_of(make_params(tmp_path, **{"dataset.source": "bad.parquet"}))
    assert "bad.parquet" in msg and "could not read" in msg
    (tmp_path / "x.xlsx").write_text("")
    assert "unsupported file type" in error_of(make_params(tmp_path, **{"dataset.source":
                                                                        "x.xlsx"}))


def test_unknown_builtin(tmp_path):
    msg = error_of(make_params(tmp_path, **{"dataset.source": "builtin:iris"}))
    assert "builtin:iris" in msg and "builtin:breast_cancer" in msg


def test_bad_template(tmp_path):
    assert "unknown template" in error_of(make_params(tmp_path, **{"prompt.template": "fancy"}))
    msg = error_of(make_params(tmp_path, **{"prompt.template": "{{ nope }}"}))
    assert "'nope' is undefined" in msg


def test_repeated_ids(tmp_path):
    df = table()
    df["id"] = 1
    assert "'id'" in error_of(make_params(tmp_path, df))


# --- the split ---------------------------------------------------------------------------------


def test_split_deterministic_and_saved(tmp_path, cache, monkeypatch):
    params = make_params(tmp_path)
    a = data.prepare(params)
    assert a.split_file == cache / "splits" / a.split_hash / "split.json"
    saved = json.loads(a.split_file.read_text())
    assert saved["split"] == a.split and saved["split_hash"] == a.split_hash

    # Reloaded, not recomputed.
    def boom(*args, **kwargs):
        raise AssertionError("split recomputed")

    monkeypatch.setattr(data, "_compute_split", boom)
    b = data.prepare(params)
    assert (b.split, b.split_hash) == (a.split, a.split_hash)
    monkeypatch.undo()

    # Recomputed from scratch (fresh cache): the same ids.
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "other")
    c = data.prepare(params)
    assert (c.split, c.split_hash) == (a.split, a.split_hash)

    d = data.prepare(make_params(tmp_path, **{"dataset.split_seed": 8}))
    assert d.split_hash != a.split_hash and d.split["test"] != a.split["test"]


def test_a_split_drawn_elsewhere_is_used_as_is(tmp_path, monkeypatch):
    """What a batch worker does: check the table's hash, then take the batch's rows."""
    params = make_params(tmp_path)
    drawn = data.prepare(params)
    assert data.table_split_hash(params) == drawn.split_hash
    # The batch's machine drew other rows (say, another scikit-learn): this machine uses them.
    doc = json.loads(drawn.split_file.read_text())
    train, test = doc["split"]["train"], doc["split"]["test"]
    doc["split"]["train"], doc["split"]["test"] = test + train[9:], train[:9]
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "worker")
    path = data.install_split(json.dumps(doc), drawn.split_hash)
    assert path == tmp_path / "worker" / "splits" / drawn.split_hash / "split.json"
    assert data.prepare(params).split["test"] == doc["split"]["test"] != drawn.split["test"]
    with pytest.raises(data.DataError, match="labelled"):
        data.install_split(json.dumps(doc), "0" * 16)


def test_split_partitions_and_stratifies(tmp_path):
    p = data.prepare(make_params(tmp_path))
    ids = [i for s in data.SPLITS for i in p.split[s]]
    assert sorted(ids) == list(range(60))  # disjoint and complete
    assert [len(p.split[s]) for s in data.SPLITS] == [36, 9, 15]
    for s in data.SPLITS:
        assert abs(p.y(s).mean() - 0.4) < 0.07


def test_hash_follows_the_data(tmp_path):
    a = data.prepare(make_params(tmp_path))
    df = table()
    df.loc[0, "age"] += 1
    b = data.prepare(make_params(tmp_path, df))
    assert a.split_hash != b.split_hash


def test_id_column_is_row_id(tmp_path):
    df = table()
    df.insert(0, "id", [f"p{i:03d}" for i in range(len(df))])
    p = data.prepare(make_params(tmp_path, df))
    assert p.table.index.name == "row_id" and "id" not in p.features
    assert all(i.startswith("p") for i in p.split["test"])
    assert list(p.X("test").index) == p.split["test"]


def test_baselines_and_llm_see_the_same_test_rows(tmp_path):
    p = data.prepare(make_params(tmp_path))
    rows = data.read_jsonl(p.data_dir / "test.jsonl")
    assert [r["row_id"] for r in rows] == p.split["test"] == list(p.X("test").index)
    assert [r["messages"][-2]["content"] for r in rows] == p.prompts("test")
    answers = [r["messages"][-1]["content"] for r in rows]
    assert answers == ["Yes" if yi else "No" for yi in p.y("test")]
    # The same again from the saved split (another process: baselines after training).
    q = data.prepare(make_params(tmp_path))
    assert list(q.X("test").index) == p.split["test"] and (q.y("test") == p.y("test")).all()


def test_oversample_touches_train_only(tmp_path):
    base = data.prepare(make_params(tmp_path))
    over = data.prepare(make_params(tmp_path, **{"dataset.balance": "oversample"}))
    assert over.split_hash != base.split_hash
    assert over.split["test"] == base.split["test"] and over.split["valid"] == base.split["valid"]
    assert sorted(set(over.split["train"])) == sorted(base.split["train"])
    c = over.class_counts("train")
    assert c["positive"] == c["negative"] == base.class_counts("train")["negative"]
    again = data.prepare(make_params(tmp_path, **{"dataset.balance": "oversample"}))
    assert again.split == over.split
    assert len(data.read_jsonl(over.data_dir / "train.jsonl")) == len(over.split["train"])


def test_duplicates_reported(tmp_path):
    df = table()
    df = pd.concat([df, df.iloc[:20]], ignore_index=True)  # rows 60..79 copy rows 0..19
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = data.prepare(make_params(tmp_path, df))
    train, test = set(p.split["train"]), p.split["test"]
    copies = {i: i + 60 for i in range(20)} | {i + 60: i for i in range(20)}
    expected = [i for i in test if copies.get(i) in train]
    assert expected, "the fixture should put some copies across train and test"
    assert p.duplicates["count"] == len(expected) and p.duplicates["test_ids"] == expected
    assert any("appear identically" in str(x.message) for x in w)
    assert f"{len(expected)} test rows identical" in "\n".join(data.summary_lines(p))


def test_breast_cancer_builtin(tmp_path):
    p = data.prepare(config.load_params(config.DEMO_PARAMS))
    assert len(p.features) == 10 and p.duplicates["count"] == 0
    assert len(p.table) == 569 and set(p.table["target"]) == {"malignant", "benign"}
    assert p.y("train").sum() + p.y("valid").sum() + p.y("test").sum() == 212  # malignant
    # The demo: each feature as a sentence ("The mean radius is 18.0.").
    first = p.prompts("train")[0]
    assert first.count(" The mean ") + first.count("\nThe mean ") == 10


# --- serialization -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "digits", "text"), [
    (17.99, 3, "18.0"), (1001.0, 3, "1000"), (0.07864, 3, "0.0786"), (9.996, 3, "10.0"),
    (123456.0, 3, "123000"), (-2.345, 2, "-2.3"), (0.0, 3, "0"), (0.3001, 3, "0.300"),
    (5, 3, "5"), (np.int64(1234567), 3, "1234567"), (1e-7, 3, "1.00e-07"), (True, 3, "True"),
    (2.5, 1, "2"), (0.00012345, 2, "0.00012"),
])
def test_format_number(value, digits, text):
    assert data.format_number(value, digits) == text


def test_int_columns_with_gaps_stay_ints(tmp_path):
    df = table()
    df["age"] = df["age"].astype(float)
    df.loc[0, "age"] = np.nan
    p = data.prepare(make_params(tmp_path, df, **{"prompt.template": "list"}))
    texts = data.format_values(p.table, p.features, p.params)
    assert texts.loc[0, "age"] == "unknown"
    assert texts.loc[1, "age"] == str(int(df.loc[1, "age"]))


def first_user_text(p) -> str:
    return p.user_texts[0]


def test_sentence_template(tmp_path):
    p = data.prepare(make_params(tmp_path, **{
        "dataset.feature_descriptions": {"bmi": "body-mass index (kg/m2)"},
        "prompt.task_description": "A patient.", "prompt.question": "Sick?"}))
    df = table()
    row = df.iloc[0]
    assert first_user_text(p) == (
        f"A patient.\n\nThe age is {row['age']}. The body-mass index (kg/m2) is "
        f"{data.format_number(row['bmi'], 3)}. The smoker is {row['smoker']}.\n\nSick?")


def test_list_template_and_missing(tmp_path):
    p = data.prepare(make_params(tmp_path, **{"prompt.template": "list",
                                              "prompt.missing": "n/a",
                                              "dataset.features": ["bmi", "age"]}))
    body = p.user_texts[3].split("\n\n")[1]
    assert body == f"bmi: n/a\nage: {table().loc[3, 'age']}"


def test_missing_is_unknown_by_default(tmp_path):
    p = data.prepare(make_params(tmp_path))
    assert "The bmi is unknown." in p.user_texts[3]


def test_jinja_templates_inline_and_file(tmp_path):
    inline = "Age {{ age }}; {% for it in items %}{{ it.description }}={{ it.value }} {% endfor %}"
    p = data.prepare(make_params(tmp_path, **{"prompt.template": inline,
                                              "dataset.feature_descriptions": {"age": "Age"}}))
    row = table().iloc[0]
    bmi = data.format_number(row["bmi"], 3)
    expected = f"Age {row['age']}; Age={row['age']} bmi={bmi} smoker={row['smoker']}"
    assert first_user_text(p).split("\n\n")[1] == expected

    (tmp_path / "row.j2").write_text("BMI {{ row['bmi'] }}\n")
    q = data.prepare(make_params(tmp_path, **{"prompt.template": "row.j2"}))
    assert f"\n\nBMI {bmi}\n\n" in first_user_text(q)
    assert q.data_dir != p.data_dir and q.split_hash == p.split_hash


def test_messages_and_system_prompt(tmp_path):
    p = data.prepare(make_params(tmp_path))
    assert [m["role"] for m in p.messages("test")[0]] == ["user", "assistant"]
    assert [m["role"] for m in p.messages("test", with_answer=False)[0]] == ["user"]
    q = data.prepare(make_params(tmp_path, **{"prompt.system_prompt": "Be brief."}))
    rows = data.read_jsonl(q.data_dir / "train.jsonl")
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert len(rows) == len(q.split["train"])


# --- files -------------------------------------------------------------------------------------


def test_no_temporary_files_left(tmp_path, cache):
    p = data.prepare(make_params(tmp_path))
    assert sorted(f.name for f in p.data_dir.iterdir()) == ["test.jsonl", "train.jsonl",
                                                            "valid.jsonl"]
    assert not [f for f in cache.rglob("*") if f.name.endswith(".tmp")]


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", fail)
    with pytest.raises(OSError):
        data._atomic_write(tmp_path / "out" / "x.json", "{}")
    assert list((tmp_path / "out").iterdir()) == []


def test_source_file_not_mutated(tmp_path):
    params = make_params(tmp_path, **{"dataset.balance": "oversample"})
    before = (tmp_path / "data.csv").read_bytes()
    data.prepare(params)
    assert (tmp_path / "data.csv").read_bytes() == before


# --- token budget and MLflow -------------------------------------------------------------------


class WordTokenizer:
    """One token per whitespace-separated word of the rendered chat."""

    def apply_chat_template(self, messages, tokenize=True, return_dict=False, **kw):
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return text.split()


def test_token_stats_and_warning(tmp_path):
    p = data.prepare(make_params(tmp_path))
    s = data.token_stats(p, WordTokenizer(), max_seq_length=512)
    assert s["n"] == 60 and s["min"] <= s["median"] <= s["p95"] <= s["max"] < 512
    assert p.token_budget == s
    with pytest.warns(UserWarning, match="truncates them silently"):
        s = data.token_stats(p, WordTokenizer(), max_seq_length=10)
    assert s["over_max_seq_length"] == 60


def test_token_stats_real_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    s = data.token_stats(data.prepare(make_params(tmp_path)), tok, max_seq_length=2048)
    assert 20 < s["min"] <= s["max"] < 2048


def test_cli_prepare_prints_summary(tmp_path, capsys, monkeypatch):
    from helpers import cli
    from helpers.llm import models

    monkeypatch.setattr(models, "load_tokenizer", lambda model_id: WordTokenizer())
    make_params(tmp_path)
    assert cli.main(["prepare", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    for needle in ("split hash:", "train:", "valid:", "test:", "positive", "duplicates:",
                   "prompt tokens: min", "--- example 1", "--- example 2", "wording:",
                   "Is the outcome sick? Answer Yes or No."):
        assert needle in out


def test_no_validation_split(tmp_path):
    p = data.prepare(make_params(tmp_path, **{"dataset.valid_size": 0.0}))
    assert p.split["valid"] == [] and len(p.split["test"]) == 15
    assert (p.data_dir / "valid.jsonl").read_text() == ""


# --- untrusted params and tables (issue 15) ----------------------------------------------------


def test_template_sandbox_refuses_python_internals(tmp_path):
    # Regression: prompt.template ran shell commands through a plain jinja2.Environment.
    marker = tmp_path / "marker"
    for payload in (f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
                    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}"):
        params = make_params(tmp_path, **{"prompt.template": payload + " {{ row.age }}"})
        assert "refused by the template sandbox" in error_of(params)
    assert not marker.exists()
    # What templates are for still works inside the sandbox.
    ok = make_params(tmp_path, **{"prompt.template":
                                  "{% for i in items %}{{ i.name | upper }}={{ i.value }};"
                                  "{% endfor %}"})
    assert data.prepare(ok).prompts("test")[0].splitlines()[2].startswith("AGE=")


def test_repeated_column_names_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("age,age,outcome\n" + "1,2,sick\n3,4,well\n" * 20)
    params = make_params(tmp_path, **{"dataset.source": "d.csv"})
    assert "'age' appear more than once" in error_of(params)


def test_header_only_table_has_no_rows(tmp_path):
    (tmp_path / "h.csv").write_text("age,outcome\n")
    assert "no rows" in error_of(make_params(tmp_path, **{"dataset.source": "h.csv"}))


def test_unquoted_yes_gets_a_hint_to_quote_it(tmp_path):
    df = table().assign(outcome=["yes"] * 24 + ["no"] * 36)
    path = tmp_path / "run.yaml"
    df.to_csv(tmp_path / "data.csv", index=False)
    path.write_text("dataset:\n  source: data.csv\n  target: outcome\n  positive_label: yes\n")
    message = error_of(config.load_params(path))
    assert "dataset.positive_label True" in message and 'positive_label: "yes"' in message
    path.write_text(path.read_text().replace("label: yes", "label: 'yes'"))
    assert data.prepare(config.load_params(path)).positive_label == "yes"
# --- prompts from the data (issue 14) ----------------------------------------------------------

# Words that belong to one table's question: none may leak into another table's prompts.
OWN_WORDS = {name: (b.task_description, b.question) for name, b in data.BUILTINS.items()}


def pima_like(n: int = 60) -> pd.DataFrame:
    """A clinical screening table with terse column names (as the Pima data has)."""
    rng = np.random.default_rng(1)
    return pd.DataFrame({"npreg": rng.integers(0, 10, n), "glu": rng.integers(60, 200, n),
                         "body_mass_index": rng.normal(30, 5, n).round(1),
                         "type": ["Yes"] * (n // 3) + ["No"] * (n - n // 3)})


def only_dataset(tmp_path: Path, **dataset) -> config.Params:
    """A params file that sets only dataset.source, target and positive_label."""
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"dataset": dataset}))
    return config.load_params(path)


def _all_prompts(p: data.Prepared) -> str:
    return "\n".join(p.user_texts.values())


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_users_table_gets_its_own_question_never_another_tables(tmp_path, kind):
    # Regression: every prompt of a user's CSV read "Is this tumour malignant?" (issue 14).
    file = f"pima.{kind}"
    df = pima_like()
    df.to_csv(tmp_path / file, index=False) if kind == "csv" else df.to_parquet(tmp_path / file)
    p = data.prepare(only_dataset(tmp_path, source=file, target="type", positive_label="Yes"))
    text = _all_prompts(p)
    question = p.words.question
    assert "type" in question and question in text and "type" in p.prompts("test")[0]
    for words in OWN_WORDS.values():
        assert not any(w in text for w in words)
    for leaked in ("tumour", "malignant", "biopsy", "penguin", "respondent"):
        assert leaked not in text.lower()
    # Column names: snake_case becomes words, terse names stay as they are.
    assert "The body mass index is" in text and "The npreg is" in text
    assert p.words.derived == ("task_description", "question")


@pytest.mark.parametrize("name", sorted(data.BUILTINS))
def test_each_builtin_speaks_its_own_words_only(tmp_path, name):
    b = data.BUILTINS[name]
    p = data.prepare(only_dataset(tmp_path, source=f"builtin:{name}", target=b.target,
                                  positive_label=b.positive_label))
    text = _all_prompts(p)
    # A multi-class built-in's question is followed by the answers to choose from.
    question = (f"{b.question} Answer with one of: {', '.join(p.class_answers)}."
                if p.multiclass else b.question)
    assert p.words.question == question and question in p.prompts("train")[0]
    for other, words in OWN_WORDS.items():
        if other != name:
            assert not any(w in text for w in words), other
    # The built-in's own target and positive label are its defaults.
    q = data.prepare(only_dataset(tmp_path, source=f"builtin:{name}"))
    assert (q.target, q.positive_label, q.split_hash) == (b.target, b.positive_label,
                                                         p.split_hash)


def test_value_labels_and_explicit_wording_win(tmp_path):
    df = pima_like()
    df["smoke"] = np.arange(len(df)) % 2
    df.to_csv(tmp_path / "t.csv", index=False)
    base = only_dataset(tmp_path, source="t.csv", target="type", positive_label="Yes")
    p = data.prepare(base.replace(**{"dataset.value_labels": {"smoke": {0: "no", 1: "yes"}},
                                     "dataset.feature_descriptions": {"glu": "glucose"}}))
    assert "The smoke is yes." in p.user_texts[1] and "The smoke is no." in p.user_texts[0]
    assert "The glucose is" in p.user_texts[0]
    q = data.prepare(base.replace(**{"prompt.question": "Diabetic? Answer Yes or No."}))
    assert q.words.question == "Diabetic? Answer Yes or No." and q.words.derived == (
        "task_description",)
    # Only the wording changed: the same split, other prompt files.
    plain = data.prepare(base)
    assert q.split_hash == plain.split_hash == p.split_hash
    assert len({q.data_dir, plain.data_dir, p.data_dir}) == 3


def test_a_coded_target_gets_its_word_in_the_question(tmp_path):
    df = pima_like()
    df["type"] = (df["type"] == "Yes").astype(int)
    df.to_csv(tmp_path / "t.csv", index=False)
    # positive_label not set: the 1 of a 0/1 column.
    p = data.prepare(only_dataset(tmp_path, source="t.csv", target="type"))
    assert p.positive_label == 1 and p.words.question == (
        "Is type true for this record? Answer Yes or No.")
    q = data.prepare(only_dataset(tmp_path, source="t.csv", target="type", positive_label=1,
                                  value_labels={"type": {1: "diabetic", 0: "healthy"}}))
    assert q.words.question == "Is the type diabetic? Answer Yes or No."


def test_a_file_without_target_or_clear_positive_is_refused(tmp_path):
    pima_like().to_csv(tmp_path / "t.csv", index=False)
    msg = error_of(only_dataset(tmp_path, source="t.csv"))
    assert "dataset.target is not set" in msg and "'npreg'" in msg
    df = pima_like()
    df["type"] = df["type"].map({"Yes": "pos", "No": "neg"})
    df.to_csv(tmp_path / "t.csv", index=False)
    msg = error_of(only_dataset(tmp_path, source="t.csv", target="type"))
    assert "dataset.positive_label is not set" in msg and "'pos'" in msg


def test_value_labels_of_an_unknown_column_are_refused(tmp_path):
    msg = error_of(make_params(tmp_path, **{"dataset.value_labels": {"smokr": {0: "no"}}}))
    assert "'smokr'" in msg and "'smoker'" in msg


# ---------------------------------------------------------------------------------------------
# The prompt recipe (what a logged model keeps to write new rows)


def test_the_recipe_writes_the_training_rows_as_prepare_did(tmp_path):
    p = data.prepare(make_params(tmp_path, **{
        "prompt.template": "{{ row.age }} / {{ row.bmi }} / {{ row.smoker }}",
        "dataset.value_labels": {"smoker": {"yes": "a smoker"}}}))
    again = data.PromptRecipe.from_dict(json.loads(json.dumps(p.recipe.to_dict())))
    assert again.user_texts(p.table) == [p.user_texts[i] for i in p.table.index]
    assert again.kinds == {"age": "int", "bmi": "number", "smoker": "text"}


def test_new_rows_are_written_by_the_training_column_kinds(tmp_path):
    """New rows whose dtypes differ from training's (whole numbers in a float column, text in a
    number column, a category never seen) are still written as training wrote such values."""
    p = data.prepare(make_params(tmp_path, **{"prompt.template": "list"}))
    new = pd.DataFrame({"age": ["41", "n/a"], "bmi": [30, None], "smoker": ["never", "yes"]})
    lines = [t.split("\n\n")[1].splitlines() for t in p.recipe.user_texts(new)]
    assert lines[0] == ["age: 41", "bmi: 30.0", "smoker: never"]  # training wrote 30 as "30.0"
    assert lines[1] == ["age: n/a", "bmi: unknown", "smoker: yes"]  # unseen text as it is


def test_positive_labels_compare_as_text():
    assert data.positive_labels([1.0, 0, "1", "x"], "1").tolist() == [1, 0, 1, 0]


# --- multi-class ------------------------------------------------------------------------------


def three_class_table(n: int = 45, k: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"size": rng.normal(5, 2, n).round(2),
                         "colour": rng.choice(["red", "blue"], n),
                         "fruit": [["apple", "banana", "cherry", "date"][i % k]
                                   for i in range(n)]})


def multi_params(tmp_path: Path, df: pd.DataFrame | None = None, **overrides):
    (df if df is not None else three_class_table()).to_csv(tmp_path / "fruit.csv", index=False)
    path = tmp_path / "fruit.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "dataset": {
        "source": "fruit.csv", "target": "fruit", "test_size": 0.2, "valid_size": 0.2}}))
    return config.load_params(path, overrides)


def test_three_values_without_a_positive_label_are_multiclass(tmp_path):
    p = data.prepare(multi_params(tmp_path))
    assert p.multiclass and p.positive_label is None
    assert p.classes == ["apple", "banana", "cherry"] and p.class_answers == p.classes
    for split in ("train", "valid", "test"):  # stratified on the class
        counts = p.class_counts(split)
        assert set(counts) == {"apple", "banana", "cherry"} and len(set(counts.values())) == 1
    y = p.y("test")
    truth = p.table.loc[p.split["test"], "fruit"].tolist()
    assert [p.classes[k] for k in y] == truth
    # The question names every answer; each training completion is its class's answer word.
    assert p.words.question.endswith("Answer with one of: apple, banana, cherry.")
    rows = data.read_jsonl(p.data_dir / "train.jsonl")
    completions = [r["messages"][-1]["content"] for r in rows]
    assert completions == p.table.loc[p.split["train"], "fruit"].tolist()
    assert "3 classes" in data.summary_lines(p)[0]


def test_prompt_answers_are_the_completions_and_checked(tmp_path):
    words = {"apple": "Pomme", "banana": "Banane", "cherry": "Cerise"}
    p = data.prepare(multi_params(tmp_path, **{"prompt.answers": words}))
    assert p.class_answers == ["Pomme", "Banane", "Cerise"]
    assert "one of: Pomme, Banane, Cerise." in p.words.question
    assert set(p.answers("train")) == set(words.values())
    msg = error_of(multi_params(tmp_path, **{"prompt.answers": {"aple": "A"}}))
    assert "'aple'" in msg and "prompt.answers" in msg and "'apple'" in msg
    msg = error_of(multi_params(tmp_path, **{"prompt.answers": {"apple": "X", "cherry": "x"}}))
    assert "'apple'" in msg and "'cherry'" in msg and "same answer" in msg


def test_too_many_classes_and_tasks_that_do_not_fit(tmp_path):
    df = pd.DataFrame({"a": range(50), "code": [f"c{i % 25}" for i in range(50)]})
    df.to_csv(tmp_path / "codes.csv", index=False)
    msg = error_of(config.load_params(None, {"dataset.source": str(tmp_path / "codes.csv"),
                                             "dataset.target": "code"}))
    assert "'code'" in msg and "25 distinct values" in msg and "20" in msg
    # task: binary keeps the yes/no error on three values.
    msg = error_of(multi_params(tmp_path, **{"dataset.task": "binary"}))
    assert "3 classes" in msg and "exactly 2" in msg
    msg = error_of(multi_params(tmp_path, **{"dataset.balance": "oversample"}))
    assert "oversample" in msg and "multi-class" in msg


def test_builtin_wine_is_three_cultivars_with_its_own_words(tmp_path):
    p = data.prepare(config.load_params(None, {"dataset.source": "builtin:wine"}))
    assert p.multiclass and p.target == "cultivar" and len(p.table) == 178
    assert p.classes == ["Barbera", "Grignolino", "Nebbiolo"]
    assert {c: int((p.table["cultivar"] == c).sum()) for c in p.classes} == {
        "Barbera": 48, "Grignolino": 71, "Nebbiolo": 59}
    assert p.words.question == ("Which grape cultivar is this wine made from? Answer with one "
                                "of: Barbera, Grignolino, Nebbiolo.")
    assert "The alcohol content (% by volume) is" in p.prompts("test")[0]
    recipe = data.PromptRecipe.from_dict(p.recipe.to_dict())
    assert recipe.task == "multiclass" and recipe.answers == p.class_answers
    assert recipe.user_texts(p.X("test").head(2)) == p.prompts("test")[:2]


def test_multiclass_train_rows_are_stratified_and_nested(tmp_path):
    order = data.class_draw_order([10, 5, 2])
    assert sorted(order[:3]) == [0, 1, 2]  # one of each class first
    assert np.bincount(order[:8], minlength=3).tolist() == [5, 2, 1]
    assert np.bincount(order, minlength=3).tolist() == [10, 5, 2]
    base = multi_params(tmp_path, three_class_table(n=90))
    full = data.prepare(base)
    drawn = {k: data.prepare(base.replace(**{"dataset.train_rows": k})) for k in (3, 7, 20)}
    for k, p in drawn.items():
        assert len(p.split["train"]) == k and p.split["test"] == full.split["test"]
        assert set(p.split["train"]) <= set(full.split["train"])
        assert set(p.class_counts("train").values()) <= {k // 3, k // 3 + 1}
    assert set(drawn[3].split["train"]) <= set(drawn[7].split["train"]) <= set(
        drawn[20].split["train"])
    msg = error_of(base.replace(**{"dataset.train_rows": 2}))
    assert "dataset.train_rows=2" in msg and "one row per class" in msg
