"""TieredStore.start_load: returns before the disk reads, hands out the leading blocks as they
arrive, stops at a corrupt block, joins a prefetch under way, and gives every pin back."""

from __future__ import annotations

import torch
from kvstore_testutil import NBYTES, assert_rows, block_bytes, flip_payload_byte, make_hashes

from kvstore.lending import copy_rows_out


def _on_disk_only(make_store, n: int, **kw):
    store = make_store(host_blocks=0)
    hashes = make_hashes(n)
    store.put(hashes, block_bytes(hashes))
    store.close()
    return make_store(**{"host_blocks": 16, **kw}), hashes


def _rows(leases) -> torch.Tensor:
    n = sum(lease.num_blocks for lease in leases)
    out = torch.empty((n, NBYTES), dtype=torch.uint8)
    i = 0
    for lease in leases:
        copy_rows_out(lease.base, lease.rows, out[i : i + lease.num_blocks])
        i += lease.num_blocks
    return out


def test_start_load_returns_before_the_disk_reads(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 6, disk_read_limit_bytes_per_s=1e3)  # 1 s a block
    store.put(hashes[:2], block_bytes(hashes[:2]))  # the first two in host too
    pending = store.start_load(hashes)
    assert not pending.settled()  # the reads crawl: nothing waited for them
    assert pending.num_ready() == 2 and pending.tiers == ["host"] * 2 + ["disk"] * 4
    lease = pending.take(2)
    assert_rows(_rows([lease]), hashes[:2])
    pending.close()  # the reads under way are cancelled
    store.release(lease)
    assert store.wait_loads(timeout_s=10)
    assert store.host.num_pinned() == 0 and store.num_lent() == 0


def test_blocks_are_taken_in_pieces_as_they_arrive(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 10)
    pending = store.start_load(hashes)
    assert pending.wait(timeout_s=30) and pending.num_ready() == 10
    leases = [pending.take(3), pending.take(7)]
    pending.close()
    assert_rows(_rows(leases), hashes)
    assert store.lookup(hashes) == ["host"] * 10  # read into host slots: promoted
    for lease in leases:
        store.release(lease)
    assert store.wait_loads(timeout_s=10) and store.host.num_pinned() == 0
    stats = store.stats()
    assert stats["disk_hits"] == 10 and stats["promoted"] == 10


def test_a_corrupt_block_ends_what_is_handed_out(make_store, tmp_path) -> None:
    store = make_store(host_blocks=0)
    hashes = make_hashes(6)
    store.put(hashes, block_bytes(hashes))
    store.close()
    flip_payload_byte(str(tmp_path / "disk"), hashes[3])
    store = make_store(host_blocks=16)
    pending = store.start_load(hashes)
    assert pending.wait(timeout_s=30)
    assert pending.end() == 3 and pending.num_ready() == 3  # blocks 4, 5 arrived, not handed out
    lease = pending.take(3)
    pending.close()
    assert_rows(_rows([lease]), hashes[:3])
    store.release(lease)
    assert store.wait_loads(timeout_s=10) and store.host.num_pinned() == 0
    assert store.lookup(hashes) == ["host"] * 3  # block 3 is gone; 4 and 5 are cached in host
    assert store.host.contains(hashes[4]) and store.host.contains(hashes[5])


def test_a_prefetch_under_way_is_joined_not_waited_for(make_store) -> None:
    store, hashes = _on_disk_only(make_store, 4, disk_read_limit_bytes_per_s=8e3)  # 8 blocks/s
    store.prefetch(hashes)
    pending = store.start_load(hashes)  # the prefetch reads them: this load joins it
    assert pending.tiers == ["disk"] * 4
    assert pending.wait(timeout_s=30) and pending.num_ready() == 4
    lease = pending.take(4)
    pending.close()
    assert_rows(_rows([lease]), hashes)
    store.release(lease)
    assert store.wait_prefetch(timeout_s=10) and store.wait_loads(timeout_s=10)
    assert store.host.num_pinned() == 0 and store.num_pinned() == 0
