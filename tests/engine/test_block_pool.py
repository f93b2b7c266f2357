"""Block pool: ref counts, lazy eviction in LRU order, tail-first freeing."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from kvstore.keys import BlockHash


def h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(16, "little"))


def test_allocate_free_and_lookup():
    evicted: list[tuple[int, BlockHash]] = []
    pool = BlockPool(4, on_evict=evicted.extend)
    a = pool.allocate(3)
    assert a is not None and pool.num_free_blocks == 1
    for i, block_id in enumerate(a):
        assert pool.cache_block(block_id, h(i))
    pool.free(a)
    assert pool.num_free_blocks == 4
    assert pool.lookup([h(0), h(1), h(2), h(3)]) == a  # still cached after free
    # Tail first: freeing [a0, a1, a2] queued a2 before a1 before a0; the uncached block goes first.
    b = pool.allocate(2)
    assert b is not None and evicted == [(a[2], h(2))]
    assert pool.lookup([h(0), h(1), h(2)]) == a[:2]
    pool.touch(a[:2])
    assert pool.allocate(1) is None  # 2 in use by b, 2 touched
    pool.free(a[:2])
    pool.free(b)
    pool.check_no_leaks()


def test_double_free_is_caught():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    assert ids is not None
    pool.free(ids)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(ids)


def test_duplicate_hash_not_registered_twice():
    pool = BlockPool(2)
    ids = pool.allocate(2)
    assert ids is not None
    assert pool.cache_block(ids[0], h(1))
    assert not pool.cache_block(ids[1], h(1))
    assert pool.lookup([h(1)]) == [ids[0]]
    pool.free(ids)
    pool.check_no_leaks()
