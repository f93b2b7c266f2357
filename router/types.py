"""Messages between the router's gRPC layer and its backend (frozen dataclasses; protobuf stops
at the gRPC boundary)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proto.vocab import FinishReason
from proto.worker_api import SamplingParams


@dataclass(frozen=True)
class GenRequest:
    req_id: str  # unique per request (client-chosen or assigned by the router)
    prompt_token_ids: tuple[int, ...]  # validated: non-empty, every id < vocab_size
    sampling: SamplingParams  # validated; max_tokens >= 1, prompt + max_tokens <= max_model_len
    cache_salt: str = ""  # tenant isolation: part of the first block's hash

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was loaded, not computed
    # cached_tokens split by tier ("device", "host", "disk", "remote")
    cached_tokens_by_tier: Mapping[str, int] = field(default_factory=dict)
    ttft_ms: float = 0.0  # server side: arrival at the router -> first token
    prefill_worker: str = ""
    decode_worker: str = ""


@dataclass(frozen=True)
class TokenDelta:
    """One item of ``backend.generate``: new token ids; the last item has ``finish_reason`` and
    ``usage`` set (and may carry the last tokens too)."""

    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None  # set on the last item
    usage: Usage | None = None  # set on the last item

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None
