"""Restart, foreign fingerprints, corruption, bad files at the path, full and unwritable disks."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from kvstore_testutil import (
    NBYTES,
    OTHER_FP,
    assert_rows,
    block_bytes,
    flip_payload_byte,
    make_hashes,
    payload_location,
)

from kvstore.errors import DiskFormatError
from kvstore.layout import KVLayout
from proto.errors import StrataError


def _out(n: int, nbytes: int = NBYTES) -> torch.Tensor:
    return torch.zeros((n, nbytes), dtype=torch.uint8)


def _fill_and_close(make_store, n: int = 6):
    store = make_store(host_blocks=0)
    hashes = make_hashes(n)
    assert store.put(hashes, block_bytes(hashes)) == n
    store.close()
    return hashes


def test_restart_serves_earlier_blocks(make_store) -> None:
    hashes = _fill_and_close(make_store)
    store = make_store(host_blocks=4)
    assert store.lookup(hashes) == ["disk"] * 6
    out = _out(6)
    assert store.load(hashes, out) == 6
    assert_rows(out, hashes)


def test_other_fingerprint_never_sees_the_blocks(make_store) -> None:
    hashes = _fill_and_close(make_store)
    store = make_store(host_blocks=4, fingerprint=OTHER_FP)
    assert store.lookup(hashes) == [] and store.load(hashes, _out(6)) == 0
    assert store.stats()["disk"]["foreign_blocks"] == 6
    store.close()
    store = make_store(host_blocks=4)  # the original model still finds them
    assert store.lookup(hashes) == ["disk"] * 6


def test_flipped_bytes_end_the_prefix_and_are_counted(make_store, tmp_path) -> None:
    hashes = _fill_and_close(make_store)
    flip_payload_byte(str(tmp_path / "disk"), hashes[3])
    store = make_store(host_blocks=8)
    out = _out(6)
    assert store.load(hashes, out) == 3
    assert_rows(out, hashes[:3])
    assert store.stats()["disk"]["corrupt_blocks"] == 1
    assert store.lookup(hashes) == ["host"] * 3  # the bad block is gone: a miss from now on
    assert store.disk.contains(hashes[4])  # the blocks after it are intact, still on disk


def test_garbage_index_file_is_moved_aside(make_store, tmp_path, caplog) -> None:
    hashes = _fill_and_close(make_store, n=3)
    index_dir = tmp_path / "disk" / "index"
    (index_dir / "data.mdb").write_bytes(os.urandom(50_000))
    with caplog.at_level(logging.WARNING):
        store = make_store(host_blocks=4, disk_write_policy="write_through")
    assert "not a valid index" in caplog.text
    assert any(p.name.startswith("data.mdb.bad-") for p in index_dir.iterdir())
    assert store.lookup(hashes) == []  # their index is gone: so are they
    assert not any((tmp_path / "disk" / "segments").glob("*/*.seg"))  # unreachable: removed
    fresh = make_hashes(2, seed=1)
    store.put(fresh, block_bytes(fresh))
    assert store.flush(timeout_s=10) and store.disk.num_blocks == 2
    out = _out(2)
    assert store.disk.get_into(fresh, out) == [True, True]
    assert_rows(out, fresh)


def test_garbage_legacy_data_file_is_moved_aside(make_store, tmp_path, caplog) -> None:
    disk_dir = tmp_path / "disk"
    disk_dir.mkdir()
    (disk_dir / "data.mdb").write_bytes(os.urandom(50_000))
    with caplog.at_level(logging.WARNING):
        store = make_store(host_blocks=4, disk_write_policy="write_through")
    assert "not a version 1 store" in caplog.text
    assert any(p.name.startswith("data.mdb.bad-") for p in disk_dir.iterdir())
    hashes = make_hashes(2)
    store.put(hashes, block_bytes(hashes))
    assert store.flush(timeout_s=10) and store.disk.num_blocks == 2


def test_truncated_index_file_is_moved_aside(make_store, tmp_path) -> None:
    _fill_and_close(make_store, n=40)
    data_file = tmp_path / "disk" / "index" / "data.mdb"
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 3)  # reading it as is would fault (SIGBUS)
    store = make_store(host_blocks=4)
    assert store.disk is not None and store.disk.num_blocks == 0


def test_truncated_segment_file_is_a_miss(make_store, tmp_path) -> None:
    hashes = _fill_and_close(make_store, n=6)
    path, offset = payload_location(str(tmp_path / "disk"), hashes[2])
    with open(path, "r+b") as f:
        f.truncate(offset + 10)  # block 2 cut short, the ones after it gone
    store = make_store(host_blocks=8)
    out = _out(6)
    assert store.load(hashes, out) == 2
    assert_rows(out, hashes[:2])
    assert store.stats()["disk"]["corrupt_blocks"] >= 1


def test_regular_file_at_the_path_is_a_clear_error(make_store, tmp_path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"someone's data")
    with pytest.raises(DiskFormatError, match="regular file"):
        make_store(disk=str(path))
    assert issubclass(DiskFormatError, StrataError)
    assert path.read_bytes() == b"someone's data"


def test_unwritable_path_disables_disk_and_keeps_serving(make_store, tmp_path, caplog) -> None:
    parent = tmp_path / "file"
    parent.write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        store = make_store(
            host_blocks=4, disk=str(parent / "disk"), disk_write_policy="write_through"
        )
    assert store.disk is None and "disk tier disabled" in caplog.text
    hashes = make_hashes(3)
    assert store.put(hashes, block_bytes(hashes)) == 3
    out = _out(3)
    assert store.load(hashes, out) == 3
    assert_rows(out, hashes)
    stats = store.stats()
    assert stats["disk_disabled_by_error"] == 1 and stats["disk_refused_writes_disabled"] == 3


def test_tiny_disk_refuses_and_host_keeps_serving(make_store, caplog) -> None:
    layout = KVLayout(
        num_layers=2, block_size=64, num_kv_heads=2, head_dim=32, dtype=torch.float32
    )  # 64 KiB blocks
    nbytes = layout.block_nbytes
    assert nbytes == 64 << 10
    with caplog.at_level(logging.WARNING):
        store = make_store(
            host_blocks=4, layout=layout, disk_capacity_bytes=128 << 10,
            disk_write_policy="write_through",
        )
    assert "raise disk_capacity_bytes" in caplog.text
    hashes = make_hashes(6)
    assert store.put(hashes, block_bytes(hashes, nbytes)) == 6
    store.flush(timeout_s=10)
    assert store.disk.num_blocks == 2 and store.stats()["disk"]["refused_writes"] == 4
    assert store.disk.used_bytes <= store.disk.capacity_bytes
    out = _out(6, nbytes)
    assert store.load(hashes, out) == 4  # host took the first four (one put fills 4 slots)
    assert_rows(out, hashes[:4])


def test_small_disk_evicts_under_pressure_without_errors(make_store) -> None:
    layout = KVLayout(num_layers=2, block_size=64, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    nbytes = layout.block_nbytes
    store = make_store(host_blocks=2, layout=layout, disk_capacity_bytes=1 << 20)
    hashes = make_hashes(60)
    for i in range(0, 60, 3):
        store.put(hashes[i : i + 3], block_bytes(hashes[i : i + 3], nbytes))
        assert store.flush(timeout_s=10)
        assert store.disk.used_bytes <= store.disk.capacity_bytes
    disk = store.stats()["disk"]
    assert disk["write_errors"] == 0 and disk["evictions"] > 0 and disk["blocks"] >= 2
    assert store.lookup(hashes[-3:]) == ["host", "host", "disk"]  # 3rd: both slots busy
