"""TieredStore: lookup / load / put across tiers, promotion, eviction chain, events, stats."""

from __future__ import annotations

import json

import pytest
import torch
from kvstore_testutil import FP, NBYTES, assert_rows, block_bytes, make_hashes

from kvstore.config import StoreConfig
from kvstore.store import TieredStore


def _out(n: int) -> torch.Tensor:
    return torch.zeros((n, NBYTES), dtype=torch.uint8)


@pytest.mark.parametrize("host_blocks,disk", [(16, True), (16, None), (0, True)])
def test_roundtrip_per_tier(make_store, host_blocks: int, disk: bool | None) -> None:
    store = make_store(host_blocks=host_blocks, disk=disk)
    hashes = make_hashes(8)
    assert store.put(hashes, block_bytes(hashes)) == 8
    expected = "host" if host_blocks else "disk"
    assert store.lookup(hashes + make_hashes(2, seed=1)) == [expected] * 8
    out = _out(8)
    assert store.load(hashes, out) == 8
    assert_rows(out, hashes)
    # the prefix stops at the first miss even when later blocks are present
    gap = hashes[:3] + make_hashes(1, seed=2) + hashes[4:]
    assert store.lookup(gap) == [expected] * 3
    assert store.load(gap, _out(8)) == 3


def test_both_tiers_off_misses_everything(make_store) -> None:
    store = make_store(host_blocks=0, disk=None)
    hashes = make_hashes(3)
    assert store.put(hashes, block_bytes(hashes)) == 0
    assert store.lookup(hashes) == [] and store.load(hashes, _out(3)) == 0
    assert store.pin(hashes) == [False] * 3
    assert store.stats()["misses"] == 3


def test_eviction_chain_host_to_disk_to_dropped_and_promotion(make_store) -> None:
    store = make_store(host_blocks=4, disk_capacity_bytes=256 << 10)
    hashes = make_hashes(200)
    data = block_bytes(hashes)
    for i in range(0, 200, 4):
        store.put(hashes[i : i + 4], data[i : i + 4])
        assert store.flush(timeout_s=10)
        assert store.host.used_bytes <= store.host.capacity_bytes
        assert store.disk.used_bytes <= store.disk.capacity_bytes
    assert store.lookup(hashes[196:]) == ["host"] * 4
    assert store.lookup(hashes[180:181]) == ["disk"]  # evicted from host, kept by disk
    assert store.lookup(hashes[:1]) == []  # LRU of disk: dropped
    out = _out(2)
    assert store.load(hashes[180:182], out) == 2
    assert_rows(out, hashes[180:182])
    assert store.lookup(hashes[180:182]) == ["host", "host"]  # promoted
    stats = store.stats()
    assert stats["promoted"] == 2 and stats["disk_hits"] == 2
    assert stats["host"]["evictions"] > 0 and stats["disk"]["evictions"] > 0


def test_pinned_blocks_survive_pressure_in_every_tier(make_store) -> None:
    # write-through: the pinned blocks are on disk too, where the pressure must not drop them
    store = make_store(
        host_blocks=4, disk_capacity_bytes=256 << 10, disk_write_policy="write_through"
    )
    hashes = make_hashes(150)
    data = block_bytes(hashes)
    store.put(hashes[:2], data[:2])
    store.flush(timeout_s=10)
    assert store.pin(hashes[:2]) == [True, True]
    for i in range(2, 150, 4):
        store.put(hashes[i : i + 4], data[i : i + 4])
        store.flush(timeout_s=10)
    assert store.lookup(hashes[:2]) == ["host", "host"]
    assert store.disk.contains(hashes[0]) and store.disk.contains(hashes[1])
    store.unpin(hashes[:2])
    assert store.num_pinned() == 0
    with pytest.raises(AssertionError, match="not pinned"):
        store.unpin(hashes[:1])


def test_events_and_stats_are_plain(make_store) -> None:
    store = make_store(host_blocks=2, disk_write_policy="write_through")
    seen = []
    store.subscribe(seen.append)
    hashes = make_hashes(3)
    store.put(hashes, block_bytes(hashes))
    store.flush(timeout_s=10)
    events = store.drain_events()
    assert events == seen and store.drain_events() == []
    stored = {(e.tier, h) for e in events if e.kind == "stored" for h in e.block_hashes}
    assert {("disk", h) for h in hashes} <= stored
    assert {("host", h) for h in hashes[:2]} <= stored
    store.remove(hashes[:1])
    removed = {
        (e.tier, h) for e in store.drain_events() if e.kind == "removed" for h in e.block_hashes
    }
    assert removed == {("host", hashes[0]), ("disk", hashes[0])}
    stats = store.stats()
    json.dumps(stats)
    assert stats["puts"] == 1 and stats["store_latency"]["count"] == 1
    assert stats["host"]["refused_writes"] == 1  # third block: both slots were being written


def test_bad_input_is_a_value_error(tmp_path) -> None:
    from kvstore_testutil import LAYOUT

    with pytest.raises(ValueError, match="fingerprint"):
        TieredStore(LAYOUT, b"short", StoreConfig(host_capacity_bytes=0))
    with TieredStore(LAYOUT, FP, StoreConfig(host_capacity_bytes=4 * NBYTES)) as store:
        hashes = make_hashes(2)
        with pytest.raises(ValueError, match="uint8"):
            store.put(hashes, torch.zeros((2, NBYTES // 4), dtype=torch.float32))
        with pytest.raises(ValueError, match="shape"):
            store.load(hashes, torch.zeros((1, NBYTES), dtype=torch.uint8))


def test_measure_bandwidth_reports_each_tier(make_store) -> None:
    store = make_store(host_blocks=8)
    bw = store.measure_bandwidth(num_blocks=8, repeats=2)
    assert set(bw) == {"host", "disk"} and all(v > 0 for v in bw.values())
    assert store.disk.num_blocks == 0  # scratch blocks removed


def test_tiers_in_order_and_demote_a_prefix_to_disk(make_store) -> None:
    from proto.vocab import Tier

    store = make_store(host_blocks=16)
    assert [t.name for t in store.tiers] == [Tier.HOST, Tier.DISK]
    assert store.tier(Tier.DISK) is store.tiers[1] and store.tier(Tier.DEVICE) is None
    hashes = make_hashes(8)
    assert store.put(hashes, block_bytes(hashes)) == 8
    assert store.flush(timeout_s=10)
    assert store.demote(Tier.HOST, hashes) == 0  # the host is the store's top: nothing moves
    pinned = hashes[4:5]
    assert store.pin(pinned) == [True]
    assert store.demote(Tier.DISK, hashes[:5]) == 4  # the pinned block stays up
    assert store.lookup(hashes) == [Tier.DISK] * 4 + [Tier.HOST] * 4
    store.unpin(pinned)
    out = _out(8)
    assert store.load(hashes, out) == 8  # read back from disk, the same bytes
    assert_rows(out, hashes)
    with pytest.raises(ValueError, match="host or disk"):
        store.demote(Tier.DEVICE)


def test_demote_everything_without_a_disk_drops_the_host_blocks(make_store) -> None:
    from proto.vocab import Tier

    store = make_store(host_blocks=8, disk=None)
    hashes = make_hashes(4)
    store.put(hashes, block_bytes(hashes))
    assert [t.name for t in store.tiers] == [Tier.HOST]
    assert store.demote(Tier.DISK) == 4 and store.lookup(hashes) == []
