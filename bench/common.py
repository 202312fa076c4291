"""What several benchmarks share. The bench folder is not a package: each script runs as
`python bench/<name>.py`, which puts this folder on sys.path, so `import common` (and `import
blas`, `import peer`) finds these files."""

from __future__ import annotations

import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(threads: int) -> None:
    """BLAS / OpenMP threads for this process and its children: call before numpy, MLX or
    PyTorch start their pools (before importing them). Also keeps Hugging Face offline."""
    for var in BLAS_THREAD_VARS:
        os.environ[var] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
