"""What the store lends to a copy: slab rows to read (``Lease``) or to fill (``Reservation``).

A copy between the engine's pool and the host tier reads or writes the host slab itself, never
a staging buffer. ``TieredStore.lend`` pins the slots of the blocks to load (disk hits are read
into fresh slots first) and ``release`` unpins them once the copy's fence completed;
``TieredStore.reserve`` gives new blocks slots that nobody can read or evict, and ``commit``
makes them readable once their copy completed (``cancel`` gives them back). Without a host tier
the rows are a private buffer (page-locked when CUDA is present).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.keys import BlockHash
from kvstore.layout import aligned_empty
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier


@dataclass(slots=True)
class Lease:
    hashes: list[BlockHash]  # the leading blocks found, in order (the rest were misses)
    base: torch.Tensor  # [R, block_nbytes] uint8 CPU: the host slab, or a private buffer
    rows: list[int]  # row of ``base`` holding block i
    tiers: list[str]  # where block i was when asked for: "host" | "disk" (a prefetch from disk
    # counts as disk)
    in_host: bool  # rows are host slots pinned until ``release`` (else a private buffer)
    released: bool = False  # set by ``TieredStore.release``

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


@dataclass(slots=True)
class Reservation:
    hashes: list[BlockHash]  # blocks to copy in: the ones no tier holds or is receiving
    indices: list[int]  # position of each in the caller's list
    base: torch.Tensor  # [R, block_nbytes] uint8 CPU: the host slab, or a private buffer
    rows: list[int]  # row of ``base`` reserved for block i
    in_host: bool  # rows are reserved host slots (else a private buffer bound for disk)
    settled: bool = field(default=False)  # committed or cancelled

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


def cpu_buffer(num_rows: int, block_nbytes: int) -> torch.Tensor:
    """``[num_rows, block_nbytes]`` uint8, page-locked when CUDA is present (async copies)."""
    return torch.empty(
        (num_rows, block_nbytes), dtype=torch.uint8, pin_memory=torch.cuda.is_available()
    )


def aligned_buffer(num_rows: int, block_nbytes: int) -> torch.Tensor:
    """``cpu_buffer`` whose rows start on 4 KiB boundaries when ``block_nbytes`` is a multiple
    of 4 KiB (the disk tier reads into such rows with ``O_DIRECT``, no bounce copy)."""
    if torch.cuda.is_available():
        return cpu_buffer(num_rows, block_nbytes)  # page-locked allocations are page-aligned
    return aligned_empty(num_rows, block_nbytes)


def runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive rows: ``(first index, first row, length)``."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            out.append((start, rows[start], i - start))
            start = i
    return out if rows else []


def copy_rows_out(base: torch.Tensor, rows: list[int], out: torch.Tensor) -> None:
    """``out[i] = base[rows[i]]`` with one copy per run of consecutive rows."""
    for i, row, n in runs(rows):
        out[i : i + n].copy_(base[row : row + n])


def disk_to_slab(
    host: HostTier, disk: DiskTier, hashes: list[BlockHash]
) -> tuple[list[int | None], list[bool]]:
    """Read blocks from disk straight into fresh host slots, pinned.

    Returns each block's slot (None: not available) and whether it was read from disk here. A
    block already resident is not read again (it is pinned and its slot returned); one being
    written by someone else, corrupt, or gone from disk is None. Unpin each slot returned.
    """
    res = host.reserve(hashes)
    slots: list[int | None] = [None] * len(hashes)
    read = [False] * len(hashes)
    if res.indices:
        new = [hashes[i] for i in res.indices]
        try:
            ok = disk.get_into(new, host.slab, rows=res.slots)
        except BaseException:
            host.cancel(new)
            raise
        host.cancel([h for h, o in zip(new, ok) if not o])
        host.commit([h for h, o in zip(new, ok) if o], pin=True)
        for i, slot, o in zip(res.indices, res.slots, ok):
            if o:
                slots[i] = slot
                read[i] = True
    for i in res.present:
        slots[i] = host.pin_slot(hashes[i])
    return slots, read
