"""helpers.llm.lanes: forward passes side by side on CPU streams, the BLAS shared fairly."""

from __future__ import annotations

import numpy as np

import helpers  # noqa: F401 - loads the BLAS before mlx
from helpers.llm import blas, lanes


def test_default_lanes_is_one_per_core_at_most_max():
    import mlx.core as mx

    n = lanes.default_lanes()
    if mx.default_device() == mx.cpu:
        assert n == min(lanes.cpu_cores(), lanes.MAX_LANES)
    else:
        assert n == 1


def test_lanes_give_the_same_result_and_restore_the_blas():
    import mlx.core as mx

    before = blas.get_threads()
    x = mx.array(np.random.default_rng(0).normal(size=(4, 64, 64)).astype(np.float32))
    want = np.asarray(mx.softmax(x @ x, axis=-1))
    with lanes.cpu_lanes(2) as streams:
        assert len(streams) == 2
        if before is not None:
            assert blas.get_threads() == max(1, lanes.cpu_cores() // 2)
        parts = []
        for i, stream in enumerate(streams):
            with mx.stream(stream):
                part = x[2 * i:2 * i + 2]
                parts.append(mx.softmax(part @ part, axis=-1))
        mx.eval(parts)
    np.testing.assert_allclose(np.concatenate([np.asarray(p) for p in parts]), want, atol=1e-5)
    assert blas.get_threads() == before
    with lanes.cpu_lanes(2) as again:  # streams are reused: each one holds a thread
        assert again == streams
    with lanes.cpu_lanes(1) as one:
        assert len(one) == 1
