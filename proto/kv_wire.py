"""Conventions of the KVTransfer wire protocol shared by its two ends.

The sender (prefill_worker/kv_sender.py) and the receiver (decode_worker/kv_receiver.py) never
import each other; what both must agree on lives here: the secret's metadata key, chunk and
message sizes, and how one block becomes a run of ``BlockChunk`` messages.

A push stream is: for each block, chunks with increasing ``offset`` covering ``[0,
total_nbytes)``; then the final chunk of the stream has ``last`` set (it may carry the last
piece of the last block, or be an empty closing chunk with no ``block_hash``). A stream that ends
without ``last`` was cut off and is discarded by the receiver. Consecutive whole blocks smaller
than a chunk travel together: the first one's message carries the next ones in ``more``
(``pack_chunks``; ``unpacked`` restores the flat order on the receiving side).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from proto import strata_pb2

SECRET_METADATA_KEY = "x-strata-secret"
DEFAULT_CHUNK_BYTES = 4 << 20
# Whole blocks are packed into one message up to this many bytes: enough to spread the per-
# message cost (~0.2 ms in Python) over many small blocks; larger messages gained nothing.
PACK_BYTES = 1 << 20
# Only blocks up to this size are packed: for larger ones the message cost is already small
# against their bytes (`strata bench transfer`: packing doubled 32 KiB blocks, made 128 KiB ones
# a little slower).
PACK_MAX_BLOCK_BYTES = 64 << 10
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


def pack_chunks(
    chunks: Iterable[strata_pb2.BlockChunk],
    max_bytes: int,
    max_block_bytes: int = PACK_MAX_BLOCK_BYTES,
) -> Iterator[strata_pb2.BlockChunk]:
    """Pack runs of small whole blocks into messages of at most ``max_bytes`` of data, keeping
    the order; larger or split blocks and the closing chunk pass through alone.

    ``chunks`` come from ``block_chunks`` with a chunk size of at least ``max_bytes``, so a block
    of at most ``max_bytes`` is one chunk: sizes are read from ``total_nbytes``, never from the
    data (reading ``data`` copies it)."""
    limit = min(max_bytes, max_block_bytes)
    head: strata_pb2.BlockChunk | None = None
    size = 0
    for chunk in chunks:
        n = chunk.total_nbytes
        small = bool(chunk.block_hash) and chunk.offset == 0 and n <= limit and not chunk.last
        if head is not None and small and size + n <= max_bytes:
            head.more.append(chunk)
            size += n
            continue
        if head is not None:
            yield head
            head = None
        if small:
            head, size = chunk, n
        else:
            yield chunk
    if head is not None:
        yield head


def unpacked(chunk: strata_pb2.BlockChunk) -> list[strata_pb2.BlockChunk]:
    """``chunk`` followed by the blocks packed into it; ValueError on a malformed pack (a
    packed block shorter than its ``total_nbytes`` is caught by the reassembly after)."""
    if not chunk.more:
        return [chunk]
    for m in chunk.more:
        if m.more or m.last or not m.block_hash or m.offset:
            raise ValueError("a packed chunk must start a block, without more or last")
    return [chunk, *chunk.more]


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
