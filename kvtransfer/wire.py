"""Wire conventions of the KV block streams, shared by the sender and the receiver.

A frame is ``<u32 LE header length><FrameHeader protobuf><payload>``: the payload holds whole
blocks back to back (``len(block_indices) * block_nbytes`` bytes), so a block is copied into a
message once (the join below) and read out of it as a view, with no per-block Python object and
no protobuf copy of the bytes. The block-stream methods use identity serializers: gRPC hands the
frame's ``bytes`` through untouched.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from proto import strata_pb2

SECRET_METADATA_KEY = "x-strata-secret"
STREAM_SERVICE = "strata.v1.KVStream"
PUSH_METHOD = f"/{STREAM_SERVICE}/Push"
PULL_METHOD = f"/{STREAM_SERVICE}/Pull"
# Largest gRPC message either end accepts; a frame (header + payload) must fit.
MAX_MESSAGE_BYTES = 64 << 20
# Payload of one frame: large enough to spread the per-message cost (a gRPC message each way, a
# Python thread hand-off) over many bytes — on the 2-core machine shared-memory frames of 16 MiB
# moved 3.1-4.3 GB/s against 2.4-3.2 at 4 MiB and 1.4-2.2 at 1 MiB, gRPC frames the same at 4 and
# 16 MiB (`strata bench transfer --frame-kib`) — and small enough to pipeline a chunk's blocks.
DEFAULT_FRAME_BYTES = 16 << 20
# Room left for the header in a message.
HEADER_ROOM = 1 << 20
# Largest block a receiver accepts (guards memory against a malformed header).
MAX_BLOCK_BYTES = MAX_MESSAGE_BYTES - HEADER_ROOM

_LEN = struct.Struct("<I")


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the message limits on both ends."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def blocks_per_frame(block_nbytes: int, frame_bytes: int = DEFAULT_FRAME_BYTES) -> int:
    """Whole blocks in one frame (at least one)."""
    if not 0 < block_nbytes <= MAX_BLOCK_BYTES:
        raise ValueError(
            f"block of {block_nbytes} bytes cannot travel in one frame (at most {MAX_BLOCK_BYTES})"
        )
    if frame_bytes <= 0:
        raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
    return max(1, min(frame_bytes, MAX_BLOCK_BYTES) // block_nbytes)


def encode(header: strata_pb2.FrameHeader, payload: bytes | memoryview | None = None) -> bytes:
    """One frame: the header, then the payload copied once into the message."""
    head = header.SerializeToString()
    if payload is None:
        return _LEN.pack(len(head)) + head
    return b"".join((_LEN.pack(len(head)), head, payload))


def new_frame(header: strata_pb2.FrameHeader, payload_nbytes: int) -> tuple[bytes, memoryview]:
    """A frame whose payload is still to be written: the message, and a writable view of its
    payload, so the blocks are copied straight into the message (gRPC takes only ``bytes``, and
    building one from a separate buffer would copy every byte once more).

    The ``bytes`` object is new and referenced by nobody else until the caller hands it on, so
    filling it through the view before that is safe; it must not be written after.
    """
    if payload_nbytes < 2:
        raise ValueError("an in-place frame needs a payload of at least 2 bytes")
    head = header.SerializeToString()
    start = _LEN.size + len(head)
    message = bytes(start + payload_nbytes)  # zero-filled fresh pages, no copy
    addr = ctypes.cast(ctypes.c_char_p(message), ctypes.c_void_p).value
    assert addr is not None
    view = memoryview((ctypes.c_ubyte * len(message)).from_address(addr)).cast("B")
    _LEN.pack_into(view, 0, len(head))
    view[_LEN.size : start] = head
    return message, view[start:]


class FrameError(ValueError):
    """A frame that breaks the wire format (the peer gets INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Frame:
    header: strata_pb2.FrameHeader
    payload: memoryview  # view into the received message: valid as long as the frame is

    def blocks(self) -> list[memoryview]:
        """The payload cut into its blocks (views, no copy); checks the sizes add up."""
        h = self.header
        n, size = len(h.block_indices), h.block_nbytes
        if n and not 0 < size <= MAX_BLOCK_BYTES:
            raise FrameError(f"block_nbytes={size} outside (0, {MAX_BLOCK_BYTES}]")
        if len(self.payload) != n * size:
            raise FrameError(
                f"payload of {len(self.payload)} bytes does not hold {n} blocks of {size} bytes"
            )
        return [self.payload[i * size : (i + 1) * size] for i in range(n)]


def decode(message: bytes) -> Frame:
    if len(message) < _LEN.size:
        raise FrameError(f"frame of {len(message)} bytes has no header length")
    (head_len,) = _LEN.unpack_from(message)
    end = _LEN.size + head_len
    if end > len(message):
        raise FrameError(f"header of {head_len} bytes overruns a frame of {len(message)}")
    header = strata_pb2.FrameHeader()
    try:
        header.ParseFromString(message[_LEN.size : end])
    except Exception as e:  # the protobuf runtime raises DecodeError
        raise FrameError(f"unreadable frame header: {e}") from None
    return Frame(header, memoryview(message)[end:])
