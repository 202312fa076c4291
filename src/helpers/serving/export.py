"""`tablora export`: a run's adapter fused into its base model, as a standalone mlx-lm model
directory (`mlx_lm.load(DIR)`, or `model_id: DIR` in a params file).

The fusing is mlx-lm's own (`mlx_lm.fuse`, run with its command-line arguments), not a copy of
it: whatever that command does to a model (LoRA and DoRA layers, quantized weights, the config
and tokenizer files) the export does too. The directory is written beside its final place and
renamed into it once complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from helpers import contract, tracking
from helpers.llm import evaluate, models
from helpers.serving.pyfunc import PredictError


def base_model(run_id: str) -> str:
    """The run's base model id: its logged model's metadata, else its `model_id` param."""
    import mlflow

    try:
        meta = mlflow.models.get_model_info(
            f"runs:/{run_id}/{contract.ARTIFACT_MODEL}").metadata or {}
        model_id = meta.get(contract.MODEL_METADATA, {}).get("base_model", "")
    except Exception:  # noqa: BLE001 - no logged model (a run evaluated before it was logged)
        model_id = ""
    run = tracking.get_run(run_id)
    if run.data.tags.get(contract.TAG_KIND) == contract.KIND_BASELINE:
        raise PredictError(f"run {run_id} is a baseline ({run.info.run_name}): only a "
                           "fine-tuned LLM run has an adapter to fuse.")
    model_id = model_id or run.data.params.get("model_id", "")
    if not model_id:
        raise PredictError(f"run {run_id} names no base model (no logged model, no model_id "
                           "param): export from a training run of tablora.")
    return model_id


def fuse(model_dir: Path, adapter_dir: Path, out: Path, dequantize: bool = True) -> None:
    """mlx_lm.fuse's command on (model, adapter) -> out (which must not exist yet).

    dequantize: mlx_lm.fuse's --dequantize. A quantized base model (the built-in one) is trained
    dequantized on the CPU (helpers.llm.models.load); fused and quantized again, its P(yes) moved
    by up to 0.07 on the demo, so the fused weights are kept unquantized unless asked."""
    from mlx_lm import fuse as mlx_fuse

    argv = ["mlx_lm.fuse", "--model", str(model_dir), "--adapter-path", str(adapter_dir),
            "--save-path", str(out)] + (["--dequantize"] if dequantize else [])
    saved = sys.argv
    sys.argv = argv  # mlx_lm.fuse.main reads its arguments with argparse
    try:
        with redirect_stdout(sys.stderr):  # its progress lines are not the command's output
            mlx_fuse.main()
    finally:
        sys.argv = saved


def export(run_id: str, out: Path, dequantize: bool = True) -> Path:
    """Fuse run `run_id`'s adapter into its base model, in the new directory `out`
    (dequantize: see fuse)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PredictError(f"--out {out}: already exists and is not an empty folder: give a new "
                           "folder (export never overwrites or deletes anything).")
    model_id = base_model(run_id)
    adapter = evaluate.download_adapter(run_id)
    if adapter is None:
        raise PredictError(f"run {run_id} has no {contract.ARTIFACT_ADAPTERS}/ artifact: train "
                           "it to the end (the best adapter is logged when training ends).")
    model_dir = models.resolve(model_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fuse(model_dir, adapter, tmp / "model", dequantize)
        if out.exists():
            out.rmdir()  # empty (checked above)
        (tmp / "model").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
