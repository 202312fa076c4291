"""Wall time and peak memory of each stage of the demo, to see where its time goes.

Runs the `tablora` sub-commands one after the other on the demo's params file, into a temporary
MLflow store (MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db) and a temporary adapter folder, so
the project's own runs are left alone:

    prepare    tablora prepare PARAMS
    baselines  tablora baselines PARAMS
    train      tablora train PARAMS
    evaluate   tablora evaluate PARAMS
    compare    tablora compare --experiment E --out <tmp>/report

A stage whose sub-command or notebook does not exist yet is skipped with a note. Peak memory is
the largest resident set of the stage's process tree (the CLI, papermill's kernel...), sampled
every 0.2 s with psutil, and the largest single process's ru_maxrss when the OS reports one.

    python bench/demo.py [--params FILE] [--set num_iters=10 ...] [--stages train evaluate]

Prints a table, then (when the stages ran) the fine-tuned LLM's figures the demo is judged by:
test accuracy with CI, ROC AUC, Brier, P(yes) interquartile range, exact McNemar against zero-shot
and against the best baseline; the last line is one JSON object {"stages": {name: {...}},
"total_seconds": ..., "quality": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "baselines", "train", "evaluate", "compare"]
# Stages run by a notebook: skipped while the notebook is not written yet.
NOTEBOOK = {"baselines": "baselines", "train": "train", "evaluate": "evaluate"}


def tablora() -> list[str]:
    exe = Path(sys.executable).with_name("tablora")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "helpers"]


def subcommands() -> set[str]:
    """The sub-commands this checkout's CLI has."""
    sys.path.insert(0, str(ROOT / "src"))
    from helpers.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps the sub-parsers here
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


def run_stage(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one command; wall seconds, exit code, peak tree RSS (MB), its output's last line."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tic = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(_rss(p) for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
    seconds = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB on Linux
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {"seconds": round(seconds, 1), "rc": proc.returncode,
            "peak_tree_rss_mb": round(peak / 2**20, 1),
            # ru_maxrss of the children is a running maximum: it tells only when it grew.
            "max_process_rss_mb": round(after / 1024, 1) if after > before else None,
            "last_line": lines[-1][:200] if lines else ""}


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:  # the process ended between listing and reading
        return 0


def judge(experiment: str) -> dict:
    """The fine-tuned LLM's test figures from the temporary store, and its paired tests."""
    import numpy as np

    from helpers.analysis import records, report

    c = report.build(records.load(experiment).records, experiment)
    llm = c.llms[0]
    p = llm.rows("test")["p_yes"].to_numpy(float)
    out = {"accuracy": llm.cell("accuracy"), "roc_auc": round(llm.value("roc_auc"), 4),
           "brier": round(llm.value("brier"), 4),
           "p_yes_iqr": round(float(np.subtract(*np.percentile(p, [75, 25]))), 3),
           "threshold": llm.threshold_text(), "floor": report.floor_cell(c, llm)}
    for t in c.zeroshot + [t for t in c.tests if t.family == report.VS_BASELINE]:
        if t.a is llm and t.test is not None:
            key = "vs_zeroshot" if t.family == report.ZEROSHOT else "vs_best_baseline"
            out[key] = t.text
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params" / "demo" / "smollm2-135m.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="passed to every stage (e.g. num_iters=10)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    ap.add_argument("--keep", action="store_true", help="keep the temporary store and logs")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tablora-bench-demo-"))
    # TABLORA_OUTPUT_ROOT: adapters may go to this temporary folder (outside the project's runs/).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PYTHONUNBUFFERED": "1", "TABLORA_OUTPUT_ROOT": str(tmp)}
    experiment = "bench-demo"
    sets = [f"experiment={experiment}", f"output_dir={tmp / 'adapters'}", *a.overrides]
    params_args = [str(a.params), *[x for s in sets for x in ("--set", s)]]
    have = subcommands()
    commands = {
        "prepare": ["prepare", *params_args],
        "baselines": ["baselines", *params_args],
        "train": ["train", *params_args],
        "evaluate": ["evaluate", *params_args],
        "compare": ["compare", "--experiment", experiment, "--out", str(tmp / "report")],
    }
    print(f"demo stages on {a.params} into {tmp} ({', '.join(a.overrides) or 'no overrides'})",
          flush=True)
    print(f"{'stage':<10}{'seconds':>9}{'peak MB':>9}{'rc':>4}  note", flush=True)
    results: dict[str, dict] = {}
    for stage in a.stages:
        nb = NOTEBOOK.get(stage)
        if stage not in have:
            results[stage] = {"skipped": f"`tablora {stage}` is not implemented yet"}
        elif nb and not (ROOT / "notebooks" / f"{nb}.ipynb").exists():
            results[stage] = {"skipped": f"notebooks/{nb}.ipynb does not exist yet"}
        else:
            results[stage] = run_stage(tablora() + commands[stage], env, tmp / f"{stage}.log")
        r = results[stage]
        if "skipped" in r:
            print(f"{stage:<10}{'-':>9}{'-':>9}{'-':>4}  skipped: {r['skipped']}", flush=True)
        else:
            note = "" if r["rc"] == 0 else f"FAILED: {r['last_line']} (log {tmp / stage}.log)"
            print(f"{stage:<10}{r['seconds']:>9.1f}{r['peak_tree_rss_mb']:>9.0f}{r['rc']:>4}  "
                  f"{note}", flush=True)
    ran = [r for r in results.values() if "seconds" in r]
    total = round(sum(r["seconds"] for r in ran), 1)
    print(f"{'total':<10}{total:>9.1f}  (load average {os.getloadavg()[0]:.1f} at the end)")
    quality = {}
    if all(r.get("rc", 0) == 0 for r in ran) and {"evaluate", "baselines"} <= set(results):
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        quality = judge(experiment)
        print("quality: " + ", ".join(f"{k} {v}" for k, v in quality.items()), flush=True)
    if not a.keep and all(r.get("rc", 0) == 0 for r in ran):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp} (logs, MLflow store)")
    print(json.dumps({"stages": results, "total_seconds": total, "quality": quality,
                      "failed": [k for k, r in results.items() if r.get("rc", 0) != 0],
                      "skipped": [k for k, r in results.items() if "skipped" in r]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
