"""Disk write policies: which blocks reach LMDB, and when."""

from __future__ import annotations

import pytest
import torch
from kvstore_testutil import NBYTES, assert_rows, block_bytes, make_hashes

from kvstore.config import StoreConfig


def _hit(store, hashes) -> None:
    assert store.load(hashes, torch.empty((len(hashes), NBYTES), dtype=torch.uint8)) == len(hashes)


def _on_disk(store, hashes) -> list[bool]:
    store.flush(timeout_s=10)
    return [store.disk.contains(h) for h in hashes]


def test_write_through_writes_every_block_at_once(make_store) -> None:
    store = make_store(host_blocks=8, disk_write_policy="write_through")
    hashes = make_hashes(4)
    store.put(hashes, block_bytes(hashes))
    assert _on_disk(store, hashes) == [True] * 4
    assert store.stats()["disk"]["written_bytes"] == 4 * NBYTES


@pytest.mark.parametrize("policy", ["evict", "evict_or_second_hit"])
def test_evict_writes_a_block_when_the_host_lets_it_go(make_store, policy: str) -> None:
    store = make_store(host_blocks=4, disk_write_policy=policy)
    hashes = make_hashes(6)
    store.put(hashes[:4], block_bytes(hashes[:4]))
    assert _on_disk(store, hashes[:4]) == [False] * 4  # nothing written while host holds them
    store.put(hashes[4:], block_bytes(hashes[4:]))  # evicts the two least recently used
    assert _on_disk(store, hashes) == [True, True, False, False, False, False]
    assert store.stats()["disk_policy"]["evict_writes"] == 2
    out = torch.empty((2, NBYTES), dtype=torch.uint8)
    assert store.load(hashes[:2], out) == 2  # read back from disk, promoted into host ...
    assert_rows(out, hashes[:2])
    assert _on_disk(store, hashes) == [True] * 4 + [False] * 2  # ... evicting two more
    assert store.stats()["disk"]["written_bytes"] == 4 * NBYTES


def test_second_hit_writes_hot_blocks_and_drops_cold_ones(make_store) -> None:
    store = make_store(host_blocks=4, disk_write_policy="second_hit")
    hashes = make_hashes(4)
    store.put(hashes, block_bytes(hashes))
    _hit(store, hashes[:2])
    assert _on_disk(store, hashes) == [False] * 4
    _hit(store, hashes[:1])  # block 0's second hit
    assert _on_disk(store, hashes) == [True, False, False, False]
    newer = make_hashes(4, seed=1)
    store.put(newer, block_bytes(newer))  # evicts all four old blocks: only 0 survives
    assert store.lookup(hashes[:1]) == ["disk"] and store.lookup(hashes[1:2]) == []
    assert store.stats()["disk_policy"]["hit_writes"] == 1


def test_blocks_no_host_slot_takes_go_to_disk_under_every_policy(make_store) -> None:
    store = make_store(host_blocks=2, disk_write_policy="second_hit")
    hashes = make_hashes(3)
    store.put(hashes, block_bytes(hashes))  # the third finds both slots being written
    assert _on_disk(store, hashes) == [False, False, True]


def test_close_persists_the_host_tier_for_a_warm_restart(make_store, tmp_path) -> None:
    store = make_store(host_blocks=8, disk_write_policy="evict")
    hashes = make_hashes(5)
    store.put(hashes, block_bytes(hashes))
    assert _on_disk(store, hashes) == [False] * 5
    store.close()
    again = make_store(host_blocks=8)
    assert again.lookup(hashes) == ["disk"] * 5
    out = torch.empty((5, NBYTES), dtype=torch.uint8)
    assert again.load(hashes, out) == 5
    assert_rows(out, hashes)
    again.close()
    quick = make_store(host_blocks=8, disk=str(tmp_path / "other"), persist_on_close=False)
    quick.put(hashes, block_bytes(hashes))
    quick.close()
    assert make_store(host_blocks=8, disk=str(tmp_path / "other")).lookup(hashes) == []


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="disk_write_policy must be one of"):
        StoreConfig(disk_write_policy="sometimes")
