"""helpers.llm.fast_training gives mlx-lm's losses and gradients, only faster (tiny model,
real MLX)."""

from __future__ import annotations

import numpy as np
import pytest

import helpers  # noqa: F401 - loads the BLAS before mlx
from helpers.llm import fast_training

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

N_LAYERS, LORA_LAYERS, BATCH = 4, 2, 4


def _records(n: int, seed: int = 0) -> list[dict]:
    """Chat rows of varied length (so batches need padding), answers Yes/No."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        text = " ".join(f"The mean radius is {rng.uniform(1, 30):.{int(rng.integers(1, 4))}f}."
                        for _ in range(k))
        out.append({"messages": [
            {"role": "user", "content": text + " Is this tumour malignant? Answer Yes or No."},
            {"role": "assistant", "content": str(rng.choice(["Yes", "No"]))}]})
    return out


def _dataset(tokenizer, records):
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    return CacheDataset(ChatDataset(records, tokenizer, mask_prompt=True))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with LoRA on its top 2 of 4 blocks, LoRA weights random (non-zero B, so
    that every LoRA matrix gets a gradient)."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    mx.random.seed(1)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1,
                          model.trainable_parameters()))
    mx.eval(model.parameters())
    return model, tokenizer


def _one_batch(iterate, dataset, max_seq_length=2048):
    """The single batch of a dataset of exactly BATCH rows."""
    batches = list(iterate(dataset, BATCH, max_seq_length))
    assert len(batches) == 1
    return batches[0]


def _value_and_grad(model, loss, batch):
    (value, ntoks), grads = nn.value_and_grad(model, loss)(model, *batch)
    return value.item(), ntoks.item(), dict(tree_flatten(grads))


def _assert_same(plain, fast, rtol):
    (l1, n1, g1), (l2, n2, g2) = plain, fast
    assert n1 == n2  # the same target tokens, including mlx-lm's final pad target
    assert l2 == pytest.approx(l1, rel=rtol)
    assert g1.keys() == g2.keys() and len(g1) == LORA_LAYERS * 7 * 2  # lora_a, lora_b
    for k in g1:
        scale = float(mx.abs(g1[k]).max().item()) + 1e-12
        assert float(mx.abs(g1[k] - g2[k]).max().item()) <= rtol * scale, k


@pytest.mark.parametrize("cache_dtype, cache_prefix, fast_kernels, rtol, step_lanes, at, share", [
    ("float32", True, True, 1e-4, 2, True, True),     # everything on: equal to float rounding
    ("float32", True, True, 1e-4, 1, False, False),   # one stream, no lever of the step
    ("float32", True, True, 1e-4, 3, True, True),     # 4 rows over 3 lanes (2 + 1 + 1)
    ("float32", True, True, 1e-4, 1, False, True),    # the shared start alone
    ("float32", True, False, 1e-4, 2, True, True),    # the model's own block code
    ("float32", False, True, 1e-4, 2, True, True),    # no prefix cache (token ids everywhere)
    ("float16", True, True, 2e-2, 2, True, True),     # half the cache memory, close but not equal
])
def test_loss_and_gradients_match_plain_mlx_lm(tiny, cache_dtype, cache_prefix, fast_kernels,
                                               rtol, step_lanes, at, share):
    from mlx_lm.tuner import trainer

    model, tokenizer = tiny
    data = _dataset(tokenizer, _records(BATCH))
    lengths = [len(data[i][0]) for i in range(BATCH)]
    assert len(set(lengths)) > 1  # padding is exercised
    fast = fast_training.FastTraining(model, cache_prefix=cache_prefix, fast_kernels=fast_kernels,
                                      cache_dtype=getattr(mx, cache_dtype),
                                      step_lanes=step_lanes, last_block_at_targets=at,
                                      share_prompt=share)
    plain = _value_and_grad(model, trainer.default_loss, _one_batch(trainer.iterate_batches, data))
    ours = _value_and_grad(model, fast.loss, _one_batch(fast, data))
    _assert_same(plain, ours, rtol)
    assert fast.first_trainable == (N_LAYERS - LORA_LAYERS if cache_prefix else 0)
    assert (fast.cache_nbytes() > 0) == cache_prefix
    # The chat preamble all rows start with went through the blocks once (llama blocks only).
    shared = [len(plan.shared) for plan in fast._plans.values()]
    assert shared == ([8] if share and fast_kernels else [0])


def test_prefix_over_parallel_streams_equals_one_stream(tiny):
    """The frozen blocks' output computed with the rows split over CPU streams (lanes) is the
    one-stream output, for an odd row count too; the BLAS thread count is restored."""
    from helpers.llm import blas

    model, tokenizer = tiny
    data = _dataset(tokenizer, _records(3, seed=5))
    before = blas.get_threads()
    hidden = {}
    for lanes in (1, 2):
        fast = fast_training.FastTraining(model, lanes=lanes)
        (x, *_), = list(fast(data, 3, 2048))
        hidden[lanes] = np.asarray(x)
    assert hidden[1].shape[0] == 3 and hidden[1].ndim == 3  # a cached hidden state, not ids
    np.testing.assert_allclose(hidden[2], hidden[1], atol=1e-5)
    assert blas.get_threads() == before


def test_step_lanes_share_the_blas_and_step_aside_for_dropout(tiny_model_dir):
    """While a batch iterator with step lanes is open (mlx-lm evaluates the step between two
    batches) the BLAS runs on cores // lanes threads; closed, the count is restored. LoRA dropout
    in training mode turns the lanes off (its masks would depend on the split)."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from helpers.llm import blas, lanes

    model, tokenizer = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, {"rank": 2, "scale": 1.0, "dropout": 0.5})
    data = _dataset(tokenizer, _records(2 * BATCH, seed=4))
    fast = fast_training.FastTraining(model, step_lanes=2)
    before = blas.get_threads()
    it = fast(data, BATCH, 2048, loop=True)
    next(it)
    if before is not None:
        assert blas.get_threads() == max(1, lanes.cpu_cores() // 2)
    it.close()
    assert blas.get_threads() == before
    model.train()
    assert fast._lanes_now(model, fast.first_trainable) == 1
    model.eval()
    assert fast._lanes_now(model, fast.first_trainable) == 2


def test_truncated_rows_match_plain(tiny):
    """A row cut at max_seq_length loses mlx-lm's final pad target; the others keep it."""
    from mlx_lm.tuner import trainer

    model, tokenizer = tiny
    data = _dataset(tokenizer, _records(BATCH, seed=3))
    lengths = sorted(len(data[i][0]) for i in range(BATCH))
    offsets = [data[i][1] for i in range(BATCH)]
    max_len = lengths[-1] - 1  # the longest row is truncated, its answer partly kept
    assert max(offsets) < max_len
    fast = fast_training.FastTraining(model)
    plain = _value_and_grad(model, trainer.default_loss,
                            _one_batch(trainer.iterate_batches, data, max_len))
    ours = _value_and_grad(model, fast.loss, _one_batch(fast, data, max_len))
    _assert_same(plain, ours, 1e-4)


def test_training_run_matches_plain(tiny, tmp_path):
    """mlx-lm's trainer (compiled step, Adam, validation) ends at the same LoRA weights; one
    batch per epoch, so every step after the first reuses the cached prefix."""
    from mlx_lm.tuner import trainer

    model, tokenizer = tiny
    start = tree_map(lambda p: p, model.trainable_parameters())
    data = _dataset(tokenizer, _records(BATCH, seed=5))
    valid = _dataset(tokenizer, _records(BATCH, seed=6))
    args = trainer.TrainingArgs(batch_size=BATCH, iters=6, steps_per_report=3, steps_per_eval=3,
                                val_batches=-1, steps_per_save=100,
                                adapter_file=str(tmp_path / "adapters.safetensors"))
    ends = []
    from helpers.llm import blas

    before = blas.get_threads()
    # Step lanes on (whatever the machine's cores): the compiled step over two CPU streams.
    for fast in (None, fast_training.FastTraining(model, step_lanes=2)):
        model.update(start)
        paths = {"loss": fast.loss, "iterate_batches": fast} if fast else {}
        trainer.train(model, optim.Adam(learning_rate=1e-2), data, valid, args=args, **paths)
        ends.append(dict(tree_flatten(model.trainable_parameters())))
        assert blas.get_threads() == before  # the iterator closed with the trainer's loop
    model.update(start)
    moved = max(float(mx.abs(ends[0][k] - v).max().item())
                for k, v in tree_flatten(start))
    assert moved > 1e-3  # training did something
    # Each step's gradients agree to ~1e-6 (test above); Adam then turns float32 rounding in
    # near-zero gradient entries into steps of its own: after 6 steps at lr 1e-2 the two paths
    # end ~1e-4 apart (5e-5 with one stream and no shared prompt start),
    # 20x below one step's size, where a wrong batch or loss would move them by ~lr.
    for k, v in ends[0].items():
        assert float(mx.abs(v - ends[1][k]).max().item()) <= 5e-4 * max(moved, 1.0), k


def test_order_resumes_and_counts_tokens(tiny):
    model, tokenizer = tiny
    data = _dataset(tokenizer, _records(4 * BATCH, seed=7))

    def firsts(fast, n):
        it = fast(data, BATCH, 2048, loop=True)
        # A batch is told apart by its cached hidden states (their sum) and its targets.
        return [(round(float(np.asarray(x).sum()), 3), tuple(np.asarray(t).tolist()))
                for x, _, t, *_ in (next(it) for _ in range(n))]

    whole = fast_training.FastTraining(model, seed=2)
    seq = firsts(whole, 8)  # two epochs of 4 batches, each in its own order
    assert len(set(seq[:4])) == 4 and sorted(seq[:4]) == sorted(seq[4:])
    assert firsts(fast_training.FastTraining(model, seed=2, skip=3), 5) == seq[3:]
    assert whole.train_tokens == 2 * sum(len(data[i][0]) for i in range(4 * BATCH))
    # Rows sorted by length, widths rounded up to 8: little padding.
    assert whole.stats["real_tokens"] <= whole.stats["padded_tokens"]
    assert whole.stats["padded_tokens"] < 1.2 * whole.stats["real_tokens"]


def test_cache_refuses_lora_below_it(tiny_model_dir):
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    data = _dataset(tokenizer, _records(BATCH))
    fast = fast_training.FastTraining(model)
    next(fast(data, BATCH, 2048))
    assert fast.first_trainable == N_LAYERS - 1
    # A LoRA layer added below the cached blocks: their output is no longer fixed.
    attn = model.model.layers[N_LAYERS - 2].self_attn
    attn.q_proj = LoRALinear.from_base(attn.q_proj, r=2)
    with pytest.raises(fast_training.PrefixCacheInvalid):
        next(fast(data, BATCH, 2048))


def test_lora_dropout_is_fine_and_other_forwards_are_refused(tiny_model_dir):
    """Dropout in the trained blocks leaves the cache valid (verify runs without dropout); a
    model whose forward is not embed -> blocks -> norm -> head (gemma scales its embeddings) is
    refused by verify instead of being trained on wrong activations."""
    from mlx_lm import load
    from mlx_lm.models import gemma
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = {"rank": 2, "scale": 1.0, "dropout": 0.5}
    model, tokenizer = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, lora)
    data = _dataset(tokenizer, _records(BATCH))
    next(fast_training.FastTraining(model)(data, BATCH, 2048))

    other = gemma.Model(gemma.ModelArgs(
        model_type="gemma", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=len(tokenizer.vocab),
        num_key_value_heads=1))
    other.freeze()
    linear_to_lora_layers(other, 1, {**lora, "dropout": 0.0})
    with pytest.raises(fast_training.FastPathUnsupported):
        next(fast_training.FastTraining(other)(data, BATCH, 2048))


@pytest.mark.filterwarnings("ignore:.*appear identically in train:UserWarning")
def test_finetune_train_with_the_fast_path_matches_plain(tmp_path, tiny_model_dir, monkeypatch):
    """helpers.llm.finetune.train(loss=fast.loss, batches=fast): the same train and validation loss
    histories as its plain path (sort_by_length=False: the same batches in the same order)."""
    import mlflow
    import pandas as pd
    import yaml

    from helpers import config, data, tracking
    from helpers.llm import finetune, models

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pd.DataFrame({"size": [1.0, 2.0, 3.0, 4.0] * 6, "label": ["no", "no", "yes", "yes"] * 6}
                 ).to_csv(tmp_path / "toy.csv", index=False)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({
        "name": "toy", "model_id": str(tiny_model_dir), "num_layers": LORA_LAYERS,
        "batch_size": 2, "learning_rate": 2e-3, "num_iters": 8, "steps_per_eval": 4,
        "dataset": {"source": str(tmp_path / "toy.csv"), "target": "label",
                    "positive_label": "yes", "test_size": 0.25, "valid_size": 0.25}}))
    history = {}
    for kind in ("plain", "fast"):
        params = config.load_params(tmp_path / "toy.yaml", {"output_dir": str(tmp_path / kind),
                                                             "fast_training": kind == "fast"})
        model, tokenizer = models.load(params.model_id)
        paths = {}
        if kind == "fast":
            fast = fast_training.FastTraining(model, seed=params.seed, sort_by_length=False)
            paths = {"loss": fast.loss, "batches": fast}
        with tracking.run(params) as run:
            finetune.train(model, tokenizer, data.prepare(params), params, **paths)
        client = mlflow.MlflowClient()
        history[kind] = [[m.value for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                   key=lambda m: m.step)]
                         for k in ("train_loss", "val_loss")]
    assert len(history["plain"][0]) == 8 and len(history["plain"][1]) == 3
    for plain, fast in zip(history["plain"], history["fast"], strict=True):
        assert np.allclose(plain, fast, rtol=1e-4)
