"""Loading models: local Hugging Face checkpoints and built-in deterministic random shapes.

A checkpoint directory needs ``config.json`` and ``model.safetensors`` or sharded
``*.safetensors`` with ``model.safetensors.index.json``; ``tokenizer.json`` is optional (without
it the model serves token ids only). Built-in names need no download: ``tiny`` (the default, for
CPU tests) and the real shapes of ``llama-3.2-1b`` and ``llama-3.1-8b`` with deterministic random
weights from a fixed seed (weight values do not change timings). A Llama-family GGUF file (a
``*.gguf`` path, or ``smollm2-135m``: a trained model that a Python package installs) is
converted once into a cached checkpoint directory (``engine.gguf_loader``) and loaded from it.
Weights load by their Hugging Face names; then ``CausalLM.fuse`` merges q/k/v and gate/up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.model import CausalLM
from textproc.gguf_models import GGUF_MODELS, find_gguf
from textproc.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

_LLAMA3_ROPE = (
    ("factor", 32.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)

BUILTIN_MODELS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        arch="llama",
        vocab_size=320,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=16384,
        rope_theta=10000.0,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_ids=(ByteTokenizer.eos_token_id,),
    ),
    "llama-3.2-1b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_ids=(ByteTokenizer.eos_token_id,),
        torch_dtype="bfloat16",
    ),
    "llama-3.1-8b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_ids=(ByteTokenizer.eos_token_id,),
        torch_dtype="bfloat16",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None  # None: the checkpoint has no tokenizer files (ids only)
    weight_identity: str  # what the weights are, for the model fingerprint
    dtype: torch.dtype
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(
    dtype: str, checkpoint_dtype: str, device: torch.device, builtin: bool
) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if builtin:  # random shapes: bf16 on GPU, float32 on CPU (CPU matmuls are fast in fp32)
        return (
            torch.bfloat16
            if device.type == "cuda" and checkpoint_dtype != "float32"
            else torch.float32
        )
    return _DTYPES.get(checkpoint_dtype, torch.float32)


def load_model(
    name_or_path: str, dtype: str = "auto", device: str = "auto", seed: int = 0
) -> LoadedModel:
    dev = resolve_device(device)
    if name_or_path in BUILTIN_MODELS:
        cfg = BUILTIN_MODELS[name_or_path]
        dt = resolve_dtype(dtype, cfg.torch_dtype, dev, builtin=True)
        model = _random_model(cfg, dt, dev, seed)
        return LoadedModel(
            model, cfg, ByteTokenizer(), f"builtin:{name_or_path}:seed={seed}", dt, dev
        )
    gguf_path = find_gguf(name_or_path)
    if gguf_path is not None:
        from engine.gguf_loader import convert_gguf

        path = convert_gguf(gguf_path)
        cfg = read_config(path)
        # dequantized weights: bf16 on a GPU, float32 on a CPU, as for the built-in shapes
        dt = resolve_dtype(dtype, "gguf", dev, builtin=True)
        model = _checkpoint_model(cfg, safetensors_files(path), dt, dev)
        identity = "gguf:" + os.path.basename(path)
        return LoadedModel(model, cfg, load_tokenizer(gguf_path), identity, dt, dev)
    if not os.path.isdir(name_or_path):
        raise ValueError(
            f"model {name_or_path!r} is neither a built-in name "
            f"({', '.join([*BUILTIN_MODELS, *GGUF_MODELS])}), a checkpoint directory nor a "
            "*.gguf file"
        )
    cfg = read_config(name_or_path)
    dt = resolve_dtype(dtype, cfg.torch_dtype, dev, builtin=False)
    files = safetensors_files(name_or_path)
    model = _checkpoint_model(cfg, files, dt, dev)
    return LoadedModel(model, cfg, load_tokenizer(name_or_path), _weight_identity(files), dt, dev)


def read_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path}: missing (a checkpoint directory needs config.json)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: malformed JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    try:
        return ModelConfig.from_hf(raw)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index file ({e})") from None
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for fp in files:
            if not os.path.exists(fp):
                raise ValueError(f"{fp}: listed in {index} but missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json found")
    return [os.path.join(path, f) for f in found]


def _weight_identity(files: list[str]) -> str:
    """Hash of every shard's name, size and safetensors header (names, shapes, offsets)."""
    h = hashlib.blake2b(digest_size=16)
    for fp in files:
        with open(fp, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(os.path.basename(fp).encode())
            h.update(str(os.path.getsize(fp)).encode())
            h.update(f.read(min(n, 1 << 24)))
    return "safetensors:" + h.hexdigest()


def _checkpoint_model(
    cfg: ModelConfig, files: list[str], dtype: torch.dtype, dev: torch.device
) -> CausalLM:
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=dev).to(dtype)
    model.tie_weights()
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for fp in files:
        try:
            tensors = load_file(fp, device=str(dev))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{fp}: cannot read safetensors file: {e}") from None
        for name, t in tensors.items():
            if name not in expected:
                continue  # e.g. rotary inv_freq buffers in old checkpoints
            p = expected[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{fp}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(t.to(dtype))
            loaded.add(name)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"checkpoint {os.path.dirname(files[0])}: missing tensors {missing[:5]}")
    _reset_rotary(model, dev)
    model.fuse()
    return model.eval()


def _reset_rotary(model: CausalLM, dev: torch.device) -> None:
    from engine.rope import rope_inv_freq

    cfg = model.config
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict).to(
        dev
    )


def _random_model(cfg: ModelConfig, dtype: torch.dtype, dev: torch.device, seed: int) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=dev).to(dtype)
    model.tie_weights()
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    _reset_rotary(model, dev)
    model.fuse()
    return model.eval()


def model_fingerprint_fields(loaded: LoadedModel, block_size: int) -> dict[str, object]:
    return {
        "config": dataclasses.asdict(loaded.config),
        "weights": loaded.weight_identity,
        "dtype": str(loaded.dtype),
        "block_size": block_size,
    }
