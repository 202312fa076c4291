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
        if prepared.multiclass:  # refused here already, not after a model has loaded
            from helpers.llm import scoring

            firsts = scoring.check_answers(tokenizer, prepared)
            print("answers:     " + ", ".join(
                f"{w!r} (first token {tokenizer.decode([t])!r})"
                for w, t in zip(prepared.class_answers, firsts, strict=True)))
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
                     compare=not a.no_compare, cluster=a.cluster or "", workers=a.workers or 0,
                     memcheck=a.memcheck)


def cmd_curve(a: argparse.Namespace) -> int:
    from helpers.workflow import curve

    return curve.run(a.params, sizes=a.sizes, seeds=a.seeds, resume=a.resume,
                     dry_run=a.dry_run, cluster=a.cluster or "", workers=a.workers or 0)
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

    if a.curve:
        from helpers.analysis import curve

        c = curve.run(a.experiment, a.curve, a.out)
        print(c.markdown)
        print(f"Curve report and figure: {c.out_dir}")
        return 0
    c = compare.run(a.experiment, a.batch, a.against, a.out)
    print(c.markdown)
    print(f"Report and figures: {c.out_dir}")
    return 0


def cmd_memcheck(a: argparse.Namespace) -> int:
    """Has the model seen this table? The tests, their chance level and the verdict per text."""
    from helpers.config import load_params
    from helpers.llm import memcheck

    params = load_params(a.params, _overrides(a.overrides))
    settings = memcheck.Settings(rows=a.rows, prefix_rows=a.prefix_rows, seed=params.seed)
    for result, run_id in memcheck.run(params, a.text, settings):
        table = result.table
        print(f"\n{params.model_id} on {table.origin} [{table.name}]: "
              f"{len(table.lines) - 1} rows, held-out column {result.feature_column!r}, "
              f"{result.seconds:.0f}s; MLflow run {run_id}")
        print("\n".join(result.lines()))
        print(f"verdict: {params.model_id} "
              + (f"has memorized this table ({', '.join(result.flagged)}): its results on it "
                 "may be inflated" if result.flagged else
                 "shows no memorization of this table (every test at chance level)"))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    """Score new rows with a run's (or a registered) model; a CSV out, one summary line."""
    from helpers.serving import predict

    result = predict.predict(a.csv, run_id=a.run or "", model=a.model or "", out=a.out)
    if a.out is None:
        print(result.frame.to_csv(index=False), end="")
        print(predict.summary_line(result), file=sys.stderr)
    else:
        print(predict.summary_line(result))
        print(f"written: {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from helpers.serving import export

    out = export.export(a.run, a.out, dequantize=not a.keep_quantized)
    print(f"fused model: {out} (mlx_lm.load({str(out)!r}), or model_id: {out} in a params file)")
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


def cmd_params(a: argparse.Namespace) -> int:
    """The params keys, from helpers.config's schema and its comments."""
    from helpers.config import ParamsError, key_docs, tune_key_docs

    docs = [d for d in key_docs() + tune_key_docs()
            if not a.words or any(w in d.key for w in a.words)]
    if not docs:
        raise ParamsError(f"no params key contains {', '.join(map(repr, a.words))}: "
                          "`tablora params` lists them all")
    print({"text": _params_text, "markdown": _params_markdown, "yaml": _params_yaml}[a.format](
        docs))
    return 0


def _show(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, str) else (
        str(value).lower() if isinstance(value, bool) else json.dumps(value, default=str))


def _params_text(docs: list[Any]) -> str:
    import textwrap

    out = []
    for d in docs:
        kind = re.sub(r"a list of an? (\w+)", r"a list of \1s", d.type)  # of integers
        out.append(f"{d.key}  ({kind}; default {_show(d.default)})")
        text = d.doc + (f" Allowed: {d.allowed}." if d.allowed else "")
        out.extend(textwrap.wrap(text, 92, initial_indent="    ", subsequent_indent="    "))
    out.append("\nSet them in a params YAML (sections nested: `dataset:` then `  target: y`), or "
               "with --set KEY=VALUE.")
    return "\n".join(out)


def _params_markdown(docs: list[Any]) -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for d in docs:
        text = d.doc + (f" Allowed: {d.allowed}." if d.allowed else "")
        rows.append(f"| `{d.key}` | `{_show(d.default)}` | {text.replace('|', '/')} |")
    return "\n".join(rows)


def _params_yaml(docs: list[Any]) -> str:
    import textwrap

    import yaml

    out = ["# A tablora params file with every key at its default (`tablora params --format "
           "yaml`)."]
    section = ""
    for d in docs:
        if "<" in d.key:  # a placeholder (tune.<param>), not a key to write
            continue
        head, _, key = d.key.rpartition(".")
        if head != section:
            out.append(f"{head}:")
            section = head
        indent = "  " if head else ""
        text = d.doc + (f" Allowed: {d.allowed}." if d.allowed else "")
        out.extend(textwrap.wrap(text, 96, initial_indent=f"{indent}# ",
                                 subsequent_indent=f"{indent}# "))
        value = yaml.safe_dump({key: d.default}, default_flow_style=True, width=10_000)
        out.append(indent + value.strip()[1:-1])
    return "\n".join(out)


def _add_where(p: argparse.ArgumentParser, what: str, cluster_note: str = "") -> None:
    """--cluster or --workers: where a multi-run command's tasks run (helpers.workflow.executor);
    neither: one after another in this process."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="tcp://HOST:8786",
                       help=f"run the {what} on this Dask scheduler's workers{cluster_note}")
    where.add_argument("--workers", type=int, metavar="N",
                       help=f"run the {what} on N worker processes of this machine (a Dask "
                       "LocalCluster)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Epilogues as written (the examples, one a line); each option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.required or action.default is argparse.SUPPRESS
                or action.default in (None, False, [])):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            return f"{text} (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tablora")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


PARAMS_HELP = "a params YAML file (its folder's _defaults.yaml is merged under it)"


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", type=Path, help=PARAMS_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, repeatable; dotted for sections "
                   "(dataset.test_size=0.3); `tablora params` lists the keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tablora", formatter_class=_Formatter,
        description="LoRA-fine-tune LLMs on a tabular yes/no task and compare them, honestly, "
        "with classical baselines. Every run is logged to MLflow.",
        epilog=_examples(
            "tablora batch params/demo            # the demo: baselines, fine-tune, compare",
            "tablora batch params/demo --dry-run  # the plan, nothing run",
            "tablora params lora                  # the params keys about LoRA",
            "tablora <command> --help             # each command's options and examples",
            "make ui / make lab                   # browse the runs / open the notebooks"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, examples: tuple[str, ...], **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=_Formatter, epilog=_examples(*examples), **kw)

    p = command("model", "build/load a model and answer a prompt (smoke test)", (
        "tablora model",
        "tablora model mlx-community/Llama-3.2-3B-Instruct-4bit --prompt 'Say yes.'",
        "tablora model path/to/mlx-model --max-tokens 8 --dequantize never"))
    p.add_argument("model_id", nargs="?", default="builtin:smollm2-135m-instruct",
                   help="a hub id (mlx-community/...), a local mlx-lm model folder, or a built-in "
                   "model")
    p.add_argument("--prompt", default="What is the capital of France?",
                   help="the user message to answer")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--dequantize", choices=["auto", "always", "never"], default="auto",
                   help="dequantize quantized weights to float32 (auto: on MLX's CPU backend, "
                   "where quantized matmuls are ~20x slower)")
    p.set_defaults(func=cmd_model)

    p = command("prepare", "split the data, serialize prompts, print the budget", (
        "tablora prepare params/demo/smollm2-135m.yaml",
        "tablora prepare my.yaml --set prompt.template=list --set dataset.test_size=0.3"))
    _add_params(p)
    p.set_defaults(func=cmd_prepare)

    p = command("train", "LoRA fine-tune (runs notebooks/train.ipynb)", (
        "tablora train params/demo/smollm2-135m.yaml",
        "tablora train my.yaml --set num_iters=200 --set learning_rate=1e-5",
        "tablora train my.yaml --run-id 0123abcd...   # resume from the last checkpoint"))
    _add_params(p)
    p.add_argument("--run-id", help="continue this MLflow run (resume from its checkpoint); "
                   "default: a new run")
    p.set_defaults(func=cmd_train)

    p = command("evaluate", "score zero-shot and fine-tuned (runs notebooks/evaluate.ipynb)", (
        "tablora evaluate params/demo/smollm2-135m.yaml",
        "tablora evaluate my.yaml --run-id 0123abcd...",
        "tablora evaluate my.yaml --adapter runs/adapters/my-model"))
    _add_params(p)
    p.add_argument("--run-id", help="the training run whose adapter to score (default: the "
                   "latest finished run named after the params file)")
    p.add_argument("--adapter", help="score this adapter folder instead (default: the run's)")
    p.set_defaults(func=cmd_evaluate)

    p = command("baselines", "fit the classical baselines (runs notebooks/baselines.ipynb)", (
        "tablora baselines params/demo/smollm2-135m.yaml",
        "tablora baselines my.yaml --set baselines.mode=fixed"))
    _add_params(p)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_baselines)

    p = command("batch", "run params files (or folders of them): train + evaluate each, "
                "baselines once per split, then compare", (
                    "tablora batch params/demo",
                    "tablora batch params/round1 --dry-run",
                    "tablora batch params/round1 --seeds 0,1,2 --only llama-3.2-3b",
                    "tablora batch params/round1 --resume   # after a crash or Ctrl-C"))
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="params files or folders of them (recursively; files starting with _, "
                   "such as _defaults.yaml, are not models)")
    p.add_argument("--resume", action="store_true",
                   help="skip models already FINISHED with identical params")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs, notebooks, splits) and exit; writes nothing")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this model (params name, run name or file name; repeatable)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: each file's "
                   "`seeds`, else its `seed`)")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison at the end")
    p.add_argument("--memcheck", action="store_true",
                   help="first check each model once per table for memorization (tablora "
                   "memcheck; a finished check is reused)")
    _add_where(p, "models", " (started as `dask worker tcp://HOST:8786 --nthreads 1 "
               "--resources model=1`)")
    p.set_defaults(func=cmd_batch)

    p = command("curve", "a learning curve: the LLM and the baselines trained on k rows of the "
                "training split, for each size k and seed, then the crossover", (
                    "tablora curve params/demo/smollm2-135m.yaml --sizes 8,32,128,all "
                    "--seeds 0,1",
                    "tablora curve my.yaml --dry-run      # the points and a time estimate",
                    "tablora curve my.yaml --resume       # after a crash or Ctrl-C",
                    "tablora compare --curve 20261130-180000-ab12   # its report again"))
    p.add_argument("params", type=Path, help="one params file (its curve.sizes and curve.seeds "
                   "are the defaults of --sizes and --seeds)")
    p.add_argument("--sizes", help="comma-separated training-set sizes, row counts and/or "
                   "'all', e.g. 8,32,128,all (default: the file's curve.sizes, else "
                   "8,16,32,64,128,256,all)")
    p.add_argument("--seeds", help="comma-separated seeds, each its own nested draw of rows, "
                   "e.g. 0,1,2 (default: the file's curve.seeds, else its seeds, else its seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted curve: finished points are kept, an "
                   "interrupted one continues from its checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the points and the time estimate and exit")
    _add_where(p, "points", " (as in `tablora batch`)")
    p.set_defaults(func=cmd_curve)
    p = command("tune", "search the `tune:` section of a params file with Optuna (TPE, pruning "
                "on validation loss); the best trial's params as a params file", (
                    "tablora tune params/demo/smollm2-135m.yaml --trials 8",
                    "tablora tune PARAMS.yaml --trials 20 --timeout 2h --workers 2",
                    "tablora tune PARAMS.yaml --trials 10 --storage "
                    "postgresql+psycopg://user:pass@db:5432/optuna   # on several machines"))
    _add_params(p)
    p.add_argument("--trials", type=int, required=True,
                   help="trials this command runs (0: none, only the study's results: the best "
                   "scored on test once, its params file, the figures)")
    p.add_argument("--timeout", help="start no trial after this long: seconds, or 90m, 2h")
    p.add_argument("--out", type=Path, help="folder for the best params file, the trials table "
                   "and the figures (default runs/tune/<study>)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by every command of "
                   "the study (default sqlite:///runs/tune/optuna.db; several machines: "
                   "postgresql+psycopg://user:pass@host:5432/optuna)")
    p.add_argument("--study", help="the study's name (default <params name>-<hash of the params "
                   "and the search>: the same command joins the same study)")
    _add_where(p, "trials")
    p.set_defaults(func=cmd_tune)

    p = command("server", "a shared MLflow tracking server over PostgreSQL, artifacts proxied "
                "(for batches on several machines)", (
                    "tablora server",
                    "tablora server --host 0.0.0.0 --port 5000   # reachable from other machines",
                    "tablora server --db postgresql+psycopg://user:pass@db:5432/mlflow"))
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (0.0.0.0: reachable from other machines)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--db", metavar="URL", help="a PostgreSQL database, e.g. "
                   "postgresql+psycopg://user:pass@host:5432/mlflow (default: a cluster of "
                   "its own in .cache/server/postgres, made and started here)")
    p.add_argument("--db-port", type=int, help="port of that own cluster (default: a free one)")
    p.add_argument("--artifacts", type=Path,
                   help="where the server keeps artifacts (default .cache/server/artifacts)")
    p.add_argument("--workers", type=int, help="server worker processes (default: MLflow's, 4)")
    p.add_argument("--allowed-hosts", help="Host headers to accept beyond localhost and "
                   "private IPs, e.g. mlflow.lab.example:5000 (MLflow's --allowed-hosts; "
                   "default: none)")
    p.set_defaults(func=cmd_server)

    p = command("compare", "tables, statistics and plots from the MLflow runs", (
        "tablora compare --batch 20261128-231500-ab12",
        "tablora compare --batch NEW --against OLD   # round over round",
        "tablora compare --experiment my-exp --out reports/my-exp"))
    p.add_argument("--experiment", default="tablora", help="the MLflow experiment to read")
    p.add_argument("--batch", help="only the runs of this batch id (default: all, the latest "
                   "run per model)")
    p.add_argument("--against", help="an earlier batch id or experiment to compare with")
    p.add_argument("--curve", metavar="ID", help="the learning curve of this batch id (printed "
                   "by `tablora curve`): its figure, tests and crossover sentence")
    p.add_argument("--out", type=Path, help="folder for REPORT.md, REPORT.html and the figures "
                   "(default: runs/compare/<batch or experiment>; a curve: runs/curve/<id>)")
    p.set_defaults(func=cmd_compare)

    p = command("memcheck", "has the model seen this table? memorization tests (header, row, "
                "feature, first token) against a shuffled copy", (
                    "tablora memcheck params/demo/smollm2-135m.yaml",
                    "tablora memcheck params/round1/llama.yaml --rows 50 --text both"))
    _add_params(p)
    p.add_argument("--rows", type=int, default=25,
                   help="trials of the row and feature tests (as many as tabmemcheck)")
    p.add_argument("--prefix-rows", type=int, default=10,
                   help="lines of context before the row to complete")
    p.add_argument("--text", choices=["auto", "file", "pandas", "both"], default="auto",
                   help="the data file as distributed (auto: when there is one), the table as "
                   "pandas writes it, or both")
    p.set_defaults(func=cmd_memcheck)

    p = command("predict", "score new rows (a CSV, labels optional) with a run's model, LLM "
                "or baseline, at the threshold its evaluation chose", (
                    "tablora predict new.csv --run 0123abcd... -o predictions.csv",
                    "tablora predict new.csv --model models:/smollm2-135m/1 -o predictions.csv",
                    "tablora predict new.csv --model models:/random_forest/1   # CSV to stdout"))
    p.add_argument("csv", type=Path, help="the rows to score: a CSV with a header row holding "
                   "the model's feature columns (an id or row_id column is kept; the target "
                   "column, when there, gives the metrics)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN_ID", help="an evaluated LLM run or a baseline run")
    which.add_argument("--model", metavar="models:/NAME/VERSION",
                       help="a registered model (the MLflow UI's Models page)")
    p.add_argument("-o", "--out", type=Path, help="the CSV to write: row_id, p_yes, prediction "
                   "(a multi-class model: row_id, prediction = the class, p_<class>) (default: "
                   "printed); written only when every row was scored")
    p.set_defaults(func=cmd_predict)

    p = command("export", "fuse a run's LoRA adapter into its base model: a standalone mlx-lm "
                "model folder (mlx_lm.fuse)", (
                    "tablora export --run 0123abcd... --out runs/export/smollm2-fused",
                    "mlx_lm.generate --model runs/export/smollm2-fused --prompt 'Hi'"))
    p.add_argument("--run", required=True, metavar="RUN_ID",
                   help="the training run whose adapter to fuse")
    p.add_argument("--out", type=Path, required=True,
                   help="a new (or empty) folder for the fused model")
    p.add_argument("--keep-quantized", action="store_true",
                   help="quantize the fused weights again like a quantized base model (smaller; "
                   "P(yes) moves: the adapter was trained on the dequantized model)")
    p.set_defaults(func=cmd_export)

    p = command("recommend", "diagnose the runs and write next-round params files", (
        "tablora recommend --batch 20261128-231500-ab12 --out params/round2",
        "tablora batch params/round2   # then run the next round"))
    p.add_argument("--experiment", default="tablora", help="the MLflow experiment to read")
    p.add_argument("--batch", help="only the runs of this batch id (default: all)")
    p.add_argument("--out", type=Path, required=True, help="folder for the next round's files")
    p.set_defaults(func=cmd_recommend)

    p = command("params", "list every params key with its type, default and meaning", (
        "tablora params",
        "tablora params lora learning_rate   # keys containing these words",
        "tablora params --format yaml > my.yaml   # a params file with every default",
        "tablora params --format markdown"))
    p.add_argument("words", nargs="*", metavar="WORD",
                   help="only keys containing one of these words")
    p.add_argument("--format", choices=["text", "markdown", "yaml"], default="text",
                   help="text for the terminal, a markdown table, or a YAML params file with "
                   "every key at its default and its meaning as a comment")
    p.set_defaults(func=cmd_params)
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
    # The notebooks' output streams through our stdout while they run: line by line into a pipe
    # or a file too (`| tee log`, CI), not in 8 KB blocks minutes apart.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
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
