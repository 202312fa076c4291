"""Tokens/s of the demo's whole training run: tablora against transformers + PEFT doing the same.

tablora trains as `tablora train` does: helpers.llm.finetune.train on the fast path
(helpers.llm.fast_training), every epoch, every validation, early stopping, checkpoints and the
MLflow logging (into a temporary store), on the params file's settings. The peer (bench/peer.py:
PyTorch + PEFT, no cache, its usual set-up) runs in a process of its own and mirrors that run
batch by batch: before each batch tablora draws, for training or for validation, the peer trains
on (forward, backward, Adam) or validates (eval mode, no gradients) the same rows, while
tablora's clock is paused. Whatever schedule the params file ends up with (epochs, validation
interval, early stopping) both sides then do the same work, and drifting load on a shared
machine falls on both alike.

    python bench/train_run.py [--params FILE] [--set KEY=VALUE ...] [--rows N] [--no-peer]

--rows N trains on N of the training rows (a fixed random subset; validation rows unchanged) to
keep the run short. Tokens are the real (unpadded) tokens of every training and validation batch,
the same count on both sides; tablora's seconds are the whole finetune.train call minus the
pauses, the peer's the sum of its steps and validation batches. Prints a table; the last line is
one JSON object (run_ratio = tablora's tokens/s / the peer's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common  # bench/common.py


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=None, help="params YAML (default: the demo's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, as `tablora train --set` (repeatable)")
    p.add_argument("--rows", type=int, default=0, help="train on N training rows (0: all)")
    p.add_argument("--threads", type=int, default=2, help="BLAS / PyTorch threads")
    p.add_argument("--no-peer", action="store_true", help="tablora alone")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)  # internal
    return p.parse_args()


ARGS = parse_args()
# Thread counts must be set before the BLAS libraries start their pools.
common.pin_threads(ARGS.threads)


# ------------------------------------------------------------------------------------ peer


def peer_worker() -> None:
    """The peer's process: a set-up line, then data and batch messages on stdin; each answered
    with a JSON line marked '@@' ({"seconds", "loss", "targets"} for a batch)."""
    import peer  # bench/peer.py (this script's folder is on sys.path)
    import torch

    setup = json.loads(sys.stdin.readline())
    model = peer.load_lora_model(setup["num_layers"], setup["rank"], setup["alpha"],
                                 ARGS.threads, setup["dropout"], setup["targets"])
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=setup["learning_rate"])
    data: dict[str, list] = {}
    print("@@" + json.dumps("ready"), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["do"] == "data":
            data[msg["name"]] = [(t, o) for t, o in msg["rows"]]
            answer = "ok"
        elif msg["do"] in ("train", "valid"):
            ids, attn, labels, _ = peer.collate([data[msg["name"]][r] for r in msg["rows"]])
            tic = time.perf_counter()
            if msg["do"] == "train":
                loss = peer.train_step(model, optimizer, ids, attn, labels)
            else:
                loss = peer.eval_loss(model, ids, attn, labels)
            answer = {"seconds": time.perf_counter() - tic, "loss": loss,
                      "targets": int((labels[:, 1:] != -100).sum())}
        else:
            break
        print("@@" + json.dumps(answer), flush=True)


class PeerProcess:
    """The main process's handle on the peer worker."""

    def __init__(self, **setup):
        import subprocess

        argv = [sys.executable, __file__, "--peer-worker", "--threads", str(ARGS.threads)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.seconds = {"train": 0.0, "valid": 0.0}
        self.losses: dict[str, list[float]] = {"train": [], "valid": []}
        # Each validation pass: (loss, target count) per batch, as mlx-lm's evaluate() weighs.
        self.passes: list[list[tuple[float, int]]] = []
        self.ask(setup)  # "ready": the model is loaded

    def ask(self, msg: dict):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the peer worker stopped (exit code {self.proc.wait()})")

    def batch(self, kind: str, name: str, rows: list[int]) -> None:
        answer = self.ask({"do": kind, "name": name, "rows": rows})
        self.seconds[kind] += answer["seconds"]
        self.losses[kind].append(answer["loss"])
        if kind == "valid":
            self.passes[-1].append((answer["loss"], answer["targets"]))

    def last_val_loss(self) -> float | None:
        """The last validation pass's loss, a mean over its target tokens (as tablora's)."""
        if not self.passes or not self.passes[-1]:
            return None
        n = sum(t for _, t in self.passes[-1])
        return sum(loss * t for loss, t in self.passes[-1]) / n

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


class Mirrored:
    """helpers.llm.fast_training.FastTraining (the batches and everything else it holds), every
    batch it yields first run by the peer on the same rows, tablora's clock paused meanwhile."""

    def __init__(self, fast, peer: PeerProcess | None):
        self.fast, self.peer = fast, peer
        self.paused = 0.0  # seconds tablora waited for the peer
        self.tokens = {"train": 0, "valid": 0}
        self.batches = {"train": 0, "valid": 0}
        self._names: dict[int, str] = {}
        self._lengths: dict[str, list[int]] = {}

    def __getattr__(self, name):  # train_tokens, loss, stats, ...
        return getattr(self.fast, name)

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None,
                 comm_group=None):
        kind = "train" if loop else "valid"
        name = self._register(dataset, kind, max_seq_length)
        if kind == "valid" and self.peer is not None:
            self.peer.passes.append([])
        for batch in self.fast(dataset, batch_size, max_seq_length, loop=loop, seed=seed,
                               comm_group=comm_group):
            rows = [int(r) for r in self.fast.last_rows]
            self.tokens[kind] += sum(self._lengths[name][r] for r in rows)
            self.batches[kind] += 1
            if self.peer is not None:
                tic = time.perf_counter()
                self.peer.batch(kind, name, rows)
                self.paused += time.perf_counter() - tic
            yield batch

    def _register(self, dataset, kind: str, max_seq_length: int) -> str:
        """Send a dataset's rows (tokens, answer offset) to the peer the first time it is seen."""
        if id(dataset) in self._names:
            return self._names[id(dataset)]
        tic = time.perf_counter()
        name = f"{kind}{len(self._names)}"
        items = [dataset[i] for i in range(len(dataset))]
        items = [it if len(it) == 2 and not isinstance(it[1], list) else (it, 0) for it in items]
        rows = [[list(map(int, t[:max_seq_length])), int(o)] for t, o in items]
        self._names[id(dataset)], self._lengths[name] = name, [len(t) for t, _ in rows]
        if self.peer is not None:
            self.peer.ask({"do": "data", "name": name, "rows": rows})
        self.paused += time.perf_counter() - tic
        return name


# ------------------------------------------------------------------------------------ main


def subset_dir(prepared, rows: int, seed: int, out: Path) -> Path:
    """The prepared split's prompt files, the training file cut to `rows` random rows."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(prepared.data_dir).glob("*.jsonl"):
        lines = f.read_text().splitlines()
        if f.stem == "train" and 0 < rows < len(lines):
            keep = sorted(np.random.default_rng(seed).choice(len(lines), rows, replace=False))
            lines = [lines[i] for i in keep]
        (out / f.name).write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    import resource

    a = ARGS
    tmp = Path(tempfile.mkdtemp(prefix="tablora-bench-run-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    # Adapters may go to this temporary folder (outside the project's runs/), as bench/demo.py.
    os.environ["TABLORA_OUTPUT_ROOT"] = str(tmp)
    # helpers first: it points MLX at the optimized BLAS before mlx is imported.
    # isort: off
    import helpers  # noqa: F401
    from helpers import data, tracking
    from helpers.config import DEMO_PARAMS, load_params
    from helpers.llm import blas, fast_training, finetune, models
    # isort: on

    import yaml

    pairs = [kv.split("=", 1) for kv in a.overrides]
    if any(len(kv) != 2 for kv in pairs):
        raise SystemExit(f"--set {a.overrides}: expected KEY=VALUE, e.g. --set num_layers=8")
    # Values read as YAML, as `tablora train --set` reads them.
    overrides = {**{k.strip(): yaml.safe_load(v) for k, v in pairs},
                 "experiment": "bench-train-run",
                 "output_dir": str(tmp / "adapters")}
    params = load_params(a.params or DEMO_PARAMS, overrides)
    prepared = data.prepare(params)
    subset = SimpleNamespace(data_dir=subset_dir(prepared, a.rows, params.seed, tmp / "data"))
    n_train = sum(1 for _ in open(subset.data_dir / "train.jsonl"))
    load0 = os.getloadavg()
    print(f"{blas.describe()} | threads {a.threads} | {params.source_file or 'params'}: "
          f"{n_train} training rows, batch {params.batch_size}, LoRA r{params.lora_rank} on the "
          f"top {params.num_layers} blocks | load average {load0[0]:.1f}", flush=True)

    model, tokenizer = models.load(params.model_id, params.dequantize)
    peer = None if a.no_peer else PeerProcess(
        num_layers=params.num_layers, rank=params.lora_rank, alpha=params.lora_alpha,
        dropout=params.lora_dropout, learning_rate=params.learning_rate,
        targets=sorted({k.rsplit(".", 1)[-1] for k in params.lora_keys}) or None)
    fast = fast_training.FastTraining(model, seed=params.seed)
    mirrored = Mirrored(fast, peer)
    with tracking.run(params):
        tic = time.perf_counter()
        val_losses: list[float] = []  # tablora's, after each validation (not step 0's)
        result = finetune.train(model, tokenizer, subset, params, loss=fast.loss,
                                batches=mirrored,
                                on_eval=lambda _step, _n, val: val_losses.append(val) or False)
        wall = time.perf_counter() - tic
    result_last_val = val_losses[-1] if val_losses else float("nan")
    if peer:
        peer.close()

    ours_seconds = wall - mirrored.paused
    tokens = mirrored.tokens["train"] + mirrored.tokens["valid"]
    ours_tps = tokens / ours_seconds
    peer_seconds = sum(peer.seconds.values()) if peer else None
    peer_tps = tokens / peer_seconds if peer else None
    steps, evals = mirrored.batches["train"], mirrored.batches["valid"]
    load1 = os.getloadavg()
    print(f"\n{steps} steps ({steps * params.batch_size / max(n_train, 1):.2f} epochs of "
          f"{n_train} rows), {evals} validation batches; {mirrored.tokens['train']} + "
          f"{mirrored.tokens['valid']} tokens; stopped early: {result.stopped_early}")
    print(f"{'side':<10}{'seconds':>9}{'tokens/s':>10}  (train / validation seconds)")
    print(f"{'tablora':<10}{ours_seconds:>9.1f}{ours_tps:>10.1f}  (whole finetune.train call; "
          f"prefix pass {fast.stats['prefix_seconds']:.1f} s)")
    if peer:
        print(f"{'peer':<10}{peer_seconds:>9.1f}{peer_tps:>10.1f}  ({peer.seconds['train']:.1f}"
              f" / {peer.seconds['valid']:.1f})")
        print(f"ratio {ours_tps / peer_tps:.2f}; final losses: tablora best val "
              f"{result.best_val_loss:.4f} (last {result_last_val:.4f}), peer last val "
              f"{peer.last_val_loss():.4f}")
    result_json = {
        "ours_run_tps": round(ours_tps, 1),
        "peer_run_tps": round(peer_tps, 1) if peer else None,
        "run_ratio": round(ours_tps / peer_tps, 3) if peer else None,
        "ours_seconds": round(ours_seconds, 1),
        "peer_seconds": round(peer_seconds, 1) if peer else None,
        "peer_train_seconds": round(peer.seconds["train"], 1) if peer else None,
        "peer_valid_seconds": round(peer.seconds["valid"], 1) if peer else None,
        "prefix_seconds": round(fast.stats["prefix_seconds"], 1),
        "steps": steps, "valid_batches": evals,
        "epochs": round(steps * params.batch_size / max(n_train, 1), 2),
        "train_rows": n_train, "train_tokens": mirrored.tokens["train"],
        "valid_tokens": mirrored.tokens["valid"], "stopped_early": result.stopped_early,
        "best_val_loss": result.best_val_loss,
        "last_val_loss": result_last_val,
        "peer_last_val_loss": peer.last_val_loss() if peer else None,
        "num_layers": params.num_layers, "batch_size": params.batch_size,
        "threads": a.threads, "max_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_avg_1m_start": round(load0[0], 2), "load_avg_1m_end": round(load1[0], 2),
    }
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result_json))


if __name__ == "__main__":
    sys.exit(peer_worker() if ARGS.peer_worker else main())
