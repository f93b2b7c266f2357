"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

import torch

from proto.worker_api import SamplingParams

__all__ = ["SamplingParams", "sample"]


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
