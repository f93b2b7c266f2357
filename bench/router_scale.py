"""The router's index and placement at a given worker count, before (the per-worker reference)
and after (``GlobalBlockIndex``), measured side by side on the same state.

- events/s: the block events a prefix-aware trace replay produced, re-applied to a fresh
  index of each kind (best of ``repeats``), a worker's batch at a time as the router applies
  them;
- index bytes: every object the index holds (dicts, sets, rows, the hash keys, arrays),
  counted once, and per million blocks held;
- placement: ``choose_prefill`` of a 32K-token prompt (2,048 blocks) over every worker (a
  warm-up call, timed apart as the first call after a full garbage collection, then the timed
  calls), on the
  replay's final state, with the prompt held by no worker, one, a quarter or all of them (in
  HBM, host and disk: 512 / 1,024 / 512 blocks), and ``mixed``: every worker holding a prefix
  of its own length in tiers split at their own points (a distinct residency per worker);
- remove_worker: forgetting the worker holding the most blocks (at the end, on that state);
  for the index over all workers, also ``compact``: clearing that worker's bits from the rows
  at once, which otherwise happens a few thousand rows per later event batch.
"""

from __future__ import annotations

import gc
import hashlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from bench.router_ref import ReferenceBlockIndex, reference_choose_prefill
from bench.router_replay import EventStream, make_cost_model, worker_names
from bench.router_sim import SimProfile
from kvstore.keys import BlockHash, hash_prompt_blocks
from proto.vocab import EventKind, Tier
from proto.worker_api import BlockEvent
from router.index import GlobalBlockIndex
from router.placement import CostModel, Placement

PROMPT_BLOCKS = 2048
SHARES = ("none", "one", "quarter", "all")
SCENARIOS = (*SHARES, "mixed")


class _Index(Protocol):
    def add_worker(self, worker_id: str) -> None: ...

    def apply_many(self, worker_id: str, events: Sequence[BlockEvent]) -> None: ...

    def remove_worker(self, worker_id: str) -> int: ...


IndexT = TypeVar("IndexT", bound=_Index)


def ingest(make: Callable[[], IndexT], stream: EventStream, repeats: int) -> tuple[IndexT, float]:
    """A fresh index fed the whole stream ``repeats`` times: (the last one, best events/s)."""
    num = sum(len(e.block_hashes) for _, events in stream for e in events)
    best, index = 0.0, make()
    for _ in range(repeats):
        index = make()
        gc.collect()
        gc.disable()  # a collection pass in the middle would time the collector
        try:
            t0 = time.perf_counter()
            for worker, events in stream:
                index.apply_many(worker, events)
            best = max(best, num / (time.perf_counter() - t0))
        finally:
            gc.enable()
    return index, best


def deep_sizeof(root: object) -> int:
    """Bytes of ``root`` and everything it references (each object once). Locks, types and
    modules are left out."""
    seen: set[int] = set()
    todo = [root]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type) or type(obj).__module__ == "_thread":
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__"):
            todo.append(vars(obj))
        for name in getattr(type(obj), "__slots__", ()):
            if name != "__weakref__" and hasattr(obj, name):
                todo.append(getattr(obj, name))
    return total


def synthetic_prompt(seed: int) -> list[BlockHash]:
    """The block hashes of a 32K-token prompt nobody holds yet."""
    tokens = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(),
                             "little") % 32000 for i in range(PROMPT_BLOCKS * 16)]
    return hash_prompt_blocks(tokens, 16, b"strata-bench-rtr", cache_salt=f"scale-{seed}")


def holdings(scenario: str, names: Sequence[str], prompt: Sequence[BlockHash],
             rng: random.Random) -> dict[str, list[BlockEvent]]:
    """Events making each holder of ``scenario`` hold its prefix of ``prompt``."""
    n = len(prompt)
    if scenario == "mixed":
        out = {}
        for w in names:
            end = rng.randrange(1, n + 1)
            a = rng.randrange(0, end + 1)
            b = rng.randrange(a, end + 1)
            out[w] = _tiers(prompt, a, b, end)
        return out
    count = {"none": 0, "one": 1, "quarter": len(names) // 4, "all": len(names)}[scenario]
    return {w: _tiers(prompt, n // 4, 3 * n // 4, n) for w in names[:count]}


def _tiers(prompt: Sequence[BlockHash], a: int, b: int, end: int) -> list[BlockEvent]:
    return [BlockEvent(EventKind.STORED, Tier.DEVICE, tuple(prompt[:a])),
            BlockEvent(EventKind.STORED, Tier.HOST, tuple(prompt[a:b])),
            BlockEvent(EventKind.STORED, Tier.DISK, tuple(prompt[b:end]))]


def _undo(events: list[BlockEvent]) -> list[BlockEvent]:
    return [BlockEvent(EventKind.REMOVED, e.tier, e.block_hashes) for e in events]


def placement_latency(
    new: GlobalBlockIndex, ref: ReferenceBlockIndex | None, cost: CostModel,
    names: Sequence[str], samples: int, ref_samples: int, seed: int,
) -> dict[str, Any]:
    """Seconds per ``choose_prefill`` of the synthetic prompt, per scenario, for both indexes
    on the same state; and whether both chose the same placement."""
    rng = random.Random(seed)
    prompt = synthetic_prompt(seed)
    prompt_len = PROMPT_BLOCKS * 16
    out: dict[str, Any] = {"after": {}, "before": {}, "agree": True, "disagree": {},
                           "first_call": {}}
    indexes: list[_Index] = [new] if ref is None else [new, ref]
    for scenario in SCENARIOS:
        held = holdings(scenario, names, prompt, rng)
        for index in indexes:
            for w, events in held.items():
                index.apply_many(w, events)
        times, placed, first = _time(
            lambda: cost.choose_prefill(names, new, prompt, prompt_len), samples)
        out["after"][scenario] = times
        out["first_call"][scenario] = first
        if ref is not None:
            ref_times, ref_placed, _ = _time(
                lambda: reference_choose_prefill(cost, names, ref, prompt, prompt_len),
                ref_samples)
            out["before"][scenario] = ref_times
            if ref_placed != placed:  # the bounded placement chose another: by how much
                out["agree"] = False
                out["disagree"][scenario] = placed.plan.ttft_s / ref_placed.plan.ttft_s - 1
        for index in indexes:
            for w, events in held.items():
                index.apply_many(w, _undo(events))
    return out


def _time(fn: Callable[[], Placement], samples: int) -> tuple[list[float], Placement, float]:
    """``samples`` timed calls after a warm-up, and the warm-up's own time. The simulator's
    garbage is collected before the warm-up: a full collection walks the benchmark's whole heap
    (the trace, the event stream) and leaves the CPU caches cold for the next call, so that call
    -- the first after the collection, with its code and the table's lines out of cache -- is
    reported apart (``first_call``), not pooled with the steady calls."""
    gc.collect()
    t0 = time.perf_counter()
    placed = fn()
    first = time.perf_counter() - t0
    times = []
    gc.disable()  # a collection of the simulator's garbage is not the router's time
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times, placed, first


def remove_worker_s(index: _Index, worker: str) -> float:
    t0 = time.perf_counter()
    index.remove_worker(worker)
    return time.perf_counter() - t0


def compact_s(index: GlobalBlockIndex) -> float:
    t0 = time.perf_counter()
    index.compact()
    return time.perf_counter() - t0


def scale_point(
    stream: EventStream, num_workers: int, profile: SimProfile, *, repeats: int, samples: int,
    ref_samples: int, seed: int, with_reference: bool,
) -> dict[str, Any]:
    """Every figure of one worker count, before and after, from one state."""
    names = worker_names(num_workers)
    new, new_rate = ingest(GlobalBlockIndex, stream, repeats)
    for w in names:
        new.add_worker(w)
    ref: ReferenceBlockIndex | None = None
    blocks = len(new)
    row: dict[str, Any] = {"workers": num_workers, "blocks": blocks,
                           "events": sum(len(e.block_hashes) for _, es in stream for e in es),
                           "events_per_s": new_rate, "index_bytes": deep_sizeof(new)}
    if with_reference:
        ref, ref_rate = ingest(ReferenceBlockIndex, stream, repeats)
        for w in names:
            ref.add_worker(w)
        row["before"] = {"events_per_s": ref_rate, "index_bytes": deep_sizeof(ref)}
    for part in (row, row["before"]) if with_reference else (row,):
        part["index_bytes_per_mblock"] = part["index_bytes"] / max(1, blocks) * 1e6
    cost = make_cost_model(profile, names)
    rng = random.Random(seed)
    for w in names:  # requests in flight, as a busy cluster has them
        cost.profiles[w].queue_depth = rng.randrange(4)
        cost.profiles[w].mean_service_s = 0.5
    lat = placement_latency(new, ref, cost, names, samples, ref_samples, seed)
    row["placement"] = lat["after"]
    row["placement_first_call"] = lat["first_call"]
    if ref is not None:
        row["before"]["placement"] = lat["before"]
        row["placements_agree"] = lat["agree"]
        row["ttft_over_reference"] = lat["disagree"]  # scenario -> predicted TTFT ratio - 1
        busiest = max(names, key=ref.num_blocks)
        row["remove_worker_s"] = remove_worker_s(new, busiest)
        row["compact_s"] = compact_s(new)
        row["before"]["remove_worker_s"] = remove_worker_s(ref, busiest)
    return row
