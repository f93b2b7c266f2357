"""The router's end of a decode worker's output stream, against a real ``OutputHub`` on a real
gRPC server (127.0.0.1), on the router's event loop; and the health watch that tells the router a
worker's process is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decode_worker.outputs import OutputHub
from engine.sequence import StepOutput
from proto import strata_pb2_grpc
from router.errors import OverloadedError, RequestTimeoutError
from router.event_loop import RouterLoop
from router.liveness import HealthWatch, check_serving
from router.outputs import OutputStream, TokenQueue, WorkerLostError


def _out(req_id: str, tokens: tuple[int, ...], done: int, finish: str | None = None) -> StepOutput:
    """``done``: the request's output tokens so far, these included."""
    return StepOutput(req_id, tokens, finish is not None, finish, 8, done, 4, {"host": 4}, None)


@pytest.fixture
def worker() -> Iterator[tuple[OutputHub, health.HealthServicer, str, grpc.Server]]:
    hub = OutputHub()
    health_servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    strata_pb2_grpc.add_WorkerOutputsServicer_to_server(hub, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield hub, health_servicer, f"127.0.0.1:{port}", server
    server.stop(0)


def _run(coro):
    return RouterLoop.shared().run(coro, timeout=30)


def test_fan_out_merges_what_a_slow_reader_missed(worker) -> None:
    hub, _, address, _ = worker
    broken: list[BaseException] = []

    async def scenario() -> None:
        stream = OutputStream("decode-x", address, None, lambda s, e: broken.append(e))
        assert await stream.wait_connected(10)
        qa, qb = stream.register("a"), stream.register("b")
        hub.publish([_out("a", (5,), 1), _out("b", (7,), 1)], {})
        first = await qa.get(5)
        assert first.token_ids == (5,) and first.cached_by_tier == {"host": 4}
        assert (await qb.get(5)).token_ids == (7,)
        # three steps before "a" reads again: one get takes them all, the end included
        hub.publish([_out("a", (6,), 2), _out("b", (8,), 2)], {})
        hub.publish([_out("a", (9,), 3)], {})
        hub.publish([_out("a", (10,), 4, "length")], {})
        got: list[int] = []
        while True:
            item = await qa.get(5)
            got += item.token_ids
            if item.finish_reason:
                break
        assert got == [6, 9, 10] and item.finish_reason == "length"
        assert (await qb.get(5)).token_ids == (8,)
        # an error for one request fails that request only
        hub.publish([], {"b": ValueError("bad token")})
        with pytest.raises(ValueError, match="bad token"):
            await qb.get(5)
        assert stream.num_requests == 0
        stream.close()

    _run(scenario())
    assert not broken


def test_a_client_too_far_behind_is_cut_off(worker) -> None:
    hub, _, address, _ = worker
    overruns: list[tuple[str, str]] = []

    async def scenario() -> None:
        stream = OutputStream(
            "decode-x",
            address,
            None,
            lambda s, e: None,
            on_overrun=lambda w, r: overruns.append((w, r)),
            max_buffered_tokens=2,
        )
        assert await stream.wait_connected(10)
        q = stream.register("a")
        for i in range(3):
            hub.publish([_out("a", (i,), i + 1)], {})
        for _ in range(100):
            if overruns:
                break
            await asyncio.sleep(0.02)
        assert (await q.get(5)).token_ids == (0, 1, 2)  # what arrived still goes out first
        with pytest.raises(OverloadedError):
            await q.get(5)
        stream.close()

    _run(scenario())
    assert overruns == [("decode-x", "a")]


def test_a_broken_stream_fails_its_requests_and_says_so(worker) -> None:
    hub, _, address, server = worker
    broken: list[OutputStream] = []

    async def scenario() -> None:
        stream = OutputStream("decode-x", address, None, lambda s, e: broken.append(s))
        assert await stream.wait_connected(10)
        q = stream.register("a")
        hub.publish([_out("a", (1,), 1)], {})
        for _ in range(500):  # the token reached the router (stop(0) drops what is unsent)
            if q._tokens:
                break
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, server.stop, 0)  # the process dies
        assert (await q.get(5)).token_ids == (1,)  # the token before the break is not lost
        with pytest.raises(WorkerLostError):
            await q.get(5)
        with pytest.raises(WorkerLostError):
            stream.register("b")  # and no new request is taken
        assert broken == [stream]

    _run(scenario())


def test_token_queue_waits_with_a_deadline() -> None:
    async def scenario() -> None:
        q = TokenQueue("a", "decode-x", 16)
        with pytest.raises(RequestTimeoutError):
            await q.get(0.05)
        asyncio.get_running_loop().call_later(0.05, q.push, [3, 4], "", None)
        assert (await q.get(5)).token_ids == (3, 4)

    _run(scenario())


def test_health_watch_sees_the_process_go(worker) -> None:
    _, health_servicer, address, server = worker
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert check_serving(address, 5)
    lost: list[str] = []

    async def scenario() -> None:
        watch = HealthWatch("decode-x", address, lambda w, why: lost.append(why))
        assert await watch.wait_serving(10)
        await asyncio.get_running_loop().run_in_executor(None, server.stop, 0)
        for _ in range(250):
            if lost:
                return
            await asyncio.sleep(0.02)

    _run(scenario())
    assert lost and "UNAVAILABLE" in lost[0]
    assert not check_serving(address, 1)
