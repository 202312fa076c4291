"""Wall time of the same three-file batch run sequentially and on a two-worker Dask LocalCluster.

    python bench/batch_scale.py [--rounds 1] [--workers 2] [--model tiny|builtin] [--iters 4]

Each round runs `tablora batch DIR --no-compare` (one model after another, in one process tree)
and `tablora batch DIR --no-compare --workers 2` (a LocalCluster of two single-threaded worker
processes started by the command, its start-up included), taking turns, each into a fresh SQLite
store of its own in a temporary folder. The batch: three params files (learning rate and LoRA
rank differ) plus the baselines of their one split, so four tasks.

--model tiny (default): the tests' tiny random llama, a few steps: a task is mostly kernel start,
imports, data preparation and MLflow logging. --model builtin: the embedded SmolLM2-135M, where
training and scoring dominate (minutes per model).

Prints a table; the last line is one JSON object: {"sequential_s", "workers_s", "ratio"
(sequential / cluster: > 1 means the cluster was faster), "cores", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("[mean radius, mean texture, mean perimeter, mean area, mean smoothness, "
            "mean compactness, mean concavity, mean concave points, mean symmetry, "
            "mean fractal dimension]")
MODELS = {"lr-low": "learning_rate: 1.0e-4\n", "lr-high": "learning_rate: 3.0e-4\n",
          "rank-8": "lora_rank: 8\nlora_alpha: 16\n"}


def tablora() -> list[str]:
    exe = Path(sys.executable).with_name("tablora")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "helpers"]


def model_id(kind: str, tmp: Path) -> str:
    if kind == "builtin":
        return "builtin:smollm2-135m-instruct"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import build_tiny_model

    return str(build_tiny_model(tmp / "tiny-llama"))


def write_params(folder: Path, model: str, iters: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "_defaults.yaml").write_text(
        f"experiment: batch-scale\nmodel_id: {model}\ndataset:\n  features: {FEATURES}\n"
        f"num_iters: {iters}\nbatch_size: 2\nnum_layers: 2\nlora_rank: 4\n"
        f"steps_per_report: 2\nsteps_per_eval: {iters}\nval_batches: 2\nsave_every: {iters}\n"
        "n_bootstrap: 100\nbaselines:\n  models: [majority, logistic_l2]\n  mode: fixed\n")
    for name, text in MODELS.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def run_batch(params: Path, workdir: Path, workers: int) -> dict:
    """One `tablora batch`, in a store and runs folder of its own; wall seconds, exit code."""
    workdir.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
           "TABLORA_RUNS": str(workdir / "runs"), "TABLORA_CACHE": str(workdir / "cache"),
           "HF_HUB_OFFLINE": "1"}
    cmd = [*tablora(), "batch", str(params), "--no-compare"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    with open(workdir / "batch.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              cwd=workdir).returncode
    seconds = time.perf_counter() - t0
    lines = (workdir / "batch.log").read_text(errors="replace").splitlines()
    summary = next((ln for ln in lines if "models succeeded" in ln), "")
    if code != 0:  # the temporary folder goes away: keep why in the output
        at = next((i for i, ln in enumerate(lines) if ln.startswith("failures (")), len(lines))
        print("\n".join(lines[at:at + 10] or lines[-20:]), flush=True)
    return {"seconds": seconds, "code": code, "summary": summary.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", choices=["tiny", "builtin"], default="tiny")
    ap.add_argument("--iters", type=int, default=4, help="training steps per model")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tablora-batch-scale-"))
    try:
        params = write_params(tmp / "params", model_id(a.model, tmp), a.iters)
        # Untimed: the first import of these fills the OS file cache; whichever mode ran first
        # would pay for it.
        subprocess.run([sys.executable, "-c", "import helpers.workflow.batch, mlflow, mlx.core, "
                        "mlx_lm, papermill, sklearn, distributed"], check=True)
        results: dict[str, list[dict]] = {"sequential": [], "workers": []}
        for r in range(a.rounds):
            for mode in ("sequential", "workers") if r % 2 == 0 else ("workers", "sequential"):
                res = run_batch(params, tmp / f"{mode}-{r}", a.workers if mode == "workers" else 0)
                results[mode].append(res)
                print(f"round {r} {mode:<10} {res['seconds']:7.1f}s  exit {res['code']}  "
                      f"{res['summary']}", flush=True)
        failed = [m for m, rs in results.items() for x in rs if x["code"] != 0]
        seq = min(x["seconds"] for x in results["sequential"])
        par = min(x["seconds"] for x in results["workers"])
        print(f"\n{'mode':<28} {'best wall s':>11}\n{'sequential':<28} {seq:>11.1f}\n"
              f"{f'LocalCluster, {a.workers} workers':<28} {par:>11.1f}\n"
              f"ratio sequential / cluster: {seq / par:.2f} on {os.cpu_count()} cores"
              + (f"\nFAILED runs in: {sorted(set(failed))} (see {tmp})" if failed else ""))
        print(json.dumps({"bench": "batch_scale", "model": a.model, "iters": a.iters,
                          "tasks": len(MODELS) + 1, "workers": a.workers, "rounds": a.rounds,
                          "cores": os.cpu_count(), "sequential_s": round(seq, 1),
                          "workers_s": round(par, 1), "ratio": round(seq / par, 3),
                          "all_ok": not failed}))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
