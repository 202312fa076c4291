"""Make the tiny test model memorize a text: the positive control of the memorization tests.

Plain next-token training of every weight (Adam) on windows of the text that start at a line
boundary: the model learns to continue the text from any of its lines, as a model that read a
CSV file on the web would. Seeded; a few hundred steps of a 4-layer, 64-wide model take seconds.
"""

from __future__ import annotations

import numpy as np

import helpers  # noqa: F401 - loads the BLAS before mlx is first imported


def small_table(rows: int = 20, seed: int = 0) -> str:
    """A CSV text of `rows` rows and 3 columns of short numbers, the first column unique."""
    rng = np.random.default_rng(seed)
    firsts = rng.choice(np.arange(10, 100), size=rows, replace=False)
    lines = ["x,y,z"] + [f"{a},{rng.integers(10, 100) / 10:.1f},{rng.integers(100, 1000)}"
                         for a in firsts]
    return "\n".join(lines) + "\n"


def memorize(model, tokenizer, text: str, steps: int = 300, lr: float = 3e-3,
             warmup: int = 0, seed: int = 0) -> list[float]:
    """Train `model` in place on `text`; returns the loss of each step.

    Each batch holds the text as it is (the file read from its start), the text from a random
    line on (a model continues a file from anywhere), and twice its rows in a random order
    under the header: a table circulates in many orders (samples, heads, shuffles), and a model
    that saw it so recalls a row from the row itself, not only from the lines before it."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    header, *rows = text.splitlines(keepends=True)
    width = len(tokenizer.encode(text)) + 16  # one shape: the compiled step is traced once
    model.unfreeze()
    model.train()
    schedule = optim.cosine_decay(lr, steps - warmup, lr / 10)
    if warmup:
        schedule = optim.join_schedules([optim.linear_schedule(lr / 10, lr, warmup), schedule],
                                        [warmup])
    opt = optim.Adam(learning_rate=schedule)

    def loss_fn(model, x, y, mask):
        ce = nn.losses.cross_entropy(model(x), y) * mask
        return ce.sum() / mask.sum()

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def train_step(x, y, mask):
        loss, grads = grad_fn(model, x, y, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    train_step = mx.compile(train_step, inputs=state, outputs=state)
    losses = []
    for _ in range(steps):
        texts = [text, "".join(rows[rng.integers(len(rows) - 1):])] + [
            header + "".join(rows[i] for i in rng.permutation(len(rows))) for _ in range(2)]
        x = np.zeros((len(texts), width), dtype=np.int32)
        y = np.zeros((len(texts), width), dtype=np.int32)
        mask = np.zeros((len(texts), width), dtype=np.float32)
        for b, t in enumerate(texts):
            w = tokenizer.encode(t)[: width + 1]
            x[b, : len(w) - 1], y[b, : len(w) - 1], mask[b, : len(w) - 1] = w[:-1], w[1:], 1
        loss = train_step(mx.array(x), mx.array(y), mx.array(mask))
        mx.eval(state, loss)
        losses.append(loss.item())
    model.eval()
    return losses
