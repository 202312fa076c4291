"""helpers.llm.models: the embedded model, local and hub model ids, the dequantize policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli, config
from helpers.llm import models

# A hub id that does not exist: offline it cannot be fetched, and online it fails at once too.
HUB_ID = "tablora-tests/no-such-model-4bit"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache, so a test sees the build itself."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def _built_dir(cache: Path) -> Path:
    return cache / "models" / "smollm2-135m-instruct"


# --------------------------------------------------------------------------- the embedded model


def test_builtin_builds_a_complete_model_dir(cache):
    path = models.resolve(config.BUILTIN_MODEL)
    assert path == _built_dir(cache)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_traditional"] is True  # GGUF's permuted q/k weights need it
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["eos_token"] == "<|im_end|>"
    # Nothing left over from the temporary build folder.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_builtin_cache_is_reused(cache):
    path = models.resolve(config.BUILTIN_MODEL)
    before = (path / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    assert models.resolve(config.BUILTIN_MODEL) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_builtin_cache_from_an_older_converter_is_rebuilt(cache):
    path = models.resolve(config.BUILTIN_MODEL)
    stamp = json.loads((path / models.BUILD_STAMP).read_text())
    (path / models.BUILD_STAMP).write_text(json.dumps({**stamp, "version": -1}))
    before = (path / "model.safetensors").stat().st_mtime_ns
    models.resolve(config.BUILTIN_MODEL)
    assert json.loads((path / models.BUILD_STAMP).read_text()) == stamp
    assert (path / "model.safetensors").stat().st_mtime_ns != before


def test_a_failed_build_leaves_no_cache(cache, monkeypatch):
    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve(config.BUILTIN_MODEL)
    assert list((cache / "models").iterdir()) == []


def test_a_killed_build_is_cleaned_up_by_the_next(cache):
    """A process killed mid-build (SIGKILL: no finally) leaves a hidden temporary folder; the
    next build removes it once it is old, and leaves a young one (a build still running) alone."""
    parent = _built_dir(cache).parent
    stale, young = parent / ".smollm2-135m-instruct-dead", parent / ".smollm2-135m-instruct-live"
    for folder in (stale, young):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half written")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    path = models.resolve(config.BUILTIN_MODEL)
    assert sorted(p.name for p in parent.iterdir()) == sorted([path.name, young.name])


def test_builtin_tokenizer_round_trips(cache):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.resolve(config.BUILTIN_MODEL)))
    text = "The mean radius is 18.0.\n\nIs this tumour malignant? Answer Yes or No."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(models.ModelUnavailable, match=config.BUILTIN_MODEL):
        models.resolve("builtin:gpt-5")


@pytest.mark.slow
def test_builtin_model_answers_paris(capsys):
    assert cli.main(["model", config.BUILTIN_MODEL, "--prompt",
                     "What is the capital of France?", "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "MLX BLAS" in out and "device" in out
    assert "Paris" in out.splitlines()[-1]


# ------------------------------------------------------------------------ local dirs, hub ids


def test_local_dir_resolves_to_itself(tiny_model_dir):
    assert models.resolve(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_missing_or_invalid_local_dir(tmp_path):
    with pytest.raises(models.ModelUnavailable, match="no such directory"):
        models.resolve(str(tmp_path / "nope"))
    with pytest.raises(models.ModelUnavailable, match="no config.json"):
        models.resolve(str(tmp_path))


def test_hub_id_offline_fails_fast_with_a_clear_message():
    t0 = time.perf_counter()
    with pytest.raises(models.ModelUnavailable) as err:
        models.resolve(HUB_ID)
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    assert "cannot be downloaded" in message
    assert config.BUILTIN_MODEL in message and "local" in message


@pytest.mark.parametrize("offline", [None, "1"], ids=["HF_HUB_OFFLINE-unset", "HF_HUB_OFFLINE=1"])
def test_cli_hub_id_offline_exits_nonzero_fast(offline):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "helpers", "model", HUB_ID],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "cannot be downloaded" in proc.stderr and config.BUILTIN_MODEL in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30  # typically ~1 s; generous for a loaded 2-core machine


# --------------------------------------------------------------------------- dequantize policy


def _save_variant(src: Path, out: Path, quantize: bool = False, dtype=None) -> Path:
    """A copy of the tiny model, 4-bit quantized and/or cast to `dtype`."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten

    shutil.copytree(src, out)
    model, _ = mlx_lm.load(str(src))
    cfg = json.loads((src / "config.json").read_text())
    if dtype is not None:
        model.set_dtype(dtype)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        cfg["quantization"] = {"group_size": 32, "bits": 4}
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def tiny_q4_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _save_variant(tiny_model_dir, tmp_path_factory.mktemp("q4") / "m", quantize=True)


def _dtypes(model) -> set:
    from mlx.utils import tree_flatten

    return {v.dtype for _, v in tree_flatten(model.parameters())}


def _logits(model, ids=(1, 5, 9, 12)):
    import mlx.core as mx

    return model(mx.array([list(ids)]))


def test_auto_dequantizes_on_cpu(tiny_q4_dir, capsys):
    import mlx.core as mx
    import mlx_lm

    if mx.default_device() != mx.cpu:
        pytest.skip("the 'auto' policy keeps quantized weights on a GPU")
    model, _ = models.load(str(tiny_q4_dir))
    assert not models.is_quantized(model)
    assert _dtypes(model) == {mx.float32}
    assert "dequantized to float32" in capsys.readouterr().out
    # The same function as the quantized model, now in float32.
    quantized, _ = mlx_lm.load(str(tiny_q4_dir))
    assert mx.allclose(_logits(model), _logits(quantized), atol=1e-3, rtol=1e-3).item()


def test_never_keeps_and_always_removes_quantization(tiny_q4_dir, tiny_model_dir):
    model, _ = models.load(str(tiny_q4_dir), dequantize="never")
    assert models.is_quantized(model)
    model, _ = models.load(str(tiny_q4_dir), dequantize="always")
    assert not models.is_quantized(model)
    # A float32 model has nothing to change.
    model, _ = models.load(str(tiny_model_dir), dequantize="always")
    assert not models.to_float32(model)


def test_auto_casts_half_precision_to_float32(tiny_model_dir, tmp_path):
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the 'auto' policy keeps weights as stored on a GPU")
    bf16 = _save_variant(tiny_model_dir, tmp_path / "bf16", dtype=mx.bfloat16)
    model, _ = models.load(str(bf16))
    assert _dtypes(model) == {mx.float32}
    model, _ = models.load(str(bf16), dequantize="never")
    assert _dtypes(model) == {mx.bfloat16}


def test_bad_dequantize_value():
    with pytest.raises(ValueError, match="dequantize"):
        models.load(config.BUILTIN_MODEL, dequantize="sometimes")


def test_model_info(tiny_q4_dir):
    model, _ = models.load(str(tiny_q4_dir), dequantize="never")
    info = models.model_info(model)
    assert info["num_layers"] == 4 and info["hidden_size"] == 64 and info["quantized"]
    dense, _ = models.load(str(tiny_q4_dir), dequantize="always")
    # Quantized weights are counted unpacked: the same count either way.
    assert models.model_info(dense)["num_parameters"] == info["num_parameters"] > 0
