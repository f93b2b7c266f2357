"""Model and engine configuration (frozen dataclasses, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF rope_scaling
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral-style local attention window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(f"unsupported architecture {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; ValueError names what is wrong."""
        archs = cfg.get("architectures") or []
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            model_type = cfg.get("model_type")
            arch = model_type if model_type in SUPPORTED_ARCHITECTURES.values() else None
        if arch is None:
            raise ValueError(
                f"config.json: architectures {archs} / model_type {cfg.get('model_type')!r} not "
                f"supported; expected one of {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            rope_params = cfg.get("rope_parameters")
            if rope_params:  # newer transformers keep theta and scaling together
                rope_theta = rope_params.get("rope_theta", rope_theta)
                rtype = rope_params.get("rope_type", "default")
                if rtype != "default":
                    rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            if rope_scaling:
                rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                if rtype not in ("default", "llama3", "linear"):
                    raise ValueError(f"config.json: rope_scaling type {rtype!r} not supported")
                if rtype == "default":
                    rope_scaling = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sliding = cfg.get("sliding_window") if arch == "mistral" else None
            if arch == "qwen2" and cfg.get("use_sliding_window"):
                raise ValueError("config.json: Qwen2 use_sliding_window=true is not supported")
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ValueError(f"config.json: missing required field {e.args[0]!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # built-in name or a local Hugging Face checkpoint directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda[:N]
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int | None = None  # pool size; None: 1 GiB on CPU, 90% of free on CUDA
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences in one decode batch
    max_num_batched_tokens: int = 2048  # tokens per step; also the prefill chunk size
    max_waiting: int = 1024  # queued requests beyond this are refused
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto (Triton on CUDA) | torch | triton
    cuda_graphs: bool = True  # short steps replay CUDA graphs (CUDA + Triton kernels only)
    # Bit-identical numbers cold, warm from any tier and across the prefill -> decode handoff:
    # prefix hits rounded down to the chunk grid (multiples of max_num_batched_tokens), prompt
    # chunks cut on that grid, tokens after the prompt one per step, and batch-invariant
    # projections (engine.matmul). It costs recompute (up to a chunk per hit) and GEMM speed.
    deterministic: bool = False
    seed: int = 0  # weights of built-in models
    # torch intra-op threads of a worker process; None: one per core in-process, and in the
    # service the node's cores shared among its workers (cluster.workers.engine_threads). Ray
    # starts actors with OMP_NUM_THREADS=1, which would leave a CPU worker on a single core.
    cpu_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, not {self.attention_backend!r}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.deterministic and self.max_num_batched_tokens % self.block_size:
            raise ValueError(
                f"deterministic mode cuts prompts on a grid of max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) tokens, which must be a multiple of block_size "
                f"({self.block_size})"
            )
