"""MLX's float32 GEMM speed on the CPU beside numpy's, in one run.

MLX's Linux CPU wheel bundles a reference BLAS; `import helpers` points it at an optimized one
(see helpers.llm.blas). This prints a table, then as its last line one JSON object:
{"mlx_gflops", "numpy_gflops", "ratio", "blas", ...} with the best GFLOP/s over the sizes.

    python bench/blas.py [--sizes 512 1024] [--repeats 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
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
    print(json.dumps({
        "mlx_gflops": round(mlx_best, 1),
        "numpy_gflops": round(numpy_best, 1),
        "ratio": round(mlx_best / numpy_best, 3),
        "blas": blas.active,
        "sizes": args.sizes,
    }))


if __name__ == "__main__":
    main()
