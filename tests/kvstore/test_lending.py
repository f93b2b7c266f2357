"""Leases and reservations: lent slab rows stay put, reserved rows are invisible until commit."""

from __future__ import annotations

import torch
from kvstore_testutil import NBYTES, assert_rows, block_bytes, make_hashes

from kvstore.lending import copy_rows_out, runs


def _rows(lease) -> torch.Tensor:
    out = torch.empty((lease.num_blocks, NBYTES), dtype=torch.uint8)
    copy_rows_out(lease.base, lease.rows, out)
    return out


def test_runs_group_consecutive_rows() -> None:
    assert runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert runs([]) == []


def test_lent_rows_are_the_slab_and_survive_eviction_until_released(make_store) -> None:
    store = make_store(host_blocks=4, disk=None)
    hashes = make_hashes(4)
    store.put(hashes, block_bytes(hashes))
    lease = store.lend(hashes[:3] + make_hashes(1, seed=7))
    assert lease.num_blocks == 3 and lease.in_host and lease.tiers == ["host"] * 3
    assert lease.base.data_ptr() == store.host.slab.data_ptr()  # no staging copy
    assert lease.rows == [0, 1, 2]  # written together: consecutive slots, one copy
    assert store.evict_host(4) == 1  # the three lent blocks are pinned
    newer = make_hashes(3, seed=1)
    assert store.put(newer, block_bytes(newer)) == 1  # only the one free slot
    assert_rows(_rows(lease), hashes[:3])
    store.release(lease)
    store.release(lease)  # idempotent
    assert store.num_lent() == 0 and store.host.num_pinned() == 0
    assert store.evict_host(4) == 4


def test_reserved_rows_are_invisible_until_commit(make_store) -> None:
    store = make_store(host_blocks=4)
    hashes = make_hashes(3)
    res = store.reserve(hashes)
    assert res.in_host and res.num_blocks == 3 and store.num_reserved() == 3
    data = block_bytes(hashes)
    res.base[res.rows[0]].copy_(data[0])  # a copy under way: the first row is written
    assert store.lookup(hashes) == []  # never a half-written block
    assert store.load(hashes, torch.zeros((3, NBYTES), dtype=torch.uint8)) == 0
    assert store.evict_host(4) == 0  # reserved rows are not evictable either
    again = store.reserve(hashes)  # a second writer of the same blocks gets nothing to do
    assert again.num_blocks == 0
    store.cancel(again)
    for i, row in enumerate(res.rows):
        res.base[row].copy_(data[i])
    store.commit(res)
    assert store.lookup(hashes) == ["host"] * 3 and store.num_reserved() == 0
    out = torch.zeros((3, NBYTES), dtype=torch.uint8)
    assert store.load(hashes, out) == 3
    assert_rows(out, hashes)


def test_cancel_gives_the_slots_back(make_store) -> None:
    store = make_store(host_blocks=2, disk=None)
    res = store.reserve(make_hashes(3))
    assert res.num_blocks == 2 and store.host.num_refused == 1  # every slot reserved
    store.cancel(res)
    assert store.num_reserved() == 0 and store.host.num_blocks == 0
    hashes = make_hashes(2, seed=3)
    assert store.put(hashes, block_bytes(hashes)) == 2


def test_disk_hits_land_in_the_slab_and_a_small_host_spills(make_store) -> None:
    seed = make_store(host_blocks=0)
    hashes = make_hashes(6)
    seed.put(hashes, block_bytes(hashes))
    seed.close()
    store = make_store(host_blocks=8)
    lease = store.lend(hashes)
    assert lease.in_host and lease.tiers == ["disk"] * 6
    assert store.lookup(hashes) == ["host"] * 6  # read into slots, now resident (promoted)
    assert_rows(_rows(lease), hashes)
    store.release(lease)
    assert store.stats()["promoted"] == 6
    small = make_store(host_blocks=4, disk=str(store.disk.path) + "-copy")
    small.put(hashes, block_bytes(hashes))  # 4 in host, 2 refused -> straight to disk
    small.flush(timeout_s=10)
    assert small.lookup(hashes) == ["host"] * 4 + ["disk"] * 2
    lease = small.lend(hashes)  # the host cannot hold all six: a private copy
    assert lease.num_blocks == 6 and not lease.in_host
    assert_rows(_rows(lease), hashes)
    small.release(lease)
    assert small.host.num_pinned() == 0


def test_the_evictor_keeps_headroom_so_writes_do_not_evict(make_store) -> None:
    import threading
    import time

    store = make_store(host_blocks=40, host_headroom=0.1)  # keeps 4 slots free
    threads: list[str] = []
    hand_over = store.host._on_evict
    store.host._on_evict = lambda hs, slab, rows: (
        threads.extend([threading.current_thread().name] * len(hs)), hand_over(hs, slab, rows))
    hashes = make_hashes(48)
    for i in range(0, 48, 4):
        store.put(hashes[i : i + 4], block_bytes(hashes[i : i + 4]))
        deadline = time.monotonic() + 10
        while store.host.num_free() < 4:  # the evictor catches up between writes
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert threads and set(threads) == {"strata-host-evictor"}  # never on the writer's thread
    assert store.stats()["host_evicted_ahead"] == len(threads) == 12
    assert store.lookup(hashes[:12]) == ["disk"] * 12  # the LRU ones, demoted (evict policy)
    assert store.lookup(hashes[12:]) == ["host"] * 36
