"""helpers.llm.kernels: the multiply-add exp, sigmoid, SwiGLU and softmax, and the llama block
built on them, against MLX's and mlx-lm's own (real MLX, tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest

import helpers  # noqa: F401 - loads the BLAS before mlx
from helpers.llm import kernels

mx = pytest.importorskip("mlx.core")


def test_fast_exp_sigmoid_and_kernels():
    """The multiply-add exp (x <= 0) and sigmoid are float32-accurate, exp is exactly 0 far
    below and for masked scores, NaN stays NaN; SwiGLU and softmax with their hand-written
    gradients equal MLX's."""
    x = mx.concatenate([mx.linspace(-40, 0, 20001), mx.array([-1e9, -mx.inf, mx.nan])])
    got, want = kernels._exp_nonpositive(x), mx.exp(x)
    rel = np.abs(np.asarray(got[:20001]) - np.asarray(want[:20001])) / np.asarray(want[:20001])
    near = np.asarray(x[:20001]) >= -32  # below: 0 instead of < 1.3e-14
    assert rel[near].max() < 2e-5 and np.asarray(got[:20001])[~near].max() == 0.0
    assert np.asarray(got[20001:20003]).tolist() == [0.0, 0.0] and np.isnan(got[-1].item())

    z = mx.concatenate([mx.linspace(-60, 60, 20001), mx.array([mx.inf, -mx.inf, mx.nan])])
    sig = np.asarray(kernels._sigmoid(z))
    exact = 1 / (1 + np.exp(-np.asarray(z[:20001], dtype=np.float64)))
    assert np.abs(sig[:20001] - exact).max() < 5e-7
    assert 0.0 <= sig[:20001].min() and sig[:20001].max() <= 1.0
    assert sig[20001:20003].tolist() == pytest.approx([1.0, 0.0], abs=1e-6) and np.isnan(sig[-1])

    mx.random.seed(0)
    g, u = mx.random.normal((3, 50)) * 4, mx.random.normal((3, 50))
    from mlx_lm.models.activations import swiglu

    def close(a, b):
        return float(mx.abs(a - b).max().item()) <= 1e-5 * (float(mx.abs(b).max().item()) + 1)

    assert close(kernels._swiglu(g, u), swiglu(g, u))
    for ours, theirs in zip(mx.grad(lambda a, b: (kernels._swiglu(a, b) * u).sum(), (0, 1))(g, u),
                            mx.grad(lambda a, b: (swiglu(a, b) * u).sum(), (0, 1))(g, u),
                            strict=True):
        assert close(ours, theirs)
    s = g + kernels.causal_bias(50)[:3]
    assert close(kernels._softmax(s), mx.softmax(s, axis=-1))
    assert close(mx.grad(lambda a: (kernels._softmax(a) * u).sum())(s),
                 mx.grad(lambda a: (mx.softmax(a, axis=-1) * u).sum())(s))


def test_llama_block_and_blocks_equal_the_models_own(tiny_model_dir):
    """llama_block (with and without a prefix's keys and values) and blocks() reproduce the
    model's own forward on the tiny llama model."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(tiny_model_dir))
    assert all(kernels.is_llama_block(layer) for layer in model.model.layers)
    tokens = mx.array([[5, 9, 17, 3, 40, 2, 11, 8]])
    h = model.model.embed_tokens(tokens)
    ours = kernels.blocks(model, h, 0, len(model.model.layers))
    theirs = kernels.blocks(model, h, 0, len(model.model.layers), fast_kernels=False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)

    # The last 3 positions after a 5-token prefix held as a KV cache: the same hidden states.
    cache = make_prompt_cache(model)
    model(tokens[:, :5], cache=cache)
    layer = model.model.layers[0]
    full = kernels.llama_block(layer, h, kernels.causal_bias(8))[:, 5:]
    kv = (cache[0].keys[..., :5, :], cache[0].values[..., :5, :])
    tail = kernels.llama_block(layer, h[:, 5:], kernels.causal_bias(3, 5), kv)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full), atol=1e-4)


def test_llama_block_at_positions_equals_the_whole_block(tiny_model_dir):
    """llama_block_at (queries, attention and MLP at a few positions only) gives the whole
    block's output at those positions, with and without a prefix's keys and values, and the
    same gradient with respect to the block's input."""
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    layer = model.model.layers[-1]
    attn = layer.self_attn
    mx.random.seed(0)
    h = mx.random.normal((3, 10, model.args.hidden_size))
    rows, cols = mx.array([0, 0, 2, 1]), mx.array([9, 3, 0, 5])
    head_dim = model.args.hidden_size // attn.n_heads
    prefix = (mx.random.normal((1, attn.n_kv_heads, 4, head_dim)),
              mx.random.normal((1, attn.n_kv_heads, 4, head_dim)))
    for kv, p in ((None, 0), (prefix, 4)):
        whole = kernels.llama_block(layer, h, kernels.causal_bias(10, p), kv)[rows, cols]
        np.testing.assert_allclose(np.asarray(kernels.llama_block_at(layer, h, rows, cols, kv)),
                                   np.asarray(whole), atol=1e-5)

    def whole_loss(x):
        return (kernels.llama_block(layer, x, kernels.causal_bias(10))[rows, cols] ** 2).sum()

    def at_loss(x):
        return (kernels.llama_block_at(layer, x, rows, cols) ** 2).sum()

    np.testing.assert_allclose(np.asarray(mx.grad(at_loss)(h)), np.asarray(mx.grad(whole_loss)(h)),
                               atol=1e-4)


def test_stream_kernels_equal_the_default_ones_on_every_stream():
    """stream_kernels: one (softmax, swiglu) pair per stream, made once, with the values and
    gradients of _softmax and _swiglu (their backward on that stream)."""
    s = mx.new_stream(mx.cpu)
    mx.random.seed(1)
    x, g, u = (mx.random.normal((4, 33)) for _ in range(3))
    with mx.stream(s):
        softmax, swiglu = kernels.stream_kernels()
        assert kernels.stream_kernels() == (softmax, swiglu)
        got = mx.grad(lambda a, b, c: (softmax(a) * c + swiglu(b, c)).sum(), (0, 1))(x, g, u)
    assert kernels.stream_kernels() != (softmax, swiglu)  # the default stream's own pair
    want = mx.grad(lambda a, b, c: (kernels._softmax(a) * c + kernels._swiglu(b, c)).sum(),
                   (0, 1))(x, g, u)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
