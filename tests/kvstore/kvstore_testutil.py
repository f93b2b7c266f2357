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
