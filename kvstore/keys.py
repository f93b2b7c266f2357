"""Block keys: the chained block hash and the model fingerprint.

``block_hash = blake2b-128(parent_hash || token_ids (int32 LE) || extra)``, chained from a fixed
root. ``extra`` is non-empty only on the first block of a prompt: it carries the model
fingerprint and the tenant's cache salt, so different weights, layouts or tenants never share a
block. Deterministic across processes and machines (never Python's ``hash()``). Only full blocks
are keyed; a partial last block is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import NewType

import numpy as np

BlockHash = NewType("BlockHash", bytes)

HASH_NBYTES = 16
ROOT_HASH = BlockHash(b"\x00" * HASH_NBYTES)
# Bump when the byte layout of a block (see layout.py) changes: old blocks must stop matching.
KV_LAYOUT_VERSION = 1


def model_fingerprint(fields: Mapping[str, object]) -> bytes:
    """A 16-byte identity of everything that decides the bytes of a KV block.

    ``fields`` holds the architecture config, the weight identity, dtype, block_size and the
    layout version; it is serialised canonically (sorted keys) before hashing.
    """
    canonical = json.dumps(
        {**fields, "kv_layout_version": KV_LAYOUT_VERSION}, sort_keys=True, default=str
    )
    return hashlib.blake2b(canonical.encode(), digest_size=HASH_NBYTES).digest()


def hash_block(
    parent: bytes, token_ids: Sequence[int] | np.ndarray, extra: bytes = b""
) -> BlockHash:
    h = hashlib.blake2b(digest_size=HASH_NBYTES)
    h.update(parent)
    h.update(np.asarray(token_ids, dtype="<i4").tobytes())
    h.update(extra)
    return BlockHash(h.digest())


def first_block_extra(fingerprint: bytes, cache_salt: str = "") -> bytes:
    return fingerprint + b"|salt:" + cache_salt.encode()


def hash_prompt_blocks(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    fingerprint: bytes,
    cache_salt: str = "",
    num_blocks: int | None = None,
) -> list[BlockHash]:
    """Chained hashes of the full blocks of ``token_ids`` (at most ``num_blocks`` of them)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    ids = np.asarray(token_ids, dtype="<i4")
    n = len(ids) // block_size
    if num_blocks is not None:
        n = min(n, num_blocks)
    hashes: list[BlockHash] = []
    parent: bytes = ROOT_HASH
    extra = first_block_extra(fingerprint, cache_salt)
    for i in range(n):
        parent = hash_block(
            parent, ids[i * block_size : (i + 1) * block_size], extra if i == 0 else b""
        )
        hashes.append(BlockHash(parent))
    return hashes


def extend_hashes(
    hashes: list[BlockHash],
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    fingerprint: bytes,
    cache_salt: str = "",
) -> list[BlockHash]:
    """Append the hashes of blocks that became full since ``hashes`` was computed (in place).

    O(1) when no block became full (a decode step), else O(tokens of the new blocks)."""
    n_full = len(token_ids) // block_size
    start = len(hashes)
    if n_full <= start:
        return hashes
    ids = np.asarray(token_ids[start * block_size : n_full * block_size], dtype="<i4")
    parent: bytes = hashes[-1] if hashes else ROOT_HASH
    for i in range(start, n_full):
        extra = first_block_extra(fingerprint, cache_salt) if i == 0 else b""
        j = (i - start) * block_size
        parent = hash_block(parent, ids[j : j + block_size], extra)
        hashes.append(BlockHash(parent))
    return hashes


def hash_hex(block_hash: bytes) -> str:
    """Stable string form of a block hash."""
    return block_hash.hex()
