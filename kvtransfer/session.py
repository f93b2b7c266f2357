"""``PushSession``: one request's push stream, opened before its prefill and fed while it runs.

The stream opens with every block hash of the request and the sender's shared-memory offer; the
receiver answers which blocks it already holds (they are not sent) and whether it mapped the
segment. The prefill worker then hands over each chunk's new full blocks as soon as the engine
computed them (``add_inline`` with their bytes, or ``add_shm`` with a segment slot it filled);
after the last chunk, ``finish`` closes the stream and only that chunk's blocks are left to send.

Threads: ``add_*``, ``finish`` and ``abort`` are called from any thread (the engine's loop thread,
the prefill thread); gRPC pulls frames from ``_frames`` on its own thread, and ``_read_replies``
runs on one the session starts. Nothing here blocks the caller of ``add_*``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from kvstore.keys import BlockHash
from kvtransfer import shm, wire
from kvtransfer.errors import TransferError
from proto import strata_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    num_sent: int  # blocks streamed to the receiver
    num_skipped: int  # blocks the receiver already held (not sent)
    nbytes: int  # payload bytes streamed (inline and through shared memory)
    shm_nbytes: int  # of which through shared memory
    num_frames: int  # data frames sent
    seconds: float  # from opening the stream to its end (most of it: waiting for the prefill)
    send_seconds: float  # spent putting frames on the wire (the bandwidth's denominator)


@dataclass(frozen=True)
class _Data:
    indices: tuple[int, ...]  # positions of the blocks in the session's hash list
    payload: memoryview | None = None  # inline bytes, framed when sent
    message: bytes | None = None  # a frame built in place (``new_frame``), sent as it is
    slot: int = -1  # segment slot holding the bytes (neither payload nor message)
    gen: int = 0  # the slot's generation when written
    nbytes: int = 0


_LAST = object()
_ABORT = object()


class PushSession:
    def __init__(
        self,
        call: Callable[..., Iterator[bytes]],
        address: str,
        req_id: str,
        fingerprint: bytes,
        hashes: Sequence[BlockHash],
        block_nbytes: int,
        deadline_s: float,
        metadata: tuple[tuple[str, str], ...],
        segment: shm.SlotSegment | None = None,
        on_done: Callable[[PushSession], None] | None = None,
        with_first_token: bool = False,
    ) -> None:
        self.address = address
        self.req_id = req_id
        self.fingerprint = fingerprint
        self.hashes = list(hashes)
        self.block_nbytes = block_nbytes
        self.segment = segment
        self.on_done = on_done
        self.held: list[bool] | None = None  # the receiver's answer to the opening frame
        self.shm_ok = False
        self.result: PushResult | None = None
        self.error: TransferError | None = None
        self._t0 = time.monotonic()
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._answered = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._slots_sent: deque[tuple[int, int]] = deque()  # (shared-memory frame number, slot)
        self._shm_frames_sent = 0
        self._frames_sent = 0
        self._num_sent = self._nbytes = self._shm_nbytes = 0
        self._send_seconds = 0.0
        self._closed = False  # finish() or abort() was called
        # The stream's last frame carries the first token: it waits for set_first_token.
        self._with_first_token = with_first_token
        self._first_token: int | None = None
        self._token_known = threading.Event()
        self._deadline_s = deadline_s
        self._responses = call(self._frames(), timeout=deadline_s, metadata=metadata)
        self._reader = threading.Thread(
            target=self._read_replies, name=f"push-{req_id}", daemon=True
        )
        self._reader.start()

    # ---- the producer side (any thread) --------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.error is not None

    def wanted(self, index: int) -> bool:
        """Whether block ``index`` still has to go (False once the receiver said it holds it)."""
        held = self.held
        return held is None or not held[index]

    def try_slot(self) -> int | None:
        """A free segment slot to fill, if the receiver maps the segment and one is free."""
        if self.segment is None or not self.shm_ok or self.failed:
            return None
        return self.segment.try_acquire()

    def add_inline(self, indices: Sequence[int], payload: memoryview) -> None:
        """Blocks ``indices`` (``payload``: their bytes back to back, kept until sent)."""
        with self._lock:
            if not self._closed:
                self._q.put(_Data(tuple(indices), payload=payload))

    def new_frame(self, indices: Sequence[int]) -> tuple[bytes, memoryview]:
        """A frame for blocks ``indices`` and the view to copy their bytes into; hand the frame
        to ``add_frame`` once filled (one copy fewer than ``add_inline``)."""
        header = strata_pb2.FrameHeader(block_indices=indices, block_nbytes=self.block_nbytes)
        return wire.new_frame(header, len(indices) * self.block_nbytes)

    def add_frame(self, indices: Sequence[int], message: bytes) -> None:
        with self._lock:
            if not self._closed:
                self._q.put(_Data(tuple(indices), message=message))

    def add_shm(self, indices: Sequence[int], slot: int, gen: int, nbytes: int) -> None:
        """Blocks ``indices``, written into ``slot`` (``SlotSegment.end_write`` gave ``gen``)."""
        with self._lock:
            if not self._closed:
                self._q.put(_Data(tuple(indices), slot=slot, gen=gen, nbytes=nbytes))
                return
        self._release(slot)

    def finish(self) -> None:
        """No more blocks: close the stream once the queued ones are sent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(_LAST)

    def set_first_token(self, token: int) -> None:
        """The first token the prefill sampled: the stream's last frame carries it."""
        self._first_token = token
        self._token_known.set()

    def abort(self) -> None:
        """Stop now: the stream is cancelled (the receiver drops the transfer)."""
        self._token_known.set()
        with self._lock:
            self._closed = True
            self._q.put(_ABORT)
        self._responses.cancel()  # type: ignore[attr-defined]

    def wait_answer(self, timeout: float | None = None) -> bool:
        """Wait for the receiver's answer to the opening frame (which blocks it holds, whether
        it maps the segment); False on timeout. Producers need not wait: ``wanted`` and
        ``try_slot`` work before it (every block is wanted, no slot is offered)."""
        return self._answered.wait(timeout)

    def wait(self, timeout: float | None = None) -> PushResult:
        """Block until the stream ended; its result, or ``TransferError``."""
        if not self._done.wait(timeout):
            raise TransferError(f"push {self.req_id} to {self.address} still running", code="")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ---- gRPC's request thread -----------------------------------------------------------
    def _frames(self) -> Iterator[bytes]:
        yield wire.encode(
            strata_pb2.FrameHeader(
                req_id=self.req_id,
                fingerprint=self.fingerprint,
                block_hashes=self.hashes,
                shm_segment=self.segment.name if self.segment is not None else "",
                host_id=shm.host_id() if self.segment is not None else "",
            )
        )
        # Hold the data until the receiver said what it holds (a few ms), so none is sent twice.
        self._answered.wait(self._deadline_s)
        while True:
            item = self._q.get()
            if item is _ABORT:
                return
            if item is _LAST:
                last = strata_pb2.FrameHeader(last=True)
                if self._with_first_token:
                    self._token_known.wait(self._deadline_s)
                    if self._first_token is None:
                        return  # aborted meanwhile: end without `last`
                    last.first_token = self._first_token
                yield wire.encode(last)
                return
            assert isinstance(item, _Data)
            frame = self._encode(item)
            if frame is not None:
                t0 = time.perf_counter()
                yield frame  # gRPC asks for the next frame once this one is on the wire
                self._send_seconds += time.perf_counter() - t0

    def _encode(self, d: _Data) -> bytes | None:
        keep = [k for k, i in enumerate(d.indices) if self.wanted(i)]
        size = self.block_nbytes
        if not keep:  # the receiver holds all of them already
            if d.slot >= 0:
                self._release(d.slot)
            return None
        self._frames_sent += 1
        if d.slot >= 0:  # in the segment: sent whole (the receiver skips held blocks)
            with self._lock:
                self._shm_frames_sent += 1
                self._slots_sent.append((self._shm_frames_sent, d.slot))
            self._num_sent += len(d.indices)
            self._nbytes += d.nbytes
            self._shm_nbytes += d.nbytes
            header = strata_pb2.FrameHeader(
                block_indices=d.indices,
                block_nbytes=size,
                shm_offset=self.segment.offset(d.slot) if self.segment is not None else 0,
                shm_nbytes=d.nbytes,
                shm_gen=d.gen,
            )
            return wire.encode(header)
        if d.message is not None:  # built in place: sent whole
            self._num_sent += len(d.indices)
            self._nbytes += len(d.indices) * size
            return d.message
        assert d.payload is not None
        self._num_sent += len(keep)
        self._nbytes += len(keep) * size
        header = strata_pb2.FrameHeader(
            block_indices=[d.indices[k] for k in keep], block_nbytes=size
        )
        if len(keep) == len(d.indices):
            return wire.encode(header, d.payload)
        parts = [d.payload[k * size : (k + 1) * size] for k in keep]
        return wire.encode(header, b"".join(parts))

    # ---- the replies ---------------------------------------------------------------------
    def _read_replies(self) -> None:
        final: strata_pb2.PushReply | None = None
        try:
            for raw in self._responses:
                reply = strata_pb2.PushReply.FromString(raw)
                if self.held is None:
                    if len(reply.held) != len(self.hashes):
                        raise TransferError(
                            f"push {self.req_id}: receiver answered {len(reply.held)} flags "
                            f"for {len(self.hashes)} blocks",
                            code="INTERNAL",
                        )
                    self.held = list(reply.held)
                    self.shm_ok = reply.shm_ok and self.segment is not None
                    self._answered.set()
                    continue
                self._ack(reply.frames_done)
                final = reply
        except grpc.RpcError as e:
            self.error = _transfer_error(f"push {self.req_id}", self.address, e)
        except TransferError as e:
            self.error = e
            self._responses.cancel()  # type: ignore[attr-defined]
        finally:
            self._answered.set()
            with self._lock:
                self._closed = True
            self._finish(final)

    def _finish(self, final: strata_pb2.PushReply | None) -> None:
        if self.error is None and (final is None or final.num_blocks < self._num_sent):
            self.error = TransferError(
                f"push {self.req_id} to {self.address} ended before its last frame",
                code="DATA_LOSS",
            )
        while True:  # whatever is still queued never went out: free its slots
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Data) and item.slot >= 0:
                self._release(item.slot)
        self._q.put(_ABORT)  # wake gRPC's request thread if it still waits for frames
        self._token_known.set()
        with self._lock:
            slots = [slot for _, slot in self._slots_sent]
            self._slots_sent.clear()
        for slot in slots:  # a receiver still reading one fails its generation check
            self._release(slot)
        held = sum(self.held) if self.held else 0
        self.result = PushResult(
            num_sent=self._num_sent,
            num_skipped=held,
            nbytes=self._nbytes,
            shm_nbytes=self._shm_nbytes,
            num_frames=self._frames_sent,
            seconds=time.monotonic() - self._t0,
            send_seconds=self._send_seconds,
        )
        self._done.set()
        if self.on_done is not None:
            self.on_done(self)

    def _ack(self, frames_done: int) -> None:
        freed = []
        with self._lock:
            while self._slots_sent and self._slots_sent[0][0] <= frames_done:
                freed.append(self._slots_sent.popleft()[1])
        for slot in freed:
            self._release(slot)

    def _release(self, slot: int) -> None:
        if self.segment is not None:
            self.segment.release(slot)


def _transfer_error(what: str, address: str, e: grpc.RpcError) -> TransferError:
    code = e.code() if isinstance(e, grpc.Call) else None
    name = code.name if code is not None else ""
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return TransferError(f"{what} to {address} failed: {name} {details}", code=name)
