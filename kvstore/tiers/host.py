"""Host tier: one slab of RAM (registered with CUDA once when present), a slot allocator.

``slab: [num_slots, block_nbytes]`` uint8, allocated once. A free heap of slot indices (the lowest
free slot first, so blocks written together land in consecutive slots and travel as one copy), a
map block_hash -> slot, and an LRU order (OrderedDict, oldest first) of the resident blocks whose
ref_cnt is zero. Pinned blocks (ref_cnt > 0) are out of the LRU and never evicted.

Writes go in three steps: ``reserve`` gives each new block a slot that nobody can read or evict,
the caller copies the bytes in (here, or later on a copy lane), then ``commit`` makes the slots
readable (or ``cancel`` frees them). ``put`` does the three at once. Reads either copy out
(``get_into``) or borrow the slab row itself under a pin (``pin_slot`` + ``slab``).

Eviction hands the victims to ``on_evict(hashes, slab, rows)`` (victim ``i`` is
``slab[rows[i]]``), all of one eviction in one call, before their slots are reused (the store
demotes them to disk there, one queued write for all of them); the callback runs with no lock
held, while the slots are reserved for the write that evicted them, so the rows still hold the
victims' bytes.
Copies run outside the lock too: readers take a transient reference on the blocks they copy.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvstore.events import PublishFn
from kvstore.keys import BlockHash
from kvstore.layout import aligned_empty
from proto.vocab import EventKind, Tier

logger = logging.getLogger(__name__)

EvictFn = Callable[[list[BlockHash], torch.Tensor, list[int]], None]  # (hashes, slab, rows)


@dataclass(slots=True)
class SlotReservation:
    indices: list[int]  # positions (in the hashes given to ``reserve``) that got a slot
    slots: list[int]  # the slot reserved for each of them
    present: list[int]  # positions already resident or being written: nothing to copy
    # every other position was refused: each slot pinned or being written


class HostTier:
    name = Tier.HOST

    def __init__(
        self,
        block_nbytes: int,
        capacity_bytes: int,
        *,
        pin_memory: bool = True,
        on_evict: EvictFn | None = None,
        publish: PublishFn | None = None,
    ) -> None:
        if block_nbytes <= 0:
            raise ValueError(f"block_nbytes must be positive, got {block_nbytes}")
        num_slots = capacity_bytes // block_nbytes
        if num_slots <= 0:
            raise ValueError(
                f"host_capacity_bytes={capacity_bytes} holds no block of {block_nbytes} bytes; "
                "raise it or set it to 0 to turn the host tier off"
            )
        self.block_nbytes = block_nbytes
        self.num_slots = num_slots
        self._on_evict = on_evict
        self._publish = publish
        # slab: [num_slots, block_nbytes], 4 KiB-aligned: disk reads land in it with O_DIRECT
        self._slab = aligned_empty(num_slots, block_nbytes)
        self._registered = False
        if pin_memory and torch.cuda.is_available():
            self._register()
        self._lock = threading.Lock()
        self._free: list[int] = list(range(num_slots))  # a heap: the lowest free slot first
        self._slot_of: dict[BlockHash, int] = {}
        self._ref_cnt: dict[BlockHash, int] = {}  # only blocks with ref_cnt > 0
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()  # unpinned residents, LRU first
        self._writing: dict[BlockHash, int] = {}  # slot reserved, bytes being copied in
        self.num_evictions = 0
        self.num_refused = 0  # writes refused: every slot pinned or being written

    def _register(self) -> None:
        nbytes = self._slab.numel()
        err = torch.cuda.cudart().cudaHostRegister(self._slab.data_ptr(), nbytes, 0)
        if int(err) != 0:
            logger.warning("cudaHostRegister of the %d-byte host slab failed (%s)", nbytes, err)
        else:
            self._registered = True

    # ----------------------------------------------------------------- queries
    @property
    def slab(self) -> torch.Tensor:
        """The slab ``[num_slots, block_nbytes]``: read a row only under a pin or a reservation."""
        return self._slab

    @property
    def registered(self) -> bool:
        """The slab is page-locked for CUDA (copies from and to it run asynchronously)."""
        return self._registered

    def contains(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return block_hash in self._slot_of

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return len(self._slot_of)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return (len(self._slot_of) + len(self._writing)) * self.block_nbytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.block_nbytes

    def ref_cnt(self, block_hash: BlockHash) -> int:
        with self._lock:
            return self._ref_cnt.get(block_hash, 0)

    def num_pinned(self) -> int:
        with self._lock:
            return len(self._ref_cnt)

    def num_free(self) -> int:
        """Slots holding nothing (a write takes one without evicting)."""
        with self._lock:
            return len(self._free)

    def num_writing(self) -> int:
        """Slots reserved and not yet committed or cancelled."""
        with self._lock:
            return len(self._writing)

    def resident(self) -> list[BlockHash]:
        """Every readable block, least recently used first among the unpinned."""
        with self._lock:
            return list(self._lru) + [h for h in self._slot_of if h not in self._lru]

    def slot_view(self, block_hash: BlockHash) -> torch.Tensor | None:
        """The block's row of the slab (zero copy). Hold a ``pin`` while using it."""
        with self._lock:
            slot = self._slot_of.get(block_hash)
        return None if slot is None else self._slab[slot]

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "blocks": len(self._slot_of),
                "pinned_blocks": len(self._ref_cnt),
                "used_bytes": (len(self._slot_of) + len(self._writing)) * self.block_nbytes,
                "capacity_bytes": self.capacity_bytes,
                "evictions": self.num_evictions,
                "refused_writes": self.num_refused,
            }

    # ----------------------------------------------------------------- reads
    def get_into(self, hashes: Sequence[BlockHash], out: torch.Tensor) -> list[bool]:
        # out: [>= n, block_nbytes] uint8
        assert out.shape[0] >= len(hashes) and out.shape[1] == self.block_nbytes, out.shape
        rows: list[int] = []
        slots: list[int] = []
        with self._lock:
            for i, h in enumerate(hashes):
                slot = self._slot_of.get(h)
                if slot is not None:
                    self._ref_locked(h)
                    rows.append(i)
                    slots.append(slot)
        if not rows:
            return [False] * len(hashes)
        try:
            slot_idx = torch.tensor(slots, dtype=torch.int64)
            if rows[-1] == len(rows) - 1:  # hits are a leading run: one gather straight into out
                torch.index_select(self._slab, 0, slot_idx, out=out[: len(rows)])
            else:
                out.index_copy_(0, torch.tensor(rows), self._slab.index_select(0, slot_idx))
        finally:
            with self._lock:
                for i in rows:
                    self._unref_locked(hashes[i])
        found = [False] * len(hashes)
        for i in rows:
            found[i] = True
        return found

    def pin_slot(self, block_hash: BlockHash) -> int | None:
        """Pin a resident block and return its slot (its bytes stay put until ``unpin``)."""
        with self._lock:
            slot = self._slot_of.get(block_hash)
            if slot is not None:
                self._ref_locked(block_hash)
            return slot

    # ----------------------------------------------------------------- writes
    def reserve(self, hashes: Sequence[BlockHash]) -> SlotReservation:
        """A private slot for each new block (evicting LRU blocks if need be).

        Reserved slots are neither readable nor evictable until ``commit`` or ``cancel``;
        resident blocks are touched (most recently used) instead.
        """
        res = SlotReservation([], [], [])
        victims: list[tuple[BlockHash, int]] = []
        with self._lock:
            for i, h in enumerate(hashes):
                if h in self._slot_of:
                    self._touch_locked(h)
                    res.present.append(i)
                elif h in self._writing:
                    res.present.append(i)  # another write (or an earlier row of this one) has it
                else:
                    slot = self._allocate_locked(victims)
                    if slot is None:
                        self.num_refused += 1
                        continue
                    self._writing[h] = slot
                    res.indices.append(i)
                    res.slots.append(slot)
        self._hand_over(victims)
        return res

    def commit(self, hashes: Sequence[BlockHash], *, pin: bool = False) -> None:
        """The reserved blocks' bytes are in their slots: make them readable (pinned if asked)."""
        with self._lock:
            for h in hashes:
                slot = self._writing.pop(h)
                assert h not in self._slot_of, f"block {h.hex()} written twice into the host slab"
                self._slot_of[h] = slot
                if pin:
                    self._ref_cnt[h] = self._ref_cnt.get(h, 0) + 1
                else:
                    self._lru[h] = None
        if self._publish is not None and hashes:
            self._publish(EventKind.STORED, self.name, list(hashes))

    def cancel(self, hashes: Sequence[BlockHash]) -> None:
        """Give reserved slots back unwritten."""
        with self._lock:
            for h in hashes:
                heapq.heappush(self._free, self._writing.pop(h))

    def put(self, hashes: Sequence[BlockHash], data: torch.Tensor) -> list[bool]:
        # data: [>= n, block_nbytes] uint8
        assert data.shape[0] >= len(hashes) and data.shape[1] == self.block_nbytes, data.shape
        res = self.reserve(hashes)
        accepted = [False] * len(hashes)
        for i in res.present:
            accepted[i] = True
        if not res.indices:
            return accepted
        rows = res.indices
        new = [hashes[i] for i in rows]
        try:
            src = data[: len(rows)] if rows[-1] == len(rows) - 1 else data[torch.tensor(rows)]
            self._slab.index_copy_(0, torch.tensor(res.slots, dtype=torch.int64), src)
        except BaseException:
            self.cancel(new)
            raise
        self.commit(new)
        for i in rows:
            accepted[i] = True
        return accepted

    def remove(self, block_hash: BlockHash) -> bool:
        with self._lock:
            if block_hash not in self._slot_of or block_hash in self._ref_cnt:
                return False
            heapq.heappush(self._free, self._slot_of.pop(block_hash))
            del self._lru[block_hash]
        if self._publish is not None:
            self._publish(EventKind.REMOVED, self.name, [block_hash])
        return True

    def evict(self, num_blocks: int) -> int:
        """Evict up to ``num_blocks`` LRU unpinned blocks (through ``on_evict``); how many went."""
        victims: list[tuple[BlockHash, int]] = []
        with self._lock:
            for _ in range(num_blocks):
                if not self._lru:
                    break
                victims.append(self._pop_lru_locked())
        self._hand_over(victims)
        with self._lock:
            for _, slot in victims:
                heapq.heappush(self._free, slot)
        return len(victims)

    # ----------------------------------------------------------------- pins
    def pin(self, block_hash: BlockHash) -> bool:
        return self.pin_slot(block_hash) is not None

    def unpin(self, block_hash: BlockHash) -> None:
        with self._lock:
            self._unref_locked(block_hash)

    def block_hashes(self) -> list[BlockHash]:
        """Every block this tier holds now (a resync of the router's index)."""
        with self._lock:
            return list(self._slot_of)

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._slab.data_ptr())
            self._registered = False

    # ----------------------------------------------------------------- internals (lock held)
    def _ref_locked(self, h: BlockHash) -> None:
        self._ref_cnt[h] = self._ref_cnt.get(h, 0) + 1
        self._lru.pop(h, None)

    def _unref_locked(self, h: BlockHash) -> None:
        n = self._ref_cnt.get(h, 0)
        assert n > 0, f"unpin of host block {h.hex()} whose ref_cnt is already 0"
        if n == 1:
            del self._ref_cnt[h]
            self._lru[h] = None  # back in the LRU order, most recently used
        else:
            self._ref_cnt[h] = n - 1

    def _touch_locked(self, h: BlockHash) -> None:
        if h in self._lru:
            self._lru.move_to_end(h)

    def _pop_lru_locked(self) -> tuple[BlockHash, int]:
        victim, _ = self._lru.popitem(last=False)
        self.num_evictions += 1
        return victim, self._slot_of.pop(victim)

    def _allocate_locked(self, victims: list[tuple[BlockHash, int]]) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        if not self._lru:
            return None
        victim, slot = self._pop_lru_locked()
        victims.append((victim, slot))
        return slot

    def _hand_over(self, victims: list[tuple[BlockHash, int]]) -> None:
        """Give evicted rows to ``on_evict`` (no lock held; their slots are still reserved)."""
        if not victims:
            return
        if self._on_evict is not None:
            try:
                self._on_evict([h for h, _ in victims], self._slab, [s for _, s in victims])
            except Exception:
                logger.exception("host on_evict failed for %d blocks", len(victims))
        if self._publish is not None:
            self._publish(EventKind.REMOVED, self.name, [h for h, _ in victims])
