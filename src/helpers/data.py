"""Data and prompts: one deterministic split for every model, rows serialized to prompts.

`prepare(params)` loads the table, checks it, splits it (stratified, saved under a content hash so
LLM runs and baselines score the very same test rows) and writes the prompts as mlx-lm chat
JSONL. Every cached file is written to a temporary file first and then renamed into place.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers import config
from helpers.config import Params
from helpers.contract import SPLITS

ID_COLUMNS = ("id", "row_id")
BUILTIN_TEMPLATES = ("sentence", "list")
SPLIT_FORMAT = 1  # bump when the split JSON layout or the splitting procedure changes


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the column and the fix."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A data set shipped by a package, with its own question: the prompts of a built-in never
    borrow another table's words, and a CSV of the same data gets none of them either."""

    load: Callable[[], pd.DataFrame]  # a fresh DataFrame
    target: str
    positive_label: Any
    task_description: str
    question: str
    feature_descriptions: dict[str, str] = dataclasses.field(default_factory=dict)
    value_labels: dict[str, dict[Any, str]] = dataclasses.field(default_factory=dict)
    about: str = ""  # where the table comes from
    # Multi-class data sets: the answer word of each class (prompt.answers wins).
    answers: dict[Any, str] = dataclasses.field(default_factory=dict)


def _breast_cancer() -> pd.DataFrame:
    """scikit-learn's bundled breast-cancer data; target as "malignant"/"benign" strings."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.copy()
    frame["target"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    return frame


def _penguins() -> pd.DataFrame:
    """palmerpenguins' CSV (Gorman, Williams & Fraser 2014): the 333 penguins whose sex is
    known; the measurement year is left out (it says nothing about the bird)."""
    from palmerpenguins import load_penguins

    frame = load_penguins()
    return frame[frame["sex"].notna()].drop(columns=["year"]).reset_index(drop=True)


def _anes96() -> pd.DataFrame:
    """statsmodels' subset of the 1996 American National Election Study (944 respondents);
    the expected vote as "Clinton"/"Dole", log(population) left out (population is there)."""
    from statsmodels.datasets import anes96

    frame = anes96.load_pandas().data.drop(columns=["logpopul"])
    for col in frame.columns:
        if col not in ("popul",):
            frame[col] = frame[col].astype(int)
    frame["vote"] = np.where(frame["vote"] == 1, "Dole", "Clinton")
    return frame


def _wine() -> pd.DataFrame:
    """scikit-learn's bundled wine data (Forina et al., PARVUS): 178 wines grown in one region
    of Italy, Barolo (59, made from the Nebbiolo grape), Grignolino (71) and Barbera (48), with
    13 chemical measurements each; the target as the grape cultivar's name (whose first tokens
    differ, where "Barolo" and "Barbera" share "Bar" under SmolLM2's tokenizer)."""
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    frame = bunch.frame.copy()
    frame["cultivar"] = np.asarray(WINE_CULTIVARS)[bunch.target.to_numpy()]
    return frame.drop(columns=["target"])


# load_wine's class_0, class_1, class_2, in the order of the original data.
WINE_CULTIVARS = ("Nebbiolo", "Grignolino", "Barbera")

_LEANING = {1: "extremely liberal", 2: "liberal", 3: "slightly liberal", 4: "moderate",
            5: "slightly conservative", 6: "conservative", 7: "extremely conservative"}

# Built-in data sets by name ("builtin:<name>"), each with its own wording.
BUILTINS: dict[str, Builtin] = {
    "breast_cancer": Builtin(
        _breast_cancer, target="target", positive_label="malignant",
        task_description="Here is a patient's breast tumour biopsy, measured from a digitized "
        "image.",
        question="Is this tumour malignant? Answer Yes or No.",
        about="scikit-learn's Wisconsin diagnostic breast cancer data (569 biopsies)"),
    "penguins": Builtin(
        _penguins, target="sex", positive_label="female",
        task_description="Here is an adult penguin measured at Palmer Station, Antarctica.",
        question="Is this penguin female? Answer Yes or No.",
        feature_descriptions={"species": "species", "island": "island",
                              "bill_length_mm": "bill length (mm)",
                              "bill_depth_mm": "bill depth (mm)",
                              "flipper_length_mm": "flipper length (mm)",
                              "body_mass_g": "body mass (g)"},
        about="palmerpenguins (PyPI): 333 penguins of three species with known sex"),
    "anes96": Builtin(
        _anes96, target="vote", positive_label="Dole",
        task_description="Here is a respondent to the 1996 American National Election Study.",
        question="Will this respondent vote for Bob Dole rather than Bill Clinton? Answer Yes "
        "or No.",
        feature_descriptions={
            "popul": "population of the respondent's town (thousands)",
            "TVnews": "number of days a week the respondent watches TV news",
            "selfLR": "respondent's own political leaning",
            "ClinLR": "respondent's view of Clinton's leaning",
            "DoleLR": "respondent's view of Dole's leaning",
            "PID": "respondent's party identification",
            "age": "respondent's age", "educ": "respondent's education",
            "income": "household income bracket (1-24)"},
        value_labels={
            "PID": {0: "strong Democrat", 1: "weak Democrat", 2: "independent, leaning "
                    "Democrat", 3: "independent", 4: "independent, leaning Republican",
                    5: "weak Republican", 6: "strong Republican"},
            "educ": {1: "grades 1-8", 2: "some high school", 3: "high school graduate",
                     4: "some college", 5: "college degree", 6: "master's degree", 7: "PhD"},
            "selfLR": _LEANING, "ClinLR": _LEANING, "DoleLR": _LEANING},
        about="statsmodels' subset of the 1996 American National Election Study (944 voters)"),
    "wine": Builtin(
        _wine, target="cultivar", positive_label=None,
        task_description="Here is a chemical analysis of a wine grown in one region of Italy, "
        "made from one of three grape cultivars.",
        question="Which grape cultivar is this wine made from?",
        feature_descriptions={
            "alcohol": "alcohol content (% by volume)", "malic_acid": "malic acid",
            "ash": "ash", "alcalinity_of_ash": "alcalinity of ash", "magnesium": "magnesium",
            "total_phenols": "total phenols", "flavanoids": "flavanoids",
            "nonflavanoid_phenols": "nonflavanoid phenols",
            "proanthocyanins": "proanthocyanins", "color_intensity": "colour intensity",
            "hue": "hue", "od280/od315_of_diluted_wines": "OD280/OD315 of diluted wines",
            "proline": "proline"},
        about="scikit-learn's wine data (Forina et al.): 178 wines of three cultivars, "
        "13 chemical measurements"),
}


def _params_dir(params: Params) -> Path | None:
    return Path(params.source_file).parent if params.source_file else None


def describe_source(params: Params) -> str:
    """The source as a user would recognise it: "builtin:<name>" or the resolved file path."""
    src = params.dataset.source
    if src.startswith("builtin:"):
        return src
    return str(config.resolve_path(src, _params_dir(params)))


def builtin(params: Params) -> Builtin | None:
    """The built-in data set of `params.dataset.source`, or None for a file."""
    src = params.dataset.source
    if not src.startswith("builtin:"):
        return None
    name = src.split(":", 1)[1]
    if name not in BUILTINS:
        raise DataError(f"dataset.source {src!r}: no such built-in data set. Built-ins: "
                        f"{', '.join('builtin:' + b for b in BUILTINS)}; or give a CSV or "
                        "Parquet path.")
    return BUILTINS[name]


def load_source(params: Params) -> pd.DataFrame:
    """The raw table of `params.dataset.source` (a fresh copy: callers may not mutate a cache)."""
    found = builtin(params)
    if found is not None:
        return found.load()
    src = params.dataset.source
    path = config.resolve_path(src, _params_dir(params))
    if path.is_dir():
        raise DataError(f"dataset.source {src!r}: {path} is a folder; give a CSV, TSV or Parquet "
                        f"file. Fix dataset.source in {params.source_file or 'the params'}.")
    if not path.is_file():
        here = _params_dir(params)
        where = f"{here} (the params file's folder) and " if here else ""
        raise DataError(f"dataset.source {src!r}: file not found (looked in {where}"
                        f"{config.PROJECT_ROOT}). Fix dataset.source in "
                        f"{params.source_file or 'the params'}.")
    table = _read_table(path)
    if len(table) == 0:
        raise DataError(f"{path}: no rows (the file holds only a header, columns "
                        f"{', '.join(map(repr, table.columns[:10]))}): add data rows, or fix "
                        f"dataset.source in {params.source_file or 'the params'}.")
    return table


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file; any failure becomes a DataError naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            table = pd.read_csv(path, sep=sep)
            _check_header(path, sep)
            return table
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow raise many types for a bad file
        raise DataError(f"{path}: could not read it as {suffix[1:].upper()}: "
                        f"{type(e).__name__}: {e}. Check that it is a valid, non-empty "
                        f"{suffix[1:].upper()} file with a header row.") from None
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}: use .csv, .tsv or "
                    ".parquet.")


def _check_header(path: Path, sep: str) -> None:
    """pandas renames a repeated column name (`age`, `age.1`), which then reaches the prompts
    as a feature of its own: refuse the file instead, naming the column."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        names = next(csv.reader(f, delimiter=sep), [])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more "
                        "than once in the header row (pandas would rename the second one to "
                        f"{repeated[0] + '.1'!r}): rename or remove the repeated columns.")


# ---------------------------------------------------------------------------------------------
# Checks


def _with_row_ids(raw: pd.DataFrame, origin: str) -> pd.DataFrame:
    """A copy indexed by row id: an `id`/`row_id` column if there is one, else the row index."""
    table = raw.copy()
    for col in ID_COLUMNS:
        if col in table.columns:
            ids = table[col]
            if ids.isna().any() or ids.duplicated().any():
                dup = ids[ids.duplicated()].head(5).tolist()
                raise DataError(f"{origin}: column {col!r} is used as the row id but has missing "
                                f"or repeated values (e.g. {dup}). Make it unique, or rename it "
                                "to use the row number instead.")
            table = table.set_index(col)
            break
    table.index.name = "row_id"
    return table


def resolve_target(table: pd.DataFrame, params: Params, origin: str) -> str:
    """The target column: dataset.target, else the built-in data set's own."""
    target = params.dataset.target
    if not target:
        found = builtin(params)
        if found is None:
            raise DataError(f"{origin}: dataset.target is not set: name the column to predict. "
                            f"Columns there are: {', '.join(map(repr, table.columns))}.")
        target = found.target
    return target


# Values read as "the positive one" when dataset.positive_label is not set.
_TRUTHY = {"1", "1.0", "true", "yes", "y", "t", "positive"}


def _check_target(table: pd.DataFrame, params: Params, target_name: str, origin: str) -> Any:
    """Check the target column; returns the positive label as it appears in the data."""
    spec = params.dataset
    if target_name not in table.columns:
        raise DataError(f"{origin}: target column {target_name!r} not found. Columns there "
                        f"are: {', '.join(map(repr, table.columns))}. Set dataset.target to one "
                        "of them.")
    target = table[target_name]
    if target.isna().any():
        missing = target.index[target.isna()].tolist()
        raise DataError(f"{origin}: target column {target_name!r} is empty in {len(missing)} "
                        f"rows (row ids {missing[:10]}). Drop those rows or fill in their class.")
    values = list(pd.unique(target))
    if target_task(params, len(values), target_name, origin) == MULTICLASS:
        return None  # no positive label: the classes are class_values()
    if len(values) != 2:
        shown = ", ".join(repr(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise DataError(f"{origin}: target column {target_name!r} has {len(values)} classes "
                        f"({shown}) but a yes/no task needs exactly 2. Pick a binary column or "
                        "recode it to two values.")
    wanted = spec.positive_label
    if wanted is None or wanted == "":
        found = builtin(params)
        if found is not None and found.target == target_name:
            wanted = found.positive_label
        else:
            truthy = [v for v in values if str(v).strip().lower() in _TRUTHY]
            if len(truthy) != 1:
                raise DataError(f"{origin}: dataset.positive_label is not set and column "
                                f"{target_name!r} holds {', '.join(map(repr, values))}: set "
                                "dataset.positive_label to the one that means 'Yes'.")
            return truthy[0]
    for v in values:
        if v == wanted:
            return v
    # YAML `positive_label: 1` against a column read as strings (or the reverse).
    for v in values:
        if str(v) == str(wanted):
            return v
    hint = _yaml_bool_hint(spec, values)
    raise DataError(f"{origin}: dataset.positive_label {wanted!r} is not a value of "
                    f"column {target_name!r}; its values are {', '.join(map(repr, values))}. Set "
                    f"dataset.positive_label to the one that means 'Yes'.{hint}")


BINARY, MULTICLASS = "binary", "multiclass"
MAX_CLASSES = 20  # more classes than this is not a classification tablora sets up


def target_task(params: Params, n_values: int, target_name: str, origin: str) -> str:
    """dataset.task, else from the target: binary where dataset.positive_label is set (the
    binary task's key) or the column holds 2 values, multiclass for 3-20 values."""
    task = params.dataset.task
    named_positive = params.dataset.positive_label not in ("", None)
    if task == BINARY or (not task and (n_values <= 2 or named_positive)):
        return BINARY  # _check_target refuses anything but 2 values
    if n_values > MAX_CLASSES:
        raise DataError(f"{origin}: target column {target_name!r} has {n_values} distinct "
                        f"values, more than the {MAX_CLASSES} classes a multi-class task takes: "
                        "pick a column with fewer classes, or group its values.")
    if n_values < 2:
        raise DataError(f"{origin}: target column {target_name!r} has {n_values} value: "
                        "a classification needs at least 2 classes.")
    return MULTICLASS


def class_values(table: pd.DataFrame, target_name: str) -> list:
    """The classes of a multi-class target, sorted (numbers as numbers, else as text)."""
    values = [_jsonable(v) for v in pd.unique(table[target_name])]
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def class_answers(params: Params, classes: list, target_name: str, origin: str) -> list[str]:
    """The answer word of each class: prompt.answers, else a built-in's own, else the class
    value's label (dataset.value_labels of the target), else the value itself as text."""
    given = params.prompt.answers
    known = {_key_text(c) for c in classes}
    unknown = [k for k in given if _key_text(k) not in known]
    if unknown:
        raise DataError(f"{origin}: prompt.answers names {', '.join(map(repr, unknown))}, not a "
                        f"class of column {target_name!r} (its classes: "
                        f"{', '.join(map(repr, classes))}): fix the keys of prompt.answers.")
    found = builtin(params)
    own = found.answers if found is not None and found.target == target_name else {}
    labels = value_labels(params).get(target_name, {})
    merged = {**{_key_text(k): str(v) for k, v in own.items()},
              **{_key_text(k): str(v) for k, v in given.items()}}
    words = [merged.get(_key_text(c)) or labels.get(_key_text(c), _key_text(c)) for c in classes]
    for i, w in enumerate(words):
        if not w.strip():
            raise DataError(f"{origin}: the answer of class {classes[i]!r} is empty: set "
                            "prompt.answers to a word for it.")
        for j in range(i):
            if words[j].strip().lower() == w.strip().lower():
                raise DataError(f"{origin}: classes {classes[j]!r} and {classes[i]!r} have the "
                                f"same answer {w!r}: give each class its own word in "
                                "prompt.answers.")
    return words


# YAML 1.1 (PyYAML) reads these unquoted words as booleans.
_YAML_BOOLS = {True: ("yes", "y", "true", "on"), False: ("no", "n", "false", "off")}


def _yaml_bool_hint(spec: Any, values: list) -> str:
    label = spec.positive_label
    if not isinstance(label, bool):
        return ""
    meant = [v for v in values if isinstance(v, str) and v.strip().lower() in _YAML_BOOLS[label]]
    example = meant[0] if meant else _YAML_BOOLS[label][0]
    return (f" YAML reads an unquoted yes/no/on/off as {str(label).lower()}: put the label in "
            f"quotes, e.g. positive_label: \"{example}\".")


def _check_features(table: pd.DataFrame, params: Params, target: str, origin: str) -> list[str]:
    """The feature columns in prompt order (all but the target when none are given)."""
    spec = params.dataset
    columns = [str(c) for c in table.columns]
    for name in [*spec.features, *spec.feature_descriptions, *spec.value_labels]:
        if name not in columns:
            close = difflib.get_close_matches(name, columns, n=3, cutoff=0.5)
            hint = f"Close matches: {', '.join(map(repr, close))}." if close else (
                f"Columns there are: {', '.join(map(repr, columns))}.")
            raise DataError(f"{origin}: feature {name!r} (in dataset.features, "
                            "dataset.feature_descriptions or dataset.value_labels) is not a "
                            f"column. {hint}")
    if target in spec.features:
        raise DataError(f"{origin}: the target {target!r} is also listed in "
                        "dataset.features: remove it (the model would be told the answer).")
    repeated = sorted({f for f in spec.features if spec.features.count(f) > 1})
    if repeated:
        raise DataError(f"{origin}: dataset.features lists {repeated} more than once.")
    if not spec.features:
        return [c for c in table.columns if c != target]
    return list(spec.features)


# ---------------------------------------------------------------------------------------------
# The split


def split_hash(table: pd.DataFrame, params: Params, target: str, positive: Any) -> str:
    """Content hash of the table (ids, columns, values incl. target) and the split settings
    (with the target and positive label as resolved: not the prompt's wording)."""
    spec = params.dataset
    h = hashlib.sha256()
    h.update(json.dumps([str(c) for c in table.columns]).encode())
    h.update(pd.util.hash_pandas_object(table, index=True).to_numpy().tobytes())
    settings = {"format": SPLIT_FORMAT, "target": target,
                "positive_label": str(positive), "test_size": spec.test_size,
                "valid_size": spec.valid_size, "split_seed": spec.split_seed,
                "balance": spec.balance}
    if positive is None:  # a multi-class target (the binary settings stay as they were)
        settings["task"] = MULTICLASS
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _counts(y: np.ndarray) -> str:
    if len(y) and y.max() > 1:  # class indices of a multi-class target
        return " / ".join(f"{n} of class {k}" for k, n in enumerate(np.bincount(y)))
    return f"{int(y.sum())} positive / {int(len(y) - y.sum())} negative"


def _compute_split(table: pd.DataFrame, y: np.ndarray, params: Params,
                   origin: str) -> dict[str, list]:
    """Stratified train/valid/test ids (fractions of the whole table), in table order."""
    from sklearn.model_selection import train_test_split

    spec = params.dataset
    pos = np.arange(len(table))
    fix = (f"Whole table: {len(y)} rows, {_counts(y)}. Use a larger dataset.test_size / "
           "dataset.valid_size (e.g. 0.3) or more rows.")
    try:
        rest, test = train_test_split(pos, test_size=spec.test_size, stratify=y,
                                      random_state=spec.split_seed)
        valid = np.array([], dtype=int)
        if spec.valid_size > 0:
            frac = spec.valid_size / (1 - spec.test_size)
            rest, valid = train_test_split(rest, test_size=frac, stratify=y[rest],
                                           random_state=spec.split_seed)
    except ValueError as e:  # sklearn: too few rows of a class, or an empty split
        raise DataError(f"{origin}: cannot split with dataset.test_size={spec.test_size}, "
                        f"dataset.valid_size={spec.valid_size}: {e} {fix}") from None
    parts = {"train": rest, "valid": valid, "test": test}
    for name, idx in parts.items():
        if name == "valid" and spec.valid_size == 0:
            continue
        if len(idx) == 0 or len(np.unique(y[idx])) < 2:
            raise DataError(f"{origin}: the {name} split would hold {len(idx)} rows "
                            f"({_counts(y[idx])}): it needs both classes. {fix}")
    # Table order: readable, and the same for baselines and prompts by construction.
    return {name: table.index[np.sort(idx)].tolist() for name, idx in parts.items()}


def _oversample(train: list, y_train: np.ndarray, seed: int) -> list:
    """Train ids plus random repeats of the minority class until the classes are even."""
    n_pos = int(y_train.sum())
    n_neg = len(y_train) - n_pos
    if n_pos == n_neg:
        return list(train)
    minority = 1 if n_pos < n_neg else 0
    pool = [i for i, yi in zip(train, y_train, strict=True) if yi == minority]
    rng = np.random.default_rng(seed)
    extra = rng.choice(len(pool), size=abs(n_pos - n_neg), replace=True)
    return list(train) + [pool[i] for i in extra]


# ---------------------------------------------------------------------------------------------
# Fewer training rows (learning curves: dataset.train_rows)


def subset_counts(k: int, n_pos: int, n_neg: int) -> tuple[int, int]:
    """(positives, negatives) among k rows drawn from n_pos + n_neg: the class shares of the
    training split, at least one row of each class. Each count grows by 0 or 1 when k grows by
    1, which is what lets the draws of one seed nest."""
    lo, hi = max(1, k - n_neg), min(k - 1, n_pos)
    pos = min(max(round(k * n_pos / (n_pos + n_neg)), lo), hi)
    return pos, k - pos


def draw_train_rows(train_ids: list, y_train: np.ndarray, k: int, seed: int) -> list:
    """k of `train_ids`, stratified; nested: for one seed, the rows of a smaller k are among
    those of a larger one (each class is shuffled once per seed and its first rows taken).
    Returned in the order of `train_ids`."""
    y_train = np.asarray(y_train, dtype=int)
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    if not 2 <= k <= len(train_ids) or min(n_pos, n_neg) < 1:
        raise ValueError(f"cannot draw {k} rows stratified from {len(train_ids)} "
                         f"({n_pos} positive / {n_neg} negative)")
    want = dict(zip((1, 0), subset_counts(k, n_pos, n_neg), strict=True))
    rng = np.random.default_rng([seed, 17])  # 17: apart from every other use of the seed
    keep: set[int] = set()
    for label in (1, 0):
        positions = np.flatnonzero(y_train == label)
        keep.update(rng.permutation(positions)[:want[label]].tolist())
    return [train_ids[i] for i in sorted(keep)]


def class_draw_order(counts: list[int]) -> list[int]:
    """The order in which a multi-class draw adds rows, as a class per step: one of each class
    first, then always the class furthest below its share (n_c / (taken_c + 0.5), the Sainte-
    Laguë rule). The first k steps are a stratified k-row draw, and a larger k only adds rows:
    what nesting needs."""
    taken = [0] * len(counts)
    order = []
    for c in sorted(range(len(counts)), key=lambda c: -counts[c]):
        if counts[c]:
            order.append(c)
            taken[c] = 1
    while len(order) < sum(counts):
        c = max((c for c in range(len(counts)) if taken[c] < counts[c]),
                key=lambda c: (counts[c] / (taken[c] + 0.5), -c))
        order.append(c)
        taken[c] += 1
    return order


def draw_train_rows_multi(train_ids: list, y_train: np.ndarray, k: int, seed: int) -> list:
    """draw_train_rows for a multi-class target (class indices): k rows, every class at least
    once while k allows, in the classes' shares; nested for one seed."""
    y_train = np.asarray(y_train, dtype=int)
    counts = np.bincount(y_train).tolist()
    present = sum(1 for n in counts if n)
    if not present <= k <= len(train_ids):
        raise ValueError(f"cannot draw {k} rows stratified from {len(train_ids)} rows of "
                         f"{present} classes: draw at least one row per class")
    want = np.bincount(class_draw_order(counts)[:k], minlength=len(counts))
    rng = np.random.default_rng([seed, 17])  # as draw_train_rows
    keep: set[int] = set()
    for c in range(len(counts)):
        positions = np.flatnonzero(y_train == c)
        keep.update(rng.permutation(positions)[:want[c]].tolist())
    return [train_ids[i] for i in sorted(keep)]


def subset_hash(base_hash: str, params: Params) -> str:
    """The split hash of `params`' subset of the split `base_hash` (the same hash when
    dataset.train_rows is 0: the whole training split)."""
    spec = params.dataset
    if not spec.train_rows:
        return base_hash
    blob = json.dumps({"split": base_hash, "train_rows": spec.train_rows,
                       "train_rows_seed": spec.train_rows_seed, "format": SPLIT_FORMAT})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_subset(table: pd.DataFrame, split: dict[str, list], base_hash: str, params: Params,
                  origin: str, target: str, positive: Any) -> tuple[dict[str, list], str, Path]:
    """The split with dataset.train_rows training rows (its own hash and saved file); the
    validation and test rows are those of the whole split."""
    spec = params.dataset
    shash = subset_hash(base_hash, params)
    path = config.CACHE_DIR / "splits" / shash / "split.json"
    saved = _load_split(path, table)
    if saved is not None:
        return saved, shash, path
    train = list(dict.fromkeys(split["train"]))  # distinct rows: oversampling comes after
    if spec.train_rows > len(train):
        raise DataError(f"{origin}: dataset.train_rows={spec.train_rows} but the training split "
                        f"holds {len(train)} rows: use at most {len(train)}, or 0 for all of "
                        f"them. Fix dataset.train_rows in {params.source_file or 'the params'}.")
    if positive is None:  # a multi-class target
        y_classes = class_indices(table.loc[train, target], class_values(table, target))
        try:
            rows = draw_train_rows_multi(train, y_classes, spec.train_rows,
                                         spec.train_rows_seed)
        except ValueError as e:
            raise DataError(f"{origin}: dataset.train_rows={spec.train_rows}: {e}. Fix "
                            f"dataset.train_rows in {params.source_file or 'the params'}."
                            ) from None
        subset = {**split, "train": rows}
        _save_split(path, subset, shash, params, origin, target, positive, parent=base_hash)
        return subset, shash, path
    y_train = (table.loc[train, target] == positive).to_numpy(dtype=int)
    rows = draw_train_rows(train, y_train, spec.train_rows, spec.train_rows_seed)
    if spec.balance == "oversample":
        y_rows = (table.loc[rows, target] == positive).to_numpy(dtype=int)
        rows = _oversample(rows, y_rows, spec.split_seed)
    subset = {**split, "train": rows}
    _save_split(path, subset, shash, params, origin, target, positive,
                parent=base_hash)
    return subset, shash, path


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_split(path: Path, table: pd.DataFrame) -> dict[str, list] | None:
    """A saved split, or None when it is missing or does not fit the table (then recompute)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        split = {name: list(saved["split"][name]) for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        warnings.warn(f"{path}: unreadable saved split; computing it again", stacklevel=3)
        return None
    known = set(table.index)
    if not all(i in known for ids in split.values() for i in ids):
        warnings.warn(f"{path}: saved split names unknown row ids; computing it again",
                      stacklevel=3)
        return None
    return split


def _duplicates(table: pd.DataFrame, columns: list[str], split: dict[str, list]) -> dict:
    """Rows identical (on `columns`) in train and test: leakage that flatters every model."""
    row_hash = pd.util.hash_pandas_object(table[columns], index=False)
    train_ids = list(dict.fromkeys(split["train"]))
    train_by_hash: dict[int, list] = {}
    for i in train_ids:
        train_by_hash.setdefault(int(row_hash.loc[i]), []).append(i)
    test_ids = [i for i in split["test"] if int(row_hash.loc[i]) in train_by_hash]
    matched = sorted({j for i in test_ids for j in train_by_hash[int(row_hash.loc[i])]},
                     key=train_ids.index)
    return {"count": len(test_ids), "test_ids": [_jsonable(i) for i in test_ids],
            "train_ids": [_jsonable(i) for i in matched]}


# ---------------------------------------------------------------------------------------------
# Serialization


def format_number(x: Any, digits: int) -> str:
    """`digits` significant digits without exponent for ordinary magnitudes: 17.99 -> "18.0"."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    # Round first: 9.996 rounds up to 10.0, which changes how many decimals are left.
    rounded = float(f"{x:.{digits - 1}e}")
    if not 1e-4 <= abs(rounded) < 1e15:
        return f"{x:.{digits - 1}e}"
    decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    if decimals <= 0:
        return str(int(round(rounded, decimals)))
    return f"{rounded:.{decimals}f}"


def _integral(col: pd.Series) -> bool:
    """A float column holding whole numbers only (ints that became floats because of NaNs)."""
    if not pd.api.types.is_float_dtype(col):
        return False
    vals = col.dropna().to_numpy(dtype=float)
    return len(vals) > 0 and bool(np.all(np.isfinite(vals) & (vals == np.round(vals)))
                                  and np.all(np.abs(vals) < 1e15))


# How format_values writes a column, decided once from the training table (column_kinds) and
# kept with a logged model, so that new rows are written as the training rows were even when
# their own dtypes differ (a float column whose new values happen to be whole numbers).
KIND_INT, KIND_NUMBER, KIND_TEXT = "int", "number", "text"


def column_kinds(table: pd.DataFrame, features: list[str]) -> dict[str, str]:
    """{column: "int" | "number" | "text"}: integers and whole-number floats (ints that became
    floats because of NaNs), other numbers, everything else (strings, booleans, categories)."""
    kinds = {}
    for col in features:
        s = table[col]
        if _integral(s) or (pd.api.types.is_integer_dtype(s)
                            and not pd.api.types.is_bool_dtype(s)):
            kinds[col] = KIND_INT  # an int column's values are written as format_number does
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            kinds[col] = KIND_NUMBER
        else:
            kinds[col] = KIND_TEXT
    return kinds


def _as_number(v: Any) -> float | int | None:
    """A number as it is, a numeric string as its number (new rows may arrive as text), else
    None (serialized as it is)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v
    if isinstance(v, str):
        for parse in (int, float):
            try:
                return parse(v)
            except ValueError:
                pass
    return None


def format_value(v: Any, kind: str, digits: int, missing: str,
                 words: dict[str, str] | None = None) -> str:
    """One value as prompt text, by its column's kind (column_kinds)."""
    if _is_missing(v):
        return missing
    text = str(v)
    if kind != KIND_TEXT:
        x = _as_number(v)
        if x is not None:
            if kind == KIND_INT and float(x).is_integer() and abs(float(x)) < 1e15:
                text = str(int(x))
            else:
                text = format_number(x, digits)
    return (words or {}).get(text, text)


def format_values(table: pd.DataFrame, features: list[str], params: Params,
                  kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """Every feature value as prompt text: numbers rounded, missing as `prompt.missing`, coded
    values as their words (dataset.value_labels, a built-in's own). kinds: how each column is
    written (default: column_kinds of `table`)."""
    p = params.prompt
    return _format_frame(table, features, kinds or column_kinds(table, features),
                         value_labels(params), p.digits, p.missing)


def _format_frame(table: pd.DataFrame, features: list[str], kinds: dict[str, str],
                  labels: dict[str, dict[str, str]], digits: int, missing: str) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    for col in features:
        words = labels.get(col, {})
        out[col] = [format_value(v, kinds[col], digits, missing, words) for v in table[col]]
    return out


def _key_text(v: Any) -> str:
    """A value_labels key as the value's prompt text: 1 and 1.0 -> "1", True -> "True"."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def value_labels(params: Params) -> dict[str, dict[str, str]]:
    """{column: {value as prompt text: word}}: a built-in's own, then dataset.value_labels."""
    found = builtin(params)
    merged: dict[str, dict[str, str]] = {}
    for source in ((found.value_labels if found else {}), params.dataset.value_labels):
        for col, words in source.items():
            merged[col] = {**merged.get(col, {}),
                           **{_key_text(k): str(w) for k, w in words.items()}}
    return merged


def humanize(column: str) -> str:
    """A column name as prompt words: snake_case and dashes become spaces ("bill_length_mm" ->
    "bill length mm"); anything else ("npreg", "mean radius") stays as it is."""
    return " ".join(str(column).replace("_", " ").replace("-", " ").split()) or str(column)


def feature_names(params: Params, features: list[str]) -> dict[str, str]:
    """The name of each feature in prompts: dataset.feature_descriptions, else the built-in's
    description, else the humanized column name."""
    found = builtin(params)
    own = found.feature_descriptions if found else {}
    given = params.dataset.feature_descriptions
    return {f: given.get(f) or own.get(f) or humanize(f) for f in features}


@dataclasses.dataclass(frozen=True)
class Wording:
    """What is said around a serialized row: derived from the data unless the params say it."""

    task_description: str
    question: str
    derived: tuple[str, ...]  # which of the two were derived (not from the params file)
    answers: tuple[str, ...] = ()  # multiclass: the answer word of each class (binary: empty)


def wording(params: Params, target: str, positive: Any,
            answers: list[str] | None = None) -> Wording:
    """The task description and question of `params`' table.

    prompt.task_description / prompt.question win when set. Otherwise a built-in data set speaks
    its own words (when its own target is predicted), and any other table gets a neutral
    sentence and a question built from the target column and positive label: never another
    table's words.
    """
    p, found = params.prompt, builtin(params)
    own = found if found is not None and found.target == target else None
    if answers:
        return _multiclass_wording(params, target, answers, own)
    answers = f"Answer {p.answer_yes} or {p.answer_no}."
    if own is not None:
        task, question = own.task_description, own.question
    else:
        name = params.dataset.source.split(":", 1)[1] if found else Path(
            params.dataset.source).stem
        task = f"Here is one record of the table {humanize(name)!r}."
        target_h = feature_names(params, [target])[target]
        word = value_labels(params).get(target, {}).get(_key_text(positive), str(positive))
        if word.strip().lower() in _TRUTHY:
            question = f"Is {target_h} true for this record? {answers}"
        else:
            question = f"Is the {target_h} {word}? {answers}"
    derived = tuple(k for k in ("task_description", "question") if not getattr(p, k))
    return Wording(p.task_description or task, p.question or question, derived)


def _multiclass_wording(params: Params, target: str, answers: list[str],
                        own: Builtin | None) -> Wording:
    """A multi-class table's words: which class, and the answers to choose from."""
    p = params.prompt
    choose = f"Answer with one of: {', '.join(answers)}."
    if own is not None:
        task, question = own.task_description, f"{own.question} {choose}"
    else:
        found = builtin(params)
        name = params.dataset.source.split(":", 1)[1] if found else Path(
            params.dataset.source).stem
        task = f"Here is one record of the table {humanize(name)!r}."
        target_h = feature_names(params, [target])[target]
        question = f"What is the {target_h} of this record? {choose}"
    derived = tuple(k for k in ("task_description", "question") if not getattr(p, k))
    return Wording(p.task_description or task, p.question or question, derived, tuple(answers))


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # lists and other containers
        return False


def _template_source(params: Params) -> str:
    """The template: "sentence", "list", or Jinja2 text (inline or read from a .j2/.jinja file)."""
    t = params.prompt.template
    if t in BUILTIN_TEMPLATES or "{{" in t or "{%" in t:
        return t
    if t.endswith((".j2", ".jinja")):
        path = config.resolve_path(t, _params_dir(params))
        if not path.is_file():
            raise DataError(f"prompt.template {t!r}: template file not found (looked beside "
                            f"{params.source_file or 'the params file'} and in "
                            f"{config.PROJECT_ROOT}). Fix the path.")
        return path.read_text(encoding="utf-8")
    raise DataError(f"prompt.template {t!r}: unknown template. Use 'sentence', 'list', inline "
                    "Jinja2 text containing '{{ ... }}', or a path ending in .j2 or .jinja.")


def _serializer(params: Params, features: list[str]) -> Callable[[dict[str, str]], str]:
    """A function from one row's formatted values ({column: text}) to the serialized row."""
    return _make_serializer(_template_source(params), feature_names(params, features), features)


def _make_serializer(source: str, names: dict[str, str],
                     features: list[str]) -> Callable[[dict[str, str]], str]:
    if source == "sentence":
        return lambda row: " ".join(f"The {names[f]} is {row[f]}." for f in features)
    if source == "list":
        return lambda row: "\n".join(f"{names[f]}: {row[f]}" for f in features)
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    # Params files are untrusted: the sandbox refuses attribute access that leads out of the
    # template (`cycler.__init__.__globals__.os...` would otherwise run shell commands).
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"prompt.template: Jinja2 syntax error on line {e.lineno}: {e.message}. "
                        "Fix the template.") from None

    def render(row: dict[str, str]) -> str:
        items = [{"name": f, "description": names[f], "value": row[f]} for f in features]
        ctx = {k: v for k, v in row.items() if k.isidentifier()}
        try:
            return template.render(ctx, row=row, items=items, names=names).strip()
        except jinja2.UndefinedError as e:
            raise DataError(f"prompt.template: {e.message}. Variables: `row` (column -> value "
                            "text), `items` (name, description, value), `names`, and each column "
                            "whose name is an identifier.") from None
        except jinja2.exceptions.SecurityError as e:
            raise DataError(f"prompt.template: refused by the template sandbox ({e}): a prompt "
                            "template may use the row's values, filters and loops, not Python "
                            "internals. Fix the template.") from None
        except Exception as e:  # noqa: BLE001 - the template is the user's code: any error is theirs
            raise DataError(f"prompt.template: rendering failed: {type(e).__name__}: {e}. Fix "
                            "the template.") from None

    return render


def user_message(serialized: str, words: Wording) -> str:
    """task_description, blank line, the serialized row, blank line, question (empties skipped)."""
    return "\n\n".join(part for part in (words.task_description, serialized, words.question)
                       if part)


def prompt_hash(params: Params, features: list[str], words: Wording) -> str:
    """Hash of everything that changes the prompt text (template file contents, derived wording,
    names and value labels included)."""
    prompt = dataclasses.asdict(params.prompt)
    if not prompt["answers"]:
        del prompt["answers"]  # binary prompts keep the folder they had before multi-class
    blob = {"prompt": prompt, "features": features,
            "names": feature_names(params, features), "labels": value_labels(params),
            "wording": [words.task_description, words.question, *words.answers],
            "template": _template_source(params)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class PromptRecipe:
    """Everything that turns one row into its chat prompt, resolved (names, value labels,
    template text, wording, how each column is written): what a logged model keeps, so that new
    rows are serialized exactly as the training rows were, without the params file, its template
    file or the training table."""

    features: list[str]
    kinds: dict[str, str]  # column_kinds of the training table
    names: dict[str, str]  # feature_names
    labels: dict[str, dict[str, str]]  # value_labels
    template: str  # "sentence", "list" or the Jinja2 text
    task_description: str
    question: str
    system_prompt: str
    missing: str
    digits: int
    answer_yes: str
    answer_no: str
    target: str
    positive_label: str  # as text: what counts as 1 in a label column of new rows
    task: str = BINARY
    classes: list = dataclasses.field(default_factory=list)  # multiclass: the class values
    answers: list = dataclasses.field(default_factory=list)  # multiclass: each class's word

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptRecipe:
        # A model logged before multi-class lacks task/classes/answers: binary.
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def user_texts(self, table: pd.DataFrame) -> list[str]:
        """The user message of each row of `table` (which holds at least self.features)."""
        texts = _format_frame(table, self.features, self.kinds, self.labels, self.digits,
                              self.missing)
        serialize = _make_serializer(self.template, self.names, self.features)
        words = Wording(self.task_description, self.question, (), tuple(self.answers))
        return [user_message(serialize(row), words) for row in texts.to_dict("records")]

    def messages(self, texts: list[str]) -> list[list[dict[str, str]]]:
        """Chat messages per user text: [system], user (no answer: what scoring reads)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [[*system, {"role": "user", "content": t}] for t in texts]


def positive_labels(values: Any, positive: str) -> np.ndarray:
    """0/1 labels of a target column of new rows: 1 where the value is the positive label,
    compared as text (a CSV may read 1 where training had 1.0, or the reverse)."""
    return np.array([int(str(v) == positive or _key_text(v) == _key_text(positive))
                     for v in values], dtype=int)


def prompt_recipe(params: Params, table: pd.DataFrame, features: list[str], target: str,
                  positive: Any, words: Wording, classes: list | None = None) -> PromptRecipe:
    p = params.prompt
    return PromptRecipe(
        features=list(features), kinds=column_kinds(table, features),
        names=feature_names(params, features), labels=value_labels(params),
        template=_template_source(params), task_description=words.task_description,
        question=words.question, system_prompt=p.system_prompt, missing=p.missing,
        digits=p.digits, answer_yes=p.answer_yes, answer_no=p.answer_no, target=str(target),
        positive_label=str(_jsonable(positive)),
        task=MULTICLASS if words.answers else BINARY, classes=list(classes or []),
        answers=list(words.answers))


# ---------------------------------------------------------------------------------------------
# Prepared


@dataclasses.dataclass
class Prepared:
    """A checked table, its saved split and the prompts written for mlx-lm."""

    params: Params
    table: pd.DataFrame  # features + target, index = row id
    target: str  # the target column (dataset.target, or the built-in's own)
    features: list[str]
    split: dict[str, list]  # "train"/"valid"/"test" -> row ids (train oversampled if asked)
    split_hash: str
    data_dir: Path  # train.jsonl, valid.jsonl, test.jsonl
    split_file: Path
    source: str
    positive_label: Any
    duplicates: dict  # {"count", "test_ids", "train_ids"}
    user_texts: dict = dataclasses.field(repr=False, default_factory=dict)  # row id -> prompt
    token_budget: dict | None = None  # filled in by token_stats()
    words: Wording | None = None  # task description and question, as used
    recipe: PromptRecipe | None = None  # how a row becomes its prompt (what a logged model keeps)
    task: str = BINARY  # or MULTICLASS: then positive_label is None and y() gives class indices
    classes: list = dataclasses.field(default_factory=list)  # multiclass: the class values
    class_answers: list = dataclasses.field(default_factory=list)  # multiclass: their words

    @property
    def multiclass(self) -> bool:
        return self.task == MULTICLASS

    def y(self, split: str) -> np.ndarray:
        """0/1 labels of a split (1 = positive_label), in split order; multiclass: the index of
        each row's class in self.classes."""
        if self.multiclass:
            return class_indices(self.table.loc[self.split[split], self.target], self.classes)
        return (self.table.loc[self.split[split], self.target] == self.positive_label).to_numpy(
            dtype=int)

    def X(self, split: str) -> pd.DataFrame:  # noqa: N802 (the usual name for features)
        """The feature columns of a split, in split order (index = row id)."""
        return self.table.loc[self.split[split], self.features]

    def prompts(self, split: str) -> list[str]:
        """The user message text of each row of a split."""
        return [self.user_texts[i] for i in self.split[split]]

    def answers(self, split: str) -> list[str]:
        if self.multiclass:
            return [self.class_answers[k] for k in self.y(split)]
        p = self.params.prompt
        return [p.answer_yes if yi else p.answer_no for yi in self.y(split)]

    def messages(self, split: str, with_answer: bool = True) -> list[list[dict[str, str]]]:
        """Chat messages per row: [system], user, [assistant answer]."""
        p = self.params.prompt
        system = [{"role": "system", "content": p.system_prompt}] if p.system_prompt else []
        out = []
        for text, answer in zip(self.prompts(split), self.answers(split), strict=True):
            msgs = [*system, {"role": "user", "content": text}]
            if with_answer:
                msgs.append({"role": "assistant", "content": answer})
            out.append(msgs)
        return out

    def class_counts(self, split: str) -> dict[str, int]:
        y = self.y(split)
        if self.multiclass:
            counts = np.bincount(y, minlength=len(self.classes))
            return {str(c): int(n) for c, n in zip(self.classes, counts, strict=True)}
        return {"positive": int(y.sum()), "negative": int(len(y) - y.sum())}


def class_indices(values: Any, classes: list) -> np.ndarray:
    """The index in `classes` of each value (compared as text where the types differ: a CSV
    of new rows may read 1 where training had 1.0); -1 for a value that is not a class."""
    index = {_key_text(c): k for k, c in enumerate(classes)}
    return np.array([index.get(_key_text(_jsonable(v)), -1) for v in values], dtype=int)


def _check_multiclass(params: Params, origin: str) -> None:
    """What the binary path has and the multi-class one does not (yet)."""
    spec = params.dataset
    if spec.balance == "oversample":
        raise DataError(f"{origin}: dataset.balance: oversample is for binary tasks; this "
                        "target is multi-class: set dataset.balance: none.")


def prepare(params: Params) -> Prepared:
    """Load, check, split (or reload the saved split) and write the prompts of `params`."""
    origin = describe_source(params)
    raw = load_source(params)
    table = _with_row_ids(raw, origin)
    target = resolve_target(table, params, origin)
    positive = _check_target(table, params, target, origin)
    features = _check_features(table, params, target, origin)
    classes: list = []
    answers: list[str] = []
    if positive is None:  # a multi-class target
        _check_multiclass(params, origin)
        classes = class_values(table, target)
        answers = class_answers(params, classes, target, origin)
        y_all = class_indices(table[target], classes)
    else:
        y_all = (table[target] == positive).to_numpy(dtype=int)

    shash = split_hash(table, params, target, positive)
    split_dir = config.CACHE_DIR / "splits" / shash
    split_file = split_dir / "split.json"
    split = _load_split(split_file, table)
    if split is None:
        split = _compute_split(table, y_all, params, origin)
        if params.dataset.balance == "oversample":
            y_train = (table.loc[split["train"], target] == positive).to_numpy()
            split["train"] = _oversample(split["train"], y_train.astype(int),
                                         params.dataset.split_seed)
        _save_split(split_file, split, shash, params, origin, target, positive)
    if params.dataset.train_rows:
        split, shash, split_file = _train_subset(table, split, shash, params, origin, target,
                                                 positive)
        split_dir = split_file.parent

    slim = table[[*features, target]]
    duplicates = _duplicates(slim, [*features, target], split)
    if duplicates["count"]:
        warnings.warn(f"{duplicates['count']} test rows also appear identically in train "
                      f"(test ids {duplicates['test_ids'][:10]}): test scores are optimistic.",
                      stacklevel=2)
    words = wording(params, target, positive, answers)
    # One path for training rows and new ones (helpers.serving): the recipe.
    recipe = prompt_recipe(params, slim, features, target, positive, words, classes)
    user_texts = dict(zip(slim.index, recipe.user_texts(slim), strict=True))
    data_dir = split_dir / f"prompts-{prompt_hash(params, features, words)}"
    prepared = Prepared(params=params, table=slim, target=target, features=features,
                        split=split, split_hash=shash, data_dir=data_dir, split_file=split_file,
                        source=origin, positive_label=positive, duplicates=duplicates,
                        user_texts=user_texts, words=words, recipe=recipe,
                        task=MULTICLASS if classes else BINARY, classes=classes,
                        class_answers=answers)
    _write_jsonl(prepared)
    return prepared


def table_split_hash(params: Params) -> str:
    """The split hash of the table as this machine reads it: what prepare() would key its split
    by. A batch worker compares it with the batch's before it trains on anything."""
    origin = describe_source(params)
    table = _with_row_ids(load_source(params), origin)
    target = resolve_target(table, params, origin)
    base = split_hash(table, params, target, _check_target(table, params, target, origin))
    return subset_hash(base, params)


def install_split(split_json: str, shash: str) -> Path:
    """Keep a split computed elsewhere (the batch's machine) as this machine's split of `shash`,
    so that prepare() loads those rows instead of drawing them again; returns the file."""
    path = config.CACHE_DIR / "splits" / shash / "split.json"
    if json.loads(split_json).get("split_hash") != shash:
        raise DataError(f"the split sent for hash {shash} is labelled "
                        f"{json.loads(split_json).get('split_hash')!r}: not installing it")
    if not path.is_file() or path.read_text(encoding="utf-8") != split_json:
        _atomic_write(path, split_json)
    return path


def _save_split(path: Path, split: dict[str, list], shash: str, params: Params,
                origin: str, target: str, positive: Any, parent: str = "") -> None:
    spec = params.dataset
    doc = {"split_hash": shash, "source": origin, "target": target,
           "positive_label": _jsonable(positive), "test_size": spec.test_size,
           "valid_size": spec.valid_size, "split_seed": spec.split_seed, "balance": spec.balance}
    if parent:  # a subset of the training split (dataset.train_rows) of the split `parent`
        doc.update(parent_split_hash=parent, train_rows=spec.train_rows,
                   train_rows_seed=spec.train_rows_seed)
    doc["split"] = {name: [_jsonable(i) for i in ids] for name, ids in split.items()}
    _atomic_write(path, json.dumps(doc, indent=1) + "\n")


def _write_jsonl(prepared: Prepared) -> None:
    """train/valid/test.jsonl in mlx-lm chat format (plus the row id), unless already there."""
    for name in SPLITS:
        path = prepared.data_dir / f"{name}.jsonl"
        if path.is_file():
            continue  # keyed by split and prompt hashes: same content
        lines = [json.dumps({"messages": m, "row_id": _jsonable(i)}, ensure_ascii=False)
                 for m, i in zip(prepared.messages(name), prepared.split[name], strict=True)]
        _atomic_write(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (as written by prepare)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Token budget


def _n_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # older/other tokenizers
        ids = ids["input_ids"]
    return len(ids)


def token_stats(prepared: Prepared, tokenizer: Any, max_seq_length: int) -> dict[str, Any]:
    """Token lengths of the full training sequences (chat template + answer), all splits.

    Warns when the longest exceeds max_seq_length: mlx-lm truncates such rows silently.
    """
    lengths = np.array([_n_tokens(tokenizer, m) for name in SPLITS
                        for m in prepared.messages(name, with_answer=True)])
    stats = {"n": int(len(lengths)), "min": int(lengths.min()),
             "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
             "max": int(lengths.max()), "max_seq_length": int(max_seq_length),
             "over_max_seq_length": int((lengths > max_seq_length).sum())}
    if stats["max"] > max_seq_length:
        warnings.warn(f"{stats['over_max_seq_length']} of {stats['n']} prompts are longer than "
                      f"max_seq_length={max_seq_length} tokens (longest {stats['max']}): mlx-lm "
                      "truncates them silently, cutting off the answer. Raise max_seq_length or "
                      "use fewer features / a shorter template.", stacklevel=2)
    prepared.token_budget = stats
    return stats


# ---------------------------------------------------------------------------------------------
# Display


def summary_lines(prepared: Prepared) -> list[str]:
    """Split sizes, class counts, hash and duplicates as printable lines."""
    what = (f"{len(prepared.classes)} classes" if prepared.multiclass
            else f"positive = {prepared.positive_label!r}")
    lines = [f"source:      {prepared.source} ({len(prepared.table)} rows, "
             f"{len(prepared.features)} features, target {prepared.target!r}, {what})",
             f"split hash:  {prepared.split_hash}  ({prepared.split_file})"]
    for split in SPLITS:
        c = prepared.class_counts(split)
        note = ""
        if split == "train" and prepared.params.dataset.balance == "oversample":
            note = f"  (oversampled; {len(set(prepared.split[split]))} distinct rows)"
        if prepared.multiclass:
            lines.append(f"{split + ':':<12} {len(prepared.split[split]):>5} rows  "
                         + "  ".join(f"{n:>4} {k}" for k, n in c.items()))
            continue
        lines.append(f"{split + ':':<12} {len(prepared.split[split]):>5} rows  "
                     f"{c['positive']:>5} positive  {c['negative']:>5} negative{note}")
    d = prepared.duplicates
    lines.append(f"duplicates:  {d['count']} test rows identical to a train row"
                 + (f" (test ids {d['test_ids'][:20]})" if d["count"] else ""))
    lines.append(f"prompts:     {prepared.data_dir}")
    if prepared.words is not None and prepared.words.derived:
        keys = " and ".join(f"prompt.{k}" for k in prepared.words.derived)
        lines.append(f"wording:     {keys} derived from the data (set {keys} to change "
                     f"it): {prepared.words.question!r}")
    return lines


def example_lines(prepared: Prepared) -> list[str]:
    """The first training prompt of each class, as the model sees it (chat messages)."""
    y, messages = prepared.y("train"), prepared.messages("train")
    lines: list[str] = []
    for n, label in enumerate(range(len(prepared.classes)) if prepared.multiclass else (1, 0),
                              1):
        if not (y == label).any():
            continue
        k = int(np.argmax(y == label))
        lines.append(f"--- example {n} (train row {prepared.split['train'][k]}) ---")
        lines += [f"[{m['role']}]\n{m['content']}" for m in messages[k]]
    return lines
