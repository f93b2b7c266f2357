"""Starting a load from the tiered store: which way each leading block comes in.

``Loader.start(hashes)`` (``TieredStore.start_load``) walks the leading blocks once: a host hit
is pinned at once; a block a prefetch is reading will arrive when that prefetch completes; a
disk hit gets a reserved host slot and a read on the disk tier's threads (``DiskTier.
read_async``). When the host tier cannot take every disk hit (every slot pinned), the load goes
to a private aligned buffer instead: the host hits are copied into it and unpinned, and a block
a prefetch is reading ends the load there. A block turning up in host meanwhile is a host hit;
one being written by someone else ends the load. Nothing past the first miss is loaded, and
the prefetch pins of the asked blocks are dropped (the load's own pins hold the hits).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from kvstore.keys import BlockHash
from kvstore.lending import Lease, aligned_buffer
from kvstore.pending import PendingLease
from kvstore.prefetch import Prefetcher
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.write_policy import DiskWritePolicy


class Loader:
    def __init__(
        self,
        host: HostTier | None,
        disk: DiskTier | None,
        prefetcher: Prefetcher | None,
        policy: DiskWritePolicy,
        block_nbytes: int,
        *,
        on_taken: Callable[[Lease], None],
        on_closed: Callable[[PendingLease], None],
    ) -> None:
        self.host = host
        self.disk = disk
        self.prefetcher = prefetcher
        self.policy = policy
        self.block_nbytes = block_nbytes
        self._on_taken = on_taken
        self._on_closed = on_closed

    def start(
        self, hashes: list[BlockHash], on_progress: Callable[[], None] | None = None
    ) -> PendingLease:
        """The pending lease of the leading blocks found (see the module)."""
        requested = len(hashes)
        host = self.host
        from_disk = self.prefetcher.from_disk(hashes) if self.prefetcher is not None else set()
        kinds, slots, futures = self._classify(hashes)
        tiers = [
            "disk" if k != "host" or h in from_disk else "host" for h, k in zip(hashes, kinds)
        ]
        if host is not None:
            for h, tier, slot in zip(hashes, tiers, slots):
                if tier == "host":
                    self.policy.host_hit(h, host.slab[slot])
        in_host = host is not None
        to_read = [i for i, k in enumerate(kinds) if k == "disk"]
        if host is not None and to_read:
            in_host = self._reserve_reads(hashes, kinds, slots, to_read)
        cut = next((i for i, k in enumerate(kinds) if k == "none"), len(kinds))
        if not in_host:  # a private buffer cannot wait for a prefetch into the slab
            cut = next((i for i in range(cut) if kinds[i] == "prefetch"), cut)
        if host is not None:  # past what can arrive: give back
            for i in range(cut, len(kinds)):
                if kinds[i] == "host":
                    host.unpin(hashes[i])
                elif kinds[i] == "disk" and in_host:
                    host.cancel([hashes[i]])
        del hashes[cut:], kinds[cut:], slots[cut:], tiers[cut:]
        if in_host:
            assert host is not None
            base, rows = host.slab, slots
        else:  # private buffer: the host hits are copied in (and unpinned), the rest read
            base, rows = aligned_buffer(cut, self.block_nbytes), list(range(cut))
            for i in range(cut):
                if kinds[i] == "host":
                    assert host is not None
                    base[i].copy_(host.slab[slots[i]])
                    host.unpin(hashes[i])
        pending = PendingLease(
            hashes, tiers, base, rows, in_host,
            host=host if in_host else None, requested=requested,
            read_here=[k == "disk" for k in kinds],
            on_taken=self._on_taken, on_closed=self._on_closed, on_progress=on_progress,
        )
        ready = [i for i in range(cut) if kinds[i] == "host"]
        if ready:
            pending.arrived(ready, [True] * len(ready), [rows[i] for i in ready])
        for i, future in futures.items():
            if i < cut:
                pending.await_prefetch(i, future, self._pin_prefetched(hashes[i]))
        reads = [i for i in range(cut) if kinds[i] == "disk"]
        if reads:
            assert self.disk is not None
            pending.disk_read = self.disk.read_async(
                [hashes[i] for i in reads], base, [rows[i] for i in reads],
                lambda pos, oks: pending.arrived([reads[p] for p in pos], oks),
            )
        return pending

    def _classify(
        self, hashes: list[BlockHash]
    ) -> tuple[list[str], list[int], dict[int, Future[None]]]:
        """Each leading block's way in -- "host" (pinned now, with its slot), "prefetch" (a
        prefetch is reading it: its future), "disk" -- up to the first miss."""
        pf, host, disk = self.prefetcher, self.host, self.disk
        kinds: list[str] = []
        slots: list[int] = []
        futures: dict[int, Future[None]] = {}
        for i, h in enumerate(hashes):
            slot = host.pin_slot(h) if host is not None else None
            future = pf.inflight(h) if pf is not None and slot is None else None
            if slot is not None:
                kinds.append("host")
            elif future is not None:
                kinds.append("prefetch")
                futures[i] = future
            elif disk is not None and disk.contains(h):
                kinds.append("disk")
            else:
                break
            slots.append(-1 if slot is None else slot)
        if pf is not None:  # our pins hold the hits now; nothing past the first miss is loaded
            pf.release(hashes)
        return kinds, slots, futures

    def _reserve_reads(
        self, hashes: list[BlockHash], kinds: list[str], slots: list[int], to_read: list[int]
    ) -> bool:
        """Reserve host slots for the disk reads; False (nothing reserved) when the host tier
        cannot take them all. A block that turned up in host meanwhile becomes a host hit (or,
        being written by someone else, "none": the load ends there)."""
        assert self.host is not None
        host = self.host
        res = host.reserve([hashes[i] for i in to_read])
        for j, slot in zip(res.indices, res.slots):
            slots[to_read[j]] = slot
        for j in res.present:
            got = host.pin_slot(hashes[to_read[j]])
            kinds[to_read[j]] = "none" if got is None else "host"
            slots[to_read[j]] = -1 if got is None else got
        if len(res.indices) + len(res.present) == len(to_read):
            return True
        host.cancel([hashes[to_read[j]] for j in res.indices])
        return False

    def _pin_prefetched(self, h: BlockHash) -> Callable[[], int | None]:
        def pin() -> int | None:
            assert self.host is not None
            slot = self.host.pin_slot(h)
            if self.prefetcher is not None:
                self.prefetcher.release([h])
            return slot

        return pin

