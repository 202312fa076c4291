"""helpers.llm.batches: one batch order for every training path, resumable to the batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from helpers.llm import batches


def test_length_groups_sort_by_length_and_drop_the_remainder():
    lengths = [5, 1, 4, 2, 3]
    groups = batches.length_groups(5, 2, lengths.__getitem__)
    assert groups == [[1, 3], [4, 2]]  # lengths (1, 2), (3, 4); the longest row left over
    assert batches.steps_per_epoch(5, 2) == 2 and batches.steps_per_epoch(1, 4) == 1
    with pytest.raises(ValueError, match="lower batch_size"):
        batches.length_groups(3, 4, lengths.__getitem__)


def test_batch_order_is_seeded_per_epoch_and_resumes():
    whole = list(itertools.islice(batches.batch_order(4, seed=7, loop=True), 12))
    assert sorted(whole[:4]) == sorted(whole[4:8]) == [0, 1, 2, 3]  # every batch once an epoch
    assert whole[:4] != whole[4:8] or whole[4:8] != whole[8:12]  # epochs reshuffle
    resumed = list(itertools.islice(batches.batch_order(4, seed=7, skip=5, loop=True), 7))
    assert resumed == whole[5:]
    assert list(batches.batch_order(4, seed=7)) == list(batches.batch_order(4, seed=7))


class _Rows:
    """A stand-in for mlx-lm's CacheDataset: (tokens, answer offset) per row."""

    def __init__(self, lengths):
        self.rows = [(list(range(1, n + 1)), n - 2) for n in lengths]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def itemlen(self, i):
        return len(self.rows[i][0])


def test_batches_skip_resumes_the_same_stream():
    rows = _Rows([5, 9, 7, 12, 3, 8, 6, 10, 4])  # 4 batches of 2 per epoch

    def stream(skip, n):
        it = batches.Batches(seed=3, skip=skip)(rows, 2, 16, loop=True)
        return [np.array(next(it)[0]).tolist() for _ in range(n)]

    full = stream(0, 10)
    assert stream(6, 4) == full[6:]  # across an epoch boundary
    assert full[:4] != full[4:8]  # each epoch has its own order
