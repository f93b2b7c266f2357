"""Conventions of the KVTransfer wire protocol shared by its two ends.

The sender (prefill_worker/kv_sender.py) and the receiver (decode_worker/kv_receiver.py) never
import each other; what both must agree on lives here: the secret's metadata key, chunk and
message sizes, and how one block becomes a run of ``BlockChunk`` messages.

A push stream is: for each block, chunks with increasing ``offset`` covering ``[0,
total_nbytes)``; then the final chunk of the stream has ``last`` set (it may carry the last
piece of the last block, or be an empty closing chunk with no ``block_hash``). A stream that ends
without ``last`` was cut off and is discarded by the receiver. Consecutive small blocks travel
together: the first one's message carries the next ones in ``more`` (``block_messages``;
``unpacked`` restores the flat order on the receiving side).
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


Payload = bytes | bytearray | memoryview


def block_messages(
    req_id: str,
    fingerprint: bytes,
    blocks: Iterable[tuple[bytes, int, Payload]],
    chunk_bytes: int,
    pack_bytes: int = PACK_BYTES,
) -> Iterator[strata_pb2.BlockChunk]:
    """The messages of a run of ``(block_hash, block_index, payload)`` blocks, in order: a block
    of at most ``PACK_MAX_BLOCK_BYTES`` joins the message before it while that stays within
    ``pack_bytes`` of data (``pack_bytes=0``: one message per block); a larger one is split into
    ``block_chunks``. The closing ``last`` chunk is the caller's."""
    limit = min(pack_bytes, chunk_bytes)
    head: strata_pb2.BlockChunk | None = None
    size = 0
    for block_hash, block_index, payload in blocks:
        n = len(payload) if isinstance(payload, bytes) else memoryview(payload).nbytes
        if 0 < n <= min(limit, PACK_MAX_BLOCK_BYTES):
            data = payload if isinstance(payload, bytes) else bytes(memoryview(payload).cast("B"))
            if head is not None and size + n <= limit:
                head.more.add(
                    block_hash=block_hash, block_index=block_index, total_nbytes=n, data=data
                )
                size += n
                continue
            if head is not None:
                yield head
            head = strata_pb2.BlockChunk(
                req_id=req_id,
                fingerprint=fingerprint,
                block_hash=block_hash,
                block_index=block_index,
                total_nbytes=n,
                data=data,
            )
            size = n
            continue
        if head is not None:
            yield head
            head = None
        yield from block_chunks(req_id, fingerprint, block_hash, block_index, payload, chunk_bytes)
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
    payload: Payload,
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
