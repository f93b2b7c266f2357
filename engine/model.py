"""Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV pool.

Parameter names follow Hugging Face checkpoints (``model.layers.N.self_attn.q_proj.weight`` ...),
so a checkpoint's tensors load by name and ``state_dict()`` has Hugging Face's names. Once the
weights are in, ``CausalLM.fuse()`` (the loader calls it) concatenates the q/k/v projections
into one ``[(H_q + 2 H_kv) * D, hidden]`` weight and gate/up into one ``[2 I, hidden]``, and
makes the named parameters views of them: one GEMM each where there were three and two, at no
extra memory. The forward pass takes a flat batch of tokens from several sequences (prefill
chunks and decodes mixed) and the pool's per-layer KV tensors; the residual stream is carried
beside the hidden state so each norm adds it in the same launch (``engine.ops.rms_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.attention import AttnMetadata, paged_attention
from engine.config import ModelConfig
from engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x, residual: [T, hidden] -> (normed x + residual, x + residual)
        return ops.rms_norm(x, self.weight, self.eps, residual, fused=fused)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; the projections'
    parameters become views of it."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse()
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttnMetadata,
    ) -> torch.Tensor:
        # x: [T, hidden]; cache: [NB, 2, bs, H_kv, D]
        assert self.qkv_weight is not None, "CausalLM.fuse() runs once the weights are loaded"
        t = x.shape[0]
        inv = meta.batch_invariant
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias, invariant=inv)  # [T, (Hq+2Hkv)*D]
        q, k, v = ops.rope_write_kv(
            qkv, cos, sin, cache, meta.slot_block, meta.slot_offset, self.num_heads,
            self.num_kv_heads, fused=meta.fused,
        )  # fmt: skip
        o = paged_attention(q, k, v, cache, meta, self.scale)
        return ops.linear(o.reshape(t, self.num_heads * self.head_dim), self.o_proj.weight,
                          invariant=inv)  # fmt: skip


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up_weight, _ = _fuse([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        assert self.gate_up_weight is not None, "CausalLM.fuse() runs once the weights are loaded"
        inv = meta.batch_invariant
        gate_up = ops.linear(x, self.gate_up_weight, invariant=inv)  # [T, 2 * I]
        h = ops.silu_mul(gate_up, fused=meta.fused)
        return ops.linear(h, self.down_proj.weight, invariant=inv)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttnMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: this layer's input before its residual add; residual: the stream so far (None:
        # x is the embedding). Returns the MLP's output and the stream before it.
        h, res = self.input_layernorm(x, residual, meta.fused)
        residual = x if res is None else res
        h = self.self_attn(h, cos, sin, cache, meta)
        h, res = self.post_attention_layernorm(h, residual, meta.fused)
        assert res is not None
        return self.mlp(h, meta), res


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder with its LM head; ``forward`` returns final hidden states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        """Merge each layer's q/k/v and gate/up weights (after loading; idempotent)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            if layer.self_attn.qkv_weight is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttnMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, cache, meta)
        out, _ = self.model.norm(x, residual, meta.fused)
        return out

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        # hidden: [N, hidden] -> logits: [N, vocab] float32
        return ops.linear(hidden, self.lm_head.weight, invariant=invariant).float()
