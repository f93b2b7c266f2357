"""``StoreTier``: the one interface every tier of the store implements (``TieredStore.tiers``).

Payloads are uint8 CPU tensors ``[n, block_nbytes]``, one row per block, in the block-major
layout of ``kvstore.layout``. Batched calls take a list of hashes and answer one bool per hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from kvstore.keys import BlockHash
from proto.vocab import Tier


@runtime_checkable
class StoreTier(Protocol):
    name: Tier  # Tier.HOST | Tier.DISK

    def contains(self, block_hash: BlockHash) -> bool:
        """Whether a read of this block would (barring corruption) hit."""
        ...

    def get_into(self, hashes: Sequence[BlockHash], out: torch.Tensor) -> list[bool]:
        """Copy block ``i`` into ``out[i]`` (uint8 ``[>= n, block_nbytes]``); True = copied."""
        ...

    def put(self, hashes: Sequence[BlockHash], data: torch.Tensor) -> list[bool]:
        """Store ``data[i]`` under ``hashes[i]``; already present counts as accepted (True)."""
        ...

    def remove(self, block_hash: BlockHash) -> bool:
        """Drop the block unless pinned; True if it was dropped."""
        ...

    def pin(self, block_hash: BlockHash) -> bool:
        """Take a reference (pinned blocks are never evicted); False if the block is absent."""
        ...

    def unpin(self, block_hash: BlockHash) -> None:
        """Release a reference taken by ``pin``."""
        ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    @property
    def capacity_bytes(self) -> int: ...

    def counters(self) -> dict[str, int]:
        """Plain counters of the tier (evictions, refusals, ...), for ``TieredStore.stats``."""
        ...

    def close(self) -> None: ...
