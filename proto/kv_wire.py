"""Conventions of the KVTransfer wire protocol shared by its two ends.

The sender (prefill_worker/kv_sender.py) and the receiver (decode_worker/kv_receiver.py) never
import each other; what both must agree on lives here: the secret's metadata key, chunk and
message sizes, and how one block becomes a run of ``BlockChunk`` messages.

A push stream is: for each block, chunks with increasing ``offset`` covering ``[0,
total_nbytes)``; then the final chunk of the stream has ``last`` set (it may carry the last
piece of the last block, or be an empty closing chunk with no ``block_hash``). A stream that ends
without ``last`` was cut off and is discarded by the receiver.
"""

from __future__ import annotations

from collections.abc import Iterator

from proto import strata_pb2

SECRET_METADATA_KEY = "x-strata-secret"
DEFAULT_CHUNK_BYTES = 4 << 20
# Largest gRPC message either end accepts; a chunk plus its header must fit.
MAX_MESSAGE_BYTES = 64 << 20
# Largest block a receiver reassembles (guards memory against a malformed total_nbytes).
MAX_BLOCK_BYTES = 1 << 30


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the message limits on both ends."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def check_chunk_bytes(chunk_bytes: int, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
    if not 0 < chunk_bytes <= max_message_bytes - (1 << 16):
        raise ValueError(
            f"chunk_bytes={chunk_bytes} must be in (0, {max_message_bytes - (1 << 16)}] "
            "(the message limit minus 64 KiB of header room)"
        )


def block_chunks(
    req_id: str,
    fingerprint: bytes,
    block_hash: bytes,
    block_index: int,
    payload: bytes | bytearray | memoryview,
    chunk_bytes: int,
) -> Iterator[strata_pb2.BlockChunk]:
    """Split one block into chunks of at most ``chunk_bytes`` (``last`` is left unset)."""
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else None
    total = len(payload) if view is None else view.nbytes
    if total == 0:
        raise ValueError(f"block {block_index} ({block_hash.hex()}) has an empty payload")
    for offset in range(0, total, chunk_bytes):
        if view is None:
            assert isinstance(payload, bytes)
            data = payload if total <= chunk_bytes else payload[offset : offset + chunk_bytes]
        else:
            data = bytes(view[offset : offset + chunk_bytes])
        yield strata_pb2.BlockChunk(
            req_id=req_id,
            fingerprint=fingerprint,
            block_hash=block_hash,
            block_index=block_index,
            offset=offset,
            total_nbytes=total,
            data=data,
        )
