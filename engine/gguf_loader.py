"""Llama-family GGUF files: converted once into a cached checkpoint directory, then loaded
like any Hugging Face checkpoint.

Conversion (``convert_gguf``): the ``gguf`` library reads the file; every tensor is
dequantized to float32 with its numpy dequantization (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K-Q6_K); names map from llama.cpp's (``blk.N.attn_q.weight``) to Hugging Face's
(``model.layers.N.self_attn.q_proj.weight``); the Q and K projections get back the row order
Hugging Face's rotary embedding expects (llama.cpp's converter interleaves each head's two
rotary halves; ``unpermute_qk`` undoes it); the config comes from the ``llama.*`` metadata and
the tokenizer from the ``tokenizer.*`` metadata (``textproc.gguf_tokenizer``). The result is
written to the cache (``textproc.gguf_cache``): ``config.json``, ``model.safetensors``
(float32), ``tokenizer.json``, ``tokenizer_config.json``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from textproc.gguf_cache import cache_dir, gguf_identity, gguf_tokenizer_dir, write_json
from textproc.gguf_models import field_value, open_gguf, require_field

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. Its converter turns each head's rows ``[half 1, half
    2]`` (Hugging Face's rotate-half layout) into interleaved pairs; this restores the halves.
    w: [num_heads * head_dim, hidden]."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_config(reader: Any, path: str, num_tokens: int) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict from the file's ``llama.*`` metadata."""
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported (GGUF files of "
            f"{', '.join(SUPPORTED_ARCHS)} are)"
        )

    def req(key: str) -> Any:
        return require_field(reader, f"{arch}.{key}", path)

    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ValueError(f"{path}: per-frequency rope factors (rope_freqs) are not supported")
    scaling = field_value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", 0) or hidden // heads)
    tensor_names = {t.name for t in reader.tensors}

    def token_id(key: str) -> int | None:
        v = field_value(reader, f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    eos = token_id("eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(field_value(reader, f"{arch}.vocab_size", 0) or num_tokens),
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(req("context_length")),
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def _check_types(reader: Any, path: str) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, not "
                f"supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )


def _tensors(reader: Any, cfg: dict[str, Any], path: str) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name} for a llama model")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims innermost first
        w = w.reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    return out


def convert_gguf(path: str) -> str:
    """The cached checkpoint directory of a GGUF file, converting it first if needed."""
    from safetensors.numpy import save_file

    identity = gguf_identity(path)
    out = cache_dir(path, identity)
    weights = os.path.join(out, "model.safetensors")
    config = os.path.join(out, "config.json")
    if os.path.exists(weights) and os.path.exists(config):
        gguf_tokenizer_dir(path)
        return out
    t0 = time.perf_counter()
    reader = open_gguf(path)
    tokens = require_field(reader, "tokenizer.ggml.tokens", path)
    cfg = hf_config(reader, path, len(tokens))
    _check_types(reader, path)
    gguf_tokenizer_dir(path, reader)
    tensors = _tensors(reader, cfg, path)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".tmp-{os.getpid()}-model.safetensors")
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "source": "gguf", "gguf": identity})
        os.replace(tmp, weights)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_json(config, cfg)
    write_json(os.path.join(out, "gguf.json"), {"path": os.path.abspath(path), "id": identity})
    logger.info("converted %s into %s in %.1f s", path, out, time.perf_counter() - t0)
    return out
