"""The decode worker's output stream: messages leave in the order they were numbered, also when
an abort publishes from another thread than the engine loop's."""

from __future__ import annotations

import queue
import threading

from decode_worker.outputs import OutputHub, _Subscription
from engine.loop import RequestAborted
from engine.sequence import StepOutput


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
