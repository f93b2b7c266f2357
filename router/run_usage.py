"""``RunUsage``: what a request's run reports in its last delta, gathered as the run goes.

The cache figures (tokens found per tier, time to the first token) are the first attempt's that
reported them: the prefill worker's result, or the decode worker's first output when it computed
the context itself (colocated, or its prefill worker died). A run that moves keeps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proto.worker_api import PrefillResult
from router.types import Usage


@dataclass(slots=True)
class RunUsage:
    prompt_tokens: int
    cached_tokens: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    ttft_ms: float = 0.0
    prefill: str = ""  # the prefill worker's id
    decode: str = ""  # the decode worker's id
    known: bool = False  # cache figures set (by the first attempt that reported them)

    def took_prefill(self, res: PrefillResult, block_size: int) -> None:
        """A prefill worker's result (the blocks it pulled count as the "remote" tier)."""
        if self.known:
            return
        self.cached_tokens, self.by_tier = res.cached_tokens, dict(res.cached_by_tier)
        if res.num_pulled_blocks:
            self.by_tier["remote"] = res.num_pulled_blocks * block_size
        self.ttft_ms, self.known = res.prefill_ms, True

    def took_first(self, hits: dict[str, int], t0: float) -> None:
        """A decode worker's first output after it computed the context (``t0``: the run's
        start, monotonic)."""
        if self.known:
            return
        self.cached_tokens, self.by_tier = sum(hits.values()), hits
        self.ttft_ms, self.known = (time.monotonic() - t0) * 1e3, True

    def done(self, num_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=num_tokens,
            cached_tokens=self.cached_tokens,
            cached_tokens_by_tier=dict(self.by_tier),
            ttft_ms=self.ttft_ms,
            prefill_worker=self.prefill,
            decode_worker=self.decode,
        )
