"""Prediction speed beside evaluation's, on the embedded model: `tablora predict`'s path (read a
CSV of new rows, check the columns, serialize them with the logged recipe, score, apply the
threshold) against the evaluation's (the split's prompts, scored), on the same rows, in one run.

    .venv/bin/python bench/predict_speed.py [--n 1000] [--chunk 100] [--params FILE]

Rows: `n` rows drawn (with replacement when the table is smaller) from the table's features.
The two paths take turns on chunks of rows (other processes' load then falls on both alike).
Both score the base model (an adapter adds the same LoRA cost to both). The last line is JSON:
predict_eps, evaluate_eps (examples/s) and predict_vs_evaluate (their ratio), and
max_p_yes_diff (0: the same prompts and numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from helpers import contract, data
from helpers.config import DEMO_PARAMS, load_params
from helpers.llm import blas, models, scoring
from helpers.serving import predict, pyfunc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(DEMO_PARAMS), help="params YAML (default: the demo)")
    ap.add_argument("--n", type=int, default=1000, help="rows to score (default 1000)")
    ap.add_argument("--chunk", type=int, default=100,
                    help="rows per turn of the two paths (default 100)")
    a = ap.parse_args(argv)

    params = load_params(a.params)
    prepared = data.prepare(params)
    rng = np.random.default_rng(0)
    ids = rng.choice(prepared.table.index.to_numpy(), a.n, replace=a.n > len(prepared.table))
    rows = prepared.table.loc[ids, prepared.features].reset_index(drop=True)
    spec = pyfunc.spec_for(params, prepared, params.threshold, contract.THRESHOLD_FIXED)
    meta = spec.metadata()
    model, tokenizer = models.load(params.model_id, params.dequantize)
    classifier = pyfunc.LLMClassifier(spec, model, tokenizer)
    # The evaluation's prompts for the same rows: prepare()'s texts, by row id.
    messages = prepared.recipe.messages([prepared.user_texts[i] for i in ids])
    scoring.score(model, tokenizer, messages[:2], params, progress=False)  # warm-up

    secs = {"predict": 0.0, "evaluate": 0.0}
    p_yes: dict[str, list] = {"predict": [], "evaluate": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, start in enumerate(range(0, a.n, a.chunk)):
            part = rows.iloc[start: start + a.chunk]
            csv = Path(tmp) / f"chunk{k}.csv"
            part.to_csv(csv, index=False)
            for name in (["predict", "evaluate"] if k % 2 == 0 else ["evaluate", "predict"]):
                t0 = time.perf_counter()
                if name == "predict":
                    table = predict.read_rows(csv, meta)
                    s = classifier.score(table, origin=str(csv))
                    classifier.predictions(s)
                else:
                    s = scoring.score(model, tokenizer, messages[start: start + a.chunk], params,
                                      progress=False)
                secs[name] += time.perf_counter() - t0
                p_yes[name].append(s.p_yes)
            print(f"chunk {k + 1}: predict {secs['predict']:.1f}s, evaluate "
                  f"{secs['evaluate']:.1f}s so far", flush=True)
    diff = float(np.max(np.abs(np.concatenate(p_yes["predict"])
                               - np.concatenate(p_yes["evaluate"]))))
    eps = {k: a.n / v for k, v in secs.items()}
    load = os.getloadavg()[1]
    print(f"\n{params.model_id} ({blas.describe()}; {os.cpu_count()} CPUs, load average "
          f"{load:.1f} over the last 5 minutes); {a.n} rows in chunks of {a.chunk}, batch "
          f"{params.eval_batch_size}")
    print(f"{'path':<52}{'seconds':>9}{'examples/s':>12}")
    print(f"{'predict (CSV -> checks -> recipe -> score -> threshold)':<52}"
          f"{secs['predict']:>9.1f}{eps['predict']:>12.2f}")
    print(f"{'evaluate (prepared prompts -> score)':<52}{secs['evaluate']:>9.1f}"
          f"{eps['evaluate']:>12.2f}")
    print(f"P(yes) of the two paths differ by at most {diff:.1e}")
    print(json.dumps({"predict_eps": round(eps["predict"], 3),
                      "evaluate_eps": round(eps["evaluate"], 3),
                      "predict_vs_evaluate": round(eps["predict"] / eps["evaluate"], 3),
                      "max_p_yes_diff": diff, "n": a.n, "chunk": a.chunk,
                      "batch_size": params.eval_batch_size, "load_avg_5m": round(load, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
