"""MLX's float32 GEMM speed on the CPU beside numpy's, in one run.

MLX's Linux CPU wheel bundles a reference BLAS; `import helpers` points it at an optimized one
(see helpers.llm.blas). This prints a table, then as its last line one JSON object:
{"mlx_gflops", "numpy_gflops", "ratio", "blas", ...} with the best GFLOP/s over the sizes.

--precisions also times, at a scoring-shaped product (1024 tokens x 576 -> 1536, SmolLM2-135M's
MLP), MLX's float32 matmul beside bfloat16, float16 and 8- and 4-bit quantized_matmul (group 32),
the JSON then carrying "precision_gflops": {name: GFLOP/s}: whether a lower precision would let
scoring pass float32's GEMM bound on this machine.

    python bench/blas.py [--sizes 512 1024] [--repeats 5] [--precisions]
"""

from __future__ import annotations

import argparse
import json
import time

import helpers  # noqa: F401 - first: loads the optimized BLAS before mlx is imported
from helpers.llm import blas


def best_seconds(fns: dict, repeats: int, rounds: int = 3) -> dict:
    """Best wall time of each function over `rounds` blocks of `repeats` calls.

    Blocks take turns, so that load from other processes on a shared machine hits both alike.
    Each block starts with a quarter second of untimed calls: the other library's BLAS threads
    keep spinning for a while after their last call, and would otherwise steal a core.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            warm_until = time.perf_counter() + 0.25
            while time.perf_counter() < warm_until:
                fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def gemm_gflops(n: int, repeats: int) -> tuple[float, float]:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = mx.array(a_np), mx.array(b_np)
    mx.eval(a, b)
    # mx.eval forces MLX's lazy matmul to run inside the timed region.
    best = best_seconds({"mlx": lambda: mx.eval(mx.matmul(a, b, stream=mx.cpu)),
                         "numpy": lambda: a_np @ b_np}, repeats)
    flops = 2 * n**3
    return flops / best["mlx"] / 1e9, flops / best["numpy"] / 1e9


def precision_gflops(repeats: int, m: int = 1024, k: int = 576, n: int = 1536) -> dict:
    """GFLOP/s of x [m, k] @ w.T [k, n] in MLX at each precision (the same values, cast or
    quantized), taking turns as best_seconds does."""
    import mlx.core as mx

    mx.random.seed(0)
    x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    fns = {}
    for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16),
                        ("float16", mx.float16)):
        xd, wd = x.astype(dtype), w.astype(dtype)
        mx.eval(xd, wd)
        fns[name] = lambda xd=xd, wd=wd: mx.eval(mx.matmul(xd, wd.T, stream=mx.cpu))
    for bits in (8, 4):
        wq, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        mx.eval(x, wq, scales, biases)
        fns[f"q{bits}"] = lambda wq=wq, s=scales, b=biases, bits=bits: mx.eval(
            mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=bits,
                                stream=mx.cpu))
    best = best_seconds(fns, repeats, rounds=1)
    return {name: 2 * m * k * n / sec / 1e9 for name, sec in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", action="store_true",
                        help="also time bfloat16, float16 and 8/4-bit quantized matmul")
    args = parser.parse_args()

    print(blas.describe())
    print(f"{'n':>6} {'MLX GFLOP/s':>12} {'numpy GFLOP/s':>14} {'ratio':>6}")
    rows = []
    for n in args.sizes:
        mlx_g, np_g = gemm_gflops(n, args.repeats)
        rows.append((n, mlx_g, np_g))
        print(f"{n:>6} {mlx_g:>12.1f} {np_g:>14.1f} {mlx_g / np_g:>6.2f}")
    # The best size for each: the peak each library reaches on this machine.
    mlx_best = max(r[1] for r in rows)
    numpy_best = max(r[2] for r in rows)
    extra = {}
    if args.precisions:
        gflops = precision_gflops(args.repeats)
        print(f"\n1024 x 576 -> 1536 in MLX: {'precision':<10} {'GFLOP/s':>8} {'x float32':>9}")
        for name, g in gflops.items():
            print(f"{'':<28}{name:<10} {g:>8.1f} {g / gflops['float32']:>9.3f}")
        extra["precision_gflops"] = {name: round(g, 2) for name, g in gflops.items()}
    print(json.dumps({
        "mlx_gflops": round(mlx_best, 1),
        "numpy_gflops": round(numpy_best, 1),
        "ratio": round(mlx_best / numpy_best, 3),
        "blas": blas.active,
        "sizes": args.sizes,
        **extra,
    }))


if __name__ == "__main__":
    main()
