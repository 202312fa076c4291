"""The `tablora` command (also `python -m helpers`): every sub-command, each a few calls into
helpers. The only module that reads command-line arguments or prints for the terminal's sake."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value (value read as YAML: 5 -> int, 1e-5 -> float via the params loader)."""
    import yaml

    from helpers.config import ParamsError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ParamsError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set num_iters=50")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {pair!r}: the value is not valid YAML ({e}); quote it, "
                              f"e.g. --set '{key.strip()}=\"{value}\"'") from None
    return out


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", type=Path, help="a params YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key (dotted for sections: dataset.test_size=0.3)")


def cmd_model(a: argparse.Namespace) -> int:
    from helpers.llm import models

    print(models.answer(a.model_id, prompt=a.prompt, max_tokens=a.max_tokens,
                        dequantize=a.dequantize))
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    """Split, write the prompts, print the token budget and one prompt of each class."""
    from helpers import data
    from helpers.config import load_params

    params = load_params(a.params, _overrides(a.overrides))
    prepared = data.prepare(params)
    print("\n".join(data.summary_lines(prepared)))
    try:
        from helpers.llm import models

        tokenizer = models.load_tokenizer(params.model_id)
    except Exception as e:  # noqa: BLE001 - no model: the rest of the report still stands
        print(f"prompt tokens: skipped (could not load the tokenizer of {params.model_id}: "
              f"{type(e).__name__}: {e})")
    else:
        s = data.token_stats(prepared, tokenizer, params.max_seq_length)
        print(f"prompt tokens: min {s['min']}  median {s['median']:.0f}  p95 {s['p95']:.0f}  "
              f"max {s['max']}  (max_seq_length {s['max_seq_length']}, "
              f"{s['over_max_seq_length']} over)  [{params.model_id}, chat template + answer]")
    print("\n" + "\n".join(data.example_lines(prepared)))
    return 0


def _notebook(name: str, a: argparse.Namespace, **extra: Any) -> int:
    from helpers.config import load_params
    from helpers.workflow import notebooks

    params = load_params(a.params, _overrides(a.overrides))  # the one parse: errors name the key
    notebooks.check_data(params)
    if a.run_id:  # resuming: first end the runs whose process was killed outright
        from helpers import tracking

        for rid in tracking.mark_stale_runs(tracking.setup(params.experiment)):
            print(f"run {rid}: its process is gone: marked KILLED")
        tracking.get_run(a.run_id)  # an unknown id: one line now, not after a kernel start
    res = notebooks.execute(name, params, run_id=a.run_id or "", **extra)
    print(f"{name}: done in {res.seconds:.0f}s; executed notebook: {res.output}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    return _notebook("train", a)


def cmd_evaluate(a: argparse.Namespace) -> int:
    return _notebook("evaluate", a, adapter=a.adapter or "")


def cmd_baselines(a: argparse.Namespace) -> int:
    return _notebook("baselines", a)


def cmd_batch(a: argparse.Namespace) -> int:
    from helpers.workflow import batch

    return batch.run(a.paths, seeds=a.seeds, only=a.only, resume=a.resume, dry_run=a.dry_run,
                     compare=not a.no_compare, cluster=a.cluster or "", workers=a.workers or 0)


def cmd_tune(a: argparse.Namespace) -> int:
    from helpers.workflow import tune

    result = tune.run(a.params, a.trials, timeout=a.timeout, out=a.out, storage=a.storage or "",
                      study=a.study or "", overrides=_overrides(a.overrides),
                      cluster=a.cluster or "", workers=a.workers or 0)
    print()
    print(result.text())
    return result.exit_code


def cmd_server(a: argparse.Namespace) -> int:
    from helpers.workflow import server

    return server.serve(db=a.db or "", host=a.host, port=a.port, artifacts=a.artifacts,
                        db_port=a.db_port or 0, workers=a.workers or 0,
                        allowed_hosts=a.allowed_hosts or "")


def cmd_compare(a: argparse.Namespace) -> int:
    from helpers.analysis import compare

    c = compare.run(a.experiment, a.batch, a.against, a.out)
    print(c.markdown)
    print(f"Report and figures: {c.out_dir}")
    return 0


def cmd_recommend(a: argparse.Namespace) -> int:
    from helpers.analysis import compare, recommend

    plan, written = compare.recommend_next(a.experiment, a.batch, a.out)
    print(recommend.summary(plan))
    print("Written: " + ", ".join(str(p) for p in written))
    folders = sorted({str(p.parent) for p in written if p.suffix == ".yaml"})
    if folders:
        print("Next round: tablora batch " + " ".join(folders))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tablora",
        description="LoRA-fine-tune LLMs on a tabular yes/no task and compare them, honestly, "
        "with classical baselines. Every run is logged to MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model", help="build/load a model and answer a prompt (smoke test)")
    p.add_argument("model_id", nargs="?", default="builtin:smollm2-135m-instruct")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dequantize", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("prepare", help="split the data, serialize prompts, print the budget")
    _add_params(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="LoRA fine-tune (runs notebooks/train.ipynb)")
    _add_params(p)
    p.add_argument("--run-id", help="continue this MLflow run (resume from its checkpoint)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate",
                       help="score zero-shot and fine-tuned (notebooks/evaluate.ipynb)")
    _add_params(p)
    p.add_argument("--run-id", help="the training run whose adapter to score (default: the "
                   "latest finished run named after the params file)")
    p.add_argument("--adapter", help="score this adapter directory instead")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baselines", help="fit the classical baselines (notebooks/baselines.ipynb)")
    _add_params(p)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("batch", help="run params files (or folders of them): train + evaluate "
                       "each, baselines once per split")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--resume", action="store_true",
                   help="skip models already FINISHED with identical params")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this model (repeatable)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (overrides the files)")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison at the end")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="tcp://HOST:8786",
                       help="run the models on this Dask scheduler's workers (started as `dask "
                       "worker tcp://HOST:8786 --nthreads 1 --resources model=1`)")
    where.add_argument("--workers", type=int, metavar="N",
                       help="run the models on N worker processes of this machine (a Dask "
                       "LocalCluster)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("tune", help="search the `tune:` section of a params file with Optuna "
                       "(TPE, pruning on validation loss); the best trial's params as a file")
    _add_params(p)
    p.add_argument("--trials", type=int, required=True, help="trials this command runs")
    p.add_argument("--timeout", help="start no trial after this long: seconds, or 90m, 2h")
    p.add_argument("--out", type=Path, help="folder for the best params file, the trials table "
                   "and the figures (default runs/tune/<study>)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by every command of "
                   "the study (default sqlite:///runs/tune/optuna.db; several machines: "
                   "postgresql+psycopg://user:pass@host:5432/optuna)")
    p.add_argument("--study", help="the study's name (default <params name>-<hash of the params "
                   "and the search>: the same command joins the same study)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="tcp://HOST:8786",
                       help="run the trials on this Dask scheduler's workers")
    where.add_argument("--workers", type=int, metavar="N",
                       help="run the trials on N worker processes of this machine")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("server", help="a shared MLflow tracking server over PostgreSQL, "
                       "artifacts proxied (for batches on several machines)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (0.0.0.0: reachable from other machines)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--db", metavar="URL", help="a PostgreSQL database, e.g. "
                   "postgresql+psycopg://user:pass@host:5432/mlflow (default: a cluster of "
                   "its own in .cache/server/postgres, made and started here)")
    p.add_argument("--db-port", type=int, help="port of that own cluster (default: free)")
    p.add_argument("--artifacts", type=Path,
                   help="where the server keeps artifacts (default .cache/server/artifacts)")
    p.add_argument("--workers", type=int, help="server worker processes (MLflow's default: 4)")
    p.add_argument("--allowed-hosts", help="Host headers to accept beyond localhost and "
                   "private IPs, e.g. mlflow.lab.example:5000 (MLflow's --allowed-hosts)")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("compare", help="tables, statistics and plots from the MLflow runs")
    p.add_argument("--experiment", default="tablora")
    p.add_argument("--batch", help="only the runs of this batch id (default: all)")
    p.add_argument("--against", help="an earlier batch id or experiment to compare with")
    p.add_argument("--out", type=Path, help="folder for the report and figures")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("recommend", help="diagnose the runs and write next-round params files")
    p.add_argument("--experiment", default="tablora")
    p.add_argument("--batch", help="only the runs of this batch id (default: all)")
    p.add_argument("--out", type=Path, required=True, help="folder for the next round's files")
    p.set_defaults(func=cmd_recommend)

    debug_help = "on an error, show its traceback (also TABLORA_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for p in sub.choices.values():  # after the sub-command too: tablora train X --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def user_error(e: BaseException) -> str | None:
    """The one-line message of a known error (contract.USER_ERRORS), raised here or inside a
    notebook's kernel; None for any other exception (a bug: it keeps its traceback)."""
    from helpers.contract import USER_ERRORS
    from helpers.workflow.notebooks import NotebookFailed

    if isinstance(e, NotebookFailed):
        message = e.evalue if e.ename in USER_ERRORS else None
    elif any(cls.__name__ in USER_ERRORS for cls in type(e).__mro__):
        message = str(e)
    else:
        return None
    return " ".join(message.split()) if message is not None else None


def _kernel_traceback(e: BaseException) -> str:
    """The traceback a notebook's kernel printed (without its colours), for --debug and bugs."""
    lines = getattr(e, "traceback", None)
    if not isinstance(lines, list) or not lines:
        return ""
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TABLORA_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Known errors carry a message written for the user: that line alone, exit 2. Others
        # (and every error with --debug) get their traceback, the kernel's first.
        message = user_error(e)
        if message is None or debug:
            kernel = _kernel_traceback(e)
            if kernel:
                print(f"the notebook's kernel raised:\n{kernel}\n", file=sys.stderr)
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
