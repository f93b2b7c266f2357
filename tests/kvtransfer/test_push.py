"""Push streams over real gRPC: blocks inline and through shared memory, held blocks skipped,
auth and fingerprint refusals, streams cut off or cancelled by either side, a failing sink,
flow control against a busy receiver, and malformed frames."""

from __future__ import annotations

import time

import grpc
import pytest

from kvtransfer import shm, wire
from kvtransfer.session import PushSession
from proto import strata_pb2 as pb
from tests.kvtransfer.conftest import BLOCK, FP, SECRET, hashes, payload


def _send(session: PushSession, data: bytes, per_frame: int, use_shm: bool) -> None:
    n = len(data) // BLOCK
    for start in range(0, n, per_frame):
        idx = list(range(start, min(n, start + per_frame)))
        part = data[start * BLOCK : (idx[-1] + 1) * BLOCK]
        slot = session.try_slot() if use_shm else None
        if slot is not None:
            assert session.segment is not None
            view = session.segment.begin_write(slot, len(part))
            view[:] = part
            session.add_shm(idx, slot, session.segment.end_write(slot), len(part))
        else:
            session.add_inline(idx, memoryview(part))


@pytest.mark.parametrize("use_shm", [False, True])
def test_push_delivers_every_block_and_skips_held_ones(receiver, make_sender, use_shm) -> None:
    sink, rx, addr = receiver
    if use_shm and not shm.free_bytes():
        pytest.skip("no writable /dev/shm")
    sender = make_sender(frame_bytes=4 * BLOCK, shm_bytes=(64 * BLOCK) if use_shm else 0)
    hs = hashes(40)
    data = payload(40)
    for i in range(6):  # the receiver already holds the first six
        sink.blocks[hs[i]] = data[i * BLOCK : (i + 1) * BLOCK]
    session = sender.open_push(addr, "r1", FP, hs, deadline_s=30, use_shm=use_shm)
    assert session.wait_answer(10)
    assert session.held == [True] * 6 + [False] * 34
    assert session.shm_ok == use_shm
    todo = b"".join(data[i * BLOCK : (i + 1) * BLOCK] for i in range(40))
    # the producer skips what is held, as the prefill worker's listener does
    for start in range(6, 40, 4):
        idx = [i for i in range(start, min(40, start + 4)) if session.wanted(i)]
        part = todo[idx[0] * BLOCK : (idx[-1] + 1) * BLOCK]
        slot = session.try_slot() if use_shm else None
        if slot is not None:
            assert session.segment is not None
            view = session.segment.begin_write(slot, len(part))
            view[:] = part
            session.add_shm(idx, slot, session.segment.end_write(slot), len(part))
        else:
            session.add_inline(idx, memoryview(part))
    session.finish()
    res = session.wait(30)
    assert res.num_sent == 34 and res.num_skipped == 6 and res.nbytes == 34 * BLOCK
    assert (res.shm_nbytes > 0) == use_shm
    assert sink.wait_done("r1")
    for i, h in enumerate(hs):
        assert sink.blocks[h] == data[i * BLOCK : (i + 1) * BLOCK], i
    if use_shm:
        assert sender.segment is not None and sender.segment.num_free == sender.segment.num_slots


def test_the_last_frame_carries_the_first_token(receiver, make_sender) -> None:
    sink, _, addr = receiver
    sender = make_sender()
    session = sender.open_push(
        addr, "tok", FP, hashes(2, tag=11), deadline_s=30, use_shm=False, with_first_token=True
    )
    session.add_inline([0, 1], memoryview(payload(2, seed=11)))
    session.finish()  # the blocks are all there; the stream waits for the token
    time.sleep(0.2)
    assert not session.done and "tok" not in sink.done
    session.set_first_token(1234)
    session.wait(10)
    assert sink.wait_done("tok") and sink.first_tokens["tok"] == 1234


def test_frames_before_the_answer_are_filtered_when_sent(receiver, make_sender) -> None:
    sink, _, addr = receiver
    sender = make_sender()
    hs, data = hashes(8, tag=2), payload(8, seed=2)
    sink.blocks[hs[0]] = data[:BLOCK]
    session = sender.open_push(addr, "r2", FP, hs, deadline_s=30, use_shm=False)
    session.add_inline(range(8), memoryview(data))  # queued before the answer is known
    session.finish()
    res = session.wait(30)
    assert res.num_sent == 7 and res.num_skipped == 1
    assert sink.wait_done("r2") and sink.writes == [7]


@pytest.mark.parametrize("use_shm", [False, True])
def test_wrong_secret_is_refused(receiver, make_sender, use_shm) -> None:
    sink, _, addr = receiver
    sender = make_sender(secret="wrong", shm_bytes=(16 * BLOCK) if use_shm else 0)
    session = sender.open_push(addr, "r3", FP, hashes(2), deadline_s=10, use_shm=use_shm)
    session.add_inline([0, 1], memoryview(payload(2)))
    session.finish()
    with pytest.raises(Exception) as err:
        session.wait(10)
    assert getattr(err.value, "code", "") == "UNAUTHENTICATED"
    assert not session.shm_ok and not sink.blocks and not sink.done
    no_secret = make_sender(secret=None)
    with pytest.raises(Exception) as err2:
        no_secret.query(addr, FP, hashes(1), deadline_s=5)
    assert getattr(err2.value, "code", "") == "UNAUTHENTICATED"


def test_other_fingerprint_is_refused(receiver, make_sender) -> None:
    sink, _, addr = receiver
    session = make_sender().open_push(addr, "r4", b"G" * 16, hashes(2), deadline_s=10)
    session.finish()
    with pytest.raises(Exception) as err:
        session.wait(10)
    assert getattr(err.value, "code", "") == "FAILED_PRECONDITION"
    assert sink.wait_done("r4") is False


def test_sender_abort_mid_stream_keeps_whole_blocks(receiver, make_sender) -> None:
    sink, _, addr = receiver
    hs, data = hashes(10, tag=5), payload(10, seed=5)
    session = make_sender().open_push(addr, "r5", FP, hs, deadline_s=30, use_shm=False)
    session.add_inline(range(4), memoryview(data[: 4 * BLOCK]))
    deadline = time.monotonic() + 10
    while len(sink.blocks) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    session.abort()
    with pytest.raises(Exception) as err:
        session.wait(10)
    assert getattr(err.value, "code", "") == "CANCELLED"
    assert sink.wait_done("r5") is False  # the transfer failed...
    assert all(sink.blocks[hs[i]] == data[i * BLOCK : (i + 1) * BLOCK] for i in range(4))


def test_receiver_cancels_a_stalled_stream(receiver, make_sender) -> None:
    sink, rx, addr = receiver
    session = make_sender().open_push(addr, "r6", FP, hashes(4, tag=6), deadline_s=30)
    assert session.wait_answer(10)
    assert rx.cancel_transfer("r6")  # the decode worker stopped waiting for this push
    with pytest.raises(Exception) as err:
        session.wait(10)
    assert getattr(err.value, "code", "") == "CANCELLED"
    assert sink.wait_done("r6") is False
    assert not rx.cancel_transfer("r6")  # already gone


def test_failing_sink_ends_the_push_with_internal(receiver, make_sender) -> None:
    sink, _, addr = receiver
    sink.fail_writes = True
    session = make_sender().open_push(addr, "r7", FP, hashes(3, tag=7), deadline_s=30)
    session.add_inline(range(3), memoryview(payload(3)))
    session.finish()
    with pytest.raises(Exception) as err:
        session.wait(10)
    assert getattr(err.value, "code", "") == "INTERNAL"
    assert sink.wait_done("r7") is False


def test_busy_receiver_slows_the_sender_and_everything_lands(receiver, make_sender) -> None:
    sink, rx, addr = receiver
    sink.gate.clear()  # the receiving engine is busy: no write completes
    n = 8 * rx.max_pending_frames + 8
    hs, data = hashes(n, tag=8), payload(n, seed=8)
    session = make_sender().open_push(addr, "r8", FP, hs, deadline_s=60, use_shm=False)
    for i in range(n):  # one block per frame
        session.add_inline([i], memoryview(data[i * BLOCK : (i + 1) * BLOCK]))
    session.finish()
    time.sleep(0.3)
    assert not session.done and len(sink.writes) == 0
    sink.gate.set()
    res = session.wait(30)
    assert res.num_sent == n and sink.wait_done("r8")
    assert all(sink.blocks[h] == data[i * BLOCK : (i + 1) * BLOCK] for i, h in enumerate(hs))


def _raw_push(addr: str, frames: list[bytes], secret: str = SECRET) -> list[pb.PushReply]:
    with grpc.insecure_channel(addr) as ch:
        call = ch.stream_stream(wire.PUSH_METHOD)
        replies = call(iter(frames), timeout=10, metadata=((wire.SECRET_METADATA_KEY, secret),))
        return [pb.PushReply.FromString(r) for r in replies]


@pytest.mark.parametrize(
    "frame, reason",
    [
        (pb.FrameHeader(block_indices=[9], block_nbytes=BLOCK), "outside the 2 announced"),
        (pb.FrameHeader(block_indices=[0], block_nbytes=BLOCK + 1), "does not hold"),
        (pb.FrameHeader(block_nbytes=BLOCK), "carries no blocks"),
        (pb.FrameHeader(req_id="other", block_indices=[0], block_nbytes=BLOCK), "req_id changed"),
        (pb.FrameHeader(block_indices=[0], block_nbytes=BLOCK, shm_nbytes=BLOCK), "shared-memory"),
    ],
)
def test_malformed_frames_get_invalid_argument(receiver, frame, reason) -> None:
    sink, _, addr = receiver
    opening = wire.encode(pb.FrameHeader(req_id="bad", fingerprint=FP, block_hashes=hashes(2)))
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(addr, [opening, wire.encode(frame, payload(1)[:BLOCK])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (err.value.details() or "")
    assert sink.wait_done("bad") is False


def test_stream_cut_off_without_last_frame(receiver) -> None:
    sink, _, addr = receiver
    opening = wire.encode(pb.FrameHeader(req_id="cut", fingerprint=FP, block_hashes=hashes(2)))
    data = wire.encode(pb.FrameHeader(block_indices=[0], block_nbytes=BLOCK), payload(1))
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(addr, [opening, data])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cut off" in (err.value.details() or "")
    assert sink.wait_done("cut") is False
    assert hashes(2)[0] in sink.blocks  # the whole block before the cut stays


def test_torn_shared_memory_frame_is_dropped(receiver) -> None:
    if not shm.free_bytes():
        pytest.skip("no writable /dev/shm")
    sink, rx, addr = receiver
    seg = shm.SlotSegment("test-sender", BLOCK, 2)
    try:
        view = seg.begin_write(0, BLOCK)
        view[:] = payload(1)
        gen = seg.end_write(0)
        seg.begin_write(0, BLOCK)  # reused before the receiver read it
        frames = [
            wire.encode(
                pb.FrameHeader(
                    req_id="torn",
                    fingerprint=FP,
                    block_hashes=hashes(1, tag=9),
                    shm_segment=seg.name,
                    host_id=shm.host_id(),
                )
            ),
            wire.encode(
                pb.FrameHeader(
                    block_indices=[0],
                    block_nbytes=BLOCK,
                    shm_offset=seg.offset(0),
                    shm_nbytes=BLOCK,
                    shm_gen=gen,
                )
            ),
            wire.encode(pb.FrameHeader(last=True)),
        ]
        replies = _raw_push(addr, frames)
    finally:
        seg.close()
    assert replies[0].shm_ok and replies[-1].num_blocks == 0
    assert rx.num_torn == 1 and not sink.blocks
    assert sink.wait_done("torn") is True  # nothing wrong was written; the block is recomputed


def test_pull_returns_the_leading_held_blocks(receiver, make_sender) -> None:
    sink, _, addr = receiver
    hs, data = hashes(70, tag=3), payload(70, seed=3)
    for i in range(66):  # all but the last four (a pull serves the leading run)
        sink.blocks[hs[i]] = data[i * BLOCK : (i + 1) * BLOCK]
    n, got = make_sender().pull(addr, FP, hs, deadline_s=10)
    assert n == 66 and got == data[: 66 * BLOCK]
    n, got = make_sender().pull(addr, FP, hashes(3, tag=4), deadline_s=10)
    assert n == 0 and got == b""
    with pytest.raises(Exception) as err:
        make_sender(secret="nope").pull(addr, FP, hs, deadline_s=10)
    assert getattr(err.value, "code", "") == "UNAUTHENTICATED"
