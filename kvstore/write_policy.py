"""When a block is written to the disk tier (``StoreConfig.disk_write_policy``).

The disk's bandwidth is for reads: writing every block at once spends it on blocks that are
mostly never read back. The policies:

- ``evict`` (the default): a block goes to disk when the host tier evicts it.
- ``write_through``: every block the store takes goes to disk at once.
- ``second_hit``: a block goes to disk when the host tier serves it for the second time; a block
  evicted before that is dropped.
- ``evict_or_second_hit``: both of the above.

Under every policy a block that no host slot could take (no host tier, or every slot pinned) goes
to disk at once, so it is never dropped for lack of host room. ``TieredStore.close`` writes the
host blocks the disk lacks (``persist_on_close``), so a clean restart finds them under any policy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from kvstore.keys import BlockHash
from kvstore.tiers.disk import DiskTier

POLICIES = ("evict", "write_through", "second_hit", "evict_or_second_hit")


class DiskWritePolicy:
    """Decides, per event of the host tier, which blocks to queue for the disk writer."""

    def __init__(self, name: str, disk: DiskTier | None) -> None:
        if name not in POLICIES:
            raise ValueError(
                f"disk write policy must be one of {', '.join(POLICIES)}, not {name!r}"
            )
        self.name = name
        self.disk = disk
        self.on_put = name == "write_through"
        self.on_evict = name in ("evict", "evict_or_second_hit")
        self.on_hit = name in ("second_hit", "evict_or_second_hit")
        self._lock = threading.Lock()
        self._hits: dict[BlockHash, int] = {}  # host hits of resident blocks (on_hit only)
        self.num_hit_writes = 0  # blocks written on their second hit
        self.num_evict_writes = 0  # blocks written when the host evicted them

    def stored(
        self, hashes: Sequence[BlockHash], data: torch.Tensor, rows: Sequence[int] | None = None
    ) -> list[bool]:
        """The host tier takes ``hashes`` (``data[rows[i]]``): written now if write-through.

        True where the disk took (or already had) the block."""
        if self.disk is None or not self.on_put or not hashes:
            return [False] * len(hashes)
        return self.disk.put(hashes, data, rows)

    def not_stored(
        self, hashes: Sequence[BlockHash], data: torch.Tensor, rows: Sequence[int] | None = None
    ) -> list[bool]:
        """No host slot took these blocks: the disk gets them under every policy."""
        if self.disk is None or not hashes:
            return [False] * len(hashes)
        return self.disk.put(hashes, data, rows)

    def host_hit(self, block_hash: BlockHash, row: torch.Tensor) -> None:
        """The host tier served the block (its row is pinned during the call)."""
        if self.disk is None or not self.on_hit:
            return
        with self._lock:
            n = self._hits.get(block_hash, 0) + 1
            self._hits[block_hash] = n
        if n == 2 and not self.disk.contains(block_hash):
            if all(self.disk.put([block_hash], row.unsqueeze(0))):
                with self._lock:
                    self.num_hit_writes += 1

    def host_evicted(
        self, hashes: Sequence[BlockHash], data: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """The host tier evicts ``hashes`` (``data[rows[i]]``, valid only during the call): the
        ones the disk lacks go to its writer in one queued write."""
        if self.on_hit:
            with self._lock:
                for h in hashes:
                    self._hits.pop(h, None)
        if self.disk is None or not self.on_evict:
            return
        todo = [i for i, h in enumerate(hashes) if not self.disk.contains(h)]
        if not todo:
            return
        taken = self.disk.put([hashes[i] for i in todo], data, [rows[i] for i in todo])
        with self._lock:
            self.num_evict_writes += sum(taken)

    def forget(self, block_hash: BlockHash) -> None:
        """The block left the host tier without an eviction (``remove``)."""
        if self.on_hit:
            with self._lock:
                self._hits.pop(block_hash, None)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "hit_writes": self.num_hit_writes,
                "evict_writes": self.num_evict_writes,
                "tracked_hits": len(self._hits),
            }
