"""Where to run a request: a TTFT cost model over measured per-worker parameters.

Predicted TTFT of prefill on worker W = queue wait(W) + load time of the cached blocks W chooses
to load + compute time of the tokens it does not load. Each leading block can be loaded (its
best tier's bandwidth; "remote" = pulled from another worker over the network) or recomputed;
``plan_load`` picks the number of leading blocks to load that minimises the sum, so a slow disk
loses to recompute when the GPU is fast. Parameters come from measurements the workers report
(start-up benchmarks, then moving averages), never from constants here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.keys import BlockHash
from router.errors import NoWorkerError
from router.index import GlobalBlockIndex

REMOTE_TIER = "remote"


@dataclass(slots=True)
class WorkerProfile:
    worker_id: str
    prefill_tokens_per_s: float  # measured prefill throughput (tokens/s)
    # bytes/s moving one block from a tier into HBM ("device" missing -> free)
    load_bytes_per_s: dict[str, float] = field(default_factory=dict)
    net_bytes_per_s: float = 0.0  # pull bandwidth from another worker; 0 -> never pull
    queue_depth: int = 0  # requests queued or running on the worker
    mean_service_s: float = 0.0  # moving average of one request's service time
    ewma_alpha: float = 0.2  # weight of a new observation in the moving averages

    def __post_init__(self) -> None:
        if not self.prefill_tokens_per_s > 0:
            raise ValueError(f"{self.worker_id}: prefill_tokens_per_s must be > 0 (measure it)")
        for tier, bw in self.load_bytes_per_s.items():
            if not bw > 0:
                raise ValueError(f"{self.worker_id}: load_bytes_per_s[{tier!r}] must be > 0")
        if self.net_bytes_per_s < 0 or self.queue_depth < 0 or self.mean_service_s < 0:
            raise ValueError(f"{self.worker_id}: bandwidth, queue depth and times must be >= 0")

    @property
    def queue_wait_s(self) -> float:
        return self.queue_depth * self.mean_service_s

    def bandwidth(self, tier: str) -> float:
        if tier == REMOTE_TIER:
            return self.net_bytes_per_s
        return self.load_bytes_per_s.get(tier, math.inf if tier == "device" else 0.0)

    def observe_service(self, seconds: float) -> None:
        a = self.ewma_alpha
        self.mean_service_s = (
            seconds if self.mean_service_s == 0 else (a * seconds + (1 - a) * self.mean_service_s)
        )

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            a = self.ewma_alpha
            self.prefill_tokens_per_s = a * num_tokens / seconds + (1 - a) * (
                self.prefill_tokens_per_s
            )

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            old = self.load_bytes_per_s.get(tier)
            rate = nbytes / seconds
            a = self.ewma_alpha
            self.load_bytes_per_s[tier] = rate if old is None else a * rate + (1 - a) * old


@dataclass(frozen=True)
class LoadPlan:
    num_load_blocks: int  # leading blocks to load; the rest of the prompt is computed
    load_s: float
    compute_s: float
    queue_s: float

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.load_s + self.compute_s


@dataclass(frozen=True)
class Placement:
    worker_id: str
    plan: LoadPlan
    num_local_blocks: int  # leading blocks the worker itself holds
    pull_from: str | None = None  # worker to pull blocks [num_local_blocks, num_load_blocks)
    num_pull_blocks: int = 0


class CostModel:
    def __init__(self, block_size: int, block_nbytes: int) -> None:
        if block_size < 1 or block_nbytes < 1:
            raise ValueError("block_size and block_nbytes must be >= 1")
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.profiles: dict[str, WorkerProfile] = {}

    def update(self, profile: WorkerProfile) -> None:
        self.profiles[profile.worker_id] = profile

    def remove(self, worker_id: str) -> None:
        self.profiles.pop(worker_id, None)

    def compute_time_s(self, profile: WorkerProfile, num_tokens: int) -> float:
        return num_tokens / profile.prefill_tokens_per_s

    def plan_load(self, profile: WorkerProfile, tiers: Sequence[str], prompt_len: int) -> LoadPlan:
        """Best number of leading blocks to load, given each leading block's tier (the last
        prompt token is always computed, to produce the first output token)."""
        max_blocks = min(len(tiers), (prompt_len - 1) // self.block_size)
        best_k, best_load, load = 0, 0.0, 0.0
        best_total = self.compute_time_s(profile, prompt_len)
        for k in range(1, max_blocks + 1):
            bw = profile.bandwidth(tiers[k - 1])
            if bw <= 0:
                break  # this tier cannot be loaded here: neither can anything after it
            load += self.block_nbytes / bw
            total = load + self.compute_time_s(profile, prompt_len - k * self.block_size)
            if total < best_total:
                best_k, best_load, best_total = k, load, total
        return LoadPlan(
            num_load_blocks=best_k,
            load_s=best_load,
            compute_s=best_total - best_load,
            queue_s=profile.queue_wait_s,
        )

    def predicted_ttft(self, worker_id: str, tiers: Sequence[str], prompt_len: int) -> float:
        return self.plan_load(self._profile(worker_id), tiers, prompt_len).ttft_s

    def choose_prefill(
        self,
        candidates: Sequence[str],
        index: GlobalBlockIndex,
        hashes: Sequence[BlockHash],
        prompt_len: int,
    ) -> Placement:
        """The candidate with the lowest predicted TTFT (ties: more local prefix, then id).
        A worker may pull the blocks beyond its own prefix from the worker holding the longest
        one, when that beats recomputing them."""
        live = [w for w in candidates if w in self.profiles]
        if not live:
            raise NoWorkerError(f"no prefill worker available among {list(candidates)}")
        held = {w: index.leading_tiers(w, hashes) for w in index.workers()}
        best: tuple[float, int, str] | None = None
        chosen: Placement | None = None
        for w in live:
            profile = self.profiles[w]
            local = held.get(w, [])
            donor = max(
                (d for d in held if d != w and len(held[d]) > len(local)),
                key=lambda d: (len(held[d]), d),
                default=None,
            )
            tiers = list(local)
            if donor is not None and profile.net_bytes_per_s > 0:
                tiers += [REMOTE_TIER] * (len(held[donor]) - len(local))
            plan = self.plan_load(profile, tiers, prompt_len)
            num_pull = max(0, plan.num_load_blocks - len(local))
            key = (plan.ttft_s, -len(local), w)
            if best is None or key < best:
                best = key
                chosen = Placement(
                    worker_id=w,
                    plan=plan,
                    num_local_blocks=len(local),
                    pull_from=donor if num_pull else None,
                    num_pull_blocks=num_pull,
                )
        assert chosen is not None
        return chosen

    def choose_decode(
        self, candidates: Sequence[str], index: GlobalBlockIndex, hashes: Sequence[BlockHash]
    ) -> str:
        """Least loaded decode worker; ties go to the one holding the longest prefix."""
        live = [w for w in candidates if w in self.profiles]
        if not live:
            raise NoWorkerError(f"no decode worker available among {list(candidates)}")
        return min(
            live,
            key=lambda w: (
                self.profiles[w].queue_depth,
                -len(index.leading_tiers(w, hashes)),
                w,
            ),
        )

    def _profile(self, worker_id: str) -> WorkerProfile:
        profile = self.profiles.get(worker_id)
        if profile is None:
            raise NoWorkerError(f"no profile for worker {worker_id!r} (not registered or dead)")
        return profile
