"""The frame format: header + payload round trip, views without copies, malformed frames."""

from __future__ import annotations

import pytest

from kvtransfer import wire
from proto import strata_pb2 as pb


def test_frame_round_trip_and_blocks_are_views() -> None:
    payload = bytes(range(256)) * 48  # 3 blocks of 4096
    header = pb.FrameHeader(req_id="r", block_indices=[4, 5, 9], block_nbytes=4096)
    frame = wire.decode(wire.encode(header, payload))
    assert frame.header.req_id == "r" and list(frame.header.block_indices) == [4, 5, 9]
    blocks = frame.blocks()
    assert [bytes(b) for b in blocks] == [payload[i * 4096 : (i + 1) * 4096] for i in range(3)]
    assert all(b.obj is blocks[0].obj for b in blocks)  # views of one message, not copies


def test_header_only_frame() -> None:
    frame = wire.decode(wire.encode(pb.FrameHeader(last=True)))
    assert frame.header.last and len(frame.payload) == 0 and frame.blocks() == []


@pytest.mark.parametrize(
    "message",
    [b"", b"\x01\x00", b"\xff\xff\x00\x00abc", b"\x03\x00\x00\x00\xff\xff\xff"],
)
def test_malformed_frames_raise_frame_error(message: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.decode(message)


def test_payload_must_hold_whole_blocks() -> None:
    header = pb.FrameHeader(block_indices=[0, 1], block_nbytes=100)
    with pytest.raises(wire.FrameError, match="does not hold 2 blocks"):
        wire.decode(wire.encode(header, b"x" * 150)).blocks()


def test_blocks_per_frame() -> None:
    assert wire.blocks_per_frame(32 << 10) == 512  # 16 MiB frames of tiny's 32 KiB blocks
    assert wire.blocks_per_frame(32 << 20) == 1  # a block larger than a frame travels alone
    with pytest.raises(ValueError, match="cannot travel"):
        wire.blocks_per_frame(wire.MAX_MESSAGE_BYTES)


def test_frame_built_in_place() -> None:
    header = pb.FrameHeader(block_indices=[0, 1], block_nbytes=3)
    message, payload = wire.new_frame(header, 6)
    assert isinstance(message, bytes) and len(payload) == 6
    payload[:] = b"abcdef"  # written through the view, before the message is handed on
    frame = wire.decode(message)
    assert list(frame.header.block_indices) == [0, 1]
    assert [bytes(b) for b in frame.blocks()] == [b"abc", b"def"]
