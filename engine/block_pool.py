"""The engine's paged block pool: ref counts, prefix-cache hashes and LRU eviction.

Free blocks keep their hash until the block is reused (lazy eviction), so a later request
with the same prefix finds them. Eviction is nothing but the order of the free queue: blocks
freed least recently are reused first; a request frees its blocks tail first, so its prefix
outlives its suffix.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.keys import BlockHash
from proto.vocab import EventKind, Tier
from proto.worker_api import BlockEvent


@dataclass(slots=True)
class KVBlock:
    block_id: int  # index into the pool's per-layer tensors
    ref_cnt: int = 0  # sequences (and transfers) using the block
    block_hash: BlockHash | None = None  # set once the block is full and its tokens are known


EvictCallback = Callable[[list[tuple[int, BlockHash]]], None]


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: EvictCallback | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.on_evict = on_evict
        self.num_evicted = 0
        # (kind, block_hash) per block, for the router's global index (``drain_events``).
        self.events: deque[tuple[EventKind, BlockHash]] = deque(maxlen=1 << 16)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """block_ids of the longest leading run of ``hashes`` present in the pool."""
        found: list[int] = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._cached

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash the pool holds (a resync of the router's index)."""
        return list(self._cached)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on (possibly free) cached blocks."""
        for block_id in block_ids:
            blk = self.blocks[block_id]
            if blk.ref_cnt == 0:
                del self._free[block_id]
            blk.ref_cnt += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (ref_cnt 1), evicting cached free blocks in LRU order.

        None if fewer than ``n`` blocks are free."""
        if n > len(self._free):
            return None
        block_ids: list[int] = []
        evicted: list[tuple[int, BlockHash]] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            blk = self.blocks[block_id]
            if blk.block_hash is not None:
                evicted.append((block_id, blk.block_hash))
            blk.ref_cnt = 1
            block_ids.append(block_id)
        if evicted:
            if self.on_evict is not None:
                self.on_evict(evicted)  # the data is still in the blocks: demote it now
            for block_id, h in evicted:
                self.blocks[block_id].block_hash = None
                if self._cached.get(h) == block_id:
                    del self._cached[h]
                    self.events.append((EventKind.REMOVED, h))
            self.num_evicted += len(evicted)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; free them tail first (the tail is evicted first)."""
        for block_id in reversed(block_ids):
            blk = self.blocks[block_id]
            assert blk.ref_cnt > 0, f"double free of block {block_id}"
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                if blk.block_hash is None:
                    # Holds nothing reusable: first in line to be reused.
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full block under its hash. False if another block already holds the hash."""
        blk = self.blocks[block_id]
        if blk.block_hash == block_hash:
            return True
        assert blk.block_hash is None, f"block {block_id} already cached under another hash"
        if block_hash in self._cached:
            return False
        blk.block_hash = block_hash
        self._cached[block_hash] = block_id
        self.events.append((EventKind.STORED, block_hash))
        return True

    def evict_all_free(self) -> int:
        """Drop every free cached block from the prefix cache (demoting them); returns how many."""
        victims = [(i, self.blocks[i].block_hash) for i in self._free if self.blocks[i].block_hash]
        evicted = [(i, h) for i, h in victims if h is not None]
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        for block_id, h in evicted:
            self.blocks[block_id].block_hash = None
            del self._cached[h]
            self.events.append((EventKind.REMOVED, h))
        self.num_evicted += len(evicted)
        return len(evicted)

    def drain_events(self) -> list[BlockEvent]:
        """Events since the last call (tier ``device``), consecutive ones of a kind grouped."""
        runs: list[tuple[EventKind, list[BlockHash]]] = []
        while self.events:
            kind, h = self.events.popleft()
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(h)
            else:
                runs.append((kind, [h]))
        return [BlockEvent(kind, Tier.DEVICE, tuple(hashes)) for kind, hashes in runs]

    def check_no_leaks(self) -> None:
        """Assert every block is free again (ref_cnt 0); for tests and shutdown."""
        used = [b.block_id for b in self.blocks if b.ref_cnt != 0]
        ref_cnts = [self.blocks[i].ref_cnt for i in used[:10]]
        assert not used, f"blocks still referenced: {used[:10]} (ref_cnts {ref_cnts})"
        assert len(self._free) == self.num_blocks, (len(self._free), self.num_blocks)
