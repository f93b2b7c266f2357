"""A receiver over real gRPC on 127.0.0.1 with a recording sink, and senders for it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from kvstore.keys import BlockHash
from kvtransfer import shm
from kvtransfer.receiver import KVReceiver, serve
from kvtransfer.sender import KVSender

FP = b"F" * 16
SECRET = "s3cret"
BLOCK = 4096  # bytes of one block in these tests


class DictSink:
    """Records what the receiver hands over (the unit-level stand-in for a worker's engine);
    writes finish on another thread, as the engine's do between its steps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: dict[bytes, bytes] = {}
        self.writes: list[int] = []  # blocks per write
        self.done: dict[str, bool] = {}
        self.first_tokens: dict[str, int | None] = {}
        self.done_event = threading.Event()
        self.gate = threading.Event()  # cleared: writes wait (a busy engine)
        self.gate.set()
        self.fail_writes = False
        self._pool = ThreadPoolExecutor(1)

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self.lock:
            return [h in self.blocks for h in hashes]

    def write_blocks(
        self, req_id: str, hashes: list[BlockHash], data: memoryview, block_nbytes: int
    ) -> Future[int]:
        def write() -> int:
            self.gate.wait(30)
            if self.fail_writes:
                raise OSError("disk on fire")
            with self.lock:
                for i, h in enumerate(hashes):
                    self.blocks[h] = bytes(data[i * block_nbytes : (i + 1) * block_nbytes])
                self.writes.append(len(hashes))
            return len(hashes)

        return self._pool.submit(write)

    def read_blocks(self, hashes: Sequence[BlockHash]) -> tuple[int, memoryview]:
        with self.lock:
            out = []
            for h in hashes:
                if h not in self.blocks:
                    break
                out.append(self.blocks[h])
        return len(out), memoryview(b"".join(out))

    def transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        with self.lock:
            assert req_id not in self.done, f"transfer_done called twice for {req_id}"
            self.done[req_id] = ok
            self.first_tokens[req_id] = first_token
        self.done_event.set()

    def wait_done(self, req_id: str, timeout: float = 10.0) -> bool:
        assert self.done_event.wait(timeout)
        with self.lock:
            return self.done[req_id]


@pytest.fixture
def receiver():
    sink = DictSink()
    rx = KVReceiver(sink, FP, secret=SECRET)
    server, port = serve(rx)
    yield sink, rx, f"127.0.0.1:{port}"
    server.stop(0)
    rx.segments.close()


@pytest.fixture
def make_sender():
    senders: list[KVSender] = []

    def make(**kw) -> KVSender:
        kw.setdefault("secret", SECRET)
        kw.setdefault("block_nbytes", BLOCK)
        s = KVSender(owner="test-sender", **kw)
        senders.append(s)
        return s

    yield make
    for s in senders:
        s.close()
    leftover = [n for n in shm_names() if n.startswith(f"{shm.PREFIX}test-sender-")]
    assert not leftover, f"shared-memory segments left behind: {leftover}"


def shm_names() -> list[str]:
    import os

    return os.listdir(shm.SHM_DIR) if os.path.isdir(shm.SHM_DIR) else []


def hashes(n: int, tag: int = 0) -> list[BlockHash]:
    return [BlockHash(bytes([tag, i % 256, i // 256]) * 5 + b"x") for i in range(n)]


def payload(n: int, seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n * BLOCK, dtype=np.uint8).tobytes()
