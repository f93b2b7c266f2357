"""Simulated workers for ``strata bench router``: no engines, no bytes, simulated time.

Each worker has a prefill speed, tier bandwidths and tier capacities from a ``SimProfile`` and a
``SimStore`` that keeps block hashes by the rules of the real tiers (``engine.block_pool``,
``kvstore.tiers``): the device pool is an LRU of cached blocks, a request's blocks are freed
tail first (its prefix outlives its suffix) and a pool victim the store lacks is demoted to it;
computed blocks are written through to host and disk; a host victim the disk lacks is demoted to
it; a disk victim is dropped; a host hit is touched, a disk hit is touched and promoted to host.
Every change is reported as the real worker reports it: ``stored`` / ``removed`` events with a
tier, which the router's real index ingests.

A request's blocks come from a Mooncake trace at full length: each ``hash_id`` is 512 tokens,
i.e. 32 blocks of 16 tokens whose hashes are chained from the previous ones with the real
``kvstore.keys.hash_block`` scheme (token ids made up from the hash_id, so equal ids give equal
blocks; a test checks the hashes equal ``hash_prompt_blocks`` of those tokens).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.trace_data import TRACE_BLOCK_TOKENS, TraceRequest
from kvstore.keys import HASH_NBYTES, ROOT_HASH, BlockHash, first_block_extra
from proto.worker_api import BlockEvent

MB = 1 << 20


@dataclass(frozen=True)
class SimProfile:
    """One simulated worker. Defaults: the Llama-3.1-8B shape on one H100 (BENCHMARKS.md)."""

    block_size: int = 16  # tokens per block
    block_nbytes: int = 2 * MB  # KV of one block (8B shape: 128 KiB a token)
    prefill_tokens_per_s: float = 23_760.0  # 32K tokens in 1.379 s
    host_bytes_per_s: float = 50.8e9  # pinned host -> GPU, 2 MiB blocks
    disk_bytes_per_s: float = 1.8e9  # NVMe read, O_DIRECT
    net_bytes_per_s: float = 2.5e9  # worker-to-worker pull over gRPC (0: never pull)
    device_blocks: int = 25_000  # HBM pool after the weights (~52 GB)
    host_blocks: int = 100_000  # pinned host slab (~210 GB)
    disk_blocks: int = 500_000  # NVMe (~1 TB)

    def __post_init__(self) -> None:
        if self.block_size < 1 or TRACE_BLOCK_TOKENS % self.block_size:
            raise ValueError(f"block_size must divide {TRACE_BLOCK_TOKENS}, got {self.block_size}")
        if min(self.prefill_tokens_per_s, self.host_bytes_per_s, self.disk_bytes_per_s) <= 0:
            raise ValueError("prefill speed and tier bandwidths must be > 0")
        if self.device_blocks < 1 or self.host_blocks < 0 or self.disk_blocks < 0:
            raise ValueError("device_blocks must be >= 1, host_blocks and disk_blocks >= 0")


class TraceHasher:
    """Block hashes of trace requests (cached per hash_id: a trace's ids repeat a lot)."""

    def __init__(self, block_size: int, fingerprint: bytes = b"strata-bench-rtr") -> None:
        self.block_size = block_size
        self.per_id = TRACE_BLOCK_TOKENS // block_size
        self._extra = first_block_extra(fingerprint)
        self._cache: dict[int, tuple[bytes, tuple[BlockHash, ...]]] = {}  # id -> (parent, hashes)

    def hashes(self, req: TraceRequest) -> list[BlockHash]:
        """Hashes of the request's full blocks, in order."""
        n = req.input_length // self.block_size
        out: list[BlockHash] = []
        parent: bytes = ROOT_HASH
        for hid in req.hash_ids:
            if len(out) >= n:
                break
            cached = self._cache.get(hid)
            if cached is None or cached[0] != parent:
                cached = (parent, self._chunk(parent, hid, first=not out))
                self._cache[hid] = cached
            out.extend(cached[1])
            parent = out[-1]
        return out[:n]

    def _chunk(self, parent: bytes, hid: int, first: bool) -> tuple[BlockHash, ...]:
        """``kvstore.keys.hash_block`` of each block of the hash_id, on the token bytes sliced
        from one array (int32 LE, as hash_block writes them)."""
        ids = np.arange(TRACE_BLOCK_TOKENS, dtype=np.int64) + hid * TRACE_BLOCK_TOKENS
        raw = (ids % (1 << 31)).astype("<i4").tobytes()
        step = 4 * self.block_size
        out: list[BlockHash] = []
        for j in range(self.per_id):
            h = hashlib.blake2b(parent, digest_size=HASH_NBYTES)
            h.update(raw[j * step : (j + 1) * step])
            if first and j == 0:
                h.update(self._extra)
            parent = BlockHash(h.digest())
            out.append(parent)
        return tuple(out)

    def tokens(self, hid: int) -> np.ndarray:
        """The made-up token ids of one hash_id (what ``_chunk`` hashes)."""
        ids = np.arange(TRACE_BLOCK_TOKENS, dtype=np.int64) + hid * TRACE_BLOCK_TOKENS
        return (ids % (1 << 31)).astype(np.int32)


class SimStore:
    """One worker's blocks in device / host / disk LRUs (oldest first), and its events."""

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.device: OrderedDict[bytes, None] = OrderedDict()
        self.host: OrderedDict[bytes, None] = OrderedDict()
        self.disk: OrderedDict[bytes, None] = OrderedDict()
        self._events: list[tuple[str, str, list[bytes]]] = []

    def lookup(self, hashes: Sequence[bytes]) -> list[str]:
        """Best tier of each leading block held (the pool first, then the store)."""
        out: list[str] = []
        for h in hashes:
            if h in self.device:
                out.append("device")
            elif h in self.host:
                out.append("host")
            elif h in self.disk:
                out.append("disk")
            else:
                break
        return out

    def serve(self, hashes: Sequence[bytes], local_tiers: Sequence[str], num_load: int) -> None:
        """A prefill of ``hashes`` that loads its first ``num_load`` blocks (from this store as
        far as ``local_tiers``, this store's ``lookup``, reaches; pulled from another worker
        beyond) and computes the rest."""
        device = self.device
        in_use = {h for h in hashes if device.pop(h, 0) is None}  # out of the LRU while used
        promoted: list[bytes] = []
        for h, tier in zip(hashes[:num_load], local_tiers):
            if tier == "host":
                self.host.move_to_end(h)
            elif tier == "disk":
                self.disk.move_to_end(h)
                promoted.append(h)
        self._host_put(promoted)
        self._allocate(len(hashes))
        self._event("stored", "device", [h for h in hashes if h not in in_use])
        computed = [h for h in hashes[num_load:] if h not in in_use]
        self._host_put(computed)  # written through
        self._disk_put(computed)
        for h in reversed(hashes):  # freed tail first: the prefix outlives the suffix
            device[h] = None

    def drain(self) -> list[BlockEvent]:
        events = [BlockEvent(kind, tier, tuple(hs)) for kind, tier, hs in self._events]
        self._events = []
        return events

    def _allocate(self, num_used: int) -> None:
        """Evict LRU pool blocks until ``num_used`` more fit; demote those the store lacks."""
        excess = len(self.device) + num_used - self.profile.device_blocks
        if excess <= 0:
            return
        victims = [self.device.popitem(last=False)[0] for _ in range(min(excess, len(self.device)))]
        self._event("removed", "device", victims)
        lacking = [h for h in victims if h not in self.host and h not in self.disk]
        self._host_put(lacking)
        self._disk_put(lacking)

    def _host_put(self, hashes: Sequence[bytes]) -> None:
        """Touch the blocks host has; evict LRU blocks for the others (demoting those the disk
        lacks), or refuse what still does not fit, as a put into a full slab does."""
        host = self.host
        for h in hashes:
            if h in host:
                host.move_to_end(h)
        new = [h for h in dict.fromkeys(hashes) if h not in host]
        victims = self._make_room(host, self.profile.host_blocks, new)
        self._event("removed", "host", victims)
        self._disk_put([h for h in victims if h not in self.disk])  # demoted
        self._insert(host, "host", new)

    def _disk_put(self, hashes: Sequence[bytes]) -> None:
        """Blocks the disk lacks, after evicting (dropping) LRU ones; a present block is left
        as it is (a write-behind put does not touch it)."""
        disk = self.disk
        new = [h for h in dict.fromkeys(hashes) if h not in disk]
        self._event("removed", "disk", self._make_room(disk, self.profile.disk_blocks, new))
        self._insert(disk, "disk", new)

    @staticmethod
    def _make_room(lru: OrderedDict[bytes, None], capacity: int, new: list[bytes]) -> list[bytes]:
        """Evict LRU entries until ``new`` fits; trims ``new`` to what can fit at all."""
        need = len(lru) + len(new) - capacity
        victims = [lru.popitem(last=False)[0] for _ in range(min(max(need, 0), len(lru)))]
        del new[max(0, capacity - len(lru)) :]
        return victims

    def _insert(self, lru: OrderedDict[bytes, None], tier: str, new: list[bytes]) -> None:
        for h in new:
            lru[h] = None
        self._event("stored", tier, new)

    def _event(self, kind: str, tier: str, hashes: list[bytes]) -> None:
        if not hashes:
            return
        last = self._events[-1] if self._events else None
        if last is not None and last[0] == kind and last[1] == tier:
            last[2].extend(hashes)
        else:
            self._events.append((kind, tier, list(hashes)))


def unbounded_hit_blocks(requests: Sequence[Sequence[BlockHash]], block_size: int,
                         prompt_lens: Sequence[int]) -> list[int]:
    """Leading blocks of each request that an earlier request had (a cache with no limit, on
    one machine), at most all but the block holding the last prompt token."""
    seen: set[bytes] = set()
    out: list[int] = []
    for hashes, n_tokens in zip(requests, prompt_lens):
        cap = min(len(hashes), (n_tokens - 1) // block_size)
        k = 0
        while k < cap and hashes[k] in seen:
            k += 1
        out.append(k)
        seen.update(hashes)
    return out
