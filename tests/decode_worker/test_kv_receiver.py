"""KVTransfer server: reassembly, batching, auth, fingerprint and broken streams, over real gRPC
on 127.0.0.1 driven by the raw generated stub (the sender has its own tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest

from decode_worker.kv_receiver import start_kv_server
from kvstore.errors import TransferError
from kvstore.keys import BlockHash
from proto import kv_wire, strata_pb2_grpc
from proto import strata_pb2 as pb

FP = b"F" * 16
SECRET = "s3cret"


class DictSink:
    """Records what the receiver hands over (unit-level stand-in for the decode worker store)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: dict[bytes, bytes] = {}
        self.batches: list[int] = []
        self.done: dict[str, bool] = {}
        self.done_event = threading.Event()

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self.lock:
            return [h in self.blocks for h in hashes]

    def write_blocks(self, req_id: str, hashes: list[BlockHash], payloads: list) -> int:
        with self.lock:
            for h, p in zip(hashes, payloads, strict=True):
                self.blocks[h] = bytes(p)
            self.batches.append(len(hashes))
        return len(hashes)

    def read_blocks(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        with self.lock:
            return [self.blocks.get(h) for h in hashes]

    def transfer_done(self, req_id: str, ok: bool) -> None:
        with self.lock:
            assert req_id not in self.done, f"transfer_done called twice for {req_id}"
            self.done[req_id] = ok
        self.done_event.set()


@pytest.fixture
def server():
    sink = DictSink()
    srv, port = start_kv_server(sink, FP, secret=SECRET, batch_blocks=3)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield sink, strata_pb2_grpc.KVTransferStub(channel)
    channel.close()
    srv.stop(0)


MD = (("x-strata-secret", SECRET),)


def _h(i: int) -> bytes:
    return bytes([i]) * 16


def _chunks(
    req_id: str, blocks: list[bytes], chunk: int, last: bool = True
) -> Iterator[pb.BlockChunk]:
    for i, data in enumerate(blocks):
        for off in range(0, len(data), chunk):
            yield pb.BlockChunk(
                req_id=req_id,
                fingerprint=FP,
                block_hash=_h(i),
                block_index=i,
                offset=off,
                total_nbytes=len(data),
                data=data[off : off + chunk],
            )
    if last:
        yield pb.BlockChunk(req_id=req_id, last=True)


def test_push_reassembles_chunks_and_writes_in_batches(server) -> None:
    sink, stub = server
    blocks = [bytes([i]) * 1000 + bytes(range(i, i + 7)) for i in range(7)]
    resp = stub.PushBlocks(_chunks("r1", blocks, chunk=300), timeout=10, metadata=MD)
    assert resp.num_blocks == 7 and resp.nbytes == sum(map(len, blocks))
    assert sink.done == {"r1": True}
    assert sink.batches == [3, 3, 1]  # batch_blocks=3 bounds memory
    assert [sink.blocks[_h(i)] for i in range(7)] == blocks
    q = stub.QueryBlocks(
        pb.QueryBlocksRequest(fingerprint=FP, block_hashes=[_h(0), _h(1), b"x" * 16, _h(2)]),
        timeout=5,
        metadata=MD,
    )
    assert list(q.held) == [True, True, False, True] and q.num_leading_held == 2


def test_packed_small_blocks_are_unpacked_in_order(server) -> None:
    sink, stub = server
    blocks = [bytes([i]) * (20 + i) for i in range(10)]
    held = [(_h(i), i, b) for i, b in enumerate(blocks)]
    messages = list(kv_wire.block_messages("rp", FP, held, 1000, 100))
    messages.append(pb.BlockChunk(req_id="rp", last=True))
    assert len(messages) < len(blocks)  # several blocks travelled in one message
    resp = stub.PushBlocks(iter(messages), timeout=10, metadata=MD)
    assert resp.num_blocks == 10 and resp.nbytes == sum(map(len, blocks))
    assert sink.done == {"rp": True}
    assert [sink.blocks[_h(i)] for i in range(10)] == blocks


def test_packed_partial_block_is_refused(server) -> None:
    sink, stub = server
    head, part = list(_chunks("rq", [b"a" * 10, b"b" * 100], chunk=40))[:2]
    head.more.append(part)  # only the first 40 of block 1's 100 bytes, and nothing after
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(iter([head, pb.BlockChunk(req_id="rq", last=True)]), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "incomplete" in e.value.details()
    assert sink.done == {"rq": False} and _h(1) not in sink.blocks


def test_wrong_or_missing_secret_is_unauthenticated(server) -> None:
    sink, stub = server
    for md in ((("x-strata-secret", "nope"),), ()):
        with pytest.raises(grpc.RpcError) as e:
            stub.QueryBlocks(pb.QueryBlocksRequest(fingerprint=FP), timeout=5, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.PushBlocks(_chunks("r", [b"abc"], 2), timeout=5, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sink.blocks == {} and sink.done == {}


def test_wrong_fingerprint_is_failed_precondition(server) -> None:
    sink, stub = server
    bad = [
        pb.BlockChunk(
            req_id="r2",
            fingerprint=b"G" * 16,
            block_hash=_h(0),
            total_nbytes=1,
            data=b"x",
            last=True,
        )
    ]
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(iter(bad), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sink.done == {"r2": False} and sink.blocks == {}
    for call in (
        lambda: stub.QueryBlocks(
            pb.QueryBlocksRequest(fingerprint=b"G" * 16), timeout=5, metadata=MD
        ),
        lambda: list(
            stub.PullBlocks(pb.PullBlocksRequest(fingerprint=b""), timeout=5, metadata=MD)
        ),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stream_without_last_drops_partial_block(server) -> None:
    sink, stub = server
    blocks = [b"a" * 100, b"b" * 100]
    cut = list(_chunks("r3", blocks, chunk=40, last=False))[:-1]  # second block incomplete
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(iter(cut), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.done == {"r3": False}
    assert _h(1) not in sink.blocks  # the half block never reaches the sink


def test_out_of_order_chunk_is_refused(server) -> None:
    sink, stub = server
    chunks = list(_chunks("r4", [b"z" * 100], chunk=40))
    chunks[0], chunks[1] = chunks[1], chunks[0]
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(iter(chunks), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.done == {"r4": False} and sink.blocks == {}


def test_client_cancel_mid_stream_reports_failure(server) -> None:
    sink, stub = server
    gate = threading.Event()

    def slow() -> Iterator[pb.BlockChunk]:
        # three whole blocks (one flushed batch), then half of a fourth, then the stream stalls
        yield from _chunks("r5", [b"q" * 64] * 3 + [b"w" * 64], chunk=64, last=False)
        yield pb.BlockChunk(
            req_id="r5", block_hash=_h(9), block_index=4, total_nbytes=64, data=b"e" * 32
        )
        gate.wait(10)

    fut = stub.PushBlocks.future(slow(), timeout=10, metadata=MD)
    deadline = time.monotonic() + 5
    while not sink.batches and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.batches == [3]
    fut.cancel()
    gate.set()
    assert sink.done_event.wait(5), "receiver never reported the broken transfer"
    assert sink.done == {"r5": False}
    assert set(sink.blocks) == {_h(0), _h(1), _h(2)}  # whole blocks kept, partial ones dropped


def test_deadline_mid_stream_reports_failure(server) -> None:
    sink, stub = server

    def stall() -> Iterator[pb.BlockChunk]:
        yield from _chunks("r6", [b"q" * 64], chunk=32, last=False)
        time.sleep(2)

    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(stall(), timeout=0.3, metadata=MD)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sink.done_event.wait(5)
    assert sink.done == {"r6": False}


def test_pull_streams_held_blocks_only(server) -> None:
    sink, stub = server
    sink.blocks[_h(1)] = b"1" * 250
    sink.blocks[_h(3)] = b"3" * 10
    chunks = list(
        stub.PullBlocks(
            pb.PullBlocksRequest(
                fingerprint=FP,
                req_id="p",
                block_hashes=[_h(0), _h(1), _h(2), _h(3)],
                chunk_bytes=100,
            ),
            timeout=5,
            metadata=MD,
        )
    )
    assert chunks[-1].last
    assert [(c.block_index, c.offset, len(c.data)) for c in chunks[:-1]] == [
        (1, 0, 100),
        (1, 100, 100),
        (1, 200, 50),
        (3, 0, 10),
    ]


def test_empty_stream_and_sink_failure(server) -> None:
    sink, stub = server
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(iter([]), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.done == {}

    def failing_write(req_id: str, hashes: list, payloads: list) -> int:
        raise TransferError("disk full")

    sink.write_blocks = failing_write
    with pytest.raises(grpc.RpcError) as e:
        stub.PushBlocks(_chunks("r7", [b"a"] * 3, chunk=8), timeout=5, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "disk full" in e.value.details()
    assert sink.done == {"r7": False}
