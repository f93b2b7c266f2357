"""The receiving end: ``KVTransfer.QueryBlocks`` and the ``KVStream`` Push / Pull methods.

The server knows nothing of tensors or tiers: it talks to a ``BlockSink`` (the worker's engine
adapter). Contract with the sink (called from gRPC server threads, concurrently):
- ``write_blocks`` returns a future and may finish later (the engine writes between its steps);
  the bytes it is given stay valid until that future completes. At most ``max_pending_frames``
  writes of one stream are outstanding: beyond that the receiver stops reading, and gRPC's flow
  control slows the sender down.
- every push stream whose opening frame arrived ends in exactly one ``transfer_done(req_id,
  ok)``, after its last write finished; ``ok`` is False when the stream broke (cancel, deadline,
  protocol error, a sink failure). Whole blocks written before the break are valid (hash-keyed).
- ``cancel_transfer(req_id)`` (the receiving worker gave up waiting) ends that push stream with
  CANCELLED on both sides.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Protocol

import grpc
import numpy as np

from kvstore.keys import BlockHash
from kvtransfer import shm, wire
from proto import strata_pb2, strata_pb2_grpc

logger = logging.getLogger(__name__)

PULL_READ_BATCH = 64  # blocks read from the sink at a time when serving a pull


class BlockSink(Protocol):
    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]: ...

    def write_blocks(
        self, req_id: str, hashes: list[BlockHash], data: memoryview, block_nbytes: int
    ) -> Future[int]: ...

    def read_blocks(self, hashes: Sequence[BlockHash]) -> tuple[int, memoryview]:
        """The leading ``n`` blocks held, as ``n * block_nbytes`` contiguous bytes."""
        ...

    def transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        """The push of ``req_id`` ended; ``first_token``: what its last frame carried."""
        ...


class _Refused(Exception):
    """The peer broke the protocol or failed a check: (status code, reason)."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class KVReceiver:
    """The three methods over a ``BlockSink``; refuses other fingerprints and wrong secrets."""

    def __init__(
        self,
        sink: BlockSink,
        fingerprint: bytes,
        secret: str | None = None,
        max_pending_frames: int = 8,
    ) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be the model fingerprint (non-empty bytes)")
        if max_pending_frames < 1:
            raise ValueError("max_pending_frames must be >= 1")
        self.sink = sink
        self.fingerprint = fingerprint
        self.secret = secret
        self.max_pending_frames = max_pending_frames
        self.host_id = shm.host_id()
        self.segments = shm.SegmentMap()
        self._lock = threading.Lock()
        self._contexts: dict[str, grpc.ServicerContext] = {}  # live push streams by req_id
        self.num_torn = 0  # shared-memory frames dropped because their slot was reused

    # ---- checks --------------------------------------------------------------------------
    def check_secret(self, context: grpc.ServicerContext) -> None:
        if self.secret is None:
            return
        given = dict(context.invocation_metadata()).get(wire.SECRET_METADATA_KEY, "")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), self.secret.encode()
        ):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-strata-secret")

    def _fingerprint_error(self, fingerprint: bytes) -> str | None:
        if fingerprint == self.fingerprint:
            return None
        return (
            f"model fingerprint {fingerprint.hex()} does not match this worker's "
            f"{self.fingerprint.hex()} (different weights, dtype, block_size or layout)"
        )

    # ---- QueryBlocks ---------------------------------------------------------------------
    def query_blocks(
        self, request: strata_pb2.QueryBlocksRequest, context: grpc.ServicerContext
    ) -> strata_pb2.QueryBlocksResponse:
        self.check_secret(context)
        err = self._fingerprint_error(request.fingerprint)
        if err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, err)
        held = self.sink.has_blocks([BlockHash(h) for h in request.block_hashes])
        assert len(held) == len(request.block_hashes), "sink.has_blocks returned a wrong count"
        leading = next((i for i, h in enumerate(held) if not h), len(held))
        return strata_pb2.QueryBlocksResponse(held=held, num_leading_held=leading)

    @property
    def num_open_pushes(self) -> int:
        """Push streams open now (their opening frame arrived, their end not yet)."""
        with self._lock:
            return len(self._contexts)

    def cancel_transfer(self, req_id: str) -> bool:
        """End ``req_id``'s push stream now (both sides see CANCELLED); False if none runs."""
        with self._lock:
            context = self._contexts.get(req_id)
        if context is None:
            return False
        context.cancel()
        return True

    # ---- Push ----------------------------------------------------------------------------
    def push(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        self.check_secret(context)
        events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        slots = threading.Semaphore(self.max_pending_frames)
        stop = threading.Event()

        def read() -> None:  # the frames, into the event queue (bounded by `slots`)
            try:
                for message in request_iterator:
                    events.put(("frame", message))
                    while not slots.acquire(timeout=0.5):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                events.put(("end", None))
            except Exception as e:  # the sender cancelled or the deadline passed
                events.put(("broken", e))

        threading.Thread(target=read, name="kv-push-reader", daemon=True).start()
        state = _PushState(events)
        try:
            yield from self._serve_push(events, slots, state, context)
        except _Refused as e:
            logger.warning("push %s from %s refused: %s", state.req_id, context.peer(), e)
            context.abort(e.code, str(e))
        finally:
            stop.set()
            self._finish_push(state, context)

    def _serve_push(
        self,
        events: queue.SimpleQueue[tuple[str, object]],
        slots: threading.Semaphore,
        state: _PushState,
        context: grpc.ServicerContext,
    ) -> Iterator[bytes]:
        while not (state.closing and state.outstanding == 0):
            kind, item = events.get()
            if kind == "written":  # a sink write finished: its read slot is free again
                slots.release()
                state.outstanding -= 1
            elif kind == "frame":
                assert isinstance(item, bytes)
                reply = self._on_frame(item, state, context)
                if not state.writing:
                    slots.release()  # the frame started no write
                if reply is not None:
                    yield reply
            elif kind == "broken":
                logger.info(
                    "push %s from %s broke off after %d blocks",
                    state.req_id,
                    context.peer(),
                    state.num_blocks,
                )
                return
            elif not state.closing:  # "end" without a `last` frame
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "stream ended without a frame marked last (cut off)",
                )
            if state.error is not None:
                raise _Refused(grpc.StatusCode.INTERNAL, state.error)
        state.ok = True
        yield strata_pb2.PushReply(
            frames_done=state.frames_done, num_blocks=state.num_blocks, nbytes=state.nbytes
        ).SerializeToString()

    def _on_frame(
        self, message: bytes, state: _PushState, context: grpc.ServicerContext
    ) -> bytes | None:
        """Handle one frame; returns the reply to send, if any. Sets ``state.writing`` when the
        frame started a sink write (whose completion posts a "written" event)."""
        state.writing = False
        try:
            frame = wire.decode(message)
        except wire.FrameError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        h = frame.header
        if state.req_id is None:
            return self._open(h, state, context)
        if h.req_id and h.req_id != state.req_id:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"req_id changed: {state.req_id!r} -> {h.req_id!r}",
            )
        if h.last:
            state.closing = True
            if h.HasField("first_token"):
                state.first_token = h.first_token
            return None
        if not h.block_indices:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "a data frame carries no blocks")
        hashes = []
        for i in h.block_indices:
            if i >= len(state.hashes):
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"block index {i} outside the {len(state.hashes)} announced blocks",
                )
            hashes.append(state.hashes[i])
        data = self._frame_data(frame, state)
        reply = None
        if h.shm_nbytes:  # its bytes are copied out of the sender's segment (or dropped)
            state.frames_done += 1
            reply = strata_pb2.PushReply(frames_done=state.frames_done).SerializeToString()
        if data is None:  # a torn shared-memory read: these blocks are recomputed, not written
            return reply
        events = state.events
        fut = self.sink.write_blocks(state.req_id, hashes, data, h.block_nbytes)
        state.writing = True
        state.outstanding += 1
        state.pending.append(fut)
        state.num_blocks += len(hashes)
        state.nbytes += len(hashes) * h.block_nbytes

        lent = state.lent.pop(id(data), None)  # a reusable buffer, back once written

        def written(f: Future[int]) -> None:
            if f.exception() is not None:
                state.error = f"receiver could not store blocks: {f.exception()}"
            if lent is not None:
                state.spare.put(lent)
            events.put(("written", None))

        fut.add_done_callback(written)
        return reply

    def _frame_data(self, frame: wire.Frame, state: _PushState) -> memoryview | None:
        h = frame.header
        n, size = len(h.block_indices), h.block_nbytes
        if not 0 < size <= wire.MAX_BLOCK_BYTES:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"block_nbytes={size} outside (0, {wire.MAX_BLOCK_BYTES}]",
            )
        if not h.shm_nbytes:
            if len(frame.payload) != n * size:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"payload of {len(frame.payload)} bytes does not hold {n} blocks of {size}",
                )
            return frame.payload
        if not state.shm_ok or h.shm_nbytes != n * size or frame.payload:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "a shared-memory frame this stream cannot carry"
            )
        out = state.buffer(n * size)
        try:
            self.segments.read_into(state.segment, h.shm_offset, h.shm_gen, out.data)
        except ValueError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except shm.TornReadError as e:
            self.num_torn += 1
            logger.warning("push %s: %s; dropping %d blocks", state.req_id, e, n)
            state.spare.put(out if out.base is None else out.base)
            return None
        view = out.data
        state.lent[id(view)] = out if out.base is None else out.base
        return view

    def _open(
        self, h: strata_pb2.FrameHeader, state: _PushState, context: grpc.ServicerContext
    ) -> bytes:
        if not h.req_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the opening frame names no req_id")
        state.req_id = h.req_id
        err = self._fingerprint_error(h.fingerprint)
        if err:
            self.sink.transfer_done(h.req_id, False)
            state.reported = True
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, err)
        with self._lock:
            old = self._contexts.get(h.req_id)
            self._contexts[h.req_id] = context
        if old is not None:  # a retried push of the same request replaces the stale one
            old.cancel()
        state.registered = True
        state.hashes = [BlockHash(x) for x in h.block_hashes]
        held = self.sink.has_blocks(state.hashes) if state.hashes else []
        if h.shm_segment and h.host_id == self.host_id:
            state.shm_ok = self.segments.open(h.shm_segment)
            state.segment = h.shm_segment
        if h.last:
            state.closing = True
        return strata_pb2.PushReply(held=held, shm_ok=state.shm_ok).SerializeToString()

    def _finish_push(self, state: _PushState, context: grpc.ServicerContext) -> None:
        for fut in state.pending:  # the sink's writes end before the stream is reported done
            try:
                fut.result(timeout=60)
            except Exception:  # reported through state.error already
                state.ok = False
        if state.req_id is None or state.reported:
            return
        if state.registered:
            with self._lock:
                if self._contexts.get(state.req_id) is context:
                    del self._contexts[state.req_id]
        ok = state.ok and state.error is None
        self.sink.transfer_done(state.req_id, ok, state.first_token if ok else None)

    # ---- Pull ----------------------------------------------------------------------------
    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.check_secret(context)
        req = strata_pb2.PullRequest()
        try:
            req.ParseFromString(request)
        except Exception as e:  # DecodeError of the protobuf runtime
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable PullRequest: {e}")
        err = self._fingerprint_error(req.fingerprint)
        if err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, err)
        hashes = [BlockHash(h) for h in req.block_hashes]
        for start in range(0, len(hashes), PULL_READ_BATCH):
            batch = hashes[start : start + PULL_READ_BATCH]
            n, data = self.sink.read_blocks(batch)
            if n == 0:
                break  # a pull serves the leading run of held blocks
            header = strata_pb2.FrameHeader(
                req_id=req.req_id,
                block_indices=range(start, start + n),
                block_nbytes=len(data) // n,
            )
            yield wire.encode(header, data)
            if n < len(batch):
                break
        yield wire.encode(strata_pb2.FrameHeader(req_id=req.req_id, last=True))


class _PushState:
    """One push stream's bookkeeping (its servicer thread and the sink's write callbacks)."""

    def buffer(self, nbytes: int) -> np.ndarray:
        """A spare buffer of at least ``nbytes`` (its first ``nbytes``), or a new one."""
        try:
            buf = self.spare.get_nowait()
        except queue.Empty:
            return np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes] if buf.size >= nbytes else np.empty(nbytes, dtype=np.uint8)

    def __init__(self, events: queue.SimpleQueue[tuple[str, object]]) -> None:
        self.events = events  # the stream's event queue ("frame", "written", "end", "broken")
        self.req_id: str | None = None
        self.hashes: list[BlockHash] = []
        self.shm_ok = False
        self.segment = ""
        self.registered = False  # in KVReceiver._contexts
        self.reported = False  # transfer_done already called
        self.closing = False  # the `last` frame arrived
        self.writing = False  # the frame just handled started a sink write
        self.outstanding = 0  # sink writes not finished yet
        self.frames_done = 0  # shared-memory frames whose bytes were taken (acknowledged)
        self.pending: list[Future[int]] = []
        self.first_token: int | None = None  # what the last frame carried
        # Buffers for bytes copied out of shared memory: reused once their write finished, so
        # a stream allocates (and page-faults) at most max_pending_frames + 1 of them.
        self.spare: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.lent: dict[int, np.ndarray] = {}
        self.num_blocks = 0
        self.nbytes = 0
        self.ok = False
        self.error: str | None = None


def add_to_server(receiver: KVReceiver, server: grpc.Server) -> None:
    """Register ``KVTransfer`` and the raw ``KVStream`` methods on ``server`` (before start)."""

    class _Query(strata_pb2_grpc.KVTransferServicer):
        def QueryBlocks(  # gRPC method name
            self, request: strata_pb2.QueryBlocksRequest, context: grpc.ServicerContext
        ) -> strata_pb2.QueryBlocksResponse:
            return receiver.query_blocks(request, context)

    strata_pb2_grpc.add_KVTransferServicer_to_server(_Query(), server)
    handlers: dict[str, grpc.RpcMethodHandler] = {
        "Push": grpc.stream_stream_rpc_method_handler(receiver.push),
        "Pull": grpc.unary_stream_rpc_method_handler(receiver.pull),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.STREAM_SERVICE, handlers),)
    )


def serve(
    receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0, max_workers: int = 16
) -> tuple[grpc.Server, int]:
    """A server with only the KV methods (tests and benchmarks; workers add theirs to their own
    server). Returns it and the bound port (``port=0`` picks one)."""
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-receiver"),
        options=wire.channel_options(),
    )
    add_to_server(receiver, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the KV transfer server to {host}:{port}")
    server.start()
    return server, bound
