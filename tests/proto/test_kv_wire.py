"""Packing small whole blocks into one KVTransfer message, and unpacking them."""

from __future__ import annotations

import pytest

from proto import kv_wire
from proto import strata_pb2 as pb


def _blocks(sizes: list[int]) -> list[pb.BlockChunk]:
    out = []
    for i, n in enumerate(sizes):
        out += kv_wire.block_chunks("r", b"F" * 16, bytes([i]) * 16, i, bytes([i]) * n, 100)
    return out


def _flat(messages: list[pb.BlockChunk]) -> list[tuple[int, int, int]]:
    return [(c.block_index, c.offset, len(c.data)) for m in messages for c in kv_wire.unpacked(m)]


def test_pack_keeps_order_and_bounds_message_size() -> None:
    chunks = _blocks([30, 30, 30, 30, 250, 10, 60, 40])  # the 250-byte block is split in 3
    messages = list(kv_wire.pack_chunks(iter(chunks), 100))
    assert _flat(messages) == [(c.block_index, c.offset, len(c.data)) for c in chunks]
    sizes = [sum(len(c.data) for c in kv_wire.unpacked(m)) for m in messages]
    assert all(s <= 100 for s in sizes)
    # 30+30+30 | 30 | split x3 | 10+60 | 40 : whole blocks share a message while they fit
    assert [len(kv_wire.unpacked(m)) for m in messages] == [3, 1, 1, 1, 1, 2, 1]
    # blocks above max_block_bytes travel alone
    alone = list(kv_wire.pack_chunks(iter(_blocks([30, 30, 30])), 100, max_block_bytes=20))
    assert [len(kv_wire.unpacked(m)) for m in alone] == [1, 1, 1]
    closing = pb.BlockChunk(req_id="r", last=True)
    tail = list(kv_wire.pack_chunks(iter(_blocks([5, 5]) + [closing]), 100))
    assert tail[-1].last and not tail[-1].more and len(kv_wire.unpacked(tail[0])) == 2


def test_unpacked_refuses_a_malformed_pack() -> None:
    head, _, part = _blocks([10, 250])[:3]  # `part` is the second piece of a split block
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
