"""Prefetch: disk -> host in the background, pinned until loaded or timed out."""

from __future__ import annotations

import time

import torch
from kvstore_testutil import NBYTES, assert_rows, block_bytes, make_hashes


def _on_disk_only(make_store, n: int, **kw):
    store = make_store(host_blocks=0)
    hashes = make_hashes(n)
    store.put(hashes, block_bytes(hashes))
    store.close()
    return make_store(host_blocks=8, **kw), hashes


def test_prefetch_moves_blocks_to_host_and_load_uses_them(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 6)
    assert store.lookup(hashes) == ["disk"] * 6
    store.prefetch(hashes[:4])
    assert store.wait_prefetch(timeout_s=10)
    assert store.lookup(hashes) == ["host"] * 4 + ["disk"] * 2
    assert store.host.num_pinned() == 4  # held for the coming load
    assert store.evict_host(8) == 0  # pinned: nothing to evict
    out = torch.zeros((6, NBYTES), dtype=torch.uint8)
    assert store.load(hashes, out) == 6
    assert_rows(out, hashes)
    assert store.host.num_pinned() == 0
    stats = store.stats()  # the request found all six on disk (four moved up meanwhile)
    assert stats["prefetched"] == 4 and stats["host_hits"] == 0 and stats["disk_hits"] == 6
    assert stats["promoted"] == 2


def test_load_right_after_prefetch_waits_for_it(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 8)
    store.prefetch(hashes)
    out = torch.zeros((8, NBYTES), dtype=torch.uint8)
    assert store.load(hashes, out) == 8  # no wait_prefetch: load waits for in-flight blocks
    assert_rows(out, hashes)


def test_prefetch_pins_expire(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 3, store_kwargs={"prefetch_pin_timeout_s": 0.05})
    store.prefetch(hashes)
    assert store.wait_prefetch(timeout_s=10)
    time.sleep(0.1)
    assert store.stats()["prefetch_expired"] == 3
    assert store.host.num_pinned() == 0
    assert store.evict_host(8) == 3  # evictable again (and still on disk)
    assert store.lookup(hashes) == ["disk"] * 3


def test_prefetch_stops_at_the_first_miss(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 4)
    store.prefetch(hashes[:2] + make_hashes(1, seed=5) + hashes[2:])
    assert store.wait_prefetch(timeout_s=10)
    assert store.lookup(hashes) == ["host", "host", "disk", "disk"]
    store.load(hashes, torch.zeros((4, NBYTES), dtype=torch.uint8))
