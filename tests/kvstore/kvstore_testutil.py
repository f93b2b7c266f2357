"""Helpers of the store tests: a 1 KiB block layout, deterministic payloads."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from kvstore.keys import BlockHash
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
NBYTES = LAYOUT.block_nbytes  # 1024
FP = hashlib.blake2b(b"test-model", digest_size=16).digest()
OTHER_FP = hashlib.blake2b(b"other-model", digest_size=16).digest()


def make_hashes(n: int, seed: int = 0) -> list[BlockHash]:
    return [
        BlockHash(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest())
        for i in range(n)
    ]


def block_bytes(hashes: Sequence[BlockHash], nbytes: int = NBYTES) -> torch.Tensor:
    """A payload that is a function of the hash: ``[n, nbytes]`` uint8."""
    rows = []
    for h in hashes:
        stream = hashlib.blake2b(h, digest_size=64).digest() * (nbytes // 64 + 1)
        rows.append(torch.frombuffer(bytearray(stream[:nbytes]), dtype=torch.uint8))
    return torch.stack(rows) if rows else torch.empty((0, nbytes), dtype=torch.uint8)


def assert_rows(out: torch.Tensor, hashes: Sequence[BlockHash]) -> None:
    assert torch.equal(out[: len(hashes)], block_bytes(hashes, out.shape[1]))


def payload_location(disk_path: str, block_hash: bytes, capacity_bytes: int = 8 << 30):
    """(segment file, byte offset) of a block's payload in a closed disk store, read from its
    LMDB index the way the tier does."""
    import lmdb

    from kvstore.tiers.disk.format import DB_INDEX, decode_entry, slots_per_segment
    from kvstore.tiers.disk.segments import class_dir

    env = lmdb.open(f"{disk_path}/index", max_dbs=2, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(DB_INDEX)) as txn:
            entry = decode_entry(txn.get(block_hash))
    finally:
        env.close()
    assert entry is not None, "the block is not in the store's index"
    per = slots_per_segment(entry.slot_nbytes, capacity_bytes)
    path = class_dir(disk_path, entry.slot_nbytes) / f"{entry.slot // per}.seg"
    return path, (entry.slot % per) * entry.slot_nbytes


def flip_payload_byte(disk_path: str, block_hash: bytes, at: int = 100) -> None:
    """Flip one byte of a stored block's payload, on disk (a decayed page)."""
    path, offset = payload_location(disk_path, block_hash)
    with open(path, "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)[0]
        f.seek(offset + at)
        f.write(bytes([byte ^ 0xFF]))
