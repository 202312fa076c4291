"""Make MLX's Linux CPU backend use an optimized BLAS.

MLX's Linux CPU wheel bundles the reference BLAS (~3 GFLOP/s float32 GEMM here, against ~130 for
OpenBLAS). Loading a library that exports the standard `cblas_*` symbols with RTLD_GLOBAL *before*
mlx is imported makes MLX's calls resolve to it. `make setup` installs Debian's
libopenblas0-pthread where it can; TABLORA_BLAS=/path/to/lib.so picks another one (e.g. MKL's
libmkl_rt.so), TABLORA_BLAS=reference keeps MLX's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import sys
import warnings

log = logging.getLogger(__name__)

CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libmkl_rt.so",
]

# What ensure_blas() found: a path, "reference" (MLX's bundled one) or "accelerate" (macOS).
active: str | None = None
_lib: ctypes.CDLL | None = None  # the library loaded, for its thread-count functions


def _venv_candidates() -> list[str]:
    # The `mkl` wheel puts libmkl_rt.so.* in <prefix>/lib.
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


def _openblas_coretype() -> str:
    """A kernel family for OpenBLAS builds too old to recognise this CPU.

    Debian 12's OpenBLAS 0.3.21 does not know recent Xeons and falls back to its slowest generic
    ("Prescott") kernels: 5-13 GFLOP/s instead of 100+. The CPU flags tell which kernels are safe.
    """
    try:
        flags = set(open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return ""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return ""


def _load(path: str) -> ctypes.CDLL:
    # OpenBLAS picks its kernels when it is loaded: set the core type for that moment only, unless
    # the user chose one (numpy's own, newer OpenBLAS must not be affected).
    coretype = "" if "OPENBLAS_CORETYPE" in os.environ else _openblas_coretype()
    if coretype and "openblas" in os.path.basename(path):
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        if coretype and "openblas" in os.path.basename(path):
            os.environ.pop("OPENBLAS_CORETYPE", None)


def ensure_blas() -> str:
    """Load an optimized BLAS globally (Linux only, once). Returns what is active."""
    global active, _lib
    if active is not None:
        return active
    if sys.platform != "linux":
        active = "accelerate"  # macOS builds of MLX use Apple's Accelerate/Metal already.
        return active
    choice = os.environ.get("TABLORA_BLAS", "")
    if choice == "reference":
        active = "reference"
        return active
    if "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before helpers: MLX keeps its slow reference BLAS. "
                      "Import helpers first.", stacklevel=2)
    for path in ([choice] if choice else CANDIDATES + _venv_candidates()):
        if path and os.path.exists(path):
            try:
                lib = _load(path)
                lib.cblas_sgemm  # noqa: B018 - raises AttributeError if the symbol is missing
            except (OSError, AttributeError) as e:
                log.debug("cannot use %s as BLAS: %s", path, e)
                continue
            active, _lib = path, lib
            return active
    active = "reference"
    warnings.warn(
        "No optimized BLAS found: MLX's CPU backend will use its bundled reference BLAS, about "
        "40x slower. Install one with `make setup` (Debian/Ubuntu: apt-get install "
        "libopenblas0-pthread) or set TABLORA_BLAS to a library exporting cblas_sgemm.",
        stacklevel=2,
    )
    return active


def describe() -> str:
    """One line for logs: which BLAS MLX uses."""
    a = ensure_blas()
    if a == "reference":
        return "MLX BLAS: bundled reference BLAS (slow; see helpers.llm.blas)"
    if a == "accelerate":
        return "MLX BLAS: Apple Accelerate"
    return f"MLX BLAS: {a}"


def _thread_functions() -> tuple | None:
    """(get, set) of the loaded library's thread count (OpenBLAS or MKL), or None."""
    if _lib is None:
        return None
    for get, set_ in (("openblas_get_num_threads", "openblas_set_num_threads"),
                      ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
        try:
            return getattr(_lib, get), getattr(_lib, set_)
        except AttributeError:
            continue
    return None


def get_threads() -> int | None:
    """Threads the loaded BLAS runs a GEMM on (None: unknown, e.g. Accelerate)."""
    fns = _thread_functions()
    return int(fns[0]()) if fns else None


@contextlib.contextmanager
def threads(n: int):
    """Run the block with the BLAS on n threads per call, then restore the previous count.

    For several MLX CPU streams working at once: each stream's GEMMs then take a core of their
    own instead of all of them competing for every core. A no-op where the count is unknown.
    """
    fns = _thread_functions()
    if not fns:
        yield
        return
    before = int(fns[0]())
    fns[1](int(n))
    try:
        yield
    finally:
        fns[1](before)
