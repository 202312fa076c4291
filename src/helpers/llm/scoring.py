"""Scoring: P(yes) for each prompt, by answer likelihood (default) or by generating and parsing.

`logprob`: the chat-formatted prompt (with the generation prompt) is followed by each answer's
tokens, "Yes" and "No" as the tokenizer splits them right after the generation prompt; the sum
(or, with length_normalize, the mean) of their log-probabilities gives one score per answer, and
P(yes) = softmax over the two. The token prefix that every prompt shares (chat preamble, system
prompt, task description) goes through the model once, into a KV cache that each batch reuses;
prompts are sorted by length and batched, right-padded (a causal model never looks at the pad
tokens after a position, so padding changes nothing that is read).

On MLX's CPU backend two more levers apply, each giving the same log-probs to float32 rounding
(tests/test_scoring.py): llama-block models (SmolLM2, Llama, Mistral) run a compiled forward on
the multiply-add softmax and SwiGLU of helpers.llm.kernels (`_fast_logprobs`; other
architectures, and the GPU, run the model's own forward), and batches are spread over one MLX
stream per core with the BLAS on one thread each (helpers.llm.lanes): MLX's element-wise
kernels use one thread per stream, so one stream leaves a core idle outside the GEMMs.
bench/eval_speed.py measures each lever.

`generate`: greedy decoding of max_new_tokens tokens, then the first yes/no word (after removing
`<think>...</think>` reasoning). An answer without one is invalid: counted, and scored as wrong.

Multi-class tasks (`answers` given to `score`: one word per class): each answer's first token
must differ from every other's (`first_tokens` refuses a clash, naming both classes); logprob
mode then scores those first tokens in one step after the prompt (through the same shared-prefix
cache) and P(class) = softmax over them; generate mode parses the first answer word found.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from helpers.config import Params, ParamsError
from helpers.llm import kernels
from helpers.llm import lanes as cpu
from helpers.llm.kernels import PAD_ID

Messages = list[dict[str, str]]


@dataclass
class Scores:
    """What one scoring pass over a list of prompts produced, in prompt order."""

    mode: str  # "logprob" or "generate"
    p_yes: np.ndarray  # P(yes) in logprob mode; NaN in generate mode (no probabilities)
    parsed: np.ndarray  # generate mode: 1 yes, 0 no, -1 invalid; logprob mode: all -1
    raw: list[str] | None  # the generated text (generate mode)
    logprob_yes: np.ndarray  # summed (or mean) answer log-probabilities (NaN in generate mode)
    logprob_no: np.ndarray
    seconds: float
    prefix_tokens: int = 0  # length of the shared prefix computed once (0 = no prefix cache)
    extra: dict[str, Any] = field(default_factory=dict)
    # Multi-class: P(class) per row, (n, classes) in logprob mode (None: binary, or generate);
    # n_classes > 0, and `parsed` holds the class index (-1 invalid) in generate mode.
    proba: np.ndarray | None = None
    n_classes: int = 0

    def __len__(self) -> int:
        return len(self.p_yes)

    @property
    def examples_per_sec(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def invalid_rate(self) -> float:
        """Share of generated answers without a yes/no word (0 in logprob mode)."""
        if self.mode != "generate" or len(self) == 0:
            return 0.0
        return float(np.mean(self.parsed < 0))

    def predict(self, labels: Iterable[int], threshold: float = 0.5) -> np.ndarray:
        """0/1 predictions: p_yes >= threshold, or the parsed answer.

        An invalid generated answer is predicted as the opposite of its label, so that it counts
        as an error in every metric (accuracy, recall and specificity alike) instead of silently
        leaning towards one class.
        """
        y = np.asarray(list(labels), dtype=int)
        if len(y) != len(self):
            raise ValueError(f"{len(y)} labels for {len(self)} scored prompts")
        if self.n_classes:  # multi-class: the most likely class (no threshold), or the parsed one
            if self.mode == "logprob":
                return np.argmax(self.proba, axis=1).astype(int)
            return np.where(self.parsed < 0, (y + 1) % self.n_classes, self.parsed).astype(int)
        if self.mode == "logprob":
            return (self.p_yes >= threshold).astype(int)
        return np.where(self.parsed < 0, 1 - y, self.parsed).astype(int)


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """tqdm.auto's bar (a widget in Jupyter, text elsewhere), showing examples/s."""
    return tqdm_class()(total=total, desc=desc, unit="ex", disable=not enabled)


def tqdm_class() -> Any:
    """tqdm's text bar in a notebook that papermill runs (tablora sets ENV_NOTEBOOK there): a
    widget is saved as first drawn ("0/32"), text as last printed; also where ipywidgets is
    missing (tqdm.auto would warn, then print text anyway). tqdm.auto elsewhere."""
    import importlib.util
    import os

    from helpers.contract import ENV_NOTEBOOK

    if os.environ.get(ENV_NOTEBOOK) or importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


# --------------------------------------------------------------------------- tokens


def encode_prompts(tokenizer: Any,
                   messages: Sequence[Messages]) -> tuple[list[str], list[list[int]]]:
    """Chat-template text (with the generation prompt) and its token ids, per example."""
    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False)
             for m in messages]
    # The template already holds the special tokens (BOS included where the model wants one).
    ids = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    return texts, ids


def answer_tokens(tokenizer: Any, prompt_text: str, answer: str) -> list[int]:
    """The tokens of `answer` as they follow the generation prompt.

    Tokenised in context (prompt + answer, minus the prompt's tokens) because a tokenizer may
    split a word differently at the start of a text ("▁Yes" vs "Yes").
    """
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    full = tokenizer.encode(prompt_text + answer, add_special_tokens=False)
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return list(full[len(prompt):])
    # The answer merged with the prompt's last token: fall back to the answer on its own.
    alone = tokenizer.encode(answer, add_special_tokens=False)
    if not alone:
        raise ParamsError(f"answer {answer!r} encodes to no tokens: set prompt.answer_yes / "
                          "prompt.answer_no to non-empty words")
    return list(alone)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences, leaving each sequence at
    least one token of its own (the last prompt token's logits are what gets scored)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


# --------------------------------------------------------------------------- prefix cache


def build_prefix_cache(model: Any, prefix: Sequence[int]) -> list[Any] | None:
    """The model's KV cache after running `prefix` once (batch of 1), or None for no prefix."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    if not prefix:
        return None
    cache = make_prompt_cache(model)
    model(mx.array([list(prefix)]), cache=cache)
    for c in cache:
        # KVCache allocates in steps of 256: keep only the filled part, so that extending a
        # broadcast copy always allocates fresh memory instead of writing into shared buffers.
        if isinstance(c, KVCache):
            c.keys, c.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    mx.eval([c.state for c in cache])
    return cache


def expand_cache(cache: list[Any], batch: int) -> list[Any]:
    """Fresh per-batch copies of a batch-1 cache, broadcast to `batch` rows (no data copied)."""
    import copy

    import mlx.core as mx
    from mlx.utils import tree_map

    def grow(x: Any) -> Any:
        if isinstance(x, mx.array) and x.ndim >= 1 and x.shape[0] == 1:
            return mx.broadcast_to(x, (batch, *x.shape[1:]))
        return x

    out = []
    for c in cache:
        new = copy.copy(c)  # keeps meta data (offsets, window sizes); state replaced below
        new.state = tree_map(grow, c.state)
        out.append(new)
    return out


# --------------------------------------------------------------------------- likelihood


# mlx-lm model modules whose Model.__call__ is exactly head(self.model(...)) with no scaling or
# soft-capping after the head: for these the head runs only at the positions that are scored.
_PLAIN_HEAD_MODULES = {"llama", "qwen2", "qwen3", "phi3", "smollm3", "ministral3"}
def _scored_logits(model: Any, x: Any, cache: Any, rows: Any, cols: Any) -> Any:
    """Logits at (rows[i], cols[i]) of the batch `x`, as float32 (M, vocab): the model's own
    forward (any mlx-lm architecture, any device), through an mlx-lm KV cache."""
    import mlx.core as mx

    module = type(model).__module__.rsplit(".", 1)[-1]
    if module in _PLAIN_HEAD_MODULES and hasattr(model, "model"):
        # The vocabulary projection is ~20% of a small model's work per token: skip it for the
        # ~100 prompt positions per row that are never read.
        return kernels.lm_head(model)(model.model(x, cache)[rows, cols]).astype(mx.float32)
    return model(x, cache=cache)[rows, cols].astype(mx.float32)


def fast_path_applies(model: Any) -> bool:
    """Whether `_fast_logprobs` reproduces this model's forward: every block a llama-form block
    (SmolLM2, Llama, Mistral, Qwen2; kernels.is_llama_block) and MLX on the CPU, where its
    multiply-add softmax/SwiGLU and fused kernels pay off. Elsewhere the model's own forward runs.
    """
    import mlx.core as mx

    inner = getattr(model, "model", None)
    return (mx.default_device() == mx.cpu
            and type(model).__module__.rsplit(".", 1)[-1] in kernels.LLAMA_FORM_MODULES
            and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm"))
            and all(kernels.is_llama_block(layer) for layer in inner.layers))


def _fast_logprobs(model: Any, start: int = 0, keep: int | None = None) -> Any:
    """A compiled (tokens, rows, cols, targets, *prefix_kv) -> log-prob of targets[i] at
    (rows[i], cols[i]), for llama-block models on the CPU (see fast_path_applies).

    prefix_kv: keys and values per block, [1, n_kv_heads, P, head_dim] each (an mlx-lm KV cache
    of the shared prefix), or nothing. The blocks run on the multiply-add softmax and SwiGLU of
    helpers.llm.kernels; mx.compile fuses their element-wise work. Traced once per (batch shape,
    stream).
    start > 0: the first argument is the hidden state [B, T, D] at block `start`'s input instead
    of the tokens, and only blocks start.. run (prefix_kv: theirs). keep: also return the hidden
    state at block `keep`'s input (what a later call with start=keep reads; FrozenStates).
    """
    import mlx.core as mx

    layers, head = model.model.layers, kernels.lm_head(model)
    last = len(layers) - 1

    def forward(x, rows, cols, targets, *prefix_kv):
        h = model.model.embed_tokens(x) if start == 0 else x
        bias = kernels.causal_bias(h.shape[1], prefix_kv[0].shape[2] if prefix_kv else 0)
        kv = [(prefix_kv[2 * i], prefix_kv[2 * i + 1]) if prefix_kv else None
              for i in range(len(layers) - start)]
        kept = None
        for i, layer_kv in zip(range(start, last), kv, strict=False):
            kept = h if i == keep else kept
            h = kernels.llama_block(layers[i], h, bias, layer_kv)
        kept = h if keep == last else kept
        # The last block only at the scored positions (keys and values everywhere).
        h = kernels.llama_block_at(layers[last], h, rows, cols, kv[-1])
        out = _target_logprobs(head(model.model.norm(h)), targets)
        return out if keep is None else (out, kept)

    return mx.compile(forward)


@dataclass
class FrozenStates:
    """Hidden states at block `start`'s input, per scored batch, shared by two scoring passes
    over the same prompts: the base model's (zero-shot) records them, the same base with a LoRA
    adapter on blocks start.. only (the fine-tuned model) reads them and runs only those blocks.

    The blocks below `start` are the same weights in both models, so their output is the same:
    the fine-tuned pass costs (layers - start) / layers of a full one (8 of 30 blocks for the
    demo). A batch is found by its tokens (shared prefix included); one not recorded (other
    prompts, other batching, over `max_bytes`) runs the whole model. llama-block models on the
    CPU only (fast_path_applies), logprob scoring only.
    """

    start: int  # first block with LoRA layers
    max_bytes: int = 1 << 30  # memory for recorded states; batches past it are not recorded
    states: dict[bytes, Any] = field(default_factory=dict)
    nbytes: int = 0
    replaying: bool = False  # False: the zero-shot pass records; True: the fine-tuned one reads
    hits: int = 0  # batches the fine-tuned pass started at block `start`

    @staticmethod
    def key(prefix: Sequence[int], tokens: np.ndarray) -> bytes:
        import hashlib

        digest = hashlib.sha1(np.asarray(prefix, np.int64).tobytes())
        digest.update(np.asarray(tokens.shape, np.int64).tobytes())
        digest.update(np.ascontiguousarray(tokens, np.int32).tobytes())
        return digest.digest()

    def record(self, key: bytes, state: Any) -> None:
        if self.nbytes + state.nbytes <= self.max_bytes:
            self.states[key] = state
            self.nbytes += state.nbytes

    def replay_on(self, model: Any) -> bool:
        """Switch to reading, after the adapter was added to `model`: only when no block below
        `start` has LoRA layers (else the recorded states are not the adapted model's: dropped).
        """
        from mlx.utils import tree_flatten

        below = [i for i, layer in enumerate(model.model.layers[: self.start])
                 if any("lora" in name for name, _ in tree_flatten(layer.parameters()))]
        if below:
            self.states.clear()
            self.nbytes = 0
        self.replaying = True
        return not below


def _target_logprobs(logits: Any, targets: Any) -> Any:
    """log softmax(logits)[i, targets[i]], in float32."""
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


@dataclass(frozen=True)
class _Answer:
    tokens: tuple[int, ...]

    @property
    def context(self) -> tuple[int, ...]:
        # Tokens fed after the prompt so that every answer token gets a prediction.
        return self.tokens[:-1]


@dataclass
class _Batch:
    """One forward pass: a row per example and distinct answer context (answers that differ
    only in their last token, single-token "Yes"/"No" as usual, share a row), right-padded."""

    tokens: np.ndarray  # int32 [rows, width]
    rows: np.ndarray  # (row, position) predicting each scored answer token ...
    cols: np.ndarray
    targets: np.ndarray  # ... that token
    owner: list[tuple[int, int]]  # (example in the batch, answer) it counts for
    n_examples: int

    @classmethod
    def build(cls, suffixes: list[list[int]], answers: list[_Answer]) -> _Batch:
        contexts = list(dict.fromkeys(a.context for a in answers))
        seqs = [s + list(c) for s in suffixes for c in contexts]
        # Few widths: few traces for mx.compile.
        width = kernels.PAD_MULTIPLE * -(-max(len(r) for r in seqs) // kernels.PAD_MULTIPLE)
        tokens = np.full((len(seqs), width), PAD_ID, np.int32)
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)] = seq
        rows, cols, targets, owner = [], [], [], []
        for i, s in enumerate(suffixes):
            for j, a in enumerate(answers):
                r = i * len(contexts) + contexts.index(a.context)
                for k, tok in enumerate(a.tokens):
                    rows.append(r)
                    cols.append(len(s) - 1 + k)
                    targets.append(tok)
                    owner.append((i, j))
        return cls(tokens, np.array(rows, np.int32), np.array(cols, np.int32),
                   np.array(targets, np.int32), owner, len(suffixes))

    def summed(self, picked: np.ndarray, n_answers: int) -> np.ndarray:
        """Per-token log-probs -> summed per (example, answer)."""
        out = np.zeros((self.n_examples, n_answers), dtype=np.float64)
        for (i, j), v in zip(self.owner, picked, strict=True):
            out[i, j] += float(v)
        return out


def _plain_logprobs(model: Any, cache: list[Any] | None) -> Any:
    """(tokens, rows, cols, targets) -> log-probs of the targets, by the model's own forward."""
    def forward(tokens, rows, cols, targets):
        batch_cache = expand_cache(cache, tokens.shape[0]) if cache is not None else None
        return _target_logprobs(_scored_logits(model, tokens, batch_cache, rows, cols), targets)

    return forward


def answer_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]],
                    answers: Sequence[Sequence[int]], batch_size: int = 8,
                    use_prefix_cache: bool = True, progress: bool = True,
                    desc: str = "scoring", fast: bool = True,
                    lanes: int | None = None,
                    frozen: FrozenStates | None = None) -> tuple[np.ndarray, int]:
    """Log-probability of each answer's token sequence after each prompt: (n, len(answers)).

    Returns the array and the shared-prefix length that was computed once (0 without cache).
    fast: llama-block models on the CPU run `_fast_logprobs` (False: the model's own forward).
    lanes: batches scored at once, each on its own MLX CPU stream with the BLAS on
    cores / lanes threads (default: one per core). MLX's CPU element-wise kernels run on one
    thread per stream; side by side they keep every core busy outside the GEMMs too.
    frozen: hidden states shared with another pass over the same prompts (FrozenStates): this
    pass records them, or reads them and runs only the blocks from `frozen.start` on (fast path
    only; the results are the same to float32 rounding).
    """
    import mlx.core as mx

    n = len(prompt_ids)
    out = np.zeros((n, len(answers)), dtype=np.float64)
    if n == 0:
        return out, 0
    ans = [_Answer(tuple(a)) for a in answers]
    prefix_len = common_prefix_len(prompt_ids) if use_prefix_cache else 0
    prefix = list(prompt_ids[0][:prefix_len])
    fast = fast and fast_path_applies(model)
    frozen = frozen if fast and frozen is not None and 0 < frozen.start < len(
        model.model.layers) else None
    if fast:
        recording = frozen is not None and not frozen.replaying
        compiled = _fast_logprobs(model, keep=frozen.start if recording else None)
        top = _fast_logprobs(model, start=frozen.start) if frozen and frozen.replaying else None
        kv = []
        if prefix:  # the prefix's keys and values, by the same fast blocks
            h = model.model.embed_tokens(mx.array([prefix]))
            n_blocks = len(model.model.layers)
            _, pairs = kernels.shared_prefix(model, h, 0, n_blocks, last=n_blocks - 1)
            kv = [a for pair in pairs for a in pair]
            mx.eval(kv)
        top_kv = kv[2 * frozen.start:] if frozen else []

        def forward(key, tokens, *rest):
            if top is not None and key in frozen.states:
                frozen.hits += 1
                return top(frozen.states[key], *rest, *top_kv)
            out = compiled(tokens, *rest, *kv)
            if recording:
                out, state = out
                frozen.record(key, state)
            return out
    else:
        plain = _plain_logprobs(model, build_prefix_cache(model, prefix))

        def forward(key, *batch):
            return plain(*batch)

    lanes = max(1, lanes or cpu.default_lanes())
    # Longest first: a memory problem shows at once, and similar lengths share a batch.
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]), reverse=True)
    groups = [order[s: s + batch_size] for s in range(0, n, batch_size)]
    # A round of `lanes` batches at a time, batch i of the round on stream i. Each round is
    # queued (async_eval) before the previous one is read back: the streams never wait for
    # Python to build the next batches.
    with cpu.cpu_lanes(lanes) as streams, progress_bar(n, desc, progress) as bar:
        def read(pending):
            for idx, batch, picked in pending:
                out[idx] = batch.summed(np.array(picked), len(ans))
                bar.update(len(idx))

        previous: list = []
        for r in range(0, len(groups), lanes):
            pending = []
            for stream, idx in zip(streams, groups[r: r + lanes], strict=False):
                batch = _Batch.build([list(prompt_ids[i][prefix_len:]) for i in idx], ans)
                key = FrozenStates.key(prefix, batch.tokens) if frozen else b""
                with mx.stream(stream):
                    picked = forward(key, mx.array(batch.tokens), mx.array(batch.rows),
                                     mx.array(batch.cols), mx.array(batch.targets))
                pending.append((idx, batch, picked))
            mx.async_eval([picked for _, _, picked in pending])
            read(previous)
            previous = pending
        read(previous)
    return out, prefix_len


def p_yes_from(logprobs: np.ndarray, lengths: Sequence[int], length_normalize: bool) -> np.ndarray:
    """P(yes) = softmax over the two answers' scores (column 0 = yes, 1 = no)."""
    from scipy.special import expit

    scores = logprobs / np.asarray(lengths, dtype=float) if length_normalize else logprobs
    # A two-way softmax is the logistic function of the score difference (stable for any gap).
    return expit(scores[:, 0] - scores[:, 1])


def first_tokens(tokenizer: Any, prompt_text: str, classes: Sequence[Any],
                 answers: Sequence[str]) -> list[int]:
    """The first token of each class's answer after the generation prompt; a ParamsError
    naming both classes and the token when two answers start with the same one."""
    firsts = [answer_tokens(tokenizer, prompt_text, a)[0] for a in answers]
    for i, tok in enumerate(firsts):
        for j in range(i):
            if firsts[j] == tok:
                raise ParamsError(
                    f"prompt.answers: classes {classes[j]!r} ({answers[j]!r}) and {classes[i]!r} "
                    f"({answers[i]!r}) both start with the token "
                    f"{tokenizer.decode([tok])!r} (id {tok}) under this model's tokenizer: "
                    "give them answer words that start differently (prompt.answers).")
    return firsts


def check_answers(tokenizer: Any, prepared: Any) -> list[int]:
    """A multi-class task's answer words start with distinct tokens under `tokenizer` (scoring
    reads only the first): their first tokens, or the ParamsError of first_tokens. Called
    before training and by `tablora prepare`."""
    texts, _ = encode_prompts(tokenizer, prepared.messages("train", False)[:1])
    return first_tokens(tokenizer, texts[0], prepared.classes, prepared.class_answers)


def proba_from(logprobs: np.ndarray) -> np.ndarray:
    """P(class) = softmax over the classes' answer scores, per row."""
    from scipy.special import softmax

    return softmax(logprobs, axis=1)


def parse_class(text: str, answers: Sequence[str]) -> int | None:
    """The index of the first answer word in `text` (case-insensitive, whole words, longest
    first where one contains another), None when there is none."""
    words = {a.strip().lower(): k for k, a in enumerate(answers) if a.strip()}
    if not words:
        return None
    pattern = r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)
                                      ) + r")(?!\w)"
    m = re.search(pattern, strip_reasoning(text), re.IGNORECASE)
    return None if m is None else words[m.group(1).lower()]


# --------------------------------------------------------------------------- generation


_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)


def strip_reasoning(text: str) -> str:
    """Text without reasoning: `<think>...</think>` blocks removed, an unclosed one to the end.

    Templates that open `<think>` in the generation prompt leave only the closing tag in the
    output: everything before the last `</think>` is then reasoning too.
    """
    if re.search(r"</think>", text, re.IGNORECASE):
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    return _THINK_BLOCK.sub(" ", text)


def parse_answer(text: str, yes_words: Iterable[str] = ("yes",),
                 no_words: Iterable[str] = ("no",)) -> int | None:
    """1 for yes, 0 for no, None when no answer word is found (case-insensitive, first wins)."""
    yes = {w.strip().lower() for w in yes_words if w.strip()}
    no = {w.strip().lower() for w in no_words if w.strip()} - yes
    words = sorted(yes | no, key=len, reverse=True)  # longest first: "no way" before "no"
    if not words:
        return None
    pattern = r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)"
    m = re.search(pattern, strip_reasoning(text), re.IGNORECASE)
    if m is None:
        return None
    return 1 if m.group(1).lower() in yes else 0


def generate_answers(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                     max_new_tokens: int = 8, progress: bool = True,
                     desc: str = "generating") -> list[str]:
    """Greedy continuations of each prompt, one prompt at a time (the reference's method)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    greedy = make_sampler(temp=0.0)
    texts = []
    with progress_bar(len(prompt_ids), desc, progress) as bar:
        for ids in prompt_ids:
            pieces = [r.text for r in stream_generate(model, tokenizer, list(ids),
                                                      max_tokens=max_new_tokens, sampler=greedy)]
            texts.append("".join(pieces))
            bar.update(1)
    return texts


# --------------------------------------------------------------------------- entry point


def answer_words(params: Params) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The words that count as yes / no: the configured answers plus plain yes/no."""
    return (tuple(dict.fromkeys([params.prompt.answer_yes, "yes"])),
            tuple(dict.fromkeys([params.prompt.answer_no, "no"])))


def score(model: Any, tokenizer: Any, messages: Sequence[Messages], params: Params,
          mode: str | None = None, use_prefix_cache: bool = True, progress: bool = True,
          desc: str = "", fast: bool = True, lanes: int | None = None,
          frozen: FrozenStates | None = None, classes: Sequence[Any] = (),
          answers: Sequence[str] = ()) -> Scores:
    """Score chat prompts (without the answer) by `mode` (default params.scoring).

    use_prefix_cache, fast, lanes, frozen: logprob mode's speed levers (see answer_logprobs);
    the results are the same to float32 rounding with any of them. classes, answers: a
    multi-class task's classes and their answer words (empty: binary, Yes/No).
    """
    mode = mode or params.scoring
    if not messages:
        raise ValueError("nothing to score: the split is empty")
    texts, ids = encode_prompts(tokenizer, messages)
    n = len(ids)
    t0 = time.perf_counter()
    if answers:
        return _score_classes(model, tokenizer, texts, ids, params, mode, list(classes),
                              list(answers), t0, use_prefix_cache, progress, desc, fast, lanes,
                              frozen)
    if mode == "logprob":
        answers = [answer_tokens(tokenizer, texts[0], a)
                   for a in (params.prompt.answer_yes, params.prompt.answer_no)]
        if answers[0] == answers[1]:
            raise ParamsError(f"prompt.answer_yes {params.prompt.answer_yes!r} and answer_no "
                              f"{params.prompt.answer_no!r} give the same tokens: make them "
                              "differ")
        lp, prefix_len = answer_logprobs(model, ids, answers, params.eval_batch_size,
                                         use_prefix_cache, progress, desc or "scoring", fast,
                                         lanes, frozen)
        p = p_yes_from(lp, [len(a) for a in answers], params.length_normalize)
        return Scores("logprob", p, np.full(n, -1), None, lp[:, 0], lp[:, 1],
                      time.perf_counter() - t0, prefix_len,
                      {"answer_tokens": answers})
    if mode == "generate":
        raw = generate_answers(model, tokenizer, ids, params.max_new_tokens, progress,
                               desc or "generating")
        yes, no = answer_words(params)
        parsed = [parse_answer(t, yes, no) for t in raw]
        codes = np.array([-1 if v is None else v for v in parsed], dtype=int)
        nan = np.full(n, np.nan)
        return Scores("generate", nan, codes, raw, nan, nan.copy(), time.perf_counter() - t0)
    raise ValueError(f"scoring={mode!r}: expected 'logprob' or 'generate'")


def _score_classes(model: Any, tokenizer: Any, texts: list[str], ids: list[list[int]],
                   params: Params, mode: str, classes: list, answers: list[str], t0: float,
                   use_prefix_cache: bool, progress: bool, desc: str, fast: bool,
                   lanes: int | None, frozen: FrozenStates | None = None) -> Scores:
    """score() for a multi-class task: P(class) from the answers' distinct first tokens (one
    step after the prompt), or the class whose word a generated answer holds first."""
    n, k = len(ids), len(answers)
    firsts = first_tokens(tokenizer, texts[0], classes, answers)
    nan = np.full(n, np.nan)
    if mode == "logprob":
        lp, prefix_len = answer_logprobs(model, ids, [[t] for t in firsts],
                                         params.eval_batch_size, use_prefix_cache, progress,
                                         desc or "scoring", fast, lanes, frozen)
        return Scores("logprob", nan, np.full(n, -1), None, nan, nan.copy(),
                      time.perf_counter() - t0, prefix_len, {"answer_tokens": firsts},
                      proba=proba_from(lp), n_classes=k)
    if mode == "generate":
        raw = generate_answers(model, tokenizer, ids, params.max_new_tokens, progress,
                               desc or "generating")
        parsed = [parse_class(t, answers) for t in raw]
        codes = np.array([-1 if v is None else v for v in parsed], dtype=int)
        return Scores("generate", nan, codes, raw, nan, nan.copy(), time.perf_counter() - t0,
                      n_classes=k)
    raise ValueError(f"scoring={mode!r}: expected 'logprob' or 'generate'")
