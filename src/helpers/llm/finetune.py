"""LoRA fine-tuning through mlx-lm's Python API, with checkpoints that resume exactly.

The only module that imports `mlx_lm.tuner`. Training runs in `mlx_lm.tuner.trainer.train`
(mlx_lm 0.32.2); everything mlx-lm leaves out happens in a callback (`_Supervisor`) that it calls
after every step: NaN checks, validation, early stopping, the best and the last adapter,
checkpoints holding the optimizer state and step, the progress bar and the MLflow metrics.

Layout of `params.adapter_dir` (the latest run of a params file; MLflow keeps every run's copy):
    adapters.safetensors, adapter_config.json   the run's adapter: best validation loss
    last/                                        the adapter after the last step
    checkpoint/                                  adapter + optimizer state + trainer_state.json
Each folder loads with `mlx_lm.load(model, adapter_path=...)` / `tuner.utils.load_adapters`.

LoRA scale: mlx-lm multiplies the adapter's output by `scale`; tablora's `lora_alpha` follows the
PEFT convention, scale = lora_alpha / lora_rank (mlx-lm's default scale 20 = alpha 160 at rank 8).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner import trainer as mlx_trainer
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from helpers import config, data, tracking
from helpers.config import EVALS_PER_EPOCH, Params, ParamsError
from helpers.contract import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    ARTIFACT_ADAPTERS,
    ARTIFACT_ADAPTERS_LAST,
    TAG_MODEL_NAME,
    TAG_SEED,
    TAG_STILL_IMPROVING,
    TAG_STOPPED_EARLY,
    TRAIN_STEPS,
)
from helpers.llm import fast_training
from helpers.llm.batches import Batches, steps_per_epoch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
LAST_DIR = "last"
CHECKPOINT_DIR = "checkpoint"
# Written into every adapter folder tablora creates: only a folder holding it is ever cleared.
OUTPUT_MARKER = ".tablora-output.json"
# What this module writes into an adapter folder (anything else there is not tablora's).
OUTPUT_NAMES = (ADAPTER_FILE, ADAPTER_CONFIG, LAST_DIR, CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.tmp",
                f"{CHECKPOINT_DIR}.old", OUTPUT_MARKER)

# "Still improving": training ended by its budget while the last validation loss was the best
# so far and at least this fraction below the one before it.
STILL_IMPROVING = 0.01


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class _EarlyStop(Exception):
    """Raised from the callback to leave mlx-lm's loop when validation stopped improving."""


@dataclass
class TrainResult:
    """What a training run produced (the notebook's summary and the evaluation's input)."""

    run_id: str
    adapter_dir: Path  # best validation loss (= last without validation data)
    last_dir: Path
    steps: int  # iterations done, including those before a resume
    final_train_loss: float  # mean of the last `steps_per_report` steps
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    still_improving: bool  # ended by the budget while validation loss was still falling
    tokens_per_sec: float
    train_seconds: float  # wall time of all training legs, validation and checkpoints included
    trainable_parameters: int
    resumed_from: int  # 0 for a fresh run
    pruned: bool = False  # stopped by the on_eval hook (a search's pruner), not by its budget

    def summary(self) -> dict[str, Any]:
        """A flat dict of the key figures."""
        return {"run_id": self.run_id, "steps": self.steps,
                "final_train_loss": round(self.final_train_loss, 4),
                "best_val_loss": None if self.best_val_loss is None
                else round(self.best_val_loss, 4),
                "best_step": self.best_step, "stopped_early": self.stopped_early,
                "still_improving": self.still_improving,
                "tokens_per_sec": round(self.tokens_per_sec, 1),
                "train_seconds": round(self.train_seconds, 1),
                "trainable_parameters": self.trainable_parameters,
                "adapter_dir": str(self.adapter_dir)}


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """mlx-lm's train() does not seed: MLX (LoRA init, dropout), numpy and Python."""
    mx.random.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _mlx_seed(seed: int, step: int) -> int:
    # MLX's key cannot be saved and restored, so it is re-seeded at every checkpoint from (seed,
    # step): a resumed run then draws the same dropout masks as one that never stopped.
    return (seed * 1_000_003 + step) % 2**32


def check_num_layers(model: nn.Module, params: Params) -> None:
    """Refuse, before training, more LoRA blocks than the model has."""
    n = len(model.layers)
    if params.num_layers > n:
        where = f"{params.source_file}: " if params.source_file else ""
        raise ParamsError(f"{where}num_layers={params.num_layers} but the model has {n} layers "
                          f"({params.model_id}): use num_layers <= {n}, or -1 for all of them")


def lora_config(params: Params) -> dict[str, Any]:
    """mlx-lm's `lora_parameters` (scale = alpha / rank, see the module docstring)."""
    cfg: dict[str, Any] = {"rank": params.lora_rank, "scale": params.lora_scale,
                           "dropout": params.lora_dropout}
    if params.lora_keys:
        cfg["keys"] = list(params.lora_keys)
    return cfg


def add_lora(model: nn.Module, params: Params) -> int:
    """Freeze the model, put LoRA on its top `num_layers` blocks; returns the trainable count."""
    check_num_layers(model, params)
    if any(isinstance(m, LoRALinear) for _, m in model.named_modules()):
        raise RuntimeError("the model already has LoRA layers (it was trained before): load it "
                           "again with helpers.llm.models.load before training")
    model.freeze()
    linear_to_lora_layers(model, params.num_layers, lora_config(params))
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> int:
    return int(sum(v.size for _, v in tree_flatten(model.trainable_parameters())))


def adapter_config(params: Params, **extra: Any) -> dict[str, Any]:
    """adapter_config.json as mlx-lm's load_adapters reads it (plus where it came from)."""
    return {"fine_tune_type": "lora", "num_layers": params.num_layers,
            "lora_parameters": lora_config(params), "model": params.model_id,
            "tablora_params": params.name, **extra}


def total_steps(params: Params, n_train: int) -> int:
    """The training budget in iterations: num_iters, or num_epochs passes over n_train rows
    (batches of batch_size, the remainder dropped: helpers.llm.batches.steps_per_epoch)."""
    key, value = params.budget
    if key == "num_iters":
        return int(value)
    return max(1, math.ceil(value * steps_per_epoch(n_train, params.batch_size)))


def eval_every(params: Params, n_train: int) -> int:
    """Validation interval in steps: steps_per_eval, or EVALS_PER_EPOCH times an epoch."""
    if params.steps_per_eval:
        return params.steps_per_eval
    return max(1, steps_per_epoch(n_train, params.batch_size) // EVALS_PER_EPOCH)


def learning_rate_schedule(params: Params, steps: int | None = None) -> Any:
    """A constant or cosine-decayed learning rate, with an optional linear warm-up.

    `steps`: the resolved budget (total_steps; num_iters when not given). Steps count optimizer
    updates (iterations / grad_accumulation_steps); the optimizer's own step counter drives
    it, so a resumed run continues where the schedule stopped.
    """
    lr = params.learning_rate
    steps = steps or params.budget[1]
    updates = max(int(steps) // params.grad_accumulation_steps, 1)
    warmup = params.warmup_steps
    if params.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(updates - warmup, 1))
    elif warmup:
        main = optim.linear_schedule(lr, lr, 1)  # constant, as a schedule to join
    else:
        return lr
    if not warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(params: Params, steps: int | None = None) -> optim.Optimizer:
    # Adam, as mlx-lm's default: LoRA's few parameters need no weight decay.
    return optim.Adam(learning_rate=learning_rate_schedule(params, steps))


def load_datasets(prepared: Any, tokenizer: Any, params: Params) -> tuple[Any, Any]:
    """The train and valid splits of `prepared.data_dir` as mlx-lm chat datasets. Not the test
    split: mlx-lm's load_local_dataset reads test.jsonl too, and training never looks at it."""
    import types

    cfg = types.SimpleNamespace(mask_prompt=params.mask_prompt)
    train_set, valid_set = (_split_dataset(Path(prepared.data_dir) / f"{name}.jsonl",
                                           tokenizer, cfg) for name in ("train", "valid"))
    if len(train_set) < params.batch_size:
        raise ParamsError(f"the train split has {len(train_set)} rows but batch_size="
                          f"{params.batch_size}: lower batch_size")
    valid = CacheDataset(valid_set) if len(valid_set) >= params.batch_size else None
    if valid is None and len(valid_set):
        warnings.warn(f"the valid split has {len(valid_set)} rows, fewer than batch_size="
                      f"{params.batch_size}: training without validation", stacklevel=2)
    return CacheDataset(train_set), valid


def _split_dataset(path: Path, tokenizer: Any, cfg: Any) -> Any:
    rows = data.read_jsonl(path) if path.is_file() else []
    return create_dataset(rows, tokenizer, cfg) if rows else []


# --------------------------------------------------------------------------- checkpoints


def save_adapter(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / ADAPTER_FILE), weights)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")


def save_checkpoint(out: Path, model: nn.Module, optimizer: optim.Optimizer,
                    config: dict[str, Any], state: dict[str, Any]) -> None:
    """Adapter, optimizer state and trainer state, swapped in whole (a crash keeps the old one)."""
    tmp, final, old = (out / f"{CHECKPOINT_DIR}.tmp", out / CHECKPOINT_DIR,
                       out / f"{CHECKPOINT_DIR}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, config)
    mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint folder, trainer state) in `out`, or None."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):  # .old: a crash between the swaps
        path = out / name / STATE_FILE
        if path.is_file():
            return path.parent, json.loads(path.read_text())
    return None


def restore_checkpoint(folder: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Adapter weights into `model` (already with LoRA layers) and the optimizer state."""
    model.load_weights(list(mx.load(str(folder / ADAPTER_FILE)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
    mx.eval(model.parameters(), optimizer.state)


def claim_output_dir(out: Path, params: Params) -> None:
    """Make `out` a folder tablora owns (its marker file), or refuse: a folder that already holds
    files is used only when tablora made it. (An adapter folder of an older tablora, inside
    runs/ and holding nothing but adapter files, is adopted.)"""
    marker = out / OUTPUT_MARKER
    if marker.is_file():
        return
    if out.is_file():
        raise ParamsError(f"output_dir {out}: is a file; output_dir must be a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    legacy = (entries and set(entries) <= set(OUTPUT_NAMES)
              and out.resolve().is_relative_to(config.RUNS_DIR.resolve()))
    if entries and not legacy:
        where = f" (from {params.source_file})" if params.source_file else ""
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ParamsError(f"output_dir {out}{where}: the folder already holds files that tablora "
                          f"did not write ({shown}); tablora writes and deletes adapters only in "
                          f"folders it created (they hold {OUTPUT_MARKER}). Set output_dir to a "
                          "new or empty folder, or leave it empty for runs/adapters/<name>.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"written_by": "tablora", "params": params.name,
                                  "contents": list(OUTPUT_NAMES[:-1])}, indent=1) + "\n")


def _clear_outputs(out: Path) -> None:
    """Remove an earlier run's adapters from `out` (only the files this module writes, and only
    in a folder tablora created: claim_output_dir first)."""
    if not (out / OUTPUT_MARKER).is_file():
        raise RuntimeError(f"{out}: not a tablora output folder (no {OUTPUT_MARKER}): not cleared")
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        (out / name).unlink(missing_ok=True)
    for name in (LAST_DIR, CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.tmp", f"{CHECKPOINT_DIR}.old"):
        shutil.rmtree(out / name, ignore_errors=True)


# --------------------------------------------------------------------------- the callback


def _progress_bar(total: int, initial: int):
    from helpers.llm.scoring import tqdm_class

    return tqdm_class()(total=total, initial=initial, desc="train", unit="step",
                        dynamic_ncols=True)


class _Supervisor(TrainingCallback):
    """Called by mlx-lm after every step: checks, validation, checkpoints, progress, MLflow."""

    def __init__(self, *, model, optimizer, params: Params, out: Path, valid, loss, batches,
                 state: dict[str, Any], total: int, every: int,
                 on_eval: Callable[[int, int, float], bool] | None = None):
        self.model, self.optimizer, self.params, self.out = model, optimizer, params, out
        self.on_eval = on_eval  # see train()
        self.total, self.every = total, every  # the budget and validation interval, in steps
        self.valid, self.loss, self.batches = valid, loss, batches
        self.state = state  # what a checkpoint stores (see _fresh_state)
        self.offset = state["step"]  # mlx-lm counts iterations from 1 on every call
        self.logger = tracking.TrainingLogger(state["run_id"])
        self.recent = collections.deque(state["recent_losses"], maxlen=params.steps_per_report)
        self.bar = _progress_bar(total, self.offset)
        self._tokens_seen = 0
        self._tick = time.perf_counter()

    # mlx-lm's hook: after step `iteration` (counted from 1 in this call of train()).
    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        step = self.offset + int(info["iteration"])
        seconds = time.perf_counter() - self._tick
        loss = float(info["train_loss"])
        tokens = self.batches.train_tokens - self._tokens_seen
        self._tokens_seen = self.batches.train_tokens
        tps = tokens / seconds if seconds > 0 else 0.0
        self.logger.on_train_loss_report({**info, "iteration": step, "tokens_per_second": tps})
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(loss, step))
        st = self.state
        self.recent.append(loss)
        st["step"], st["recent_losses"] = step, list(self.recent)
        if int(info["iteration"]) > 1:  # the first step of a leg includes compiling: not counted
            st["step_seconds"] += seconds
            st["step_tokens"] += tokens
        # One refresh per step (a papermill log shows each refresh as a line).
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        self.bar.update(1)
        p = self.params
        if step % p.steps_per_report == 0 or step == self.total:
            self.bar.write(f"step {step:>5}/{self.total}  train_loss {np.mean(self.recent):.4f}"
                           f"  lr {float(info['learning_rate']):.2e}  {tps:,.0f} tok/s")
        self._after_step(step)
        self._tick = time.perf_counter()

    def _after_step(self, step: int) -> None:
        p = self.params
        last = step == self.total
        if self.valid is not None and (step % self.every == 0 or last):
            val = self.validate(step)
            n_eval = len(self.state["val_losses"]) - 1  # evaluation 0 is the base model
            if self.on_eval is not None and self.on_eval(step, n_eval, val) and not last:
                self.state["pruned"] = True
                self.bar.write(f"stopped at step {step} by the search's pruner (val_loss "
                               f"{val:.4f} at evaluation {n_eval})")
                raise _EarlyStop
        stop = (p.early_stopping_patience > 0
                and self.state["evals_since_best"] >= p.early_stopping_patience)
        self.state["stopped_early"] = stop and not last
        if step % p.grad_accumulation_steps == 0 and (step % p.save_every == 0 or last or stop):
            self.checkpoint(step)
        if stop and not last:
            self.bar.write(f"early stopping at step {step}: val_loss has not improved for "
                           f"{p.early_stopping_patience} evaluations (best "
                           f"{self.state['best_val_loss']:.4f} at step {self.state['best_step']})")
            raise _EarlyStop

    def validate(self, step: int) -> float:
        p = self.params
        tic = time.perf_counter()
        val = mlx_trainer.evaluate(model=self.model, dataset=self.valid, batch_size=p.batch_size,
                                   num_batches=p.val_batches, max_seq_length=p.max_seq_length,
                                   loss=self.loss, iterate_batches=self.batches)
        self.model.train()  # evaluate() left it in eval mode (no dropout)
        seconds = time.perf_counter() - tic
        self._tick = time.perf_counter()  # validation time is not step time
        self.logger.on_val_loss_report({"iteration": step, "val_loss": val})
        st = self.state
        if st["best_val_loss"] is None or val < st["best_val_loss"]:
            st["best_val_loss"], st["best_step"], st["evals_since_best"] = val, step, 0
            save_adapter(self.model, self.out, adapter_config(p, step=step, val_loss=val))
        else:
            st["evals_since_best"] += 1
        st.setdefault("val_losses", []).append(val)
        self.bar.write(f"step {step:>5}/{self.total}  val_loss {val:.4f}  (best "
                       f"{st['best_val_loss']:.4f} at step {st['best_step']}; {seconds:.1f}s)")
        return val

    def checkpoint(self, step: int) -> None:
        self.state["train_seconds"] = _elapsed(self.state)
        saved = {k: v for k, v in self.state.items() if not k.startswith("_")}
        save_checkpoint(self.out, self.model, self.optimizer,
                        adapter_config(self.params, step=step), saved)
        mx.random.seed(_mlx_seed(self.params.seed, step))

    def _diverged_message(self, loss: float, step: int) -> str:
        p = self.params
        return (f"training loss became {loss} at step {step}: the learning rate "
                f"{p.learning_rate:g} is too high for LoRA scale {p.lora_scale:g} "
                f"(lora_alpha {p.lora_alpha:g} / lora_rank {p.lora_rank}). Lower learning_rate "
                f"(e.g. {p.learning_rate / 10:g}) or lora_alpha, or add warmup_steps.")

    def close(self) -> None:
        self.bar.close()


def _elapsed(state: dict[str, Any]) -> float:
    return state["_seconds_before"] + time.perf_counter() - state["_started"]


def _fresh_state(params: Params, run_id: str, total: int) -> dict[str, Any]:
    return {"step": 0, "run_id": run_id, "seed": params.seed, "params_hash": params.hash(),
            "num_iters": total, "best_val_loss": None, "best_step": None,
            "evals_since_best": 0, "stopped_early": False, "recent_losses": [], "val_losses": [],
            "step_seconds": 0.0, "step_tokens": 0, "train_seconds": 0.0}


# --------------------------------------------------------------------------- train


class _QuietMlxConsole:
    """Silence mlx-lm's own progress display while train() runs: ours replaces it."""

    def __enter__(self):
        from mlx_lm.cli_ui import make_console

        self.console = make_console()
        self.was = self.console.quiet, self.console.is_jupyter
        self.console.quiet = True
        # In a notebook rich would also display a widget and route stderr into it, our progress
        # bar included: the saved notebook then showed a stale bar ("6/32") beside the final one.
        self.console.is_jupyter = False

    def __exit__(self, *exc):
        self.console.quiet, self.console.is_jupyter = self.was


def train(model: nn.Module, tokenizer: Any, prepared: Any, params: Params, *,
          loss: Any = None, batches: Batches | None = None,
          on_eval: Callable[[int, int, float], bool] | None = None) -> TrainResult:
    """LoRA-fine-tune `model` on `prepared` inside the active MLflow run; returns the result.

    A checkpoint of this same run in `params.adapter_dir` (a run started again with its run_id)
    is resumed: weights, optimizer state, step, best val loss and MLflow steps continue. `loss`
    and `batches` replace mlx-lm's default_loss and the batch iterator (same signatures).
    `on_eval(step, evaluation number, val_loss)` is called after each validation (not the one
    of the base model at step 0); when it returns True training stops there, as early stopping
    does, with `pruned` set (a search's pruner: helpers.workflow.tune).
    One training at a time writes into an adapter folder: a second one is refused.
    """
    if getattr(prepared, "multiclass", False):
        from helpers.llm import scoring

        scoring.check_answers(tokenizer, prepared)  # before any step
    with _output_lock(params.adapter_dir):
        return _train(model, tokenizer, prepared, params, loss=loss, batches=batches,
                      on_eval=on_eval)



@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `out` (a file beside it), released when training ends however."""
    try:
        with tracking.file_lock(out.parent / f".{out.name}.lock", wait=False):
            yield
    except tracking.LockHeld:
        raise ParamsError(f"output_dir {out}: another training run is writing its adapters "
                          "there right now; wait for it, or give this run its own "
                          "output_dir (or name).") from None


def _train(model: nn.Module, tokenizer: Any, prepared: Any, params: Params, *,
           loss: Any = None, batches: Batches | None = None,
           on_eval: Callable[[int, int, float], bool] | None = None) -> TrainResult:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("finetune.train needs an active MLflow run (tracking.run(...))")
    run_id = active.info.run_id
    check_num_layers(model, params)
    if params.save_every % params.grad_accumulation_steps:
        raise ParamsError(f"save_every={params.save_every} must be a multiple of "
                          f"grad_accumulation_steps={params.grad_accumulation_steps}: a "
                          "checkpoint mid-accumulation would lose the partial gradient")
    train_set, valid = load_datasets(prepared, tokenizer, params)

    seed_everything(params.seed)
    n_trainable = add_lora(model, params)
    total, every = total_steps(params, len(train_set)), eval_every(params, len(train_set))
    optimizer = build_optimizer(params, total)
    out = params.adapter_dir
    claim_output_dir(out, params)
    state = _resume_or_start(out, run_id, model, optimizer, params, total)
    resumed_from = state["step"]
    _tag_run(params, n_trainable, total)

    fast = loss is None and batches is None and params.fast_training
    if fast:
        # Same losses and gradients as mlx-lm's default path, less work (llm.fast_training).
        batches = fast_training.FastTraining(model, seed=params.seed, skip=state["step"])
        loss = batches.loss
    loss = loss or mlx_trainer.default_loss
    batches = batches or Batches(seed=params.seed, skip=state["step"])
    remaining = total - state["step"]
    # Wall time so far: earlier legs (from the checkpoint) + this one.
    state["_seconds_before"], state["_started"] = state["train_seconds"], time.perf_counter()
    if remaining > 0 and not state["stopped_early"] and not state.get("pruned"):
        try:
            _run_trainer(model, optimizer, train_set, valid, params, out, loss, batches, state,
                         remaining, total, every, on_eval)
        except fast_training.FastPathUnsupported:
            if not fast:
                raise
            # Checked on the first batch, before any update: the plain path starts clean.
            warnings.warn("this architecture is not supported by the fast training path: "
                          "using mlx-lm's default loss (set fast_training: false to skip the "
                          "check)", stacklevel=2)
            _run_trainer(model, optimizer, train_set, valid, params, out,
                         mlx_trainer.default_loss, Batches(seed=params.seed, skip=state["step"]),
                         state, remaining, total, every, on_eval)
    return _finish(model, params, out, state, run_id, n_trainable, resumed_from)


def _resume_or_start(out: Path, run_id: str, model, optimizer, params: Params,
                     total: int) -> dict:
    """The trainer state: restored from this run's checkpoint in `out`, or a fresh one."""
    import mlflow

    found = read_checkpoint(out)
    if found and found[1].get("run_id") == run_id:
        folder, state = found
        restore_checkpoint(folder, model, optimizer)
        mx.random.seed(_mlx_seed(params.seed, state["step"]))
        print(f"resuming run {run_id} from its checkpoint at step {state['step']} ({folder})")
        return state
    if "train_loss" in mlflow.get_run(run_id).data.metrics:
        warnings.warn(f"run {run_id} has trained before but {out} holds no checkpoint of it: "
                      "training again from step 0 (steps already in its curves are not logged "
                      "again)", stacklevel=3)
    _clear_outputs(out)
    return _fresh_state(params, run_id, total)


def _run_trainer(model, optimizer, train_set, valid, params, out, loss, batches, state,
                 remaining, total, every, on_eval=None) -> None:
    (out / LAST_DIR).mkdir(parents=True, exist_ok=True)
    args = mlx_trainer.TrainingArgs(
        batch_size=params.batch_size, iters=remaining, val_batches=params.val_batches,
        steps_per_report=1,  # a report per step: per-step metrics and an immediate NaN stop
        steps_per_eval=remaining + 1, steps_per_save=remaining + 1,  # done by the callback
        max_seq_length=params.max_seq_length,
        adapter_file=str(out / LAST_DIR / ADAPTER_FILE),
        grad_accumulation_steps=params.grad_accumulation_steps)
    sup = _Supervisor(model=model, optimizer=optimizer, params=params, out=out, valid=valid,
                      loss=loss, batches=batches, state=state, total=total, every=every,
                      on_eval=on_eval)
    if valid is not None and state["step"] == 0:
        sup.validate(0)  # the starting point of the curve (the base model)
    try:
        with _QuietMlxConsole():
            # val_dataset=None: validation runs in the callback, after the step it describes.
            mlx_trainer.train(model=model, optimizer=optimizer, train_dataset=train_set,
                              val_dataset=None, args=args, loss=loss, iterate_batches=batches,
                              training_callback=sup)
    except _EarlyStop:
        pass
    finally:
        sup.close()


def _tag_run(params: Params, n_trainable: int, total: int) -> None:
    import mlflow

    run = mlflow.get_run(mlflow.active_run().info.run_id)
    tags = {TAG_SEED: str(params.seed)}
    if TAG_MODEL_NAME not in run.data.tags:  # a batch sets it without the seed suffix
        tags[TAG_MODEL_NAME] = params.name
    mlflow.set_tags(tags)
    # The budget in steps (num_epochs resolved): a metric, since a resumed run logs it again.
    mlflow.log_metrics({"trainable_parameters": n_trainable, TRAIN_STEPS: total})


def still_improving(state: dict[str, Any]) -> bool:
    """Ended by the budget (not early stopping) while the last validation loss was the best so
    far and clearly below the one before it: more steps would likely have helped."""
    vals = state.get("val_losses") or []
    if state["stopped_early"] or state.get("pruned") or len(vals) < 2:
        return False
    return vals[-1] <= min(vals) and vals[-1] < vals[-2] * (1 - STILL_IMPROVING)


def _finish(model, params, out, state, run_id, n_trainable, resumed_from) -> TrainResult:
    """Save the last adapter, make sure a best one exists, log both and the summary metrics."""
    import mlflow

    state["train_seconds"] = _elapsed(state)
    step = state["step"]
    save_adapter(model, out / LAST_DIR, adapter_config(params, step=step))
    if state["best_step"] is None:  # no validation data: the last adapter is the run's adapter
        save_adapter(model, out, adapter_config(params, step=step))
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        mlflow.log_artifact(str(out / name), artifact_path=ARTIFACT_ADAPTERS)
        mlflow.log_artifact(str(out / LAST_DIR / name), artifact_path=ARTIFACT_ADAPTERS_LAST)
    tps = state["step_tokens"] / state["step_seconds"] if state["step_seconds"] else 0.0
    recent = state["recent_losses"]
    final_loss = float(np.mean(recent)) if recent else float("nan")
    summary = {"train_seconds": state["train_seconds"], "final_train_loss": final_loss,
               "iterations": step}
    if tps:
        # Logged at the last step after the per-step values, so it is the run's headline figure.
        mlflow.log_metric("tokens_per_sec", tps, step=step)
    if state["best_val_loss"] is not None:
        summary.update(best_val_loss=state["best_val_loss"], best_val_step=state["best_step"])
    mlflow.log_metrics(summary)
    improving = still_improving(state)
    mlflow.set_tags({TAG_STOPPED_EARLY: str(state["stopped_early"]).lower(),
                     TAG_STILL_IMPROVING: str(improving).lower()})
    if improving:
        vals = state["val_losses"]
        warnings.warn(f"training stopped at its budget ({step} steps) while validation loss was "
                      f"still falling ({vals[-2]:.4f} -> {vals[-1]:.4f} at the last two "
                      "evaluations): this model may be under-trained. Raise num_epochs (or "
                      "num_iters); early stopping ends training once it stops improving.",
                      stacklevel=3)
    return TrainResult(run_id=run_id, adapter_dir=out, last_dir=out / LAST_DIR, steps=step,
                       final_train_loss=final_loss, best_val_loss=state["best_val_loss"],
                       best_step=state["best_step"], stopped_early=state["stopped_early"],
                       still_improving=improving, tokens_per_sec=tps,
                       train_seconds=state["train_seconds"],
                       trainable_parameters=n_trainable, resumed_from=resumed_from,
                       pruned=bool(state.get("pruned")))


# --------------------------------------------------------------------------- reading back


def loss_history(run_id: str) -> Any:
    """train_loss and val_loss of a run as a long DataFrame (step, metric, value)."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient()
    rows = [{"step": m.step, "metric": key, "value": m.value}
            for key in ("train_loss", "val_loss") for m in client.get_metric_history(run_id, key)]
    frame = pd.DataFrame(rows, columns=["step", "metric", "value"])
    return frame.sort_values(["metric", "step"]).reset_index(drop=True)
