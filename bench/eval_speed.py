"""Evaluation speed on the embedded model: generation vs likelihood scoring, without and with the
shared-prefix KV cache, on the same test prompts in one run.

    .venv/bin/python bench/eval_speed.py [--n 64] [--batch-size 8] [--params FILE]

The modes take turns on chunks of the prompts (other processes' load then falls on all
of them alike); prefix caching works per chunk, as it does per split in evaluation. Prints a
table; the last line is JSON: generate_eps, logprob_eps, cached_eps (examples/s) and
speedup_vs_generate (cached / generate).

(e) and (f) score the same chunk with a LoRA adapter on the top --adapted-layers blocks (the
demo's num_layers; random weights: the cost does not depend on them), as the evaluation's
fine-tuned pass does: (e) the whole model, (f) from the states (c) left at the adapter's first
block (scoring.FrozenStates). finetuned_frozen_speedup = (f) / (e).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import blas as bench_blas  # bench/blas.py (this folder is on sys.path), not helpers.llm.blas
import numpy as np

from helpers import data
from helpers.config import DEMO_PARAMS, load_params
from helpers.llm import blas, lanes, models, scoring


def _joined(parts: list[scoring.Scores]) -> scoring.Scores:
    """One Scores from the chunks of one mode (times added up)."""
    cat = np.concatenate
    raw = sum((p.raw for p in parts), []) if parts[0].raw is not None else None
    return scoring.Scores(parts[0].mode, cat([p.p_yes for p in parts]),
                          cat([p.parsed for p in parts]), raw,
                          cat([p.logprob_yes for p in parts]), cat([p.logprob_no for p in parts]),
                          sum(p.seconds for p in parts),
                          min(p.prefix_tokens for p in parts))


def _adapted_copy(params, num_layers: int):
    """A second copy of the model with LoRA layers on its top `num_layers` blocks, their B
    matrices random (fresh LoRA has B = 0: the base model's outputs, which would hide a wrong
    take-over)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = models.load(params.model_id, params.dequantize)
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": params.lora_rank, "scale": 2.0,
                                              "dropout": 0.0})
    mx.random.seed(0)
    model.update(tree_unflatten([(k, 0.01 * mx.random.normal(v.shape))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    model.eval()
    mx.eval(model.parameters())
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(DEMO_PARAMS), help="params YAML (default: the demo)")
    ap.add_argument("--n", type=int, default=64, help="test prompts to score (default 64)")
    ap.add_argument("--batch-size", type=int, help="eval_batch_size (default: the params')")
    ap.add_argument("--chunk", type=int, default=16,
                    help="prompts per round of the three modes (default 16)")
    ap.add_argument("--adapted-layers", type=int,
                    help="LoRA blocks of (e) and (f) (default: the params' num_layers)")
    a = ap.parse_args(argv)

    overrides = {"eval_batch_size": a.batch_size} if a.batch_size else {}
    params = load_params(a.params, overrides)
    prepared = data.prepare(params)
    messages = prepared.messages("test", with_answer=False)
    if len(messages) < a.n:
        # Too few test rows: add validation rows so that every mode still sees n prompts.
        messages += prepared.messages("valid", with_answer=False)
    messages = messages[: a.n]
    model, tokenizer = models.load(params.model_id, params.dequantize)
    _, ids = scoring.encode_prompts(tokenizer, messages)
    adapted = _adapted_copy(params, a.adapted_layers or params.num_layers)
    n_blocks = len(model.model.layers)
    start = n_blocks - (a.adapted_layers or params.num_layers)

    # Warm-up: first calls allocate buffers and build kernels; keep that out of every timing.
    scoring.score(model, tokenizer, messages[:2], params, progress=False)
    scoring.score(model, tokenizer, messages[:1], params, mode="generate", progress=False)
    warm = scoring.FrozenStates(start)
    scoring.score(model, tokenizer, messages[:2], params, progress=False, frozen=warm)
    warm.replay_on(adapted)
    scoring.score(adapted, tokenizer, messages[:2], params, progress=False, frozen=warm)

    # The prompts in chunks, each scored by all three modes in a rotating order: load from other
    # processes that drifts over minutes then slows every mode alike.
    # (d) is (c) on the model's own mlx-lm forward on one stream: what the fast kernels and the
    # parallel CPU streams add (see helpers.llm.scoring.answer_logprobs).
    modes = {"generate": {"mode": "generate"}, "logprob": {"use_prefix_cache": False},
             "cached": {"use_prefix_cache": True},
             "cached_plain": {"use_prefix_cache": True, "fast": False, "lanes": 1}}
    runs: dict[str, list[scoring.Scores]] = {m: [] for m in [*modes, "adapted", "frozen"]}
    chunks = [messages[i: i + a.chunk] for i in range(0, len(messages), a.chunk)]
    gemm = 0.0  # MLX's float32 GEMM rate on all cores, best of the chunks (bench/blas.py)
    for k, part in enumerate(chunks):
        order = list(modes)[k % len(modes):] + list(modes)[: k % len(modes)]
        frozen = scoring.FrozenStates(start)  # (c) records the chunk's states at `start`
        for name in order:
            extra = {"frozen": frozen} if name == "cached" else {}
            runs[name].append(scoring.score(model, tokenizer, part, params, progress=False,
                                            **modes[name], **extra))
        frozen.replay_on(adapted)
        pair = ["adapted", "frozen"] if k % 2 == 0 else ["frozen", "adapted"]
        for name in pair:
            runs[name].append(scoring.score(adapted, tokenizer, part, params, progress=False,
                                            frozen=frozen if name == "frozen" else None))
        if frozen.hits != -(-len(part) // params.eval_batch_size):
            raise RuntimeError(f"(f) took over {frozen.hits} batches of the chunk, not all")
        gemm = max(gemm, bench_blas.gemm_gflops(1024, 2)[0])
        print(f"chunk {k + 1}/{len(chunks)}: " + ", ".join(
            f"{m} {runs[m][-1].examples_per_sec:.2f} ex/s" for m in runs)
            + f", GEMM {gemm:.0f} GFLOP/s", flush=True)
    gen, plain, cached, cached_plain, full_ft, frozen_ft = (_joined(runs[m]) for m in runs)
    ft_diff = float(np.max(np.abs(np.c_[full_ft.logprob_yes - frozen_ft.logprob_yes,
                                        full_ft.logprob_no - frozen_ft.logprob_no])))

    valid = gen.parsed >= 0
    # None (JSON null) when no generated answer parses: NaN is not valid JSON.
    agree = float(np.mean((cached.p_yes >= params.threshold)[valid] == (gen.parsed[valid] == 1))
                  ) if valid.any() else None
    both = {m: np.c_[s.logprob_yes, s.logprob_no] for m, s in
            (("plain", plain), ("cached", cached), ("cached_plain", cached_plain))}
    max_diff = max(float(np.max(np.abs(both[m] - both["cached"]))) for m in both)
    lengths = [len(x) for x in ids]
    n_lanes = lanes.default_lanes()
    # The matrix multiplies alone: 2 x the blocks' weights per token after the shared prefix
    # (a lower bound of the work: attention, norms, SwiGLU left out), at the GEMM rate just
    # measured: no scoring of these prompts in float32 on this machine can pass this.
    from mlx.utils import tree_flatten

    block_params = sum(v.size for layer in model.model.layers
                       for _, v in tree_flatten(layer.parameters()) if v.ndim == 2)
    flops = 2 * block_params * float(np.mean([n - cached.prefix_tokens for n in lengths]))
    bound_eps = gemm * 1e9 / flops
    load = os.getloadavg()[1]  # other processes compete for the CPUs: say how much
    print(f"\n{params.model_id} ({blas.describe()}; {os.cpu_count()} CPUs, load average "
          f"{load:.1f} over the last 5 minutes)")
    print(f"{len(ids)} prompts, {np.mean(lengths):.0f} tokens on average ({min(lengths)}-"
          f"{max(lengths)}), shared prefix {cached.prefix_tokens}+ tokens; batch "
          f"{params.eval_batch_size}, generation {params.max_new_tokens} new tokens; logprob: "
          f"fast path {scoring.fast_path_applies(model)}, {n_lanes} CPU stream(s)")
    print(f"{'mode':<40}{'seconds':>9}{'examples/s':>12}{'vs generate':>13}")
    rows = [("(a) generate + parse", gen), ("(b) logprob, batched", plain),
            ("(c) logprob, batched + prefix cache", cached),
            ("(d) (c) on mlx-lm's forward, 1 stream", cached_plain),
            (f"(e) (c) with LoRA on {n_blocks - start} blocks", full_ft),
            (f"(f) (e) from (c)'s states at block {start}", frozen_ft)]
    for name, s in rows:
        print(f"{name:<40}{s.seconds:>9.1f}{s.examples_per_sec:>12.2f}"
              f"{s.examples_per_sec / gen.examples_per_sec:>12.1f}x")
    agree_text = "-" if agree is None else f"{agree:.0%}"
    print(f"{'GEMM-bound: the matrix multiplies alone':<40}{len(ids) / bound_eps:>9.1f}"
          f"{bound_eps:>12.2f}{bound_eps / gen.examples_per_sec:>12.1f}x  "
          f"({flops / 1e9:.1f} GFLOP a prompt at {gemm:.0f} GFLOP/s)")
    print(f"generate: {valid.mean():.0%} of answers parse; logprob agrees with them on "
          f"{agree_text}; (b), (c) and (d) log-probs differ by at most {max_diff:.1e}; (e) and "
          f"(f) by {ft_diff:.1e}")
    result = {"generate_eps": round(gen.examples_per_sec, 3),
              "logprob_eps": round(plain.examples_per_sec, 3),
              "cached_eps": round(cached.examples_per_sec, 3),
              "speedup_vs_generate": round(cached.examples_per_sec / gen.examples_per_sec, 2),
              "cached_plain_eps": round(cached_plain.examples_per_sec, 3),
              "gemm_gflops": round(gemm, 1), "gemm_bound_eps": round(bound_eps, 3),
              "gemm_bound_speedup_vs_generate": round(bound_eps / gen.examples_per_sec, 2),
              "cached_fraction_of_gemm_bound": round(cached.examples_per_sec / bound_eps, 3),
              "n": len(ids), "mean_prompt_tokens": round(float(np.mean(lengths)), 1),
              "prefix_tokens": cached.prefix_tokens, "batch_size": params.eval_batch_size,
              "max_new_tokens": params.max_new_tokens, "generate_invalid_rate": gen.invalid_rate,
              "agreement_where_parsed": agree, "max_logprob_diff": max_diff,
              "finetuned_eps": round(full_ft.examples_per_sec, 3),
              "finetuned_frozen_eps": round(frozen_ft.examples_per_sec, 3),
              "finetuned_frozen_speedup": round(frozen_ft.examples_per_sec
                                                / full_ft.examples_per_sec, 2),
              "finetuned_frozen_max_diff": ft_diff, "adapted_layers": n_blocks - start,
              "load_avg_5m": round(load, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
