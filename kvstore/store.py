"""TieredStore: host slab + LMDB disk behind one lookup / lend / reserve / put API.

- Reads: ``lend`` pins the slab slots of the leading blocks found (disk hits are read straight
  into fresh slots first: disk -> host -> pool, never a side buffer) for a copy to read; the
  caller ``release``s the lease once its copy completed. ``load`` is lend + copy out + release.
  ``prefetch`` moves disk blocks into host in the background (``kvstore.prefetch``).
- Writes: ``reserve`` gives new blocks slots nobody can read or evict; the caller copies into
  them (asynchronously) and ``commit``s once the copy completed — only then are the blocks
  readable — or ``cancel``s. ``put`` copies synchronously. When a block also goes to disk is
  the ``disk_write_policy`` (``kvstore.write_policy``; the disk writes behind, in a thread).
- Any tier may be off (host capacity 0, no disk_path); an unusable disk path disables the disk
  tier with a warning and the store keeps serving from host.
- Locks: the store's own lock guards its pins and lease count; each tier has its own. The order
  is store -> tier; tiers never call back into the store under their lock, and event
  subscribers are always called with no lock held.

One TieredStore per ``disk_path`` at a time (an exclusive flock enforces it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from kvstore.bandwidth import disk_read_method, drop_page_cache, measure_bandwidth
from kvstore.config import StoreConfig
from kvstore.errors import DiskUnavailableError
from kvstore.events import EventBus, EventListener
from kvstore.evictor import HostEvictor
from kvstore.keys import HASH_NBYTES, BlockHash
from kvstore.layout import KVLayout
from kvstore.lending import Lease, Reservation, copy_rows_out, cpu_buffer
from kvstore.loader import Loader
from kvstore.metrics import StoreMetrics
from kvstore.pending import PendingLease
from kvstore.prefetch import Prefetcher
from kvstore.tiers.base import StoreTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.write_policy import DiskWritePolicy
from proto.vocab import Tier
from proto.worker_api import BlockEvent

logger = logging.getLogger(__name__)


class TieredStore:
    def __init__(
        self,
        layout: KVLayout,
        fingerprint: bytes,
        config: StoreConfig,
        *,
        prefetch_pin_timeout_s: float = 30.0,
        max_events: int = 65536,
    ) -> None:
        if len(fingerprint) != HASH_NBYTES:
            raise ValueError(
                f"fingerprint must be {HASH_NBYTES} bytes (kvstore.keys.model_fingerprint), "
                f"got {len(fingerprint)}"
            )
        if prefetch_pin_timeout_s <= 0:
            raise ValueError("prefetch_pin_timeout_s must be positive")
        self.layout = layout
        self.fingerprint = fingerprint
        self.config = config
        self.block_nbytes = layout.block_nbytes
        self.events = EventBus(max_events)
        self.metrics = StoreMetrics()
        self.host: HostTier | None = None
        self.disk: DiskTier | None = None
        self.disk_error: str | None = None  # why the configured disk tier is off
        self.num_disk_refused = 0  # writes the failed disk tier could not take
        if config.disk_enabled:
            assert config.disk_path is not None
            try:
                self.disk = DiskTier(
                    config.disk_path,
                    config.disk_capacity_bytes,
                    self.block_nbytes,
                    fingerprint,
                    write_queue_blocks=config.disk_write_queue_blocks,
                    publish=self.events.publish,
                    read_threads=config.disk_read_threads,
                    read_chunk_bytes=config.disk_read_chunk_bytes,
                    read_limit_bytes_per_s=config.disk_read_limit_bytes_per_s,
                )
            except DiskUnavailableError as e:
                self.disk_error = str(e)
                logger.warning("disk tier disabled, serving from host only: %s", e)
        self.policy = DiskWritePolicy(config.disk_write_policy, self.disk)
        if config.host_enabled:
            self.host = HostTier(
                self.block_nbytes,
                config.host_capacity_bytes,
                pin_memory=config.pin_host_memory,
                on_evict=self.policy.host_evicted,
                publish=self.events.publish,
            )
        # the enabled tiers, fastest first: a block's tier is the first of these holding it
        self.tiers: list[StoreTier] = [t for t in (self.host, self.disk) if t is not None]
        self.evictor: HostEvictor | None = None
        headroom = int(self.host.num_slots * config.host_headroom) if self.host else 0
        if self.host is not None and headroom > 0:
            self.evictor = HostEvictor(self.host, headroom)
        self.prefetcher: Prefetcher | None = None
        if self.host is not None and self.disk is not None:
            self.prefetcher = Prefetcher(
                self.host, self.disk, config.prefetch_threads, prefetch_pin_timeout_s, self.metrics
            )
        self.loader = Loader(
            self.host, self.disk, self.prefetcher, self.policy, self.block_nbytes,
            on_taken=self._lease_taken, on_closed=self._load_closed,
        )
        self._lock = threading.Lock()
        self._pins: dict[BlockHash, list[tuple[bool, bool]]] = {}  # (host, disk) per pin call
        self._num_lent = 0  # leases not released yet
        self._loads_done = threading.Condition(self._lock)  # notified as pending leases end
        self._num_pending = 0  # pending leases whose blocks are not all settled and closed
        self._closed = False

    # ----------------------------------------------------------------- read path
    def lookup(self, hashes: Sequence[BlockHash]) -> list[Tier]:
        """The fastest tier holding each leading block present; stops at the first miss.

        A block whose copy into host is still under way is not present yet."""
        found: list[Tier] = []
        for h in hashes:
            for tier in self.tiers:
                if tier.contains(h):
                    found.append(tier.name)
                    break
            else:
                break
        return found

    def lend(self, hashes: Sequence[BlockHash]) -> Lease:
        """Pin the leading blocks found for a copy to read; ``release`` the lease after it.

        ``start_load`` waited for: disk hits are read (and verified) into fresh host slots
        first; a missing or corrupt block ends the prefix. Without room in the host tier (or
        without a host tier) the blocks land in a private buffer."""
        pending = self.start_load(hashes)
        pending.wait()
        lease = pending.take(pending.num_ready())
        pending.close()
        return lease

    def start_load(
        self, hashes: Sequence[BlockHash], on_progress: Callable[[], None] | None = None
    ) -> PendingLease:
        """Start loading the leading blocks found; returns at once (the engine keeps serving).

        Host hits are pinned and ready now; disk hits are read by the disk tier's threads into
        reserved host slots (a private buffer when the host tier cannot hold them all); blocks
        a prefetch is reading arrive when it completes (``kvstore.loader``). ``on_progress``
        runs (on any thread) whenever blocks arrive. Take what arrived
        (``PendingLease.take``), then ``close`` it."""
        with self._lock:
            self._num_lent += 1
            self._num_pending += 1
        return self.loader.start(list(hashes), on_progress)

    def _lease_taken(self, lease: Lease) -> None:
        with self._lock:
            self._num_lent += 1

    def _load_closed(self, pending: PendingLease) -> None:
        """Every block of a closed pending lease arrived or failed: account the load."""
        taken = pending.num_taken()
        num_disk = pending.tiers[:taken].count(Tier.DISK)
        if pending.in_host:
            self.metrics.add("promoted", sum(pending.read_here[:taken]))
        end = pending.settled_at or time.perf_counter()
        self.metrics.record_load(
            end - pending.started,
            {Tier.HOST: taken - num_disk, Tier.DISK: num_disk},
            pending.requested - taken,
            self.block_nbytes,
        )
        with self._lock:
            self._num_lent -= 1
            self._num_pending -= 1
            self._loads_done.notify_all()

    def wait_loads(self, timeout_s: float | None = None) -> bool:
        """Wait until every pending lease closed has settled (its reads ended); False on
        timeout. Leak checks call it: a closed load's last reads end on their own."""
        with self._loads_done:
            return self._loads_done.wait_for(lambda: self._num_pending == 0, timeout_s)

    def release(self, lease: Lease) -> None:
        """The copy that read the lease completed: unpin its slots. Idempotent."""
        if lease.released:
            return
        lease.released = True
        if lease.in_host and self.host is not None:
            for h in lease.hashes:
                self.host.unpin(h)
        with self._lock:
            self._num_lent -= 1

    def load(self, hashes: Sequence[BlockHash], out: torch.Tensor) -> int:
        """Copy the leading blocks into ``out`` (uint8 ``[>= n, block_nbytes]``, CPU).

        Returns how many leading blocks were loaded; a missing or corrupt block ends the prefix.
        """
        self._check_buffer(out, len(hashes), "out")
        lease = self.lend(hashes)
        try:
            copy_rows_out(lease.base, lease.rows, out)
        finally:
            self.release(lease)
        return lease.num_blocks

    def prefetch(self, hashes: Sequence[BlockHash]) -> None:
        """Start moving the leading disk-resident blocks into host; returns at once."""
        if self.prefetcher is not None and not self._closed:
            self.prefetcher.prefetch(hashes)

    def wait_prefetch(self, timeout_s: float | None = None) -> bool:
        """Wait for every prefetch started so far; False on timeout."""
        return self.prefetcher.wait_all(timeout_s) if self.prefetcher is not None else True

    # ----------------------------------------------------------------- write path
    def reserve(self, hashes: Sequence[BlockHash]) -> Reservation:
        """Rows for the blocks no tier holds yet, to copy into; ``commit`` or ``cancel`` after.

        Blocks the host refuses (every slot pinned or being written) are left out."""
        if self.host is not None:
            res = self.host.reserve(hashes)
            if self.evictor is not None:
                self.evictor.wake()
            new = [hashes[i] for i in res.indices]
            return Reservation(new, res.indices, self.host.slab, res.slots, in_host=True)
        idx = []
        if self.disk is not None:
            idx = [i for i, h in enumerate(hashes) if not self.disk.contains(h)]
        buf = cpu_buffer(len(idx), self.block_nbytes)
        return Reservation([hashes[i] for i in idx], idx, buf, list(range(len(idx))), False)

    def commit(self, res: Reservation) -> None:
        """The copy into the reservation completed: the blocks become readable."""
        assert not res.settled, "reservation committed or cancelled twice"
        res.settled = True
        if not res.hashes:
            return
        start = time.perf_counter()
        if res.in_host:
            assert self.host is not None
            disk_ok = self.policy.stored(res.hashes, res.base, res.rows)  # before it can move
            self.host.commit(res.hashes)
        else:
            disk_ok = self.policy.not_stored(res.hashes, res.base, res.rows)
        n = res.num_blocks if res.in_host else 0
        self.metrics.record_put(
            time.perf_counter() - start, {Tier.HOST: n, Tier.DISK: sum(disk_ok)}, self.block_nbytes
        )

    def cancel(self, res: Reservation) -> None:
        """Give the reservation back unwritten (its copy failed or was abandoned)."""
        assert not res.settled, "reservation committed or cancelled twice"
        res.settled = True
        if res.in_host and self.host is not None and res.hashes:
            self.host.cancel(res.hashes)

    def put(self, hashes: Sequence[BlockHash], data: torch.Tensor) -> int:
        """Store ``data[i]`` (uint8 ``[>= n, block_nbytes]``, CPU) under ``hashes[i]``, copied now.

        Returns how many blocks some tier accepted (already present counts as accepted)."""
        self._check_buffer(data, len(hashes), "data")
        start = time.perf_counter()
        n = len(hashes)
        host_ok = self.host.put(hashes, data) if self.host is not None else [False] * n
        if self.evictor is not None:
            self.evictor.wake()
        disk_ok = [False] * n
        if self.policy.on_put:
            disk_ok = self.policy.stored(hashes, data)
        refused = [i for i in range(n) if not host_ok[i] and not disk_ok[i]]
        took = self.policy.not_stored([hashes[i] for i in refused], data, refused)
        for i, ok in zip(refused, took):
            disk_ok[i] = ok
        if self.disk is None and self.disk_error is not None:  # what the disk would have got
            with self._lock:
                self.num_disk_refused += n if self.policy.on_put else len(refused)
        self.metrics.record_put(
            time.perf_counter() - start,
            {Tier.HOST: sum(host_ok), Tier.DISK: sum(disk_ok)},
            self.block_nbytes,
        )
        return sum(1 for a, b in zip(host_ok, disk_ok) if a or b)

    def remove(self, hashes: Sequence[BlockHash]) -> int:
        """Drop unpinned blocks from every tier; how many tier copies were dropped."""
        num = 0
        for h in hashes:
            for tier in (self.host, self.disk):
                if tier is not None and tier.remove(h):
                    num += 1
            self.policy.forget(h)
        return num

    def tier(self, name: Tier) -> StoreTier | None:
        """The store's tier ``name``; None when it is off."""
        return next((t for t in self.tiers if t.name == name), None)

    def read_speed(self, tier: Tier) -> float | None:
        """Bytes/s of the tier's own reads so far (the disk measures them); None if unknown."""
        return self.disk.read_bytes_per_s if tier == Tier.DISK and self.disk is not None else None

    def demote(self, to: Tier, hashes: Sequence[BlockHash] | None = None) -> int:
        """Move blocks down to tier ``to``: every unpinned block of the tiers above it (the
        blocks of ``hashes`` only, when given: a prefix), each written to ``to`` first when it
        lacks it; returns how many left the tiers above. After a demotion to disk the disk's
        pages are dropped from the OS cache, so later loads read the device. The tiers above
        host (the device pool) are the engine's: ``demote(Tier.HOST)`` moves nothing here."""
        if to not in (Tier.HOST, Tier.DISK):
            raise ValueError(f"a store demotes to host or disk, not {to!r}")
        if to == Tier.HOST or self.host is None:
            return 0
        self.flush()
        if hashes is None:
            num = self.evict_host(self.host.num_blocks)
        else:
            present = [h for h in hashes if self.host.contains(h)]
            self.persist(present)
            num = sum(self.host.remove(h) for h in present)
        self.flush()
        if self.disk is not None:
            drop_page_cache(self.disk.path)
        return num

    def evict_host(self, num_blocks: int) -> int:
        """Evict up to ``num_blocks`` LRU unpinned host blocks, each written to disk first if
        the disk lacks it (whatever the write policy: this is a demotion)."""
        if self.host is None:
            return 0
        self.persist(self.host.resident()[:num_blocks])
        return self.host.evict(num_blocks)

    def persist(self, hashes: Sequence[BlockHash]) -> int:
        """Write the host blocks the disk lacks to disk, waiting for the writer; how many."""
        if self.host is None or self.disk is None:
            return 0
        todo = [h for h in hashes if not self.disk.contains(h)]
        chunk = self.config.disk_write_queue_blocks
        num = 0
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            slots = [self.host.pin_slot(h) for h in part]
            held = [(h, s) for h, s in zip(part, slots) if s is not None]
            try:
                ok = self.disk.put([h for h, _ in held], self.host.slab, [s for _, s in held])
                num += sum(ok)
            finally:
                for h, _ in held:
                    self.host.unpin(h)
            self.disk.flush()
        return num

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the disk write-behind queue to drain; False on timeout."""
        return self.disk.flush(timeout_s) if self.disk is not None else True

    # ----------------------------------------------------------------- pins
    def pin(self, hashes: Sequence[BlockHash]) -> list[bool]:
        """Pin each block in every tier holding it (never evicted); False where none holds it."""
        pinned: list[bool] = []
        with self._lock:
            for h in hashes:
                in_host = self.host is not None and self.host.pin(h)
                in_disk = self.disk is not None and self.disk.pin(h)
                if in_host or in_disk:
                    self._pins.setdefault(h, []).append((in_host, in_disk))
                pinned.append(in_host or in_disk)
        return pinned

    def unpin(self, hashes: Sequence[BlockHash]) -> None:
        """Release pins taken by ``pin`` (only for the blocks it returned True for)."""
        with self._lock:
            for h in hashes:
                stack = self._pins.get(h)
                assert stack, f"unpin of block {h.hex()} that this store has not pinned"
                in_host, in_disk = stack.pop()
                if not stack:
                    del self._pins[h]
                if in_host and self.host is not None:
                    self.host.unpin(h)
                if in_disk and self.disk is not None:
                    self.disk.unpin(h)

    def num_pinned(self) -> int:
        """Blocks pinned by ``pin`` or by prefetch (zero when every user is done)."""
        with self._lock:
            num = len(self._pins)
        return num + (self.prefetcher.num_pinned() if self.prefetcher is not None else 0)

    def num_lent(self) -> int:
        """Leases not released yet."""
        with self._lock:
            return self._num_lent

    def num_reserved(self) -> int:
        """Host slots reserved and not yet committed or cancelled."""
        return self.host.num_writing() if self.host is not None else 0

    # ----------------------------------------------------------------- events, stats, close
    def held(self) -> dict[Tier, list[BlockHash]]:
        """Every block of each tier below the device pool (a resync of the router's index)."""
        out: dict[Tier, list[BlockHash]] = {}
        if self.host is not None:
            out[Tier.HOST] = self.host.block_hashes()
        if self.disk is not None:
            out[Tier.DISK] = self.disk.block_hashes()
        return out

    def subscribe(self, callback: EventListener) -> None:
        self.events.subscribe(callback)

    def drain_events(self) -> list[BlockEvent]:
        return self.events.drain()

    def stats(self) -> dict[str, object]:
        """Plain numbers (JSON-able): per-tier counters, hits, latency histograms."""
        pf = self.prefetcher
        if pf is not None:
            pf.expire()
        return {
            **self.metrics.snapshot(),
            "host": self.host.counters() if self.host is not None else {"enabled": 0},
            "disk": self.disk.counters() if self.disk is not None else {"enabled": 0},
            "disk_policy": self.policy.counters(),
            "host_evicted_ahead": self.evictor.num_evicted if self.evictor is not None else 0,
            "disk_disabled_by_error": int(self.disk_error is not None),
            "disk_refused_writes_disabled": self.num_disk_refused,
            "prefetch_pinned_blocks": pf.num_pinned() if pf is not None else 0,
            "prefetch_inflight_blocks": pf.num_inflight() if pf is not None else 0,
            "events_dropped": self.events.num_dropped,
        }

    def measure_bandwidth(self, num_blocks: int = 16, repeats: int = 3) -> dict[Tier, float]:
        """Measured read GB/s per enabled tier (see ``kvstore.bandwidth``)."""
        return measure_bandwidth(
            self.block_nbytes, self.host is not None, self.disk,
            self.config.disk_write_queue_blocks, num_blocks, repeats,
        )

    @property
    def reads_bypass_page_cache(self) -> bool:
        """The disk tier reads with ``O_DIRECT`` (or there is none): no page cache to drop."""
        return self.disk is None or self.disk.direct_io

    def disk_read_method(self) -> str:
        """How the disk tier's reads reach the device (see ``kvstore.bandwidth``)."""
        return disk_read_method(self.disk)

    def close(self) -> None:
        """Finish prefetches, write host blocks the disk lacks (``persist_on_close``), flush the
        disk writer, close LMDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.evictor is not None:
            self.evictor.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.config.persist_on_close and self.host is not None and self.disk is not None:
            try:
                self.persist(self.host.resident())
            except Exception:  # a failing disk must not stop the shutdown
                logger.exception("writing the host tier to disk at close failed")
        if self.disk is not None:
            self.disk.close()
        if self.host is not None:
            self.host.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_buffer(self, buf: torch.Tensor, n: int, name: str) -> None:
        if buf.dtype != torch.uint8 or buf.device.type != "cpu" or buf.dim() != 2:
            raise ValueError(
                f"{name} must be a CPU uint8 tensor [n, block_nbytes]; got {buf.dtype} "
                f"{tuple(buf.shape)} on {buf.device} (use buf.view(torch.uint8).reshape(n, -1))"
            )
        if buf.shape[0] < n or buf.shape[1] != self.block_nbytes:
            raise ValueError(
                f"{name} has shape {tuple(buf.shape)}; need at least [{n}, {self.block_nbytes}]"
            )
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
