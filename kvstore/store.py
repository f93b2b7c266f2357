"""TieredStore: host slab + LMDB disk behind one lookup / load / prefetch / put API.

- ``put`` writes through: a synchronous memcpy into the host slab and a write-behind copy to
  disk, so a restart finds every block. Host evictions are demoted to disk when disk lacks them
  (a write refused at put time because the queue was full gets a second chance there).
- ``load`` serves the leading blocks from host, then disk (verified), promoting disk hits into
  host. ``prefetch`` moves disk-resident blocks into host in the background and pins them there
  until loaded or ``prefetch_pin_timeout_s`` passes.
- Any tier may be off (host capacity 0, no disk_path); an unusable disk path disables the disk
  tier with a warning and the store keeps serving from host.
- Locks: the store's own lock guards pins and prefetch bookkeeping; each tier has its own. The
  order is store -> tier; tiers never call back into the store under their lock, and event
  subscribers are always called with no lock held.

One TieredStore per ``disk_path`` at a time (an exclusive flock enforces it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvstore.config import StoreConfig
from kvstore.errors import DiskUnavailableError
from kvstore.events import EventBus, EventListener, StoreEvent
from kvstore.keys import HASH_NBYTES, BlockHash
from kvstore.layout import KVLayout
from kvstore.metrics import StoreMetrics
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

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
        self.prefetch_pin_timeout_s = prefetch_pin_timeout_s
        self.events = EventBus(max_events)
        self.metrics = StoreMetrics()
        self.host: HostTier | None = None
        self.disk: DiskTier | None = None
        self.disk_error: str | None = None  # why the configured disk tier is off
        self.num_disk_refused = 0  # writes the failed disk tier could not take
        if config.host_enabled:
            self.host = HostTier(
                self.block_nbytes,
                config.host_capacity_bytes,
                pin_memory=config.pin_host_memory,
                on_evict=self._demote,
                publish=self.events.publish,
            )
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
                )
            except DiskUnavailableError as e:
                self.disk_error = str(e)
                logger.warning("disk tier disabled, serving from host only: %s", e)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(config.prefetch_threads, "strata-prefetch")
        self._inflight: dict[BlockHash, Future[None]] = {}  # prefetches not finished
        self._prefetch_pins: dict[BlockHash, float] = {}  # host pin held by prefetch -> deadline
        self._pins: dict[BlockHash, list[tuple[bool, bool]]] = {}  # (host, disk) per pin call
        self._closed = False

    # ----------------------------------------------------------------- read path
    def lookup(self, hashes: Sequence[BlockHash]) -> list[str]:
        """Tier name ("host" | "disk") of each leading block present; stops at the first miss."""
        tiers: list[str] = []
        for h in hashes:
            if self.host is not None and self.host.contains(h):
                tiers.append("host")
            elif self.disk is not None and self.disk.contains(h):
                tiers.append("disk")
            else:
                break
        return tiers

    def load(self, hashes: Sequence[BlockHash], out: torch.Tensor) -> int:
        """Copy the leading blocks into ``out`` (uint8 ``[>= n, block_nbytes]``, CPU).

        Returns how many leading blocks were loaded; a missing or corrupt block ends the prefix.
        """
        self._check_buffer(out, len(hashes), "out")
        start = time.perf_counter()
        n = len(hashes)
        with self._lock:
            waits = {id(f): f for h in hashes if (f := self._inflight.get(h)) is not None}
        for future in waits.values():
            future.result()
        host_ok = self.host.get_into(hashes, out) if self.host is not None else [False] * n
        disk_rows: list[int] = []
        for i in range(n):
            if host_ok[i]:
                continue
            if self.disk is None or not self.disk.contains(hashes[i]):
                break
            disk_rows.append(i)
        disk_hit: set[int] = set()
        if disk_rows:
            assert self.disk is not None
            tmp = torch.empty((len(disk_rows), self.block_nbytes), dtype=torch.uint8)
            ok = self.disk.get_into([hashes[i] for i in disk_rows], tmp)
            got = [j for j, o in enumerate(ok) if o]
            if got:
                out.index_copy_(0, torch.tensor([disk_rows[j] for j in got]), tmp[got])
            disk_hit = {disk_rows[j] for j in got}
        num_loaded = 0
        while num_loaded < n and (host_ok[num_loaded] or num_loaded in disk_hit):
            num_loaded += 1
        promote = [i for i in range(num_loaded) if i in disk_hit]
        if promote and self.host is not None:
            self.host.put([hashes[i] for i in promote], out[torch.tensor(promote)])
            self.metrics.add("promoted", len(promote))
        self._release_prefetch_pins(hashes)
        num_host = sum(1 for i in range(num_loaded) if host_ok[i])
        self.metrics.record_load(
            time.perf_counter() - start,
            {"host": num_host, "disk": num_loaded - num_host},
            n - num_loaded,
            self.block_nbytes,
        )
        return num_loaded

    def prefetch(self, hashes: Sequence[BlockHash]) -> None:
        """Start moving the leading disk-resident blocks into host; returns at once."""
        if self.host is None or self.disk is None or self._closed:
            return
        self._expire_prefetch_pins()
        deadline = time.monotonic() + self.prefetch_pin_timeout_s
        todo: list[BlockHash] = []
        with self._lock:
            for h in hashes:
                if h in self._inflight or h in todo:
                    continue
                if self.host.pin(h):
                    self._hold_prefetch_pin_locked(h, deadline)
                elif self.disk.contains(h):
                    todo.append(h)
                else:
                    break
            num_tasks = min(self.config.prefetch_threads, len(todo))
            for t in range(num_tasks):
                chunk = todo[t::num_tasks]
                future = self._executor.submit(self._prefetch_task, chunk)
                for h in chunk:
                    self._inflight[h] = future

    def _prefetch_task(self, hashes: list[BlockHash]) -> None:
        assert self.host is not None and self.disk is not None
        try:
            tmp = torch.empty((len(hashes), self.block_nbytes), dtype=torch.uint8)
            ok = self.disk.get_into(hashes, tmp)
            got = [i for i, o in enumerate(ok) if o]
            if got:
                self.host.put([hashes[i] for i in got], tmp[got])
            deadline = time.monotonic() + self.prefetch_pin_timeout_s
            with self._lock:
                for i in got:
                    if self.host.pin(hashes[i]):
                        self._hold_prefetch_pin_locked(hashes[i], deadline)
            self.metrics.add("prefetched", len(got))
        except Exception:
            logger.exception("prefetch of %d block(s) failed", len(hashes))
        finally:
            with self._lock:
                for h in hashes:
                    self._inflight.pop(h, None)

    def wait_prefetch(self, timeout_s: float | None = None) -> bool:
        """Wait for every prefetch started so far; False on timeout."""
        with self._lock:
            futures = set(self._inflight.values())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for future in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.result(remaining)
            except TimeoutError:
                return False
        return True

    # ----------------------------------------------------------------- write path
    def put(self, hashes: Sequence[BlockHash], data: torch.Tensor) -> int:
        """Store ``data[i]`` (uint8 ``[>= n, block_nbytes]``, CPU) under ``hashes[i]``.

        Host gets a synchronous copy, disk a write-behind one. Returns how many blocks some tier
        accepted (already present counts as accepted).
        """
        self._check_buffer(data, len(hashes), "data")
        start = time.perf_counter()
        n = len(hashes)
        host_ok = self.host.put(hashes, data) if self.host is not None else [False] * n
        if self.disk is not None:
            disk_ok = self.disk.put(hashes, data)
        else:
            disk_ok = [False] * n
            if self.disk_error is not None:
                with self._lock:
                    self.num_disk_refused += n
        self.metrics.record_put(
            time.perf_counter() - start,
            {"host": sum(host_ok), "disk": sum(disk_ok)},
            self.block_nbytes,
        )
        return sum(1 for a, b in zip(host_ok, disk_ok) if a or b)

    def _demote(self, block_hash: BlockHash, row: torch.Tensor) -> None:
        """Host eviction hook: keep the block on disk (its row is valid only during the call)."""
        if self.disk is not None and not self.disk.contains(block_hash):
            self.disk.put([block_hash], row.unsqueeze(0))

    def remove(self, hashes: Sequence[BlockHash]) -> int:
        """Drop unpinned blocks from every tier; how many tier copies were dropped."""
        num = 0
        for h in hashes:
            for tier in (self.host, self.disk):
                if tier is not None and tier.remove(h):
                    num += 1
        return num

    def evict_host(self, num_blocks: int) -> int:
        """Evict up to ``num_blocks`` LRU unpinned host blocks (demoted to disk)."""
        return self.host.evict(num_blocks) if self.host is not None else 0

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
            return len(self._pins) + len(self._prefetch_pins)

    def _hold_prefetch_pin_locked(self, h: BlockHash, deadline: float) -> None:
        assert self.host is not None
        if h in self._prefetch_pins:
            self.host.unpin(h)  # one prefetch pin per block: refresh its deadline instead
        self._prefetch_pins[h] = deadline

    def _release_prefetch_pins(self, hashes: Sequence[BlockHash]) -> None:
        if self.host is None:
            return
        with self._lock:
            for h in hashes:
                if self._prefetch_pins.pop(h, None) is not None:
                    self.host.unpin(h)

    def _expire_prefetch_pins(self) -> None:
        if self.host is None:
            return
        now = time.monotonic()
        with self._lock:
            expired = [h for h, deadline in self._prefetch_pins.items() if deadline < now]
            for h in expired:
                del self._prefetch_pins[h]
                self.host.unpin(h)
        if expired:
            self.metrics.add("prefetch_expired", len(expired))

    # ----------------------------------------------------------------- events, stats, close
    def held(self) -> dict[str, list[BlockHash]]:
        """Every block of each tier below the device pool (a resync of the router's index)."""
        out: dict[str, list[BlockHash]] = {}
        if self.host is not None:
            out["host"] = self.host.block_hashes()
        if self.disk is not None:
            out["disk"] = self.disk.block_hashes()
        return out

    def subscribe(self, callback: EventListener) -> None:
        self.events.subscribe(callback)

    def drain_events(self) -> list[StoreEvent]:
        return self.events.drain()

    def stats(self) -> dict[str, object]:
        """Plain numbers (JSON-able): per-tier counters, hits, latency histograms."""
        self._expire_prefetch_pins()
        with self._lock:
            prefetch_pinned, inflight = len(self._prefetch_pins), len(self._inflight)
        return {
            **self.metrics.snapshot(),
            "host": self.host.counters() if self.host is not None else {"enabled": 0},
            "disk": self.disk.counters() if self.disk is not None else {"enabled": 0},
            "disk_disabled_by_error": int(self.disk_error is not None),
            "disk_refused_writes_disabled": self.num_disk_refused,
            "prefetch_pinned_blocks": prefetch_pinned,
            "prefetch_inflight_blocks": inflight,
            "events_dropped": self.events.num_dropped,
        }

    def measure_bandwidth(self, num_blocks: int = 16, repeats: int = 3) -> dict[str, float]:
        """Measured read GB/s per enabled tier (see ``kvstore.bandwidth``)."""
        from kvstore.bandwidth import measure_bandwidth

        return measure_bandwidth(self, num_blocks, repeats)

    def close(self) -> None:
        """Finish prefetches, flush the disk write-behind queue, close LMDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.host is not None:
            with self._lock:
                for h in self._prefetch_pins:
                    self.host.unpin(h)
                self._prefetch_pins.clear()
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
