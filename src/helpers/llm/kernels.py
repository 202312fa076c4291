"""Llama-family transformer blocks on kernels that MLX's CPU backend runs fast.

Profile of a SmolLM2 block on MLX's CPU backend (4 x 184 tokens, 2 threads): its 7 GEMMs take
about a third of the forward time, as long as PyTorch's; attention and SwiGLU take most of the
rest, 2-2.5x PyTorch's, because MLX's CPU exp and sigmoid are slow (18.6 and 23.4 ns a value in
bench/kernels.py: scalar library calls). mx.compile fuses chains of multiply-adds into one loop
instead, so llama-family blocks run here on the same modules and weights, with the softmax's exp
and SwiGLU's sigmoid written as such chains (no library call, no bit tricks that break the
fusion), their gradients written out. bench/kernels.py, compiled, on one SmolLM2 block's shapes:
softmax 2.7x and SwiGLU 7.9x faster than MLX's own. Training (helpers.llm.fast_training) and
scoring (helpers.llm.scoring) share `llama_block`.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import mlx.core as mx
import mlx.nn as nn

# What mlx-lm's iterate_batches pads with (np.zeros), and so its last target; scoring pads with it
# too (any id works there: pads sit after every scored position, and attention is causal).
PAD_ID = 0
PAD_MULTIPLE = 8  # batch width rounded up to this: few distinct shapes for mx.compile to trace


def lm_head(model: nn.Module):
    """The LM head as a callable on hidden states (tied embeddings or a separate lm_head)."""
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    return model.model.embed_tokens.as_linear if tied or not hasattr(model, "lm_head") else (
        model.lm_head)


# exp(t) for t in [-1, 0]: Taylor to degree 10 (error < 3e-8, float32's rounding).
_EXP_TAYLOR = tuple(1 / math.factorial(k) for k in range(11))
# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 7.905 (tanh is 1 to float32 beyond): Eigen's rational
# approximation (generic_fast_tanh_float); error < 4e-7.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
           5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
           -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
           1.19825839466702e-06)


def _horner(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    p = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        p = p * x + c
    return p


def _exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (a softmax's x - max): exp(x / 32) ** 32, by five squarings.

    Relative error < 1e-5 (the squarings multiply float32 rounding by 32); exactly 0 below -32
    (where exp < 1.3e-14, and masked scores sit): no denormal floats downstream (x86 computes
    those ~100x slower).
    """
    p = _horner(mx.maximum(x, -32.0) * (1 / 32), _EXP_TAYLOR)
    for _ in range(5):
        p = p * p
    return mx.where(x < -32.0, 0.0, p)


def _sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + exp(-x)) = (1 + tanh(x / 2)) / 2, tanh rational (absolute error < 3e-7)."""
    t = mx.clip(x * 0.5, -7.90531110763549805, 7.90531110763549805)
    t2 = t * t
    return 0.5 + 0.5 * t * _horner(t2, _TANH_P) / _horner(t2, _TANH_Q)


def _swiglu_math(gate: mx.array, up: mx.array) -> mx.array:
    return gate * _sigmoid(gate) * up


def _swiglu_grads(gate: mx.array, up: mx.array, cotangent: mx.array):
    s = _sigmoid(gate)
    gs = gate * s
    return cotangent * up * (s + gs * (1 - s)), cotangent * gs


def _softmax_math(x: mx.array) -> mx.array:
    e = _exp_nonpositive(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_grad(output: mx.array, cotangent: mx.array) -> mx.array:
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def _make_kernels(stream=None) -> tuple:
    """(softmax over the last axis, swiglu = silu(gate) * up as mlx_lm.models.activations.swiglu)
    with their gradients written out, computed on `stream` (None: the stream that is the default
    when the backward pass is built)."""
    on = (lambda: mx.stream(stream)) if stream is not None else contextlib.nullcontext

    @mx.custom_function
    def softmax(x):
        return _softmax_math(x)

    @softmax.vjp
    def softmax_vjp(primals, cotangent, output):
        with on():
            return (_softmax_grad(output, cotangent),)

    @mx.custom_function
    def swiglu(gate, up):
        return _swiglu_math(gate, up)

    @swiglu.vjp
    def swiglu_vjp(primals, cotangent, output):
        with on():
            return _swiglu_grads(*primals, cotangent)

    return softmax, swiglu


_softmax, _swiglu = _make_kernels()

# (stream, softmax, swiglu): the two kernels per stream, their gradients on it. MLX builds a
# custom function's VJP on the stream that is the default when the backward pass is built, not on
# the forward's: work split over CPU streams (helpers.llm.lanes) would otherwise compute these
# gradients, most of the backward's element-wise work, on one stream, i.e. one thread.
_STREAM_KERNELS: list[tuple] = []


def stream_kernels() -> tuple:
    """(softmax, swiglu) for the current default stream (the one `with mx.stream(s)` selects):
    _softmax and _swiglu, their gradients computed on that stream."""
    stream = mx.default_stream(mx.default_device())
    for s, softmax, swiglu in _STREAM_KERNELS:
        if s == stream:
            return softmax, swiglu
    kernels = _make_kernels(stream)
    _STREAM_KERNELS.append((stream, *kernels))
    return kernels


# mlx-lm model modules whose blocks are llama's: pre-norm attention (q/k/v/o projections, RoPE,
# grouped-query heads; Qwen2 adds biases to q/k/v, which its Linear layers carry) and SwiGLU MLP.
LLAMA_FORM_MODULES = ("llama", "qwen2")


def is_llama_block(layer: nn.Module) -> bool:
    """A block whose forward `llama_block` reproduces (and `verify` checks): llama's (SmolLM2,
    Llama, Mistral) or Qwen2's, without a sliding window."""
    for name in LLAMA_FORM_MODULES:
        m = importlib.import_module(f"mlx_lm.models.{name}")
        if (type(layer) is m.TransformerBlock and type(layer.mlp) is m.MLP
                and type(layer.self_attn) is m.Attention):
            return not getattr(layer, "use_sliding", False)
    return False


def causal_bias(length: int, prefix: int = 0) -> mx.array:
    """Additive causal mask [length, prefix + length]: 0 where a position may look (the whole
    prefix, and itself and what comes before it), -1e9 above the diagonal (its exp is 0)."""
    i = mx.arange(length)
    bias = mx.where(i[:, None] >= i[None], 0.0, -1e9).astype(mx.float32)
    return mx.concatenate([mx.zeros((length, prefix)), bias], axis=1) if prefix else bias


def keys_values(layer: nn.Module, h: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
    """A llama block's own keys and values [B, n_kv_heads, L, head_dim] of its input h [B, L, D]
    (RoPE'd from position `offset`): what a KV cache holds for these positions."""
    return _own_keys_values(layer.self_attn, layer.input_layernorm(h), offset)


def _own_keys_values(attn: nn.Module, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
    B, L, _ = x.shape
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attn.rope(k, offset=offset), v


def _with_prefix(k: mx.array, v: mx.array,
                 prefix_kv: tuple[mx.array, mx.array] | None) -> tuple[mx.array, mx.array]:
    """The P prefix keys and values (batch 1, broadcast to every row) before k and v."""
    if prefix_kv is None:
        return k, v
    pk, pv = prefix_kv
    B = k.shape[0]
    return (mx.concatenate([mx.broadcast_to(pk, (B, *pk.shape[1:])), k], axis=2),
            mx.concatenate([mx.broadcast_to(pv, (B, *pv.shape[1:])), v], axis=2))


def llama_block(layer: nn.Module, h: mx.array, bias: mx.array,
                prefix_kv: tuple[mx.array, mx.array] | None = None,
                return_kv: bool = False):
    """llama.TransformerBlock.__call__ on the fast SwiGLU and softmax.

    prefix_kv: this block's keys and values [1, n_kv_heads, P, head_dim] of P earlier tokens
    (an mlx-lm KVCache's state after the shared prompt prefix), read by every row of h, which
    then holds positions P..P+L-1; bias is causal_bias(L, P). None: positions 0..L-1.
    return_kv: also return the block's own keys and values of h (as keys_values).
    The kernels' gradients run on the stream that is the default here (stream_kernels).
    """
    softmax, swiglu = stream_kernels()
    attn, mlp = layer.self_attn, layer.mlp
    x = layer.input_layernorm(h)
    B, L, _ = x.shape
    offset = 0 if prefix_kv is None else prefix_kv[0].shape[2]
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    q = attn.rope(q, offset=offset)
    own = _own_keys_values(attn, x, offset)
    k, v = _with_prefix(*own, prefix_kv)
    # Grouped-query attention: query head i reads key/value head i // rep. The rep query heads
    # of a key/value head are stacked along the positions (a free reshape), so that each is one
    # GEMM per row and key/value head ([rep * L, hd] x [hd, P + L]) with nothing broadcast.
    rep = attn.n_heads // attn.n_kv_heads
    q = (q * attn.scale).reshape(B, attn.n_kv_heads, rep * L, -1)
    s = (q @ k.swapaxes(-1, -2)).reshape(B, attn.n_kv_heads, rep, L, -1)
    o = softmax(s + bias).reshape(B, attn.n_kv_heads, rep * L, -1) @ v
    o = o.reshape(B, attn.n_heads, L, -1).transpose(0, 2, 1, 3).reshape(B, L, -1)
    h = h + attn.o_proj(o)
    x = layer.post_attention_layernorm(h)
    h = h + mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    return (h, own) if return_kv else h


def llama_block_at(layer: nn.Module, h: mx.array, rows: mx.array, cols: mx.array,
                   prefix_kv: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """llama_block(layer, h, ...)[rows, cols]: the block's output [N, D] at N positions only.

    For the last block of a forward read at a few positions (an answer's targets, the scored
    tokens): keys and values at every position of each row, but the queries, the attention, the
    output projection and the MLP only at the N positions, ~1/30 of the block's work at 4 answer
    tokens per ~180-token row. rows, cols: int32 [N]; prefix_kv as in llama_block (col c is then
    position P + c and sees the whole prefix).
    """
    softmax, swiglu = stream_kernels()
    attn, mlp = layer.self_attn, layer.mlp
    x = layer.input_layernorm(h)
    B, L, _ = x.shape
    offset = 0 if prefix_kv is None else prefix_kv[0].shape[2]
    k, v = _with_prefix(*_own_keys_values(attn, x, offset), prefix_kv)  # [B, n_kv, P + L, hd]
    n = rows.shape[0]
    hq, xq = h[rows, cols], x[rows, cols]  # [N, D]
    pos = cols + offset
    # Each query as a batch row of one position, RoPE'd at its own position (an offset per row).
    q = attn.q_proj(xq).reshape(n, attn.n_heads, 1, -1)
    q = attn.rope(q, offset=pos)
    rep = attn.n_heads // attn.n_kv_heads
    q = (q * attn.scale).reshape(n, attn.n_kv_heads, rep, 1, -1)
    k, v = mx.expand_dims(k[rows], 2), mx.expand_dims(v[rows], 2)  # [N, n_kv, 1, P + L, hd]
    # Key j is visible to the query at position p when j <= p (-1e9: exp is 0, as causal_bias).
    keys = mx.arange(offset + L)
    bias = mx.where(keys[None] <= pos[:, None], 0.0, -1e9).astype(mx.float32)
    o = softmax(q @ k.swapaxes(-1, -2) + bias.reshape(n, 1, 1, 1, -1)) @ v
    hq = hq + attn.o_proj(o.reshape(n, -1))
    x = layer.post_attention_layernorm(hq)
    return hq + mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def blocks(model: nn.Module, h: mx.array, start: int, stop: int, fast_kernels: bool = True,
           prefix_kv: list | None = None) -> mx.array:
    """Blocks start..stop-1 of the model on h [B, T, D], positions from 0 (no cache), or after a
    shared prefix: prefix_kv[i] = block start + i's keys and values of P earlier tokens
    ([1, n_kv_heads, P, head_dim], llama blocks only), h then at positions P..P+T-1."""
    from mlx_lm.models.base import create_attention_mask

    if start >= stop:
        return h
    if prefix_kv is not None:
        bias = causal_bias(h.shape[1], prefix_kv[0][0].shape[2])
        for layer, kv in zip(model.model.layers[start:stop], prefix_kv, strict=False):
            h = llama_block(layer, h, bias, kv)
        return h
    mask = create_attention_mask(h, None)  # "causal" for T > 1, as LlamaModel does without cache
    bias = causal_bias(h.shape[1]) if fast_kernels else None
    for layer in model.model.layers[start:stop]:
        if fast_kernels and is_llama_block(layer):
            h = llama_block(layer, h, bias)
        else:
            h = layer(h, mask, cache=None)
    return h


def shared_prefix(model: nn.Module, h: mx.array, start: int, stop: int,
                  last: int | None = None) -> tuple[mx.array, list]:
    """A prompt prefix [1, P, D] through llama blocks start..stop-1: its output, and each block's
    keys and values of it (what blocks(..., prefix_kv=...) reads). Blocks from `last` on (default
    stop) give only their keys and values (their output at the prefix is never read)."""
    kv = []
    bias = causal_bias(h.shape[1])
    last = stop if last is None else last
    for i, layer in enumerate(model.model.layers[start:stop], start):
        if i >= last:
            kv.append(keys_values(layer, h))
        else:
            h, own = llama_block(layer, h, bias, return_kv=True)
            kv.append(own)
    return h, kv
