"""The decode worker's output stream: messages leave in the order they were numbered, also when
an abort publishes from another thread than the engine loop's; and the stream served by a child
process (``OutputSender``): in order, authenticated, and a dead child never blocks the loop."""

from __future__ import annotations

import os
import queue
import threading
import time

import grpc
import pytest

from decode_worker.output_stream import FRAME, StreamHub, read_frames
from decode_worker.outputs import OutputHub, OutputSender, _Subscription
from engine.loop import RequestAborted
from engine.sequence import StepOutput
from kvtransfer import wire
from proto import strata_pb2, strata_pb2_grpc


def _step(req_id: str, token: int) -> StepOutput:
    return StepOutput(req_id, (token,), False, None, 8, 2, 0, {}, None)


def test_two_publishers_keep_the_numbering_in_order() -> None:
    hub = OutputHub(max_queued=1 << 20)
    sub = _Subscription("test", 1 << 20)
    hub._sub = sub  # what Subscribe does, without a gRPC server
    n = 5000

    def engine_loop() -> None:  # a step's outputs
        for i in range(n):
            hub.publish([_step("a", i % 200)], {})

    def aborts() -> None:  # requests aborted while they waited for their blocks
        for i in range(n):
            hub.publish([], {f"r{i}": RequestAborted("aborted")})

    threads = [threading.Thread(target=engine_loop), threading.Thread(target=aborts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = []
    while True:
        try:
            seqs.append(sub.q.get_nowait().seq)
        except queue.Empty:
            break
    assert seqs == list(range(1, 2 * n + 1))


def test_a_subscriber_that_falls_behind_is_ended() -> None:
    hub = OutputHub(max_queued=4)
    sub = _Subscription("slow", 4)
    hub._sub = sub
    for i in range(5):
        hub.publish([_step("a", i)], {})
    assert sub.ended.is_set()
    hub.publish([_step("a", 9)], {})  # nobody listens now: dropped, counted
    assert hub.num_dropped == 1


# ---- the stream served by a child process ------------------------------------------------------
def _subscribe(port: int, secret: str | None):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    md = ((wire.SECRET_METADATA_KEY, secret),) if secret else ()
    call = strata_pb2_grpc.WorkerOutputsStub(ch).Subscribe(
        strata_pb2.SubscribeRequest(subscriber="test"), metadata=md, timeout=30
    )
    assert next(call).num_steps == 0  # subscribed
    return ch, call


def test_the_child_process_serves_every_step_in_order() -> None:
    lost: list[str] = []
    # queued in the child until the test reads (ordering here, not a lagging subscriber)
    sender = OutputSender("127.0.0.1", "s3cret", max_queued=1 << 16, on_lost=lost.append)
    try:
        ch, call = _subscribe(sender.port, "s3cret")
        n = 3000  # more than one pipe read and, merged or not, every token arrives once
        for i in range(n):
            sender.publish([_step("a", i % 1000)], {})
        sender.publish([], {"b": ValueError("bad token")})
        tokens: list[int] = []
        seqs: list[int] = []
        errors = {}
        while len(tokens) < n or not errors:
            msg = next(call)
            seqs.append(msg.seq)
            tokens.extend(msg.token_ids)
            errors.update({k: v.code for k, v in msg.errors.items()})
        assert tokens == [i % 1000 for i in range(n)]
        assert seqs == sorted(seqs) and seqs[0] == 1  # numbered in the child, in order
        assert errors == {"b": "INVALID_ARGUMENT"}
        assert sender.num_messages == n + 1 and sender.num_dropped == 0
        call.cancel()
        ch.close()
    finally:
        sender.close()
    assert sender.proc.returncode == 0 and lost == []  # it ended when its pipe closed
    sender.publish([_step("a", 1)], {})  # after close: dropped, never written to a reused fd
    assert sender.num_dropped == 1 and sender.num_messages == n + 1


def test_the_child_refuses_a_wrong_secret() -> None:
    sender = OutputSender("127.0.0.1", "s3cret")
    try:
        with pytest.raises(grpc.RpcError) as e:
            _subscribe(sender.port, "wrong")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        sender.close()


def test_a_dead_child_is_reported_once_and_publishing_goes_on() -> None:
    lost: list[str] = []
    sender = OutputSender("127.0.0.1", on_lost=lost.append)
    try:
        sender.proc.kill()
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(lost) == 1 and "status" in lost[0]
        for i in range(100):  # never blocks, never raises: counted as dropped
            sender.publish([_step("a", i)], {})
        assert sender.num_dropped == 100 and len(lost) == 1
    finally:
        sender.close()


def test_frames_split_across_reads_are_put_back_together() -> None:
    hub = StreamHub()
    sub = _Subscription("test", 100)
    hub._sub = sub
    msgs = [strata_pb2.StepOutputs(req_ids=["a"], num_tokens=[1], token_ids=[i], num_steps=1)
            for i in range(20)]  # fmt: skip
    data = b"".join(FRAME.pack(len(b)) + b for b in (m.SerializeToString() for m in msgs))
    r, w = os.pipe()

    def write_in_pieces() -> None:
        for k in range(0, len(data), 7):  # frames cut anywhere, headers included
            os.write(w, data[k : k + 7])
            time.sleep(0.0005)
        os.close(w)

    t = threading.Thread(target=write_in_pieces)
    t.start()
    read_frames(r, hub)  # returns when the writer closes
    t.join()
    os.close(r)
    got = [sub.q.get_nowait().token_ids[0] for _ in range(20)]
    assert got == list(range(20)) and sub.q.empty()
