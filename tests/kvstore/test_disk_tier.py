"""DiskTier: checksummed LMDB values, write-behind queue, LRU inside the map, restart."""

from __future__ import annotations

import torch
from kvstore_testutil import FP, NBYTES, assert_rows, block_bytes, make_hashes

from kvstore.layout import aligned_empty
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk.segments import SegmentFiles


def _disk(tmp_path, **kw) -> DiskTier:
    kw.setdefault("capacity_bytes", 1 << 20)
    return DiskTier(str(tmp_path / "disk"), block_nbytes=NBYTES, fingerprint=FP, **kw)


def test_roundtrip_served_from_queue_then_from_lmdb(tmp_path) -> None:
    disk = _disk(tmp_path)
    try:
        hashes = make_hashes(6)
        data = block_bytes(hashes)
        assert disk.put(hashes, data) == [True] * 6
        data.zero_()  # the queue holds its own copy
        out = torch.empty((6, NBYTES), dtype=torch.uint8)
        assert disk.get_into(hashes, out) == [True] * 6  # queued or committed: both serve
        assert_rows(out, hashes)
        assert disk.flush(timeout_s=10)
        assert disk.num_blocks == 6 and disk.counters()["written_blocks"] == 6
        out.zero_()
        assert disk.get_into(hashes[::-1], out) == [True] * 6
        assert_rows(out, hashes[::-1])
        assert disk.put(hashes[:2], data[:2]) == [True, True]  # idempotent
        assert disk.remove(hashes[0]) and not disk.contains(hashes[0])
        assert disk.flush(timeout_s=10)
        assert disk.get_into(hashes[:1], out) == [False]
    finally:
        disk.close()


def test_full_queue_refuses_without_blocking(tmp_path) -> None:
    disk = _disk(tmp_path, write_queue_blocks=4)
    try:
        hashes = make_hashes(40)
        accepted = disk.put(hashes, block_bytes(hashes))  # one call holds the queue lock
        assert sum(accepted) == 4 and accepted[:4] == [True] * 4
        assert disk.counters()["refused_writes"] == 36
        assert disk.flush(timeout_s=10) and disk.num_blocks == 4
    finally:
        disk.close()


def test_lru_eviction_stays_under_capacity_and_skips_pinned(tmp_path) -> None:
    disk = _disk(tmp_path, capacity_bytes=256 << 10)
    try:
        hashes = make_hashes(200)
        data = block_bytes(hashes)
        disk.put(hashes[:10], data[:10])
        assert disk.flush(timeout_s=10)
        assert disk.pin(hashes[0])
        out = torch.empty((1, NBYTES), dtype=torch.uint8)
        assert disk.get_into(hashes[1:2], out) == [True]  # touch 1: most recently used
        for i in range(10, 200, 10):
            disk.put(hashes[i : i + 10], data[i : i + 10])
            assert disk.flush(timeout_s=10)
            assert disk.used_bytes <= disk.capacity_bytes
        c = disk.counters()
        assert c["evictions"] > 0 and c["refused_writes"] == 0
        assert disk.contains(hashes[0])  # pinned: never evicted
        assert not disk.contains(hashes[2])  # least recently used: gone
        assert disk.contains(hashes[199])
        disk.unpin(hashes[0])
    finally:
        disk.close()


def test_restart_keeps_blocks_and_lru_order(tmp_path) -> None:
    hashes = make_hashes(4)
    disk = _disk(tmp_path)
    disk.put(hashes, block_bytes(hashes))
    disk.flush(timeout_s=10)
    out = torch.empty((4, NBYTES), dtype=torch.uint8)
    disk.get_into(hashes[:1], out)  # 0 becomes the most recently used
    disk.close()
    disk = _disk(tmp_path)
    try:
        assert disk.num_blocks == 4
        assert list(disk.index.entries) == [hashes[1], hashes[2], hashes[3], hashes[0]]
        assert disk.get_into(hashes, out) == [True] * 4
        assert_rows(out, hashes)
    finally:
        disk.close()


def test_direct_read_floor_reads_exactly_the_blocks_slots(tmp_path) -> None:
    disk = _disk(tmp_path)
    try:
        hashes = make_hashes(6)
        assert disk.put(hashes, block_bytes(hashes)) == [True] * 6
        assert disk.flush(timeout_s=10)
        slots = [disk.index.servable(h).slot for h in hashes]
        runs = disk.segments.runs(slots)
        # consecutive slots of one segment fold into runs covering exactly the blocks' slots
        assert sum(n for _, _, n in runs) == 6 * disk.slot_nbytes
        covered = sorted(off // disk.slot_nbytes + k for _, off, n in runs
                         for k in range(n // disk.slot_nbytes))
        assert covered == sorted(disk.segments.offset_of(s) // disk.slot_nbytes for s in slots)
        floor = disk.direct_read_floor_s(hashes)
        if disk.direct_io:
            assert floor is not None and floor > 0
        else:  # no O_DIRECT on this filesystem: no honest floor
            assert floor is None
        assert disk.direct_read_floor_s(hashes + make_hashes(1, seed=99)) is None  # one missing
    finally:
        disk.close()


def test_runs_fold_only_slots_that_follow_on_in_one_file(tmp_path) -> None:
    seg = SegmentFiles(str(tmp_path), 4096, 4)  # 4 slots a segment
    try:
        bufs = [aligned_empty(1, 4096).numpy().reshape(-1) for _ in range(4)]
        for first in (0, 4, 12):  # segments 0, 1 and 3; segment 2 (slots 8-11) has no file
            seg.write(first, bufs)
        fd0, fd1, fd3 = (seg.runs([s])[0][0] for s in (0, 4, 12))
        # consecutive slot numbers across a segment's end: two runs in two files
        assert seg.runs([2, 3, 4, 5]) == [(fd0, 2 * 4096, 2 * 4096), (fd1, 0, 2 * 4096)]
        # slots 9 and 10 have no file: left out, and 10 does not extend the run of slot 7
        assert seg.runs([7, 9, 10]) == [(fd1, 3 * 4096, 4096)]
        assert seg.runs([11, 12, 13]) == [(fd3, 0, 2 * 4096)]
        assert seg.runs([1, 0]) == [(fd0, 4096, 4096), (fd0, 0, 4096)]  # in order, not merged
    finally:
        seg.close()
