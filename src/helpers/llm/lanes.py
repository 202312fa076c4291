"""CPU lanes: forward passes spread over one MLX stream per core.

MLX's CPU backend runs a stream's element-wise kernels on one thread, so with one stream a core
idles outside the matrix multiplies. Scoring and the frozen-prefix pass of training run batches
side by side on `cpu_lanes(n)` streams, with the BLAS on cores / n threads meanwhile.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import mlx.core as mx

MAX_LANES = 4  # CPU streams working side by side (see default_lanes)


def cpu_cores() -> int:
    """Cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def default_lanes() -> int:
    """How many MLX streams forward-only work is spread over: one per core (at most MAX_LANES)
    on the CPU, 1 on a GPU. MLX runs a stream's element-wise kernels on one thread, so with one
    stream a core idles outside the GEMMs (see cpu_lanes)."""
    return min(cpu_cores(), MAX_LANES) if mx.default_device() == mx.cpu else 1


_LANE_STREAMS: list[Any] = []  # CPU streams made so far: each holds a thread, so reuse them


def lane_streams(lanes: int) -> list[Any]:
    """`lanes` CPU streams (made once and reused); one lane: the default stream. The BLAS is left
    as it is: see cpu_lanes, or lane_blas while the work runs."""
    if lanes <= 1:
        return [mx.default_stream(mx.default_device())]
    while len(_LANE_STREAMS) < lanes:
        _LANE_STREAMS.append(mx.new_stream(mx.cpu))
    return _LANE_STREAMS[:lanes]


def lane_blas(lanes: int):
    """The BLAS on cpu_cores() // lanes threads (restored after); a no-op for one lane."""
    if lanes <= 1:
        return contextlib.nullcontext()
    from helpers.llm import blas

    return blas.threads(max(1, cpu_cores() // lanes))


@contextlib.contextmanager
def cpu_lanes(lanes: int):
    """`lanes` streams to run forward passes side by side on, the BLAS on cpu_cores() // lanes
    threads meanwhile (restored after), so that each lane's GEMMs keep to their share of the
    cores. One lane: the default stream, the BLAS untouched."""
    with lane_blas(lanes):
        yield lane_streams(lanes)
