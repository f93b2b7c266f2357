"""HostTier: one slab, slot allocator, LRU of unpinned blocks, eviction hand-over."""

from __future__ import annotations

import pytest
import torch
from kvstore_testutil import NBYTES, assert_rows, block_bytes, make_hashes

from kvstore.tiers.host import HostTier


def test_roundtrip_and_idempotent_put() -> None:
    host = HostTier(NBYTES, 4 * NBYTES)
    hashes = make_hashes(3)
    assert host.put(hashes, block_bytes(hashes)) == [True] * 3
    assert host.put(hashes[:1], torch.zeros((1, NBYTES), dtype=torch.uint8)) == [True]
    out = torch.zeros((4, NBYTES), dtype=torch.uint8)
    assert host.get_into([hashes[2], make_hashes(1, seed=9)[0], hashes[0]], out) == [
        True,
        False,
        True,
    ]
    assert_rows(out[0:1], hashes[2:3])
    assert torch.all(out[1] == 0)  # a miss leaves its row untouched
    assert_rows(out[2:3], hashes[0:1])  # the second put did not overwrite
    assert host.num_blocks == 3 and host.used_bytes == 3 * NBYTES
    assert host.capacity_bytes == 4 * NBYTES


def test_lru_eviction_hands_over_the_victim_bytes() -> None:
    handed: list[tuple[bytes, torch.Tensor]] = []
    calls: list[int] = []

    def on_evict(hs: list[bytes], slab: torch.Tensor, rows: list[int]) -> None:
        calls.append(len(hs))
        handed.extend((h, slab[r].clone()) for h, r in zip(hs, rows))

    host = HostTier(NBYTES, 3 * NBYTES, on_evict=on_evict)
    hashes = make_hashes(5)
    host.put(hashes[:3], block_bytes(hashes[:3]))
    out = torch.empty((1, NBYTES), dtype=torch.uint8)
    host.get_into(hashes[:1], out)  # touch 0: LRU order is now 1, 2, 0
    host.put(hashes[3:5], block_bytes(hashes[3:5]))
    assert [h for h, _ in handed] == [hashes[1], hashes[2]]
    assert calls == [2]  # one eviction, one call for both victims
    for h, row in handed:
        assert_rows(row.unsqueeze(0), [h])
    assert [host.contains(h) for h in hashes] == [True, False, False, True, True]
    assert host.num_evictions == 2 and host.num_blocks == 3


def test_pinned_blocks_are_never_evicted() -> None:
    host = HostTier(NBYTES, 2 * NBYTES)
    hashes = make_hashes(4)
    host.put(hashes[:2], block_bytes(hashes[:2]))
    assert host.pin(hashes[0]) and host.pin(hashes[1]) and host.pin(hashes[1])
    assert not host.pin(hashes[2])  # absent
    assert host.put(hashes[2:3], block_bytes(hashes[2:3])) == [False]  # every slot pinned
    assert host.num_refused == 1
    assert not host.remove(hashes[0])  # pinned: stays
    host.unpin(hashes[0])
    assert host.put(hashes[2:3], block_bytes(hashes[2:3])) == [True]  # evicts 0, not 1
    assert not host.contains(hashes[0]) and host.contains(hashes[1])
    host.unpin(hashes[1])
    host.unpin(hashes[1])
    assert host.ref_cnt(hashes[1]) == 0 and host.num_pinned() == 0
    with pytest.raises(AssertionError, match="ref_cnt is already 0"):
        host.unpin(hashes[1])


def test_slot_view_is_zero_copy_and_remove_frees_the_slot() -> None:
    host = HostTier(NBYTES, 2 * NBYTES)
    hashes = make_hashes(3)
    host.put(hashes[:2], block_bytes(hashes[:2]))
    view = host.slot_view(hashes[1])
    assert view is not None
    assert_rows(view.unsqueeze(0), hashes[1:2])
    assert host.remove(hashes[1]) and host.slot_view(hashes[1]) is None
    host.put(hashes[2:3], block_bytes(hashes[2:3]))  # reuses the freed slot, no eviction
    assert host.num_evictions == 0
    assert_rows(view.unsqueeze(0), hashes[2:3])  # same memory, new block
    assert host.evict(5) == 2 and host.num_blocks == 0


def test_capacity_below_one_block_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="host_capacity_bytes"):
        HostTier(NBYTES, NBYTES - 1)
