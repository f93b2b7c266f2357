"""``KVSender``: the client side of worker-to-worker KV transfer.

``open_push`` starts one request's ``PushSession`` (see session.py); ``pull`` fetches the held
leading blocks of a list from another worker; ``query`` asks which blocks a worker holds.
Channels are cached per address (``num_channels`` each: sessions take them in turn); every call
carries the cluster secret and a deadline. Failures raise ``TransferError`` with the gRPC status
name in ``.code``. With ``shm_bytes`` > 0 the sender owns a shared-memory segment that receivers
on the same host map, so their block bytes skip the socket.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence

import grpc

from kvstore.keys import BlockHash
from kvtransfer import shm, wire
from kvtransfer.errors import TransferError
from kvtransfer.session import PushSession, _transfer_error
from proto import strata_pb2, strata_pb2_grpc

logger = logging.getLogger(__name__)


class KVSender:
    """Thread-safe; one per worker."""

    def __init__(
        self,
        secret: str | None = None,
        owner: str = "sender",
        block_nbytes: int = 0,
        frame_bytes: int = wire.DEFAULT_FRAME_BYTES,
        shm_bytes: int = 0,
        num_channels: int = 1,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
    ) -> None:
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if shm_bytes < 0:
            raise ValueError(f"shm_bytes must be >= 0 (0: no shared memory), got {shm_bytes}")
        self.block_nbytes = block_nbytes
        self.frame_blocks = wire.blocks_per_frame(block_nbytes, frame_bytes) if block_nbytes else 1
        self.num_channels = num_channels
        self.max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str], ...] = (
            ((wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        )
        self._lock = threading.Lock()
        self._channels: dict[str, list[grpc.Channel]] = {}
        self._turn = itertools.count()
        self.segment: shm.SlotSegment | None = None
        shm_bytes = min(shm_bytes, shm.free_bytes() // 2)
        slot = self.frame_blocks * block_nbytes
        if block_nbytes and shm_bytes >= slot:
            try:
                self.segment = shm.SlotSegment(owner, slot, shm_bytes // slot)
            except OSError as e:
                logger.warning("no shared-memory segment (%s): block bytes go over gRPC", e)

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            chans = self._channels.get(address)
            if chans is None:
                opts = wire.channel_options(self.max_message_bytes)
                chans = [
                    grpc.insecure_channel(
                        address, options=[*opts, ("grpc.channel_id", i)]
                    )  # distinct options: one TCP connection each
                    for i in range(self.num_channels)
                ]
                self._channels[address] = chans
            return chans[next(self._turn) % len(chans)]

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for chans in channels.values():
            for channel in chans:
                channel.close()
        if self.segment is not None:
            self.segment.close()

    def query(
        self, address: str, fingerprint: bytes, hashes: Sequence[BlockHash], deadline_s: float
    ) -> list[bool]:
        """Which of ``hashes`` the worker at ``address`` holds."""
        stub = strata_pb2_grpc.KVTransferStub(self._channel(address))
        req = strata_pb2.QueryBlocksRequest(fingerprint=fingerprint, block_hashes=list(hashes))
        try:
            resp = stub.QueryBlocks(req, timeout=deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _transfer_error("QueryBlocks", address, e) from e
        if len(resp.held) != len(hashes):
            raise TransferError(f"QueryBlocks to {address}: wrong count", code="INTERNAL")
        return list(resp.held)

    def open_push(
        self,
        address: str,
        req_id: str,
        fingerprint: bytes,
        hashes: Sequence[BlockHash],
        deadline_s: float,
        use_shm: bool = True,
        on_done: Callable[[PushSession], None] | None = None,
        with_first_token: bool = False,
    ) -> PushSession:
        """Open ``req_id``'s push stream now; blocks are added to it as they are computed."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        if not self.block_nbytes:
            raise ValueError("a sender that pushes needs block_nbytes")
        call = self._channel(address).stream_stream(wire.PUSH_METHOD)
        return PushSession(
            call,
            address,
            req_id,
            fingerprint,
            hashes,
            self.block_nbytes,
            deadline_s,
            self._metadata,
            segment=self.segment if use_shm else None,
            on_done=on_done,
            with_first_token=with_first_token,
        )

    def pull(
        self,
        address: str,
        fingerprint: bytes,
        hashes: Sequence[BlockHash],
        deadline_s: float,
        req_id: str = "",
    ) -> tuple[int, bytes]:
        """The leading blocks of ``hashes`` that the worker at ``address`` holds: how many, and
        their bytes back to back."""
        req = strata_pb2.PullRequest(
            fingerprint=fingerprint, block_hashes=list(hashes), req_id=req_id
        ).SerializeToString()
        call = self._channel(address).unary_stream(wire.PULL_METHOD)
        parts: list[memoryview] = []
        num = 0
        got_last = False
        stream = call(req, timeout=deadline_s, metadata=self._metadata)
        try:
            for message in stream:
                try:
                    frame = wire.decode(message)
                    blocks = frame.blocks()
                except wire.FrameError as e:
                    raise TransferError(f"pull from {address}: {e}", code="DATA_LOSS") from None
                if frame.header.last:
                    got_last = True
                    break
                if list(frame.header.block_indices) != list(range(num, num + len(blocks))):
                    raise TransferError(f"pull from {address}: blocks out of order")
                parts.append(frame.payload)
                num += len(blocks)
        except grpc.RpcError as e:
            raise _transfer_error("Pull", address, e) from e
        finally:
            stream.cancel()  # no-op once the stream completed
        if not got_last:
            raise TransferError(f"pull from {address}: stream ended early", code="DATA_LOSS")
        return num, b"".join(parts)
