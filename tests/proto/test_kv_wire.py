"""Packing small whole blocks into one KVTransfer message, and unpacking them."""

from __future__ import annotations

import pytest

from proto import kv_wire
from proto import strata_pb2 as pb


def _payloads(sizes: list[int]) -> list[tuple[bytes, int, bytes]]:
    return [(bytes([i]) * 16, i, bytes([i]) * n) for i, n in enumerate(sizes)]


def _messages(sizes: list[int], chunk: int, pack: int) -> list[pb.BlockChunk]:
    return list(kv_wire.block_messages("r", b"F" * 16, _payloads(sizes), chunk, pack))


def _flat(messages: list[pb.BlockChunk]) -> list[tuple[int, int, int]]:
    return [(c.block_index, c.offset, len(c.data)) for m in messages for c in kv_wire.unpacked(m)]


def test_small_blocks_share_messages_in_order_within_the_limit() -> None:
    sizes = [30, 30, 30, 30, 250, 10, 60, 40]  # the 250-byte block is split in 3 chunks
    messages = _messages(sizes, 100, 100)
    assert _flat(messages) == [
        (0, 0, 30),
        (1, 0, 30),
        (2, 0, 30),
        (3, 0, 30),
        (4, 0, 100),
        (4, 100, 100),
        (4, 200, 50),
        (5, 0, 10),
        (6, 0, 60),
        (7, 0, 40),
    ]
    sizes_per_message = [sum(len(c.data) for c in kv_wire.unpacked(m)) for m in messages]
    assert all(s <= 100 for s in sizes_per_message)
    # 30+30+30 | 30 | split x3 | 10+60 | 40 : small blocks share a message while they fit
    assert [len(kv_wire.unpacked(m)) for m in messages] == [3, 1, 1, 1, 1, 2, 1]
    for m in messages:  # every block's bytes arrive intact
        for c in kv_wire.unpacked(m):
            assert c.data == bytes([c.block_index]) * len(c.data)
            assert c.total_nbytes == sizes[c.block_index]
    # pack 0: one message per block; blocks above PACK_MAX_BLOCK_BYTES are never packed
    assert [len(kv_wire.unpacked(m)) for m in _messages([30, 30, 30], 100, 0)] == [1, 1, 1]
    big = kv_wire.PACK_MAX_BLOCK_BYTES + 1
    assert [len(kv_wire.unpacked(m)) for m in _messages([big, big], 4 * big, 4 * big)] == [1, 1]


def test_unpacked_refuses_a_malformed_pack() -> None:
    head = _messages([10], 100, 100)[0]
    part = _messages([250], 100, 100)[1]  # the second piece of a split block
    bad = pb.BlockChunk()
    bad.CopyFrom(head)
    bad.more.append(part)
    with pytest.raises(ValueError, match="must start a block"):
        kv_wire.unpacked(bad)
    nested = pb.BlockChunk()
    nested.CopyFrom(head)
    inner = nested.more.add()
    inner.CopyFrom(head)
    inner.more.append(head)
    with pytest.raises(ValueError):
        kv_wire.unpacked(nested)
