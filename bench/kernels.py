"""Element-wise kernels on MLX's CPU backend: MLX's own softmax / SwiGLU against the multiply-add
versions of helpers.llm.kernels, on the shapes of one SmolLM2 block (batch 8 x 128 tokens after a
48-token prefix), compiled as the fast paths run them.

    .venv/bin/python bench/kernels.py [--rounds 7]

The variants take turns, round after round; each figure is the best round. Prints a table; the
last line is JSON: milliseconds per call and nanoseconds per value of each variant, and
softmax_speedup / swiglu_speedup (MLX's / ours, both compiled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from helpers.llm import blas, kernels

blas.ensure_blas()

import mlx.core as mx  # noqa: E402
from mlx_lm.models.activations import swiglu  # noqa: E402

B, HEADS, L, PREFIX, HIDDEN = 8, 9, 128, 48, 1536  # SmolLM2-135M: 9 heads, MLP 1536 wide


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)

    mx.random.seed(0)
    scores = mx.random.normal((B, 3, HEADS // 3, L, PREFIX + L)) * 4
    bias = kernels.causal_bias(L, PREFIX)
    gate, up = mx.random.normal((B, L, HIDDEN)) * 3, mx.random.normal((B, L, HIDDEN))
    variants = {
        "mlx exp": (mx.exp, (scores,)),
        "mlx sigmoid": (mx.sigmoid, (gate,)),
        "mlx softmax": (mx.compile(lambda s: mx.softmax(s + bias, axis=-1)), (scores,)),
        "ours softmax": (mx.compile(lambda s: kernels._softmax(s + bias)), (scores,)),
        "mlx swiglu": (mx.compile(swiglu), (gate, up)),
        "ours swiglu": (mx.compile(kernels._swiglu), (gate, up)),
    }
    best = {k: float("inf") for k in variants}
    for fn, args in variants.values():
        mx.eval(fn(*args))  # compile and allocate outside the timings
    for _ in range(a.rounds):
        for name, (fn, args) in variants.items():
            t0 = time.perf_counter()
            mx.eval(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)

    print(f"{blas.describe()}; best of {a.rounds} rounds")
    print(f"{'kernel':<16}{'ms':>9}{'ns/value':>10}")
    result: dict[str, float] = {}
    for name, (_, args) in variants.items():
        ms, ns = 1e3 * best[name], 1e9 * best[name] / args[0].size
        print(f"{name:<16}{ms:>9.2f}{ns:>10.2f}")
        key = name.replace(" ", "_")
        result[f"{key}_ms"], result[f"{key}_ns_per_value"] = round(ms, 3), round(ns, 3)
    result["softmax_speedup"] = round(best["mlx softmax"] / best["ours softmax"], 2)
    result["swiglu_speedup"] = round(best["mlx swiglu"] / best["ours swiglu"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
