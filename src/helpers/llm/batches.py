"""Training batches: which rows go together, and in which order, for every training path.

One order for both the mlx-lm path (`Batches`, mlx-lm's own padding) and the fast path
(helpers.llm.fast_training.FastTraining): rows grouped by length into batches (a remainder
smaller than a batch is dropped, as mlx-lm does), training epoch e in the order of
numpy.random.default_rng([seed, e]) with the first `skip` batches passed over (a resumed run
continues the very same sequence), validation in the fixed order of default_rng(seed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import mlx.core as mx
import numpy as np

# mlx-lm pads each batch to 1 + a multiple of this (its own rule, kept for identical batches).
PAD_TO = 32


def length_groups(n: int, batch_size: int, length: Callable[[int], int]) -> list[list[int]]:
    """Row indices sorted by `length`, cut into batches of batch_size (the remainder dropped)."""
    if n < batch_size:
        raise ValueError(f"a split has {n} rows but batch_size={batch_size}: lower batch_size")
    idx = sorted(range(n), key=length)
    return [idx[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def batch_order(n_batches: int, seed: int, skip: int = 0, loop: bool = False) -> Iterator[int]:
    """Batch indices: one fixed pass (loop=False: validation), or endless epochs (training)."""
    if not loop:
        yield from (int(i) for i in np.random.default_rng(seed).permutation(n_batches))
        return
    epoch, pos = divmod(skip, n_batches)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n_batches)
        yield from (int(i) for i in order[pos:])
        epoch, pos = epoch + 1, 0


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Batches in one pass over n_rows (the remainder is dropped, as in length_groups)."""
    return max(n_rows // batch_size, 1)


class Batches:
    """mlx-lm's `iterate_batches`, made resumable and countable.

    Same batches as mlx-lm (rows sorted by length, grouped, padded to 1 + a multiple of 32), but
    the training order comes from a generator of its own keyed by (seed, epoch) rather than
    numpy's global state, so that `skip` batches can be passed over on resume and the rest come
    out exactly as in an uninterrupted run. Validation batches come in one fixed order. Counts
    the real (unpadded) tokens of the training batches for tokens/s.
    """

    def __init__(self, seed: int = 0, skip: int = 0):
        self.seed = seed
        self.skip = skip
        self.train_tokens = 0
        self._warned = False

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None,
                 comm_group=None):
        if comm_group is not None and comm_group.size() > 1:
            raise NotImplementedError("tablora trains on one machine (no distributed groups)")
        groups = length_groups(len(dataset), batch_size, dataset.itemlen)
        for i in batch_order(len(groups), self.seed, self.skip, loop):
            batch, lengths = self._collate(dataset, groups[i], max_seq_length)
            if loop:
                self.train_tokens += int(lengths[:, 1].sum().item())
            yield batch, lengths

    def _collate(self, dataset, rows: list[int], max_seq_length: int) -> tuple[mx.array, mx.array]:
        items = [dataset[j] for j in rows]  # (tokens, offset of the answer)
        lengths = [min(len(tokens), max_seq_length) for tokens, _ in items]
        if max(len(t) for t, _ in items) > max_seq_length and not self._warned:
            self._warned = True
            warnings.warn(f"some sequences are longer than max_seq_length={max_seq_length} "
                          "tokens and are truncated (their answer may be cut off)", stacklevel=2)
        width = min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), max_seq_length)
        arr = np.zeros((len(items), width), np.int32)
        for j, ((tokens, _), n) in enumerate(zip(items, lengths, strict=True)):
            arr[j, :n] = tokens[:n]
        offsets = [offset for _, offset in items]
        return mx.array(arr), mx.array(list(zip(offsets, lengths, strict=True)))
