"""helpers.llm.scoring on the tiny random llama: prefix cache, batching and the answer parser."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import data
from helpers.config import ParamsError, load_params
from helpers.llm import scoring

N = 12  # test prompts per check: enough for two batches of unequal lengths


@pytest.fixture(scope="module")
def params(tiny_model_dir):
    # Three features keep the prompts short (~70 tokens): the tests stay fast.
    return load_params(None, {"model_id": str(tiny_model_dir), "eval_batch_size": 5,
                              "dataset.features": ["mean radius", "mean texture", "mean area"]})


@pytest.fixture(scope="module")
def prepared(params):
    return data.prepare(params)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import mlx_lm

    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tiny, prepared):
    _, tokenizer = tiny
    texts, ids = scoring.encode_prompts(tokenizer, prepared.messages("test", False)[:N])
    return texts, ids


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, prepared, tmp_path_factory):
    """The tiny model with a LoRA adapter trained to answer Yes/No first (see tiny_adapter.py)."""
    import mlx_lm
    from tiny_adapter import train_tiny_adapter

    adapter = train_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"),
                                 prepared.messages("train")[:8], steps=30)
    return mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))


def naive_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Reference: one unbatched, uncached forward pass over prompt + answer."""
    import mlx.core as mx

    logits = model(mx.array([prompt + answer]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer))


def test_answer_tokens_follow_the_generation_prompt(tiny, prompts):
    _, tokenizer = tiny
    texts, ids = prompts
    yes = scoring.answer_tokens(tokenizer, texts[0], "Yes")
    assert tokenizer.encode(texts[0] + "Yes", add_special_tokens=False) == ids[0] + yes
    assert yes != scoring.answer_tokens(tokenizer, texts[0], "No")


def test_common_prefix_leaves_each_prompt_a_token():
    assert scoring.common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert scoring.common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert scoring.common_prefix_len([[7], [8]]) == 0


def test_cached_equals_uncached_and_naive(tiny, prompts):
    model, tokenizer = tiny
    texts, ids = prompts
    # A two-token "yes" exercises the multi-token path (one row per answer context).
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    answers.append(answers[0] + answers[1])
    cached, prefix = scoring.answer_logprobs(model, ids, answers, 5, True, False)
    plain, none = scoring.answer_logprobs(model, ids, answers, 5, False, False)
    assert prefix > 20 and none == 0  # the chat preamble and task description are shared
    np.testing.assert_allclose(cached, plain, atol=1e-4)
    for i in (0, N - 1):
        ref = [naive_logprob(model, ids[i], a) for a in answers]
        np.testing.assert_allclose(cached[i], ref, atol=1e-4)


def test_batched_equals_one_by_one(tiny, prompts):
    model, tokenizer = tiny
    texts, ids = prompts
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    batched, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False)
    single, _ = scoring.answer_logprobs(model, ids, answers, 1, True, False)
    np.testing.assert_allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_fast_path_equals_the_models_own_forward(tiny, prompts, use_cache):
    """The compiled llama path (multiply-add softmax/SwiGLU, the prefix's keys and values fed in)
    gives the log-probs of the model's own mlx-lm forward through a KV cache."""
    model, tokenizer = tiny
    texts, ids = prompts
    assert scoring.fast_path_applies(model)  # a llama on the CPU: the fast path runs
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    answers.append(answers[0] + answers[1])  # a multi-token answer: two positions per row
    fast, p1 = scoring.answer_logprobs(model, ids, answers, 5, use_cache, False, fast=True)
    own, p2 = scoring.answer_logprobs(model, ids, answers, 5, use_cache, False, fast=False)
    assert p1 == p2 and (p1 > 20) == use_cache
    np.testing.assert_allclose(fast, own, atol=1e-4)


@pytest.mark.parametrize("lanes", [2, 3])
def test_parallel_streams_equal_one_stream(tiny, prompts, lanes):
    """Batches spread over CPU streams (12 prompts in batches of 5: 3 batches, a short round)
    give the one-stream result, and the BLAS thread count is restored afterwards."""
    from helpers.llm import blas

    model, tokenizer = tiny
    texts, ids = prompts
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    before = blas.get_threads()
    one, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False, lanes=1)
    many, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False, lanes=lanes)
    np.testing.assert_allclose(many, one, atol=1e-5)
    assert blas.get_threads() == before


@pytest.fixture(scope="module")
def top_tuned(tiny_model_dir, prepared, tmp_path_factory):
    """The tiny model (4 blocks) with LoRA on its top 2 blocks, trained a few steps."""
    import mlx_lm
    from tiny_adapter import train_tiny_adapter

    adapter = train_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("top-adapter"),
                                 prepared.messages("train")[:8], steps=10, num_layers=2)
    return mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))[0]


def test_frozen_states_give_the_adapted_models_forward(tiny, top_tuned, prompts):
    """A fine-tuned pass that starts at block 2 from the zero-shot pass's states (LoRA only on
    blocks 2-3) gives the whole adapted model's log-probs, batch by batch."""
    model, tokenizer = tiny
    texts, ids = prompts
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    frozen = scoring.FrozenStates(start=2)
    recorded, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False, frozen=frozen)
    base, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False)
    np.testing.assert_allclose(recorded, base, atol=1e-6)  # recording changes nothing
    assert len(frozen.states) == 3 and frozen.nbytes > 0  # 12 prompts, batches of 5
    assert frozen.replay_on(top_tuned)
    taken_over, _ = scoring.answer_logprobs(top_tuned, ids, answers, 5, True, False,
                                            frozen=frozen)
    full, _ = scoring.answer_logprobs(top_tuned, ids, answers, 5, True, False)
    assert frozen.hits == 3
    np.testing.assert_allclose(taken_over, full, rtol=1e-6, atol=1e-6)
    assert np.abs(full - base).max() > 1e-3  # the adapter moved the answers: a real check
    # Other batches (other prompts or sizes) were not recorded: they run the whole model.
    other, _ = scoring.answer_logprobs(top_tuned, ids[:7], answers, 4, True, False,
                                       frozen=frozen)
    np.testing.assert_allclose(other, full[:7], atol=1e-5)
    assert frozen.hits == 3


def test_frozen_states_are_dropped_when_lora_reaches_below_them(tiny, tuned, prompts):
    """An adapter on every block: the recorded block-2 states are not the adapted model's."""
    model, tokenizer = tiny
    texts, ids = prompts
    answers = [scoring.answer_tokens(tokenizer, texts[0], a) for a in ("Yes", "No")]
    frozen = scoring.FrozenStates(start=2)
    scoring.answer_logprobs(model, ids, answers, 5, True, False, frozen=frozen)
    adapted_model = tuned[0]
    assert not frozen.replay_on(adapted_model) and not frozen.states
    scored, _ = scoring.answer_logprobs(adapted_model, ids, answers, 5, True, False,
                                        frozen=frozen)
    full, _ = scoring.answer_logprobs(adapted_model, ids, answers, 5, True, False)
    assert frozen.hits == 0
    np.testing.assert_allclose(scored, full, atol=1e-6)


def _tiny_random(module: str, vocab_size: int):
    """A tiny randomly initialized mlx-lm model of another architecture (biased q/k/v for Qwen2,
    q/k norms for Qwen3)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_map

    m = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(3)
    model = m.Model(m.ModelArgs(
        model_type=module, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab_size,
        max_position_embeddings=4096, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)
        if module == "qwen3" else m.ModelArgs(
        model_type=module, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab_size))
    # Non-zero q/k/v biases, so that the fast path has to carry them.
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("module, fast", [("qwen2", True), ("qwen3", False)])
def test_other_architectures(prompts, module, fast):
    """Qwen2's blocks are llama-form: the fast path runs them and equals the model's forward.
    Qwen3's (q/k norms) are not: scored through its own forward and KV cache. Both, cached and
    batched, match one plain forward pass."""
    _, ids = prompts
    model = _tiny_random(module, max(max(x) for x in ids) + 1)
    assert scoring.fast_path_applies(model) == fast
    answers = [[ids[0][-1]], [ids[0][-2]]]  # any two tokens do
    got, prefix = scoring.answer_logprobs(model, ids, answers, 5, True, False)
    own, _ = scoring.answer_logprobs(model, ids, answers, 5, True, False, fast=False)
    assert prefix > 20
    np.testing.assert_allclose(got, own, atol=1e-4)
    for i in (0, N - 1):
        np.testing.assert_allclose(got[i], [naive_logprob(model, ids[i], a) for a in answers],
                                   atol=1e-4)


def test_head_only_at_scored_positions_matches_full_logits(tiny, prompts):
    import mlx.core as mx

    model, _ = tiny
    _, ids = prompts
    x = mx.array([ids[0][:40], ids[1][:40]])
    rows, cols = mx.array([0, 1, 1]), mx.array([39, 0, 20])
    fast = scoring._scored_logits(model, x, None, rows, cols)
    full = model(x)[rows, cols]
    np.testing.assert_allclose(np.array(fast), np.array(full), atol=1e-5)


def test_p_yes_is_a_probability(tiny, prepared, params):
    model, tokenizer = tiny
    s = scoring.score(model, tokenizer, prepared.messages("test", False)[:N], params,
                      progress=False)
    assert s.mode == "logprob" and len(s) == N
    assert np.all((s.p_yes >= 0) & (s.p_yes <= 1))
    np.testing.assert_allclose(s.p_yes, 1 / (1 + np.exp(s.logprob_no - s.logprob_yes)))
    # Length-normalised: -2 over two tokens ties with -1 over one.
    norm = scoring.p_yes_from(np.array([[-2.0, -1.0]]), [2, 1], length_normalize=True)
    np.testing.assert_allclose(norm, [0.5])
    assert s.invalid_rate == 0 and list(s.predict(prepared.y("test")[:N], 1.0)) == [
        int(p >= 1.0) for p in s.p_yes]


def test_logprob_class_agrees_with_restricted_generation(tiny, prepared, params):
    # mlx-lm's own greedy generation, allowed only the two answers' first tokens, against the
    # batched, prefix-cached likelihood path. The random tiny model says Yes to everything
    # (P(yes) 0.50-0.56), so No's logit gets a bias b: greedy picks Yes exactly where the
    # log-odds exceed b, i.e. where P(yes) >= sigmoid(b). With b at the median both classes
    # occur, and a log-odds error of a few hundredths would flip some answers.
    import mlx.core as mx
    from mlx_lm import stream_generate

    model, tokenizer = tiny
    msgs = prepared.messages("test", False)[:N]
    lp = scoring.score(model, tokenizer, msgs, params, progress=False)
    yes, no = (t[0] for t in lp.extra["answer_tokens"])
    ranked = np.sort(lp.p_yes)
    cut = (ranked[N // 2 - 1] + ranked[N // 2]) / 2
    bias = float(np.log(cut / (1 - cut)))

    def only_answers(tokens, logits):
        keep = np.full(logits.shape[-1], -np.inf, dtype=np.float32)
        keep[[yes, no]] = np.inf
        shift = np.zeros(logits.shape[-1], dtype=np.float32)
        shift[no] = bias
        return mx.minimum(logits, mx.array(keep)) + mx.array(shift)

    _, ids = scoring.encode_prompts(tokenizer, msgs)
    raw = ["".join(r.text for r in stream_generate(model, tokenizer, x, max_tokens=1,
                                                    logits_processors=[only_answers]))
           for x in ids]
    parsed = np.array([scoring.parse_answer(t) for t in raw])
    assert sorted(set(parsed)) == [0, 1], raw
    assert np.array_equal(lp.predict(prepared.y("test")[:N], cut), parsed)


def test_logprob_class_agrees_with_generated_answer(tuned, prepared, params):
    # Unrestricted greedy decoding through scoring's generate mode. The adapter teaches the
    # tiny model to put the answer word first, but it cannot learn to stop after it (it
    # repeats "YesYes..."): so one token is generated, the first answer token. Answers that do
    # not parse are exempt, as the issue states.
    model, tokenizer = tuned
    msgs = prepared.messages("test", False)[:N]
    one = params.replace(max_new_tokens=1)
    lp = scoring.score(model, tokenizer, msgs, one, progress=False)
    gen = scoring.score(model, tokenizer, msgs, one, mode="generate", progress=False)
    valid = gen.parsed >= 0
    assert valid.mean() >= 0.5, gen.raw
    assert np.array_equal((lp.p_yes >= 0.5)[valid], gen.parsed[valid] == 1)


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes", 1), ("no.", 0), ("**YES**, it is", 1), ("No, not malignant", 0),
    ("<think>yes? maybe no</think>\nNo", 0), ("<THINK>no</THINK> yes", 1),
    ("reasoning first... no wait</think> Yes.", 1),  # template opened <think> itself
    ("<think>still thinking, yes or no", None),  # reasoning cut off by max_new_tokens
    ("I cannot tell", None), ("", None), ("Nope", None), ("yesterday", None),
    ("Malignant.", 1),
])
def test_parse_answer(text, expected):
    assert scoring.parse_answer(text, ("yes", "malignant"), ("no", "benign")) == expected


def test_invalid_answers_count_as_errors():
    s = scoring.Scores("generate", np.full(4, np.nan), np.array([1, -1, 0, -1]),
                       ["Yes", "?", "No", "??"], np.full(4, np.nan), np.full(4, np.nan), 1.0)
    assert s.invalid_rate == 0.5
    # The invalid rows get the opposite of their label: wrong either way.
    assert list(s.predict([1, 1, 0, 0])) == [1, 0, 0, 1]


# --- multi-class ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wine_params(tiny_model_dir):
    return load_params(None, {"model_id": str(tiny_model_dir), "eval_batch_size": 5,
                              "dataset.source": "builtin:wine",
                              "dataset.features": ["alcohol", "hue"]})


@pytest.fixture(scope="module")
def wine(wine_params):
    return data.prepare(wine_params)


def test_class_probabilities_are_the_first_tokens_softmax(tiny, wine, wine_params):
    model, tokenizer = tiny
    messages = wine.messages("test", False)[:N]
    s = scoring.score(model, tokenizer, messages, wine_params, progress=False,
                      classes=wine.classes, answers=wine.class_answers)
    assert s.mode == "logprob" and s.proba.shape == (N, 3) and s.n_classes == 3
    np.testing.assert_allclose(s.proba.sum(axis=1), 1.0, rtol=1e-9)
    assert s.prefix_tokens > 0  # the shared prefix went through the model once
    # Against one uncached forward per prompt and answer, softmax over the first tokens.
    texts, ids = scoring.encode_prompts(tokenizer, messages)
    firsts = [scoring.answer_tokens(tokenizer, texts[0], a)[0] for a in wine.class_answers]
    assert s.extra["answer_tokens"] == firsts and len(set(firsts)) == 3
    naive = np.array([[naive_logprob(model, ids[i], [t]) for t in firsts] for i in range(N)])
    np.testing.assert_allclose(s.proba, scoring.proba_from(naive), atol=1e-4)
    assert list(s.predict(wine.y("test")[:N])) == list(np.argmax(s.proba, axis=1))


def test_answers_sharing_a_first_token_are_refused(tiny, wine_params, tmp_path):
    model, tokenizer = tiny
    # "Barolo" and "Barbera" both start with "B" under the tiny model's tokenizer.
    params = wine_params.replace(**{"prompt.answers": {"Nebbiolo": "Barolo"}})
    clashing = data.prepare(params)
    with pytest.raises(ParamsError) as e:
        scoring.score(model, tokenizer, clashing.messages("test", False)[:2], params,
                      progress=False, classes=clashing.classes, answers=clashing.class_answers)
    msg = str(e.value)
    assert "'Barbera'" in msg and "'Nebbiolo' ('Barolo')" in msg and "'B'" in msg
    assert "prompt.answers" in msg
    # Training refuses them too, before any step (and `tablora prepare`).
    from helpers.llm import finetune

    with pytest.raises(ParamsError, match="both start with the token 'B'"):
        finetune.train(model, tokenizer, clashing,
                       params.replace(output_dir=str(tmp_path / "adapters")))
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("Nebbiolo", 2), ("It is barbera.", 0), ("<think>Nebbiolo?</think> Grignolino", 1),
    ("Barberas", None), ("", None), ("Grignolino or Nebbiolo", 1),
])
def test_parse_class(text, expected):
    assert scoring.parse_class(text, ["Barbera", "Grignolino", "Nebbiolo"]) == expected


def test_an_invalid_generated_class_counts_as_wrong():
    nan = np.full(3, np.nan)
    s = scoring.Scores("generate", nan, np.array([2, -1, -1]), ["c", "?", "?"], nan, nan, 1.0,
                       n_classes=3)
    predicted = s.predict([2, 0, 2])
    assert list(predicted[:1]) == [2] and predicted[1] != 0 and predicted[2] != 2
    assert s.invalid_rate == pytest.approx(2 / 3)
