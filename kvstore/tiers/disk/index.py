"""The disk tier's index in memory: which blocks it holds, where, in which LRU order.

``DiskIndex`` is rebuilt on open from the catalog's entries (small records: opening never reads
a payload) and kept in step with it by the writer. It tracks:

- entries, least recently used first (an ``OrderedDict``; blocks of another model fingerprint or
  slot size are *foreign*: never served, and first in the order, so evicted first);
- pins (``ref_cnt``: never evicted) and reads in flight per slot (a slot being read is neither
  evicted nor reused: a dropped entry's slot is freed when its last read ends);
- free slots: a heap of freed slots below a high-water mark, and every slot above it, lowest
  first, so blocks written together get consecutive slots;
- bytes used (entries plus slots reserved for writes in flight) against ``capacity_bytes``;
- access counters and deletions not yet written to the catalog.

Eviction walks the LRU order from its oldest end and stops as soon as enough room is free (no
copy of the index). Not thread-safe: the tier's lock guards every call.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from kvstore.keys import BlockHash
from kvstore.tiers.disk.format import Entry


@dataclass(slots=True)
class DiskEntry:
    slot: int  # slot number in the segment files of ``slot_nbytes``
    slot_nbytes: int  # slot size (another one than the tier's: foreign)
    crc: int  # crc32 of the payload
    foreign: bool  # another model fingerprint or slot size: never served, evicted first


class DiskIndex:
    def __init__(self, slot_nbytes: int, capacity_bytes: int) -> None:
        self.slot_nbytes = slot_nbytes
        self.capacity_bytes = capacity_bytes
        self.max_slots = capacity_bytes // slot_nbytes
        self.entries: OrderedDict[BlockHash, DiskEntry] = OrderedDict()  # LRU first
        self.ref_cnt: dict[BlockHash, int] = {}
        self.used_bytes = 0  # entries' slots + slots reserved for writes in flight
        self.num_foreign = 0
        self.foreign_classes: dict[int, int] = {}  # other slot sizes -> entries
        self.clock = 0  # last access counter handed out
        self.dirty: dict[BlockHash, int] = {}  # access counters not yet in the catalog
        self.deletes: set[BlockHash] = set()  # entries to delete from the catalog
        self._free: list[int] = []  # heap of free slots below ``_hwm``
        self._hwm = 0  # every slot from here to ``max_slots`` is free
        self._reading: dict[int, int] = {}  # slot -> reads in flight
        self._deferred: set[int] = set()  # slots of dropped entries still being read

    # ---- open ------------------------------------------------------------------------------
    def load(
        self, entries: list[tuple[BlockHash, Entry]], fingerprint: bytes, payload_nbytes: int
    ) -> list[BlockHash]:
        """Fill the index from the catalog; returns the entries to delete (two entries naming the
        same slot: neither can be trusted)."""
        ours: dict[int, list[BlockHash]] = {}
        for h, e in entries:
            if e.slot_nbytes == self.slot_nbytes:
                ours.setdefault(e.slot, []).append(h)
        shared = {h for hs in ours.values() if len(hs) > 1 for h in hs}
        kept = [(h, e) for h, e in entries if h not in shared]
        # foreign first, then by access counter: the LRU order across restarts
        foreign_of = {h: _foreign(e, fingerprint, payload_nbytes, self) for h, e in kept}
        kept.sort(key=lambda he: (not foreign_of[he[0]], he[1].access))
        used_slots: list[int] = []
        for h, e in kept:
            foreign = foreign_of[h]
            self.entries[h] = DiskEntry(e.slot, e.slot_nbytes, e.crc, foreign)
            self.used_bytes += e.slot_nbytes
            if e.slot_nbytes == self.slot_nbytes:
                used_slots.append(e.slot)
            else:
                self.foreign_classes[e.slot_nbytes] = self.foreign_classes.get(e.slot_nbytes, 0) + 1
            self.num_foreign += foreign
            self.clock = max(self.clock, e.access)
        self._hwm = min(self.max_slots, max(used_slots, default=-1) + 1)
        taken = set(used_slots)
        self._free = [s for s in range(self._hwm) if s not in taken]  # ascending: a heap
        return sorted(shared)

    # ---- queries ---------------------------------------------------------------------------
    def servable(self, h: BlockHash) -> DiskEntry | None:
        entry = self.entries.get(h)
        return entry if entry is not None and not entry.foreign else None

    @property
    def num_blocks(self) -> int:
        return len(self.entries) - self.num_foreign

    def num_free_slots(self) -> int:
        return (self.capacity_bytes - self.used_bytes) // self.slot_nbytes

    # ---- use -------------------------------------------------------------------------------
    def touch(self, h: BlockHash) -> None:
        self.entries.move_to_end(h)
        self.clock += 1
        self.dirty[h] = self.clock

    def begin_read(self, slot: int) -> None:
        self._reading[slot] = self._reading.get(slot, 0) + 1

    def end_read(self, slot: int) -> None:
        n = self._reading[slot] - 1
        if n:
            self._reading[slot] = n
            return
        del self._reading[slot]
        if slot in self._deferred:
            self._deferred.discard(slot)
            self._release(slot)

    def pin(self, h: BlockHash) -> None:
        self.ref_cnt[h] = self.ref_cnt.get(h, 0) + 1

    def unpin(self, h: BlockHash) -> None:
        n = self.ref_cnt.get(h, 0)
        assert n > 0, f"unpin of disk block {h.hex()} whose ref_cnt is already 0"
        if n == 1:
            del self.ref_cnt[h]
        else:
            self.ref_cnt[h] = n - 1

    # ---- writes ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Up to ``n`` free slots (lowest first), reserved until ``add`` or ``unreserve``."""
        slots: list[int] = []
        while len(slots) < n and self.used_bytes + self.slot_nbytes <= self.capacity_bytes:
            if self._free:
                slots.append(heapq.heappop(self._free))
            elif self._hwm < self.max_slots:
                slots.append(self._hwm)
                self._hwm += 1
            else:
                break
            self.used_bytes += self.slot_nbytes
        return slots

    def unreserve(self, slots: list[int]) -> None:
        """Slots reserved by ``allocate`` that were not written after all."""
        for slot in slots:
            self.used_bytes -= self.slot_nbytes
            self._release(slot)

    def next_clock(self) -> int:
        self.clock += 1
        return self.clock

    def add(self, h: BlockHash, slot: int, crc: int) -> None:
        """A write of ours committed in ``slot`` (reserved by ``allocate``), most recent. An
        entry the block had (written again after a removal raced its first write) is replaced:
        the catalog holds the new one."""
        old = self.entries.pop(h, None)
        if old is not None:
            self._forget(old)
        self.entries[h] = DiskEntry(slot, self.slot_nbytes, crc, foreign=False)

    def drop(self, h: BlockHash) -> list[int]:
        """Forget the entry (deleted from the catalog by the next commit); returns the foreign
        slot sizes left with no entry (their files can go)."""
        entry = self.entries.pop(h, None)
        if entry is None:
            return []
        self.deletes.add(h)
        self.dirty.pop(h, None)
        return self._forget(entry)

    def victims(self, num_slots: int) -> list[BlockHash]:
        """LRU unpinned blocks not being read whose removal makes room for ``num_slots`` more
        slots (fewer if the rest is pinned); the caller drops them."""
        need = self.used_bytes + num_slots * self.slot_nbytes - self.capacity_bytes
        out: list[BlockHash] = []
        for h, entry in self.entries.items():  # oldest first; stops as soon as it fits
            if need <= 0:
                break
            if h in self.ref_cnt or entry.slot in self._reading and not entry.foreign:
                continue
            out.append(h)
            need -= entry.slot_nbytes
        return out

    def take_deletes(self) -> set[BlockHash]:
        deletes, self.deletes = self.deletes, set()
        return deletes

    def take_dirty(self) -> dict[BlockHash, int]:
        dirty, self.dirty = self.dirty, {}
        return dirty

    def _forget(self, entry: DiskEntry) -> list[int]:
        self.used_bytes -= entry.slot_nbytes
        self.num_foreign -= entry.foreign
        if entry.slot_nbytes != self.slot_nbytes:
            left = self.foreign_classes[entry.slot_nbytes] - 1
            self.foreign_classes[entry.slot_nbytes] = left
            if not left:
                del self.foreign_classes[entry.slot_nbytes]
                return [entry.slot_nbytes]
            return []
        if entry.slot in self._reading:
            self._deferred.add(entry.slot)
        else:
            self._release(entry.slot)
        return []

    def _release(self, slot: int) -> None:
        if slot < self.max_slots:
            heapq.heappush(self._free, slot)

def _foreign(e: Entry, fingerprint: bytes, payload_nbytes: int, index: DiskIndex) -> bool:
    return (
        e.fingerprint != fingerprint
        or e.slot_nbytes != index.slot_nbytes
        or e.payload_nbytes != payload_nbytes
    )
