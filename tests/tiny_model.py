"""A tiny randomly initialized llama-architecture model with a real byte-level BPE tokenizer.

Small enough that a training step takes milliseconds, real enough that mlx_lm.load, its chat
template and the whole tablora code path run unchanged on it.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough text for the BPE to learn the words tablora's prompts use.
CORPUS = [
    "The mean radius is 18.0. The mean texture is 10.4. The mean perimeter is 123.",
    "Is this tumour malignant? Answer Yes or No. Yes No yes no",
    "Here is a patient's breast tumour biopsy, measured from a digitized image.",
    "mean area: 1001 mean smoothness: 0.118 mean compactness: 0.278 unknown",
    "user assistant system 0123456789 . , : ? !",
] * 20


def build_tiny_model(path: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files for mlx_lm.load into `path`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    import helpers  # noqa: F401 - loads the BLAS before mlx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))

    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tok),
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
