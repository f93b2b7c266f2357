"""Replay a Mooncake trace over simulated workers at its timestamps (simulated time).

For each request: the router picks a prefill worker (``prefix-aware``: the real
``CostModel.choose_prefill`` over the real ``GlobalBlockIndex``; ``load-only``: the shortest
predicted queue, ties at random; ``random``); the worker looks its blocks up in its own store,
decides how many leading blocks to load with the same cost model (pulling the blocks the router
named from the donor, as far as the donor still holds them), queues the request behind the
ones it already has (one prefill at a time) and updates its store. TTFT = queue wait + load +
compute of the prompt. The index sees a worker's events when its request completes, as the
router sees them after the worker reports; queue depths and the moving average of service
times are what the router would observe.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.router_sim import SimProfile, SimStore, TraceHasher, unbounded_hit_blocks
from bench.trace_data import TraceRequest
from kvstore.keys import BlockHash
from proto.worker_api import BlockEvent
from router.index import TIERS, GlobalBlockIndex
from router.placement import REMOTE_TIER, CostModel, WorkerProfile, tier_runs

POLICIES = ("prefix-aware", "load-only", "random")
EventStream = list[tuple[str, list[BlockEvent]]]  # (worker, its events), in the order applied


@dataclass
class Workload:
    """A trace turned into block hashes once, shared by every replay."""

    arrivals_s: list[float]  # from the first request
    prompt_lens: list[int]
    hashes: list[list[BlockHash]]
    unbounded_blocks: list[int]  # leading blocks an unbounded cache would serve

    @classmethod
    def from_trace(cls, reqs: Sequence[TraceRequest], block_size: int) -> Workload:
        hasher = TraceHasher(block_size)
        t0 = reqs[0].timestamp_ms
        hashes = [hasher.hashes(r) for r in reqs]
        lens = [r.input_length for r in reqs]
        return cls([(r.timestamp_ms - t0) / 1e3 for r in reqs], lens, hashes,
                   unbounded_hit_blocks(hashes, block_size, lens))


@dataclass
class ReplayResult:
    policy: str
    num_workers: int
    placed: list[str] = field(default_factory=list)  # the prefill worker of each request
    ttft_s: list[float] = field(default_factory=list)
    served_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (*TIERS, REMOTE_TIER), 0))
    held_tokens: int = 0  # prompt tokens the chosen worker held in some tier (loaded or not)
    placement_s: list[float] = field(default_factory=list)  # choose_prefill, prefix-aware only
    events: EventStream | None = None  # what the index ingested (when recorded)
    index: GlobalBlockIndex | None = None
    cost: CostModel | None = None
    wall_s: float = 0.0


def worker_names(num_workers: int) -> list[str]:
    return [f"sim-{i:04d}" for i in range(num_workers)]


def make_cost_model(profile: SimProfile, names: Sequence[str]) -> CostModel:
    cost = CostModel(profile.block_size, profile.block_nbytes)
    for w in names:
        cost.update(WorkerProfile(
            w, profile.prefill_tokens_per_s,
            {"host": profile.host_bytes_per_s, "disk": profile.disk_bytes_per_s},
            net_bytes_per_s=profile.net_bytes_per_s,
        ))
    return cost


def replay(work: Workload, num_workers: int, policy: str, profile: SimProfile, seed: int = 0,
           record_events: bool = False, on_request: Callable[[], None] | None = None,
           ) -> ReplayResult:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: expected one of {POLICIES}")
    if num_workers < 1:
        raise ValueError(f"the number of workers must be >= 1, got {num_workers}")
    start_wall = time.perf_counter()
    names = worker_names(num_workers)
    stores = {w: SimStore(profile) for w in names}
    cost = make_cost_model(profile, names)
    index = GlobalBlockIndex() if policy == "prefix-aware" else None
    if index is not None:
        for w in names:
            index.add_worker(w)
    out = ReplayResult(policy, num_workers, events=[] if record_events else None, index=index,
                       cost=cost)
    rng = random.Random(seed)
    free_at = dict.fromkeys(names, 0.0)
    pending: list[tuple[float, int, str, list[BlockEvent], float]] = []  # by completion time

    def complete(until: float) -> None:
        while pending and pending[0][0] <= until:
            _, _, w, events, service_s = heapq.heappop(pending)
            if index is not None:
                index.apply_many(w, events)
            if out.events is not None:
                out.events.append((w, events))
            p = cost.profiles[w]
            p.queue_depth -= 1
            p.observe_service(service_s)

    for i, (t, prompt_len, hashes) in enumerate(zip(work.arrivals_s, work.prompt_lens,
                                                    work.hashes)):
        complete(t)
        pull_from, num_pull = None, 0
        if index is not None:
            t0 = time.perf_counter()
            placement = cost.choose_prefill(names, index, hashes, prompt_len)
            out.placement_s.append(time.perf_counter() - t0)
            w, pull_from, num_pull = (placement.worker_id, placement.pull_from,
                                      placement.num_pull_blocks)
        elif policy == "load-only":
            waits = {n: cost.profiles[n].queue_wait_s for n in names}
            least = min(waits.values())
            w = rng.choice([n for n in names if waits[n] == least])
        else:
            w = rng.choice(names)
        out.placed.append(w)
        store = stores[w]
        local = store.lookup(hashes)
        runs = tier_runs(local)
        if pull_from is not None:
            reach = min(len(local) + num_pull, len(stores[pull_from].lookup(hashes)))
            if reach > len(local):
                runs.append((REMOTE_TIER, reach - len(local)))
        p = cost.profiles[w]
        plan = cost.plan_runs(p, runs, prompt_len)
        service_s = plan.load_s + plan.compute_s
        end = max(t, free_at[w]) + service_s
        free_at[w] = end
        out.ttft_s.append(end - t)
        k = plan.num_load_blocks
        bs = profile.block_size
        out.held_tokens += min(len(local), (prompt_len - 1) // bs) * bs
        for tier in local[:k]:
            out.served_tokens[tier] += profile.block_size
        out.served_tokens[REMOTE_TIER] += max(0, k - len(local)) * profile.block_size
        store.serve(hashes, local, k)
        p.queue_depth += 1
        heapq.heappush(pending, (end, i, w, store.drain(), service_s))
        if on_request is not None:
            on_request()
    complete(float("inf"))
    out.wall_s = time.perf_counter() - start_wall
    return out
