"""The sending end of worker-to-worker KV transfer (gRPC client of ``KVTransfer``).

``push`` first asks the receiver which blocks it already holds (``QueryBlocks``), then streams
only the missing ones, each split into chunks of ``chunk_bytes``. Payloads are block-major
contiguous buffers (see kvstore/layout.py); they are produced lazily when a callable is given, so
a push of many blocks never holds more than a chunk or two in flight beyond the caller's own
buffers. Channels are cached per address; every call carries a deadline. Failures raise
``TransferError`` with the gRPC status name in ``.code``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from kvstore.errors import TransferError
from kvstore.keys import BlockHash
from proto import kv_wire, strata_pb2, strata_pb2_grpc

logger = logging.getLogger(__name__)

Payload = kv_wire.Payload
PayloadSource = Sequence[Payload] | Callable[[int], Payload]


@dataclass(frozen=True)
class PushResult:
    num_sent: int  # blocks streamed to the receiver
    num_skipped: int  # blocks the receiver already held (not sent)
    nbytes: int  # payload bytes streamed
    seconds: float  # wall time of the query plus the push


class _StopPush(Exception):
    """Raised inside the chunk generator to stop a push early (cancel or a payload error)."""


class KVSender:
    """Pushes and pulls KV blocks to and from ``KVTransfer`` servers. Thread-safe."""

    def __init__(
        self,
        secret: str | None = None,
        chunk_bytes: int = kv_wire.DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = kv_wire.MAX_MESSAGE_BYTES,
        pack_bytes: int = kv_wire.PACK_BYTES,
    ) -> None:
        kv_wire.check_chunk_bytes(chunk_bytes, max_message_bytes)
        if pack_bytes < 0:
            raise ValueError(
                f"pack_bytes must be >= 0 (0: one block per message), got {pack_bytes}"
            )
        self.chunk_bytes = chunk_bytes
        self.pack_bytes = pack_bytes  # whole blocks share a message up to this many bytes
        self.max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str], ...] = (
            ((kv_wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        )
        self._lock = threading.Lock()
        self._stubs: dict[str, strata_pb2_grpc.KVTransferStub] = {}
        self._channels: dict[str, grpc.Channel] = {}

    def _stub(self, address: str) -> strata_pb2_grpc.KVTransferStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(
                    address, options=kv_wire.channel_options(self.max_message_bytes)
                )
                self._channels[address] = channel
                stub = self._stubs[address] = strata_pb2_grpc.KVTransferStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            channel.close()

    def query(
        self, address: str, fingerprint: bytes, hashes: Sequence[BlockHash], deadline_s: float
    ) -> list[bool]:
        """Which of ``hashes`` the receiver at ``address`` holds."""
        req = strata_pb2.QueryBlocksRequest(fingerprint=fingerprint, block_hashes=list(hashes))
        try:
            resp = self._stub(address).QueryBlocks(req, timeout=deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _transfer_error("QueryBlocks", address, e) from e
        assert len(resp.held) == len(hashes), "receiver answered QueryBlocks with a wrong count"
        return list(resp.held)

    def push(
        self,
        address: str,
        req_id: str,
        fingerprint: bytes,
        hashes: Sequence[BlockHash],
        payloads: PayloadSource,
        deadline_s: float,
        skip_held: bool = True,
        cancel: threading.Event | None = None,
    ) -> PushResult:
        """Send the blocks of ``req_id`` that the receiver lacks; ``payloads[i]`` (or
        ``payloads(i)``) is the block-major buffer of ``hashes[i]``. Setting ``cancel`` stops
        the stream; the receiver then drops the transfer and this raises ``TransferError``
        with code "CANCELLED"."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        if not callable(payloads) and len(payloads) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(payloads)} payloads")
        t0 = time.monotonic()
        end = t0 + deadline_s
        held = self.query(address, fingerprint, hashes, deadline_s) if skip_held else []
        todo = [i for i in range(len(hashes)) if not (held and held[i])]
        state = {"nbytes": 0}
        failure: list[Exception] = []

        def blocks() -> Iterator[tuple[bytes, int, Payload]]:
            for i in todo:
                payload = payloads(i) if callable(payloads) else payloads[i]
                if cancel is not None and cancel.is_set():
                    raise _StopPush("cancelled")
                state["nbytes"] += memoryview(payload).nbytes
                yield hashes[i], i, payload

        def chunks() -> Iterator[strata_pb2.BlockChunk]:
            try:
                yield from kv_wire.block_messages(
                    req_id, fingerprint, blocks(), self.chunk_bytes, self.pack_bytes
                )
            except Exception as e:  # ends the stream without `last`: the receiver drops it
                failure.append(e)
                return
            yield strata_pb2.BlockChunk(req_id=req_id, fingerprint=fingerprint, last=True)

        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TransferError(
                f"push {req_id} to {address}: deadline spent on QueryBlocks",
                code="DEADLINE_EXCEEDED",
            )
        try:
            self._stub(address).PushBlocks(chunks(), timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as e:
            if not failure:
                raise _transfer_error(f"PushBlocks {req_id}", address, e) from e
        if failure:
            err = failure[0]
            if isinstance(err, _StopPush):
                raise TransferError(f"push {req_id} to {address} cancelled", code="CANCELLED")
            raise err
        result = PushResult(
            num_sent=len(todo),
            num_skipped=len(hashes) - len(todo),
            nbytes=state["nbytes"],
            seconds=time.monotonic() - t0,
        )
        logger.debug("push %s to %s: %s", req_id, address, result)
        return result

    def pull(
        self,
        address: str,
        fingerprint: bytes,
        hashes: Sequence[BlockHash],
        deadline_s: float,
        req_id: str = "",
    ) -> list[bytes | None]:
        """Fetch blocks from the worker at ``address``; ``None`` where it does not hold one."""
        req = strata_pb2.PullBlocksRequest(
            fingerprint=fingerprint,
            block_hashes=list(hashes),
            req_id=req_id,
            chunk_bytes=self.chunk_bytes,
        )
        out: list[bytes | None] = [None] * len(hashes)
        parts: list[bytes] = []
        filled = 0  # bytes of the block being reassembled
        got_last = False
        stream = self._stub(address).PullBlocks(req, timeout=deadline_s, metadata=self._metadata)
        try:
            for message in stream:
                if message.last:
                    got_last = True
                    break
                try:
                    chunks = kv_wire.unpacked(message)
                except ValueError as e:
                    raise TransferError(f"pull from {address}: {e}") from None
                for chunk in chunks:
                    i = chunk.block_index
                    if i >= len(hashes) or chunk.block_hash != hashes[i]:
                        raise TransferError(f"pull from {address}: unexpected block index {i}")
                    if chunk.offset != filled:
                        raise TransferError(
                            f"pull from {address}: chunks of block {i} out of order"
                        )
                    parts.append(chunk.data)
                    filled += len(chunk.data)
                    if filled == chunk.total_nbytes:
                        out[i] = parts[0] if len(parts) == 1 else b"".join(parts)
                        parts, filled = [], 0
        except grpc.RpcError as e:
            raise _transfer_error("PullBlocks", address, e) from e
        finally:
            stream.cancel()  # no-op once the stream completed
        if not got_last or parts:
            raise TransferError(f"pull from {address}: stream ended early", code="DATA_LOSS")
        return out


def _transfer_error(what: str, address: str, e: grpc.RpcError) -> TransferError:
    code = e.code() if isinstance(e, grpc.Call) else None
    name = code.name if code is not None else ""
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return TransferError(f"{what} to {address} failed: {name} {details}", code=name)
