"""The fast LoRA training path: mlx-lm's losses and gradients, computed with less work.

Interface (both plug into mlx_lm.tuner.trainer.train as `loss=` / `iterate_batches=`)::

    fast = FastTraining(model, seed=params.seed, skip=steps_done)
    trainer.train(model, optimizer, train_set, valid_set, args,
                  loss=fast.loss, iterate_batches=fast)   # or helpers.llm.finetune.train(...,
                                                          #    loss=fast.loss, batches=fast)

`fast` is the batch iterator (same signature as mlx-lm's iterate_batches, plus `train_tokens`, the
real tokens of the training batches yielded, as helpers.llm.batches.Batches) and `fast.loss` the
loss (same signature and value as mlx-lm's default_loss, for the batches `fast` yields). It may be
made before the LoRA layers are added; what gets cached is decided on the first batch.

What it does, and why the result equals mlx-lm's default_loss on the same rows:

a. Answer-only LM head. default_loss computes the final norm and the LM head (49152 x 576 for
   SmolLM2-135M: ~a fifth of the forward FLOPs, as much again backward, and [B, T, 49152]
   float32 logits) at every position, then masks the loss down to the answer. Here the batch
   carries the flat indices of the positions whose next token is a target; hidden states are
   gathered there first, so the head runs on ~4 rows per example instead of ~180. The targets are
   default_loss's exactly, including its last one: the pad id 0 after the final token (its mask
   is `offset <= step <= length`), absent only when a row fills max_seq_length.
b. Frozen-prefix cache. With LoRA only on the top k blocks and the base frozen, the embedding and
   the blocks below the first trainable one are a fixed function of each example. Their output,
   the hidden state entering the first trainable block, is computed the first time a batch is
   drawn, kept, and reused in every later epoch and every validation pass; a training step then
   runs only the top k blocks. Positions need no care: blocks apply RoPE themselves from
   position 0 (no KV cache), and with right padding the causal mask keeps real positions
   independent of the padding, so the batch width does not change them.
c. Faster kernels: llama-family blocks run on a SwiGLU and a softmax built on a multiply-add exp
   (MLX's CPU exp is slow; see helpers.llm.kernels), gradients written out. Same values
   to float32 rounding; fast_kernels=False runs the model's own block code.
d. Less padding and per-step work: rows are batched with rows of similar token length (mlx-lm
   0.32.2 sorts a CacheDataset by `len(raw dict)` = 1, i.e. keeps file order) and padded to a
   multiple of 8 (mlx-lm: 32, plus one); batches (token arrays, target indices) are built once.

Batch order: helpers.llm.batches.batch_order, as for mlx-lm's path (Batches): epoch e in
numpy.random.default_rng([seed, e]) order, the first `skip` batches passed over (a resumed run
continues the same sequence); validation (loop=False) in default_rng(seed) order.
sort_by_length=False keeps mlx-lm's batch membership.

The cache is valid while (checked on every call; PrefixCacheInvalid otherwise):
- no trainable parameter sits below the first trainable block (found from the model: the lowest
  block holding one; a trainable embedding means no prefix, levers a and c only);
- the frozen weights do not change (don't fuse, load or re-quantize mid-run: make a new
  FastTraining, or call clear());
- nothing random runs below the first trainable block: LoRA dropout lives in the trained blocks,
  so lora_dropout > 0 is fine; base blocks with dropout of their own would not be.
Architectures: models whose forward is model.model.embed_tokens -> model.model.layers[i](h, mask)
-> model.model.norm -> LM head (llama, mistral, qwen2, SmolLM2, ...). verify=True compares the fast
logits with the model's own forward on the first batch and raises FastPathUnsupported if they
differ; use mlx-lm's default loss and iterate_batches then.

Memory: the cache holds hidden_size values per token: 2.3 KB per token at float32 for
SmolLM2-135M (the demo's ~400 rows x 177 tokens: ~165 MB); cache_dtype=mx.float16 halves it at
a small precision cost (loss within ~1e-3). cache_nbytes() reports it.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from helpers.llm.batches import batch_order, length_groups
from helpers.llm.kernels import (
    PAD_ID,
    PAD_MULTIPLE,
    blocks,
    is_llama_block,
    llama_block_at,
    lm_head,
    shared_prefix,
)
from helpers.llm.lanes import cpu_lanes, default_lanes, lane_blas, lane_streams
from helpers.llm.scoring import common_prefix_len

# A shared prompt start shorter than this is not worth the extra pass (a BOS token, say).
MIN_SHARED_TOKENS = 8


class PrefixCacheInvalid(RuntimeError):
    """The model no longer satisfies what the frozen-prefix cache assumes."""


class FastPathUnsupported(RuntimeError):
    """This architecture's forward differs from the embed -> blocks -> norm -> head the fast path
    replays; use mlx-lm's default loss and iterate_batches."""


@dataclass
class _Batch:
    rows: list[int]  # dataset indices
    tokens: np.ndarray  # int32 [B, T], padded with PAD_ID: each row after the plan's shared start
    positions: mx.array  # int32 [N]: flat indices b * T + j of the positions that carry a target
    targets: mx.array  # int32 [N]
    n_real: int  # real (unpadded) tokens
    hidden: mx.array | None = None  # the cached prefix output [B, T, D] (filled on first use)


@dataclass
class _Plan:
    """The fixed batches of one (dataset, batch_size, max_seq_length) combination."""

    dataset: Any  # weakref to the dataset
    batches: list[_Batch] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)  # the tokens every row starts with (or none)
    # What a step gets for them: the frozen blocks' output [1, P, D], or their ids [1, P] when
    # nothing is cached; and the frozen blocks' keys and values of them (filled on first use).
    shared_input: mx.array | None = None
    frozen_kv: list | None = None


def _lora_blocks(model: nn.Module) -> tuple[int, list[str]]:
    """Index of the lowest transformer block holding a trainable parameter (0 if anything below
    the blocks, e.g. the embedding, is trainable), and the trainable parameter names."""
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    if not names:
        raise PrefixCacheInvalid("the model has no trainable parameters (add LoRA layers first)")
    n_blocks = len(model.model.layers)
    first = n_blocks
    for name in names:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            first = min(first, int(parts[2]))
        elif parts[:2] == ["model", "embed_tokens"]:
            first = 0  # a trainable embedding: nothing below the blocks is fixed
        # model.norm / lm_head sit above every block: they don't move `first`.
    return first, names



class FastTraining:
    """mlx-lm `loss` and `iterate_batches` with an answer-only LM head and a frozen-prefix cache.

    The instance itself is the iterate_batches callable (helpers.llm.finetune's `batches`), and
    `.loss` the loss. It may be made before the LoRA layers are added: what is cached is decided
    on the first batch.
    model: the mlx-lm model (its LoRA layers in place by the first batch; base frozen).
    seed, skip: the batch order (see __call__); skip = steps already done (resume).
    cache_prefix: compute the frozen blocks once per example (False: levers a and c only).
    cache_dtype: mx.float32 (results equal the plain path) or mx.float16 (half the memory).
    sort_by_length: batch examples of similar token length (False: mlx-lm's batch membership).
    fast_kernels: run llama blocks on the faster SwiGLU/softmax (False: the model's own code).
    verify: compare with the model's own forward on the first batch (FastPathUnsupported).
    lanes: the rows of a batch whose frozen prefix is computed are split over this many CPU
    streams (default_lanes(); 1: one stream).
    step_lanes: the same for the training step's blocks, forward and backward (default: lanes);
    off while LoRA dropout is on (its masks would depend on the split, i.e. on the machine).
    last_block_at_targets: the top block computes its queries, attention and MLP only at the
    target positions (llama blocks, fast_kernels; keys and values everywhere).
    share_prompt: the token prefix every row of a dataset starts with (chat preamble, system
    prompt, task description) goes through the blocks once per step (once per dataset below
    the first trainable block) instead of once per row; the rows attend to its keys and values
    (llama blocks, fast_kernels).
    """

    def __init__(self, model: nn.Module, *, seed: int = 0, skip: int = 0,
                 cache_prefix: bool = True, cache_dtype: mx.Dtype = mx.float32,
                 sort_by_length: bool = True, fast_kernels: bool = True, verify: bool = True,
                 lanes: int | None = None, step_lanes: int | None = None,
                 last_block_at_targets: bool = True, share_prompt: bool = True):
        self.model = model
        self.lanes = max(1, lanes or default_lanes())
        self.step_lanes = max(1, step_lanes or self.lanes)
        self.last_block_at_targets = last_block_at_targets
        self.share_prompt = share_prompt
        self.fast_kernels = fast_kernels
        self.seed, self.skip = seed, skip
        self.cache_prefix = cache_prefix
        self.cache_dtype = cache_dtype
        self.sort_by_length = sort_by_length
        self.verify = verify
        self.first_trainable: int | None = None  # set on the first batch (_setup)
        self._trainable: list[str] = []
        self._plans: dict[tuple, _Plan] = {}
        self._prefix_fn = None  # the compiled embedding + frozen blocks
        self._verified = False
        # Real (unpadded) tokens of the training batches yielded: helpers.llm.finetune's tokens/s.
        self.train_tokens = 0
        self.last_rows: list[int] = []  # dataset rows of the batch yielded last (for benches)
        # For profiles: tokens yielded (real and padded) and the time spent filling the cache.
        # computed_tokens: positions the blocks run on (padding included, a shared start once).
        self.stats = {"real_tokens": 0, "padded_tokens": 0, "computed_tokens": 0,
                      "prefix_seconds": 0.0}

    def _setup(self) -> None:
        inner = getattr(self.model, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            raise FastPathUnsupported(
                f"{type(self.model).__module__}: no model.embed_tokens/layers/norm; use mlx-lm's "
                "default loss and iterate_batches")
        first, names = _lora_blocks(self.model)
        if self.first_trainable is None:
            self.first_trainable = first if self.cache_prefix else 0
            self._trainable = names
        elif first < self.first_trainable or names != self._trainable:
            raise PrefixCacheInvalid(
                f"the trainable parameters changed since the cache was built (lowest trainable "
                f"block now {first}, cache built below {self.first_trainable}): make a new "
                "FastTraining for the new LoRA layout")

    # ------------------------------------------------------------------ the loss (in the step)
    def loss(self, model: nn.Module, x: mx.array, positions: mx.array, targets: mx.array,
             shared: mx.array | None = None):
        """Mean cross-entropy over the target positions, and their count (as default_loss).

        x: the cached prefix output [B, T, D] (float), or token ids [B, T] when nothing is cached.
        shared: the rows' shared start (see _Plan.shared_input), x then holds what follows it.
        """
        logits = self._target_logits(model, x, positions, shared)
        ntoks = mx.array(targets.shape[0], dtype=mx.int32)
        ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32).sum() / ntoks
        return ce, ntoks

    def _target_logits(self, model: nn.Module, x: mx.array, positions: mx.array,
                       shared: mx.array | None = None) -> mx.array:
        layers = model.model.layers
        n = len(layers)
        start = 0 if mx.issubdtype(x.dtype, mx.integer) else self.first_trainable
        # The top block only where a target is read (see llama_block_at): its input everywhere.
        at = (self.last_block_at_targets and self.fast_kernels and start < n
              and is_llama_block(layers[-1]))
        kv = None
        if shared is not None:
            # The shared start once (one row), its keys and values read by every row.
            h = (model.model.embed_tokens(shared) if mx.issubdtype(shared.dtype, mx.integer)
                 else shared.astype(mx.float32))
            _, kv = shared_prefix(model, h, start, n, last=n - 1)
        stop = n - 1 if at else n
        h = self._blocks(model, x, start, stop, None if kv is None else kv[:stop - start])
        if at:
            width = h.shape[1]
            h = llama_block_at(layers[-1], h, positions // width, positions % width,
                               None if kv is None else kv[-1])
        else:
            h = h.reshape(-1, h.shape[-1])[positions]  # gather first: the head runs on N rows
        return lm_head(model)(model.model.norm(h))

    def _blocks(self, model: nn.Module, x: mx.array, start: int, stop: int,
                prefix_kv: list | None = None) -> mx.array:
        """Blocks start..stop-1 on x (token ids: embedded first), the batch's rows split over
        step_lanes CPU streams, forward and (under value_and_grad) backward: MLX runs a stream's
        element-wise work on one thread. Row groups are independent, so the result and, summed
        by autodiff, the gradients are those of the whole batch."""
        def run(part):
            if mx.issubdtype(part.dtype, mx.integer):
                h = model.model.embed_tokens(part)
            else:
                h = part.astype(mx.float32)
            return blocks(model, h, start, stop, self.fast_kernels, prefix_kv)

        lanes = min(self._lanes_now(model, start), x.shape[0]) if stop > start else 1
        if lanes <= 1:
            return run(x)
        parts = []
        for stream, rows in zip(lane_streams(lanes), np.array_split(np.arange(x.shape[0]), lanes),
                                strict=True):
            with mx.stream(stream):
                parts.append(run(x[int(rows[0]):int(rows[-1]) + 1]))
        return mx.concatenate(parts, axis=0)

    def _lanes_now(self, model: nn.Module, start: int) -> int:
        """step_lanes, or 1 while a dropout in the trained blocks draws masks (training mode)."""
        if self.step_lanes <= 1:
            return 1
        for layer in model.model.layers[start:]:
            for _, m in layer.named_modules():
                if isinstance(m, nn.Dropout) and m.training and m._p_1 < 1:
                    return 1
        return self.step_lanes

    # ------------------------------------------------------------------ the batches
    def __call__(self, dataset, batch_size: int, max_seq_length: int, loop: bool = False,
                 seed: int | None = None, comm_group=None):
        """Drop-in for mlx_lm.tuner.trainer.iterate_batches; yields (x, positions, targets).

        Batch order: helpers.llm.batches.batch_order (`skip` batches passed over on resume).
        """
        if comm_group is not None and comm_group.size() > 1:
            raise NotImplementedError("the fast path trains on one machine")
        self._setup()
        plan = self._plan(dataset, batch_size, max_seq_length)
        # The BLAS on its share of the cores while the step lanes run (mlx-lm evaluates the
        # step between two batches, i.e. while this generator is suspended here).
        with lane_blas(self.step_lanes):
            for i in batch_order(len(plan.batches), self.seed, self.skip, loop):
                if loop:
                    self.train_tokens += plan.batches[i].n_real
                self.last_rows = plan.batches[i].rows
                yield self._materialize(plan, plan.batches[i])

    iterate_batches = __call__

    def clear(self, weights_changed: bool = True) -> None:
        """Forget every cached prefix: after the frozen weights changed, or (weights_changed=False,
        keeping the compiled prefix function) to time a first epoch again."""
        self._plans.clear()
        if weights_changed:
            self._prefix_fn = None

    def cache_nbytes(self) -> int:
        return sum(b.hidden.nbytes for p in self._plans.values() for b in p.batches
                   if b.hidden is not None)

    def _plan(self, dataset, batch_size, max_seq_length) -> _Plan:
        key = (id(dataset), batch_size, max_seq_length)
        plan = self._plans.get(key)
        if plan is not None and plan.dataset() is dataset:
            return plan
        if len(dataset) < batch_size:
            raise ValueError(f"Dataset must have at least batch_size={batch_size} examples but "
                             f"only has {len(dataset)}.")
        items = [dataset[i] for i in range(len(dataset))]  # tokenizes once (CacheDataset keeps)
        items = [it if len(it) == 2 and not isinstance(it[1], list) else (it, 0) for it in items]
        if self.sort_by_length:
            groups = length_groups(len(items), batch_size, lambda i: len(items[i][0]))
        else:  # mlx-lm's (and Batches'): CacheDataset.itemlen is len(raw dict) = 1
            len_fn = (dataset.itemlen if hasattr(dataset, "itemlen")
                      else lambda i: len(items[i][0]))
            groups = length_groups(len(items), batch_size, len_fn)
        plan = _Plan(weakref.ref(dataset) if _weakrefable(dataset) else (lambda d=dataset: d))
        plan.shared = self._shared_start(items, max_seq_length)
        plan.batches = [self._make_batch(items, g, max_seq_length, len(plan.shared))
                        for g in groups]
        self._plans[key] = plan
        return plan

    def _shared_start(self, items, max_seq_length) -> list[int]:
        """The tokens every row starts with, up to the first target position (none when fewer
        than MIN_SHARED_TOKENS, or where blocks other than llama's would have to read them)."""
        layers = self.model.model.layers
        if not (self.share_prompt and self.fast_kernels
                and all(is_llama_block(layer) for layer in layers)):
            return []
        seqs = [list(it[0][:max_seq_length]) for it in items]
        n = min(common_prefix_len(seqs), min(max(int(it[1]) - 1, 0) for it in items))
        return seqs[0][:n] if n >= MIN_SHARED_TOKENS else []

    def _make_batch(self, items, rows, max_seq_length, shared: int) -> _Batch:
        """The rows after their `shared` first tokens (the plan's shared start), right-padded."""
        seqs = [list(items[r][0][:max_seq_length]) for r in rows]
        offs = [int(items[r][1]) for r in rows]
        width = PAD_MULTIPLE * math.ceil(max(len(s) - shared for s in seqs) / PAD_MULTIPLE)
        tokens = np.full((len(rows), width), PAD_ID, np.int32)
        positions, targets = [], []
        for b, (s, o) in enumerate(zip(seqs, offs, strict=True)):
            n = len(s)
            tokens[b, :n - shared] = s[shared:]
            # default_loss: input position j predicts token j + 1 and counts when
            # offset <= j + 1 <= length; position `length` is the pad (absent when the sequence
            # fills max_seq_length, as the batch is then exactly max_seq_length wide).
            last = n - 1 if n < max_seq_length else n - 2
            nxt = s[1:] + [PAD_ID]
            for j in range(max(o - 1, 0), last + 1):
                positions.append(b * width + j - shared)
                targets.append(nxt[j])
        return _Batch(rows, tokens, mx.array(np.asarray(positions, np.int32)),
                      mx.array(np.asarray(targets, np.int32)), sum(len(s) for s in seqs))

    def _materialize(self, plan: _Plan, batch: _Batch):
        B, width = batch.tokens.shape
        self.stats["real_tokens"] += batch.n_real
        self.stats["padded_tokens"] += B * (width + len(plan.shared))
        self.stats["computed_tokens"] += B * width + len(plan.shared)
        shared = self._shared_input(plan) if plan.shared else None
        if self.first_trainable == 0:
            x = mx.array(batch.tokens)
        else:
            if batch.hidden is None:
                batch.hidden = self._prefix(batch.tokens, plan.frozen_kv)
            x = batch.hidden
        if self.verify and not self._verified:
            self._verify(plan, batch, x, shared)
        return (x, batch.positions, batch.targets) + ((shared,) if plan.shared else ())

    def _shared_input(self, plan: _Plan) -> mx.array:
        """The shared start as a step reads it (computed once per plan): its ids, or its output
        of the frozen blocks, whose keys and values the frozen pass of every row then reads."""
        if plan.shared_input is None:
            ids = mx.array([plan.shared], dtype=mx.int32)
            if self.first_trainable == 0:
                plan.shared_input = ids
            else:
                h = self.model.model.embed_tokens(ids)
                h, plan.frozen_kv = shared_prefix(self.model, h, 0, self.first_trainable)
                plan.shared_input = h
                mx.eval(plan.shared_input, plan.frozen_kv)
        return plan.shared_input

    def _prefix(self, tokens: np.ndarray, frozen_kv: list | None = None) -> mx.array:
        """The hidden state entering the first trainable block (no gradient needed); after the
        shared start's keys and values frozen_kv, when given."""
        tic = time.perf_counter()
        if self._prefix_fn is None:
            # Compiled (fused element-wise work: ~25% faster than eager here); traced once per
            # batch width. The frozen weights enter as constants: clear() drops it with the cache.
            def forward(ids, *kv):
                h = self.model.model.embed_tokens(ids)
                pairs = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)] if kv else None
                return blocks(self.model, h, 0, self.first_trainable, self.fast_kernels, pairs)

            self._prefix_fn = mx.compile(forward)
        kv = [a for pair in frozen_kv for a in pair] if frozen_kv else []
        if self.lanes > 1 and len(tokens) > 1:
            # Rows split over CPU streams side by side (the compiled function is traced once per
            # stream and row count).
            rows = [r for r in np.array_split(np.arange(len(tokens)), self.lanes) if len(r)]
            with cpu_lanes(self.lanes) as streams:
                parts = []
                for stream, r in zip(streams, rows, strict=False):
                    with mx.stream(stream):
                        parts.append(self._prefix_fn(mx.array(tokens[r]), *kv)
                                     .astype(self.cache_dtype))
                mx.eval(parts)
            h = mx.concatenate(parts, axis=0)
        else:
            h = self._prefix_fn(mx.array(tokens), *kv).astype(self.cache_dtype)
        mx.eval(h)
        self.stats["prefix_seconds"] += time.perf_counter() - tic
        return h

    def _verify(self, plan: _Plan, batch: _Batch, x: mx.array, shared: mx.array | None) -> None:
        """The fast logits of the batch's first row must equal the model's own forward."""
        pos = np.asarray(batch.positions)
        pos = pos[pos < batch.tokens.shape[1]]  # the first row's target positions
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout: both sides deterministic
        try:
            ref = self.model(mx.array([plan.shared + batch.tokens[0].tolist()]))
            ref = ref.reshape(-1, ref.shape[-1])[mx.array(pos + len(plan.shared))]
            fast = self._target_logits(self.model, x[:1], mx.array(pos), shared)
            err, scale = mx.abs(fast - ref).max().item(), max(mx.abs(ref).max().item(), 1.0)
        finally:
            self.model.train(was_training)
        tol = 1e-3 if self.cache_dtype == mx.float32 else 5e-2
        if not err <= tol * scale:
            raise FastPathUnsupported(
                f"the fast path's logits differ from {type(self.model).__module__}'s forward by "
                f"{err:.3g} (tolerance {tol * scale:.3g}): use mlx-lm's default loss and "
                "iterate_batches for this model")
        self._verified = True


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False
