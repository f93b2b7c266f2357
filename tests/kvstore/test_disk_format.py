"""Disk format 2: a version 1 store is migrated, an unknown version refused, aligned reads go
straight into the rows, opening reads no payload, blocks of another size are foreign."""

from __future__ import annotations

import struct
import zlib

import lmdb
import pytest
import torch
from kvstore_testutil import FP, NBYTES, OTHER_FP, assert_rows, block_bytes, make_hashes

from kvstore.errors import DiskFormatError
from kvstore.layout import KVLayout, aligned_empty
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk.format import DB_META, KEY_VERSION, encode_u32

_V1_HEADER = struct.Struct("<4sHH16sQI4x")  # the version 1 value header


def _write_v1_store(path, values: dict[bytes, bytes], access: dict[bytes, int]) -> None:
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=3, subdir=True)
    blocks, counters, meta = (env.open_db(n) for n in (b"blocks", b"access", b"env"))
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k, v, db=blocks)
        for k, c in access.items():
            txn.put(k, struct.pack("<Q", c), db=counters)
        txn.put(b"fingerprint", FP, db=meta)
    env.close()


def _v1_value(fingerprint: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(payload) if crc is None else crc
    return _V1_HEADER.pack(b"STKV", 1, 0, fingerprint, len(payload), crc) + payload


def test_a_version_1_store_is_migrated(tmp_path, make_store) -> None:
    disk_dir = tmp_path / "disk"
    hashes = make_hashes(8)
    data = block_bytes(hashes)
    values = {h: _v1_value(FP, data[i].numpy().tobytes()) for i, h in enumerate(hashes[:5])}
    values[hashes[5]] = _v1_value(OTHER_FP, data[5].numpy().tobytes())  # another model
    values[hashes[6]] = _v1_value(FP, data[6].numpy().tobytes(), crc=1)  # a bad checksum
    values[hashes[7]] = b"not a block"
    _write_v1_store(disk_dir, values, {h: 10 - i for i, h in enumerate(hashes[:5])})
    store = make_store(host_blocks=8)
    assert not (disk_dir / "data.mdb").exists()  # migrated, then removed
    assert store.lookup(hashes) == ["disk"] * 5
    assert list(store.disk.index.entries) == hashes[4::-1]  # the LRU order it had
    out = torch.zeros((5, NBYTES), dtype=torch.uint8)
    assert store.load(hashes[:5], out) == 5
    assert_rows(out, hashes[:5])
    store.close()
    again = make_store(host_blocks=8)  # a second open finds them in the new format
    assert again.lookup(hashes[:5]) == ["disk"] * 5


def test_an_index_of_another_format_version_is_refused(tmp_path, make_store) -> None:
    store = make_store(host_blocks=0)
    hashes = make_hashes(2)
    store.put(hashes, block_bytes(hashes))
    store.close()
    env = lmdb.open(str(tmp_path / "disk" / "index"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(DB_META)) as txn:
        txn.put(KEY_VERSION, encode_u32(3))
    env.close()
    with pytest.raises(DiskFormatError, match="format version 3"):
        make_store(host_blocks=4)


@pytest.mark.parametrize("aligned", [True, False])
def test_reads_land_in_the_rows_aligned_or_not(tmp_path, aligned: bool) -> None:
    nbytes = 8192  # fills its slot: aligned rows are read into directly, others via a bounce
    disk = DiskTier(str(tmp_path / "d"), 1 << 20, nbytes, FP)
    try:
        hashes = make_hashes(6)
        data = block_bytes(hashes, nbytes)
        disk.put(hashes, data)
        assert disk.flush(timeout_s=10)
        if aligned:
            out = aligned_empty(7, nbytes)
        else:  # rows 8 bytes off a page boundary
            out = torch.zeros(7 * nbytes + 8, dtype=torch.uint8)[8:].view(7, nbytes)
        assert disk.get_into(hashes[::-1], out, rows=[6, 5, 4, 3, 2, 1]) == [True] * 6
        assert torch.equal(out[1:], data)
        assert disk.counters()["read_bytes"] == 6 * nbytes
    finally:
        disk.close()


def test_opening_reads_no_payload(tmp_path) -> None:
    disk = DiskTier(str(tmp_path / "d"), 1 << 20, NBYTES, FP)
    hashes = make_hashes(5)
    disk.put(hashes, block_bytes(hashes))
    disk.flush(timeout_s=10)
    disk.close()
    for seg in (tmp_path / "d" / "segments").glob("*/*.seg"):
        seg.unlink()  # the payloads are gone; the index alone is read on open
    disk = DiskTier(str(tmp_path / "d"), 1 << 20, NBYTES, FP)
    try:
        assert disk.num_blocks == 5 and disk.contains(hashes[0])
        out = torch.zeros((5, NBYTES), dtype=torch.uint8)
        assert disk.get_into(hashes, out) == [False] * 5  # a read finds nothing: misses
        assert disk.counters()["corrupt_blocks"] == 5 and disk.num_blocks == 0
    finally:
        disk.close()


def test_blocks_of_another_size_are_foreign_then_evicted(tmp_path, make_store) -> None:
    small = make_store(host_blocks=0, disk_capacity_bytes=64 << 10)  # 16 slots of 4 KiB
    hashes = make_hashes(6)
    small.put(hashes, block_bytes(hashes))
    small.close()
    big = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=256, dtype=torch.float32)
    assert big.block_nbytes == 32 << 10
    store = make_store(host_blocks=0, layout=big, disk_capacity_bytes=64 << 10)
    segments = tmp_path / "disk" / "segments"
    assert store.stats()["disk"]["foreign_blocks"] == 6 and (segments / "4096").is_dir()
    assert store.lookup(hashes) == []  # never served
    fresh = make_hashes(2, seed=9)
    store.put(fresh, block_bytes(fresh, big.block_nbytes))  # needs their room: they go first
    assert store.flush(timeout_s=10)
    assert store.disk.num_blocks == 2 and store.stats()["disk"]["foreign_blocks"] == 0
    assert not (segments / "4096").exists()  # nothing refers to that slot size any more
