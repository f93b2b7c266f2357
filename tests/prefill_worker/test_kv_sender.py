"""KVSender against a real KVTransfer server on 127.0.0.1: push with chunking and skipping of
held blocks, auth and fingerprint errors, cancel mid-stream, pull round trip."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from decode_worker.kv_receiver import start_kv_server
from kvstore.errors import TransferError
from kvstore.keys import BlockHash, hash_prompt_blocks
from prefill_worker.kv_sender import KVSender

FP = b"P" * 16
SECRET = "cluster-secret"
BLOCK_NBYTES = (1 << 20) + 4096  # > 1 MiB: split into several chunks
CHUNK = 256 << 10


class DictSink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: dict[bytes, bytes] = {}
        self.done: dict[str, bool] = {}
        self.done_event = threading.Event()

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self.lock:
            return [h in self.blocks for h in hashes]

    def write_blocks(self, req_id: str, hashes: list[BlockHash], payloads: list) -> int:
        with self.lock:
            for h, p in zip(hashes, payloads, strict=True):
                self.blocks[h] = bytes(p)
        return len(hashes)

    def read_blocks(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        with self.lock:
            return [self.blocks.get(h) for h in hashes]

    def transfer_done(self, req_id: str, ok: bool) -> None:
        with self.lock:
            self.done[req_id] = ok
        self.done_event.set()


@pytest.fixture
def receiver():
    sink = DictSink()
    server, port = start_kv_server(sink, FP, secret=SECRET)
    yield sink, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def sender():
    s = KVSender(secret=SECRET, chunk_bytes=CHUNK)
    yield s
    s.close()


def _blocks(n: int, seed: int = 0) -> tuple[list[BlockHash], list[memoryview]]:
    rng = np.random.default_rng(seed)
    hashes = hash_prompt_blocks(rng.integers(0, 1000, size=16 * n), 16, FP)
    # block-major buffers as the store hands them out: views over one numpy slab
    slab = rng.integers(0, 255, size=(n, BLOCK_NBYTES), dtype=np.uint8)
    return hashes, [memoryview(slab[i]) for i in range(n)]


def test_push_20_blocks_then_skip_held(receiver, sender) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(20)
    res = sender.push(addr, "req-1", FP, hashes[:12], payloads[:12], deadline_s=30)
    assert (res.num_sent, res.num_skipped, res.nbytes) == (12, 0, 12 * BLOCK_NBYTES)
    assert res.seconds > 0
    res = sender.push(addr, "req-2", FP, hashes, lambda i: payloads[i], deadline_s=30)
    assert (res.num_sent, res.num_skipped) == (8, 12)
    assert res.nbytes == 8 * BLOCK_NBYTES
    assert sink.done == {"req-1": True, "req-2": True}
    assert all(sink.blocks[h] == bytes(p) for h, p in zip(hashes, payloads))
    # everything held: the stream still closes the request on the receiver
    res = sender.push(addr, "req-3", FP, hashes, payloads, deadline_s=30)
    assert (res.num_sent, res.num_skipped, res.nbytes) == (0, 20, 0)
    assert sink.done["req-3"] is True
    assert sender.query(addr, FP, hashes[:2] + [BlockHash(b"\0" * 16)], 5) == [True, True, False]


def test_push_without_skip_sends_everything(receiver, sender) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(3, seed=1)
    sender.push(addr, "a", FP, hashes, payloads, deadline_s=30)
    res = sender.push(addr, "b", FP, hashes, payloads, deadline_s=30, skip_held=False)
    assert (res.num_sent, res.num_skipped) == (3, 0)


def test_wrong_secret_and_fingerprint(receiver) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(2, seed=2)
    for s, code in ((KVSender(secret="wrong"), "UNAUTHENTICATED"), (KVSender(), "UNAUTHENTICATED")):
        with pytest.raises(TransferError) as e:
            s.push(addr, "x", FP, hashes, payloads, deadline_s=5)
        assert e.value.code == code
        s.close()
    s = KVSender(secret=SECRET)
    with pytest.raises(TransferError) as e:
        s.push(addr, "y", b"Q" * 16, hashes, payloads, deadline_s=5)
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(TransferError) as e:
        s.push(addr, "z", b"Q" * 16, hashes, payloads, deadline_s=5, skip_held=False)
    assert e.value.code == "FAILED_PRECONDITION"
    s.close()
    assert sink.blocks == {}
    assert sink.done == {"z": False}


def test_cancel_mid_stream_aborts_both_sides(receiver, sender) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(6, seed=3)
    cancel = threading.Event()

    def payload_for(i: int) -> memoryview:
        if i == 4:
            cancel.set()  # the caller gives up while block 4 is about to go out
        return payloads[i]

    with pytest.raises(TransferError) as e:
        sender.push(addr, "c", FP, hashes, payload_for, deadline_s=30, cancel=cancel)
    assert e.value.code == "CANCELLED"
    assert sink.done_event.wait(5)
    assert sink.done == {"c": False}
    assert hashes[4] not in sink.blocks and hashes[5] not in sink.blocks


def test_payload_error_propagates_and_receiver_drops(receiver, sender) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(3, seed=4)

    def payload_for(i: int) -> memoryview:
        if i == 2:
            raise RuntimeError("block 2 vanished")
        return payloads[i]

    with pytest.raises(RuntimeError, match="vanished"):
        sender.push(addr, "e", FP, hashes, payload_for, deadline_s=30)
    assert sink.done_event.wait(5)
    assert sink.done == {"e": False}


def test_pull_roundtrip(receiver, sender) -> None:
    sink, addr = receiver
    hashes, payloads = _blocks(5, seed=5)
    sender.push(addr, "p", FP, hashes[:3], payloads[:3], deadline_s=30)
    got = sender.pull(addr, FP, [hashes[3], hashes[0], hashes[2], hashes[4]], deadline_s=30)
    assert got[0] is None and got[3] is None
    assert got[1] == bytes(payloads[0]) and got[2] == bytes(payloads[2])


def test_unreachable_receiver_and_bad_arguments(sender) -> None:
    hashes, payloads = _blocks(1, seed=6)
    with pytest.raises(TransferError) as e:
        sender.push("127.0.0.1:1", "u", FP, hashes, payloads, deadline_s=2)
    assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    with pytest.raises(ValueError, match="payloads"):
        sender.push("127.0.0.1:1", "u", FP, hashes, payloads * 2, deadline_s=2)
    with pytest.raises(ValueError, match="deadline_s"):
        sender.push("127.0.0.1:1", "u", FP, hashes, payloads, deadline_s=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        KVSender(chunk_bytes=0)
