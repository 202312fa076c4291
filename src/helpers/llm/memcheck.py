"""Has the model seen this table? Memorization tests run before any LLM result is believed.

LLMs memorize popular public tables verbatim, and their accuracy on a table they have seen is
inflated (Bordt, Nori, Rodrigues, Nushi, Caruana: "Elephants Never Forget: Memorization and
Learning of Tabular Data in Large Language Models", COLM 2024). The tests below keep the
definitions of their package `tabmemcheck` 0.1.6 (functions.py, chat_completion.py), for a
model that continues plain text (its "base model" path, `LLM_Interface.completion`):

  header       the CSV from its first line, cut in the middle third of row i, just after a
               delimiter (i = 1..8; tabmemcheck cuts at rows 2, 4, 6, 8: the odd rows double the
               trials so that the test can reach significance); the model continues greedily.
               Exact: it reproduces the rest of the cut row and the whole next row. Also: how
               many characters it reproduces verbatim (tabmemcheck's score, up to that length).
  row          `prefix_rows` (10) contiguous lines at a random place, the model writes the next
               one. Exact: the true row is contained in the first line of the completion
               (tabmemcheck: `suffix.strip() in response.strip()`).
  feature      the most distinctive column (most distinct values; tabmemcheck's
               `find_most_unique_feature`) held out of a row: the header, `few_shot` (5) random
               other rows of the table, then the row's own fields up to the held-out one;
               exact: the completion's next field is the held-out value.
  first_token  the first n characters of the row that `row` asked for, n the smallest that gives
               >= 3 distinct first tokens, none in half the rows (`build_first_token`); read off
               the `row` completions. Skipped when the first column is sorted (an id, a date):
               the next value is then predictable from the rows before it, seen or not
               (tabmemcheck runs a classifier for that).

Chance level: the same trials on a shuffled copy of the table (each column permuted on its own,
the header kept). A test flags memorization when its exact matches beat the shuffled copy's
by a one-sided Fisher exact test at ALPHA. Near matches: Levenshtein distance at most
NEAR_FRACTION of the target's length (logged, not used for the flag).

Differences from tabmemcheck, each for a reason:
  - A causal model has no chat API in the way, so every test is plain continuation (the chat
    prompts with few-shot examples from other tables exist because chat APIs allow nothing
    else), and the feature completion is asked in the table's own CSV text rather than as
    "Name = value" pairs: a table memorized from the web was memorized in that text.
  - The header is cut after a delimiter, not at any character: a cut inside a number splits a
    token that a tokenizer merging digits never produces there.
  - The row prompt ends with the newline that ends its last row; without it a model may run
    the last number on ("0" -> "0.021,...") instead of starting the next row.
  - Prompts share their beginnings so that a key-value cache serves them (prompt processing is
    the cost on a CPU): the row trials come in blocks of `block` (5) consecutive rows after the
    random `prefix_rows` lines, each row with every line before it in the block (10 to 14
    lines of context); the feature trials share one draw of example rows, and a row whose
    held-out value an example shows is not a trial.
  - Generation is greedy and stops as soon as the completion cannot be a near match any more
    (the Levenshtein distance to every prefix of the target exceeds the near bound): the
    verdict is the same, and a model that has not seen the table costs a few tokens a trial.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.resources
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helpers import contract, data
from helpers.config import Params

TESTS = contract.MEMCHECK_TESTS  # header, row, feature, first_token
TEXTS = ("auto", "file", "pandas", "both")
ALPHA = 0.05
NEAR_FRACTION = 0.1
MAX_LINES = 100_000  # tabmemcheck's csv_max_rows: the rest of a huge file is never read
# Built-in tables as their packages ship them: the file that circulates publicly (scikit-learn's
# own copy, on GitHub in every fork), which is what a model would have seen.
BUILTIN_FILES = {"breast_cancer": ("sklearn.datasets.data", "breast_cancer.csv")}


class MemcheckError(ValueError):
    """A table or setting the tests cannot use; the message names it and the fix (one line:
    contract.USER_ERRORS)."""


@dataclass(frozen=True)
class Settings:
    rows: int = 25  # trials of the row and feature tests (tabmemcheck's num_queries)
    prefix_rows: int = 10  # lines before the row to complete (num_prefix_rows)
    few_shot: int = 5  # random rows before a feature completion prompt (few_shot)
    header_cuts: int = 8  # header trials: cuts in rows 1..header_cuts
    block: int = 5  # row trials in a row after one context (they share its cache)
    seed: int = 0

    def __post_init__(self) -> None:
        for key, low in (("rows", 1), ("prefix_rows", 1), ("few_shot", 0), ("header_cuts", 1),
                         ("block", 1)):
            if getattr(self, key) < low:
                raise MemcheckError(f"memcheck {key}={getattr(self, key)}: must be >= {low}")

    def hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- the table as text


@dataclass(frozen=True)
class TableText:
    """A table as CSV text: its lines (the header first), split into fields."""

    name: str  # "file" (as distributed) or "pandas" (DataFrame.to_csv)
    origin: str  # where the text came from, for people
    lines: tuple[str, ...]
    delimiter: str = ","
    columns: tuple[str, ...] = ()  # a name per field (the header's, or the table's)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def cells(self) -> list[list[str]]:
        """The fields of every line after the header."""
        return [_split(line, self.delimiter) for line in self.lines[1:]]


def _split(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter))


def _join(fields: Sequence[str], delimiter: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="").writerow(fields)
    return buf.getvalue()


def from_text(text: str, name: str, origin: str, delimiter: str = ",",
              names: Sequence[str] = ()) -> TableText:
    """Check the text's shape: a header line and rows with one field count."""
    lines = [line.rstrip("\r") for line in text.split("\n")[: MAX_LINES + 1]]
    lines = [line for line in lines if line.strip()]
    if len(lines) < 3:
        raise MemcheckError(f"{origin}: {len(lines)} non-empty line(s); the memorization tests "
                            "need a header and at least 2 rows")
    counts = [len(_split(line, delimiter)) for line in lines[1:]]
    if len(set(counts)) > 1:
        bad = next(i for i, c in enumerate(counts, 2) if c != counts[0])
        raise MemcheckError(f"{origin}: line {bad} has {counts[bad - 2]} fields, line 2 has "
                            f"{counts[0]}: the tests need one field count per row")
    header = _split(lines[0], delimiter)
    if len(header) == counts[0]:
        columns = tuple(header)
    elif len(names) == counts[0]:  # e.g. scikit-learn's file: "569,30,malignant,benign"
        columns = tuple(str(n) for n in names)
    else:
        columns = tuple(f"column {i + 1}" for i in range(counts[0]))
    return TableText(name, origin, tuple(lines), delimiter, columns)


def table_texts(params: Params, which: str = "auto") -> list[TableText]:
    """The texts to test: "file" is the data file as distributed (a CSV/TSV source, or the file
    a built-in ships as), "pandas" the table as pandas writes it to CSV; "auto" = the file where
    there is one, else the pandas rendering; "both" = each that exists."""
    if which not in TEXTS:
        raise MemcheckError(f"memcheck text {which!r}: expected one of {', '.join(TEXTS)}")
    frame = data.load_source(params)
    source = data.describe_source(params)
    out: list[TableText] = []
    raw = _raw_file(params, source)
    if raw is not None and which in ("auto", "file", "both"):
        path, delimiter = raw
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(from_text(text, "file", str(path), delimiter, [str(c) for c in frame.columns]))
    if which in ("pandas", "both") or (which == "auto" and not out):
        text = frame.to_csv(index=False, lineterminator="\n")
        out.append(from_text(text, "pandas", f"{source} as pandas writes it (to_csv)"))
    if not out:
        raise MemcheckError(f"dataset.source {params.dataset.source!r} has no data file to test "
                            "(a Parquet file or a built-in without one): use --text pandas")
    return out


def _raw_file(params: Params, source: str) -> tuple[Path, str] | None:
    if source.startswith("builtin:"):
        spec = BUILTIN_FILES.get(source.split(":", 1)[1])
        if spec is None:
            return None
        return Path(str(importlib.resources.files(spec[0]) / spec[1])), ","
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return path, ","
    if suffix == ".tsv":
        return path, "\t"
    return None


def shuffled(table: TableText, seed: int) -> TableText:
    """The chance-level copy: every column permuted on its own, the header line kept."""
    rng = np.random.default_rng([seed, 1])
    cells = np.array(table.cells(), dtype=object)
    for j in range(cells.shape[1]):
        cells[:, j] = cells[rng.permutation(len(cells)), j]
    lines = (table.lines[0], *(_join(row, table.delimiter) for row in cells.tolist()))
    return dataclasses.replace(table, name=f"{table.name} (shuffled)",
                               origin=f"{table.origin}, columns shuffled", lines=lines)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Query:
    """One prompt and the text a model that has seen the table would continue it with."""

    test: str
    trial: int
    prompt: str
    target: str
    stop_lines: int  # newlines that end the completion (the target's own + 1)
    line: int = 0  # which line of the table the target comes from
    stop_text: str = ""  # also ends the completion (the delimiter after a held-out field)


def plan(table: TableText, settings: Settings) -> dict[str, Any]:
    """The random choices of every trial, drawn once from the seed and the table's shape, so
    that the table and its shuffled copy get the same trials."""
    rng = np.random.default_rng([settings.seed, 0])
    n_lines = len(table.lines)
    cuts = [i for i in range(1, settings.header_cuts + 1) if i + 1 < n_lines]
    if n_lines - settings.prefix_rows < 1:
        raise MemcheckError(f"{table.origin}: {n_lines} lines but the row test takes "
                            f"{settings.prefix_rows} lines of context and one to complete: "
                            f"use --prefix-rows {max(1, n_lines - 2)} or fewer")
    # Blocks of rows to complete that never overlap; the header counts as a line (tabmemcheck).
    block = min(settings.block, settings.rows)
    slots = max(1, (n_lines - settings.prefix_rows) // block)
    n_blocks = min(slots, -(-settings.rows // block))
    firsts = sorted(settings.prefix_rows + block * int(k)
                    for k in rng.choice(slots, size=n_blocks, replace=False))
    blocks, left = [], settings.rows
    for f in firsts:
        blocks.append(list(range(f, min(f + block, n_lines, f + left))))
        left -= len(blocks[-1])
    n_rows = n_lines - 1
    shots = rng.choice(n_rows, size=min(settings.few_shot, n_rows - 1), replace=False).tolist()
    return {
        "cut_fractions": rng.uniform(1 / 3, 2 / 3, size=len(cuts)).tolist(),
        "cuts": cuts,
        "row_blocks": blocks,
        "feature_shots": shots,
        "feature_order": [r for r in rng.permutation(n_rows).tolist() if r not in shots],
    }


def distinctive_column(table: TableText) -> int:
    """The column with the most distinct values (tabmemcheck's find_most_unique_feature), but
    never the first: the row must give at least one field before the held-out one."""
    cells = table.cells()
    if len(table.columns) < 2:
        raise MemcheckError(f"{table.origin}: one column; the feature test holds one field out "
                            "of a row and needs at least two")
    counts = [len({row[j].strip() for row in cells}) for j in range(len(table.columns))]
    return int(np.argmax(counts[1:])) + 1


def first_token_digits(table: TableText) -> int | None:
    """tabmemcheck's build_first_token: the fewest leading characters giving >= 3 distinct
    tokens with none in half the rows; None when there is none or the first column is sorted."""
    rows = list(table.lines[1:])
    first = [row[0] for row in table.cells()]
    numbers = _as_numbers(first)
    keys = numbers if numbers is not None else first
    if len(keys) > 2 and (keys == sorted(keys) or keys == sorted(keys, reverse=True)):
        return None
    for n in range(1, 7):
        _, counts = np.unique([r[:n] for r in rows], return_counts=True)
        if len(counts) >= 3 and counts.max() < 0.5 * len(rows):
            return n
    return None


def _as_numbers(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def queries(table: TableText, chosen: dict[str, Any], settings: Settings) -> list[Query]:
    """The prompts of every test on `table`, from the choices `plan` drew, in an order where
    each prompt shares the longest beginning with the one before it."""
    lines, text = table.lines, table.text
    out: list[Query] = []
    starts = np.cumsum([0] + [len(line) + 1 for line in lines])  # offset of each line in text
    for k, (i, frac) in enumerate(zip(chosen["cuts"], chosen["cut_fractions"], strict=True)):
        cut = int(starts[i] + _cut_at_field(lines[i], frac, table.delimiter))
        end = int(starts[i + 2] - 1)  # the end of the next row, before its newline
        out.append(Query("header", k, text[:cut], text[cut:end], 2, i))
    k = 0
    for block in chosen["row_blocks"]:
        for t in block:  # every line since the block's context began
            prompt = "\n".join(lines[block[0] - settings.prefix_rows: t]) + "\n"
            out.append(Query("row", k, prompt, lines[t], 1, t))
            k += 1
    col = distinctive_column(table)
    cells = table.cells()
    shots = chosen["feature_shots"]
    shown = {cells[o][col].strip() for o in shots}
    # tabmemcheck never shows the answer in a few-shot example: a row whose held-out value an
    # example row shows is passed over.
    rows = [r for r in chosen["feature_order"] if cells[r][col].strip() not in shown]
    head = "\n".join([lines[0], *(lines[o + 1] for o in shots)])
    for k, r in enumerate(rows[: settings.rows]):
        prompt = head + "\n" + _join(cells[r][:col], table.delimiter) + table.delimiter
        out.append(Query("feature", k, prompt, cells[r][col].strip(), 1, r + 1,
                         table.delimiter))
    return out


def _cut_at_field(line: str, frac: float, delimiter: str) -> int:
    """Where to cut a row: just after the delimiter nearest to `frac` of its length. A cut
    inside a number would split a token that tokenizers merging digits (GPT-2's BPE, Llama 3's
    groups of three) never produce there, and the model would be tested on text it never saw."""
    ends = [i + 1 for i, ch in enumerate(line) if ch == delimiter]
    if not ends:
        return 0
    return min(ends, key=lambda e: abs(e - frac * len(line)))


# --------------------------------------------------------------------------- scoring strings


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), tabmemcheck's string distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class _PrefixDistance:
    """min over j of levenshtein(generated, target[:j]), updated one character at a time: a lower
    bound on the distance of any completion that starts with what was generated."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.row = list(range(len(target) + 1))

    def add(self, text: str) -> int:
        for ch in text:
            prev, cur = self.row, [self.row[0] + 1]
            for j, cb in enumerate(self.target, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ch != cb)))
            self.row = cur
        return min(self.row)


def near_bound(target: str) -> int:
    return int(NEAR_FRACTION * len(target))


def answer_of(q: Query, completion: str, delimiter: str) -> str:
    """The part of a completion that is compared with the target."""
    if q.test == "row":
        return completion.strip("\n").split("\n")[0]
    if q.test == "feature":
        return _split(completion.split("\n")[0], delimiter)[0].strip() if completion else ""
    return "\n".join(completion.split("\n")[: q.stop_lines])


def is_exact(q: Query, answer: str) -> bool:
    if q.test == "row":
        return q.target.strip() in answer.strip()
    if q.test == "feature":
        return answer == q.target
    return answer.startswith(q.target)


def verbatim_chars(target: str, completion: str) -> int:
    """Characters the completion reproduces before its first difference (tabmemcheck's header
    score)."""
    n = 0
    for a, b in zip(target, completion, strict=False):
        if a != b:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- generation


Complete = Callable[[str, Query], tuple[str, bool]]  # (prompt, query) -> (completion, cut short)


def mlx_completer(model: Any, tokenizer: Any, context: int | None = None,
                  min_chars: int = 6) -> Complete:
    """Greedy continuation with mlx-lm, stopped at the query's last newline, at the length
    bound, or as soon as the completion can no longer be a near match (see the module doc).
    One key-value cache serves every prompt: cut back to the tokens a prompt shares with the
    one before, it spares processing them again. `min_chars`: never stopped early before this
    many characters (the first-token test reads up to 6 of a row completion)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    held: dict[str, Any] = {"cache": None, "ids": []}  # the cache and the tokens it holds

    def cache_for(ids: list[int]) -> tuple[Any, int]:
        """The cache holding the longest prefix of `ids` it can (one token at least stays to
        be processed); returns it and that prefix's length."""
        cache, old = held["cache"], held["ids"]
        k = 0
        for a, b in zip(old, ids[:-1], strict=False):
            if a != b:
                break
            k += 1
        if cache is None or (k < len(old) and not can_trim_prompt_cache(cache)):
            held["cache"], k = make_prompt_cache(model), 0
        elif k < len(old):
            trim_prompt_cache(cache, len(old) - k)
        return held["cache"], k

    def complete(prompt: str, q: Query) -> tuple[str, bool]:
        ids = list(tokenizer.encode(prompt))
        max_tokens = len(q.target) + 8  # tabmemcheck: 1 + the target's characters
        if context and len(ids) + max_tokens > context:
            raise MemcheckError(
                f"the {q.test} prompt is {len(ids)} tokens and may take {max_tokens} more, over "
                f"the model's context of {context}: use --prefix-rows (row test) or fewer "
                "columns")
        cache, k = cache_for(ids)
        out, dist, limit = "", _PrefixDistance(q.target), near_bound(q.target)
        generated: list[int] = []
        done, cut_short = False, False
        for token, _ in generate_step(mx.array(ids[k:]), model, prompt_cache=cache,
                                      max_tokens=max_tokens):
            token = int(token)
            if token in eos:
                break
            generated.append(token)
            text = tokenizer.decode(generated)
            if q.test == "row":  # a blank line before the row is not an answer
                text = text.lstrip("\n")
            piece, out = text[len(out):], text
            if out.count("\n") >= q.stop_lines or (q.stop_text and q.stop_text in out):
                done = True
            elif dist.add(piece) > limit and len(out) >= min_chars:
                done = cut_short = True
            if done:
                break
        # The generator runs a token ahead (the end-of-sequence token too): keep the cache and
        # the tokens it is known to hold in step.
        seq = ids + generated
        excess = cache[0].offset - len(seq)
        if excess > 0 and can_trim_prompt_cache(cache):
            trim_prompt_cache(cache, excess)
        elif excess > 0:
            held["cache"] = None
        held["ids"] = seq[: cache[0].offset]
        return out, cut_short

    return complete


def model_context(model: Any) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


# --------------------------------------------------------------------------- the tests


@dataclass
class Trial:
    test: str
    copy: str  # "table" or "shuffled"
    trial: int
    line: int
    prompt: str
    target: str
    completion: str
    answer: str
    exact: bool
    near: bool
    distance: int
    verbatim_chars: int
    cut_short: bool


@dataclass
class TestResult:
    test: str
    trials: int = 0
    exact: int = 0
    near: int = 0
    chance_trials: int = 0
    chance_exact: int = 0
    chance_near: int = 0
    p: float = 1.0
    verbatim_chars: int = 0  # the longest verbatim continuation (header)
    chance_verbatim_chars: int = 0
    skipped: str = ""  # why the test did not run

    @property
    def flagged(self) -> bool:
        return not self.skipped and self.exact > 0 and self.p < ALPHA


@dataclass
class Result:
    table: TableText
    settings: Settings
    tests: dict[str, TestResult]
    trials: list[Trial] = field(default_factory=list)
    feature_column: str = ""
    seconds: float = 0.0

    @property
    def flagged(self) -> list[str]:
        return [t for t, r in self.tests.items() if r.flagged]

    def metrics(self) -> dict[str, float]:
        """memcheck_<test>_{exact,near,trials,chance_exact,chance_near,chance_trials,p,flagged}
        (and the header's verbatim characters), memcheck_flagged."""
        out: dict[str, float] = {}
        for name, r in self.tests.items():
            if r.skipped:
                continue
            for what in ("exact", "near", "trials", "chance_exact", "chance_near",
                         "chance_trials", "p"):
                out[contract.memcheck_metric(name, what)] = float(getattr(r, what))
            out[contract.memcheck_metric(name, "flagged")] = float(r.flagged)
        header = self.tests.get("header")
        if header and not header.skipped:
            out[contract.memcheck_metric("header", "verbatim_chars")] = header.verbatim_chars
            out[contract.memcheck_metric("header", "chance_verbatim_chars")] = (
                header.chance_verbatim_chars)
        out[contract.MEMCHECK_FLAGGED] = float(bool(self.flagged))
        return out

    def lines(self) -> list[str]:
        """A line per test, for the terminal."""
        out = []
        for name, r in self.tests.items():
            if r.skipped:
                out.append(f"  {name:<12} skipped: {r.skipped}")
                continue
            extra = (f"; longest verbatim continuation {r.verbatim_chars} characters "
                     f"(shuffled {r.chance_verbatim_chars})" if name == "header" else "")
            out.append(f"  {name:<12} exact {r.exact}/{r.trials}, near {r.near}/{r.trials}; "
                       f"shuffled copy: exact {r.chance_exact}/{r.chance_trials}; one-sided "
                       f"Fisher p = {r.p:.3g}{extra} -> "
                       + ("MEMORIZED" if r.flagged else "not flagged"))
        return out


def fisher_greater(a: int, n: int, b: int, m: int) -> float:
    """P(at least `a` exact of `n` | the same rate as `b` of `m`): one-sided Fisher exact."""
    from scipy.stats import fisher_exact

    if n == 0 or m == 0:
        return 1.0
    return float(fisher_exact([[a, n - a], [b, m - b]], alternative="greater").pvalue)


def check(complete: Complete, table: TableText, settings: Settings = Settings(),
          progress: bool = True) -> Result:
    """Every test on the table and on its shuffled copy (the chance level)."""
    t0 = time.perf_counter()
    chosen = plan(table, settings)
    copies = {"table": table, "shuffled": shuffled(table, settings.seed)}
    todo = [(copy, q) for copy, t in copies.items() for q in queries(t, chosen, settings)]
    n_first = first_token_digits(table)
    trials: list[Trial] = []
    bar = _progress(len(todo), progress)
    try:
        for copy, q in todo:
            bar.set_postfix_str(f"{q.test} ({copy})", refresh=False)
            completion, cut_short = complete(q.prompt, q)
            answer = answer_of(q, completion, table.delimiter)
            distance = levenshtein(answer, q.target)
            exact = is_exact(q, answer)
            trials.append(Trial(q.test, copy, q.trial, q.line, q.prompt, q.target, completion,
                                answer, exact, exact or distance <= near_bound(q.target),
                                distance, verbatim_chars(q.target, completion), cut_short))
            bar.update(1)
    finally:
        bar.close()
    tests = {name: _summarize(name, trials) for name in ("header", "row", "feature")}
    tests["first_token"] = _first_token(trials, n_first)
    cells_col = distinctive_column(table)
    return Result(table, settings, tests, trials, table.columns[cells_col],
                  time.perf_counter() - t0)


def _summarize(name: str, trials: Sequence[Trial]) -> TestResult:
    real = [t for t in trials if t.test == name and t.copy == "table"]
    chance = [t for t in trials if t.test == name and t.copy == "shuffled"]
    r = TestResult(name, trials=len(real), exact=sum(t.exact for t in real),
                   near=sum(t.near for t in real), chance_trials=len(chance),
                   chance_exact=sum(t.exact for t in chance),
                   chance_near=sum(t.near for t in chance))
    if not real:
        r.skipped = "no trials (the table is too short)"
        return r
    r.p = fisher_greater(r.exact, r.trials, r.chance_exact, r.chance_trials)
    r.verbatim_chars = max(t.verbatim_chars for t in real)
    r.chance_verbatim_chars = max((t.verbatim_chars for t in chance), default=0)
    return r


def _first_token(trials: Sequence[Trial], n: int | None) -> TestResult:
    r = TestResult("first_token")
    if n is None:
        r.skipped = ("the first column is sorted or has too few distinct leading characters: "
                     "its next value is predictable without memory")
        return r
    rows = [t for t in trials if t.test == "row"]
    hits = {copy: [t.answer[:n] == t.target[:n] for t in rows if t.copy == copy]
            for copy in ("table", "shuffled")}
    r.trials, r.exact = len(hits["table"]), sum(hits["table"])
    r.chance_trials, r.chance_exact = len(hits["shuffled"]), sum(hits["shuffled"])
    r.near, r.chance_near = r.exact, r.chance_exact  # a token is matched or not
    r.p = fisher_greater(r.exact, r.trials, r.chance_exact, r.chance_trials)
    return r


def _progress(total: int, enabled: bool) -> Any:
    import importlib.util

    # As helpers.llm.scoring: without ipywidgets tqdm.auto warns in every notebook.
    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(total=total, desc="memcheck", unit="prompt", disable=not enabled)


# --------------------------------------------------------------------------- MLflow


def run_key(params: Params, table: TableText, settings: Settings) -> str:
    """Which check a run is: the model, the table text, the settings (batch reuse)."""
    blob = json.dumps([params.model_id, data.describe_source(params), table.name,
                       hashlib.sha256(table.text.encode()).hexdigest(), settings.hash()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_finished(params: Params, key: str) -> Any | None:
    """The latest FINISHED memcheck run with this key in the params' experiment."""
    import mlflow

    from helpers import tracking

    exp_id = tracking.setup(params.experiment)
    runs = mlflow.MlflowClient().search_runs(
        [exp_id], filter_string=f"tags.`{contract.TAG_MEMCHECK_KEY}` = "
        f"{tracking.filter_value(key)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1)
    return runs[0] if runs else None


def log(result: Result) -> None:
    """Into the active MLflow run: the counts, the flag, every prompt and completion."""
    import mlflow

    mlflow.log_metrics(result.metrics())
    mlflow.log_params({"memcheck.text": result.table.name, "memcheck.origin": result.table.origin,
                       "memcheck.feature_column": result.feature_column,
                       **{f"memcheck.{k}": v for k, v in dataclasses.asdict(
                           result.settings).items()}})
    mlflow.set_tag(contract.TAG_MEMCHECK_FLAGGED, ",".join(result.flagged) or "none")
    mlflow.log_dict({"table": result.table.origin, "settings": dataclasses.asdict(result.settings),
                     "tests": {k: {**dataclasses.asdict(v), "flagged": v.flagged}
                               for k, v in result.tests.items()},
                     "trials": [dataclasses.asdict(t) for t in result.trials]},
                    contract.ARTIFACT_MEMCHECK)


def run(params: Params, which: str = "auto", settings: Settings | None = None,
        reuse: bool = False, progress: bool = True, model: Any = None
        ) -> list[tuple[Result | None, str]]:
    """Check `params.model_id` against the table of `params.dataset.source`: one MLflow run of
    kind memcheck per text of the table. Returns (result, run id) per text; with `reuse`, a text
    already checked with the same model and settings is skipped (result None, its run id).
    `model`: an already loaded (model, tokenizer)."""
    from helpers import tracking

    settings = settings or Settings(seed=params.seed)
    texts = table_texts(params, which)
    out: list[tuple[Result | None, str]] = []
    todo = []
    for table in texts:
        key = run_key(params, table, settings)
        done = find_finished(params, key) if reuse else None
        if done is not None:
            out.append((None, done.info.run_id))
        else:
            todo.append((table, key))
    if not todo:
        return out
    if model is None:
        from helpers.llm import models

        model = models.load(params.model_id, params.dequantize)
    mlx_model, tokenizer = model
    complete = mlx_completer(mlx_model, tokenizer, model_context(mlx_model))
    for table, key in todo:
        tags = {contract.TAG_MEMCHECK_KEY: key, contract.TAG_MEMCHECK_TEXT: table.name,
                contract.TAG_MODEL_NAME: params.name}
        with tracking.run(params, kind=contract.KIND_MEMCHECK, tags=tags,
                          run_name=f"memcheck-{params.name}-{table.name}") as active:
            tracking.log_params(params)
            result = check(complete, table, settings, progress)
            log(result)
        out.append((result, active.info.run_id))
    return out
