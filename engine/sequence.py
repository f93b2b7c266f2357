"""Per-request state inside the engine, and what a step reports back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from kvstore.keys import BlockHash
from proto.vocab import FinishReason


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    req_id: str
    token_ids: list[int]  # prompt followed by the generated tokens
    prompt_len: int  # tokens of the prompt
    sampling: SamplingParams
    cache_salt: str  # tenant isolation: part of the first block's hash
    arrival_time: float  # time.perf_counter() when added
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)  # logical -> physical pool blocks
    block_hashes: list[BlockHash] = field(default_factory=list)  # hashes of full blocks
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    num_registered_blocks: int = 0  # leading blocks offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from a cache instead of computed
    cached_by_tier: dict[str, int] = field(default_factory=dict)  # tier -> cached tokens
    load_s: float = 0.0  # seconds its prefix loads from the store took (start to last arrival)
    first_token_time: float | None = None  # perf_counter() when the first token was sampled
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Leading tokens that form the prompt; the rest were sampled (a decode worker's request
    # carries the first token the prefill worker sampled). Deterministic mode computes them
    # one per step, as the decode steps that sampled them did.
    prefill_len: int = 0

    def __post_init__(self) -> None:
        if self.prefill_len <= 0:
            self.prefill_len = self.prompt_len

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass(frozen=True)
class StepOutput:
    req_id: str
    new_token_ids: tuple[int, ...]  # tokens sampled for this request in this step
    finished: bool
    finish_reason: FinishReason | None  # set when finished
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from a cache (any tier)
    cached_by_tier: dict[str, int]  # "device" | "host" | "disk" -> tokens
    ttft_s: float | None  # arrival to first token, once known


@dataclass(frozen=True)
class RequestResult:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int
    cached_by_tier: dict[str, int]
    ttft_s: float
    latency_s: float
    load_s: float = 0.0  # seconds its prefix loads from the store took (within ttft_s)
