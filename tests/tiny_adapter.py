"""A LoRA adapter for the tiny test model, trained for a few steps to answer "Yes"/"No".

The tiny model is random: untrained, its greedy output is noise and never parses. A few dozen
steps of LoRA on the chat-formatted answers (answer token and end-of-turn token) teach it the
answer format, which is all the scoring tests need. Saved the way mlx-lm saves adapters
(adapters.safetensors + adapter_config.json), so mlx_lm's load_adapters reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers  # noqa: F401 - loads the BLAS before mlx is first imported

ANSWER_WEIGHT = 3.0
LORA = {"rank": 8, "scale": 4.0, "dropout": 0.0}


def train_tiny_adapter(model_dir: Path, out: Path, messages: list[list[dict]],
                       steps: int = 40, lr: float = 1e-2, seed: int = 0,
                       num_layers: int | None = None) -> Path:
    """Fit a LoRA adapter on `messages` (each ending with the assistant's answer); returns out.

    steps=0 saves the freshly initialised adapter (LoRA B = 0: the base model's outputs).
    num_layers: LoRA on the top num_layers blocks (default all)."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model, tokenizer = mlx_lm.load(str(model_dir))
    model.freeze()
    num_layers = num_layers or len(model.layers)
    linear_to_lora_layers(model, num_layers, LORA)

    if steps > 0:
        _fit(model, tokenizer, messages, steps, lr)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": LORA}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _fit(model, tokenizer, messages: list[list[dict]], steps: int, lr: float) -> None:
    """Adam on the answer and end-of-turn tokens of each chat."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    # Each example: prompt tokens, then the answer and end-of-turn tokens that carry the loss.
    rows, starts = [], []
    for m in messages:
        prompt = tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True,
                                               tokenize=False)
        full = tokenizer.apply_chat_template(m, tokenize=False)
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        rows.append(tokenizer.encode(full, add_special_tokens=False))
        starts.append(len(p_ids))
    width = max(len(r) for r in rows)
    x = mx.array([r + [0] * (width - len(r)) for r in rows])
    pos = mx.arange(width - 1)[None]
    # Loss on the two tokens after the prompt: the answer word (weighted up: its probability is
    # split between Yes and No, and it must still beat <|im_end|>) and then <|im_end|>.
    start = mx.array(starts)[:, None]
    mask = ANSWER_WEIGHT * (pos == start - 1) + 1.0 * (pos == start)

    def loss_fn(model):
        logits = model(x[:, :-1])
        ce = nn.losses.cross_entropy(logits, x[:, 1:])
        return (ce * mask).sum() / mask.sum()

    opt = optim.Adam(learning_rate=lr)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        _, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
