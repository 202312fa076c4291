"""helpers.llm.blas: MLX on an optimized BLAS, and a thread count that is always restored."""

from __future__ import annotations

import sys

import pytest

import helpers  # noqa: F401 - loads the BLAS before mlx
from helpers.llm import blas


def test_an_optimized_blas_is_loaded_on_linux():
    active = blas.ensure_blas()
    assert blas.ensure_blas() == active  # idempotent: loaded once per process
    if sys.platform == "linux":
        assert active != "reference", blas.describe()  # make setup installs OpenBLAS
    assert blas.describe().startswith("MLX BLAS: ")


def test_threads_are_restored_even_on_error():
    before = blas.get_threads()
    if before is None:
        pytest.skip("this BLAS does not report its thread count")
    with pytest.raises(RuntimeError), blas.threads(1):
        assert blas.get_threads() == 1
        raise RuntimeError("inside")
    assert blas.get_threads() == before


def test_mlx_matmul_is_right_on_this_blas():
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(48, 32)).astype(
        np.float32)
    np.testing.assert_allclose(np.asarray(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4,
                               atol=1e-4)
