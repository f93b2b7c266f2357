"""The router <-> worker calls over Ray: their arguments and replies as frozen dataclasses.

Both sides import this module (it needs neither torch nor the engine), so replies are typed
objects, not dicts read by string keys. ``SamplingParams`` lives here for the same reason; the
engine's sampler (``engine.sampling``) uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.vocab import EventKind, FinishReason, Role, Tier


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


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str  # unique in the cluster, e.g. "prefill-0"
    role: Role
    node: str  # host name of the node the worker runs on
    fingerprint: bytes  # model fingerprint: blocks are only shared between equal ones
    block_size: int  # tokens per KV block
    block_nbytes: int  # bytes of one block (all layers, K and V)
    vocab_size: int
    max_model_len: int
    kv_address: str | None  # host:port of the worker's gRPC server (KV transfer, health)
    prefill_tokens_per_s: float  # measured at start-up
    tier_bytes_per_s: dict[Tier, float] = field(default_factory=dict)  # measured load speed
    pid: int = 0  # the worker's process id
    node_id: str = ""  # the Ray node it runs on ("" outside Ray)
    epoch: int = 0  # this start of the worker (a new one every start: ``EventBatch.epoch``)
    started_at: float = 0.0  # wall-clock time its process was ready to serve
    outputs_address: str | None = None  # decode: host:port of its output stream (None: kv_address)


@dataclass(frozen=True)
class BlockEvent:
    """Blocks a tier of a worker took or dropped: the one event type from the block pool and the
    store, through the worker's ``EventBatch``, to the router's index."""

    kind: EventKind  # stored: the tier now holds the blocks; removed: it no longer does
    tier: Tier
    block_hashes: tuple[bytes, ...]  # the blocks concerned, in no particular order


@dataclass(frozen=True)
class EventBatch:
    """A worker's block events since its last drain (``drain_events``). The router's index
    applies a batch only in order and only from the incarnation it follows
    (``router.incarnation``)."""

    epoch: int  # the worker's start that made them (a restart numbers from 1 again)
    seq: int  # 1, 2, ... within the epoch, snapshots included (``BlockSnapshot.seq``)
    events: tuple[BlockEvent, ...]
    lost: bool = False  # events were dropped before this drain (the index must resync)


@dataclass(frozen=True)
class BlockSnapshot:
    """Every block a worker holds, by tier (``snapshot_blocks``): the events numbered up to
    ``seq`` are in it; later batches apply on top."""

    epoch: int
    seq: int
    blocks: dict[Tier, list[bytes]]  # tier -> block hashes


@dataclass(frozen=True)
class PrefillRequest:
    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # of the whole request (the prefill samples the first token)
    cache_salt: str = ""
    decode_kv_address: str | None = None  # push the prompt's blocks there while computing
    timeout_s: float = 300.0
    pull_from: str | None = None  # worker to pull leading blocks from before computing
    num_pull_blocks: int = 0


@dataclass(frozen=True)
class PrefillResult:
    req_id: str
    first_token: int
    finished: bool  # the request ends here (stop token or max_tokens == 1)
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int
    cached_by_tier: dict[Tier, int]
    prefill_ms: float  # arrival at this worker to first token
    num_blocks_to_push: int  # full blocks streamed to the decode worker (or held there)
    num_pulled_blocks: int = 0  # blocks fetched from another worker before computing


@dataclass(frozen=True)
class DecodeRequest:
    """Continue ``token_ids`` on a decode worker; its tokens arrive on the worker's output
    stream (``WorkerOutputs.Subscribe``), not as the call's reply. The router sends it as it
    places the request, so the decode worker admits it the moment its blocks have landed."""

    req_id: str
    token_ids: tuple[int, ...]  # prompt (+ the first token when a prefill worker sampled it)
    sampling: SamplingParams  # max_tokens: tokens still to generate
    cache_salt: str = ""
    expect_transfer: bool = True  # a prefill worker pushes this request's blocks
    transfer_timeout_s: float = 30.0  # then whatever did not arrive is computed
    # The first token is not in ``token_ids`` yet: it comes at the end of the push (or from the
    # router, ``DecodeActor.first_token``); ``sampling.max_tokens`` counts the tokens after it.
    awaits_first_token: bool = False
    # Leading tokens of ``token_ids`` that are the prompt (0: all); the others were sampled,
    # and deterministic mode computes them as the decode steps that sampled them did.
    num_prompt_tokens: int = 0
