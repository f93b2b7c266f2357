"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate, the first one included
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # per-request seed: same seed, same tokens, on any worker
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past the model's EOS token

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: list[SamplingParams], seq_lens: list[int]) -> list[int]:
    """One token per row. logits: [N, vocab] float32; seq_lens: tokens before the new one.

    A seeded request draws the token at position ``i`` from a generator seeded by (seed, i), so
    the result depends on nothing but the request: not on batch mates, not on the worker (a
    decode worker continuing a prefill worker's sequence draws the same tokens).
    """
    out = logits.argmax(dim=-1).tolist()
    for row, (p, n_out) in enumerate(zip(params, seq_lens)):
        if p.greedy:
            continue
        x = logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
            probs = probs / probs.sum()
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=probs.device).manual_seed(
                (p.seed * 1_000_003 + n_out) & (2**63 - 1)
            )
        out[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
