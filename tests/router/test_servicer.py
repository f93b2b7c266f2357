"""The Generation service over a real gRPC server on 127.0.0.1, driven by StrataClient."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.client import StrataClient
from router.config import RouterConfig
from router.errors import RemoteError
from router.metrics import RouterMetrics, render
from router.server import serve
from router.servicer import GenerationServicer


@pytest.fixture
def make_server(tokenizer, backend):
    started: list[tuple[grpc.Server, StrataClient]] = []

    def make(token: str | None = None, **cfg_kwargs) -> tuple[StrataClient, GenerationServicer]:
        opts = {"port": 0, "max_model_len": 256, "max_in_flight": 4, "max_workers": 8}
        cfg = RouterConfig(auth_token=token, **{**opts, **cfg_kwargs})
        servicer = GenerationServicer(backend, tokenizer, cfg, RouterMetrics())
        server, port = serve(servicer)
        client = StrataClient(f"127.0.0.1:{port}", token=token)
        started.append((server, client))
        return client, servicer

    yield make
    for server, client in started:
        client.close()
        server.stop(0)


def _in_flight(servicer: GenerationServicer) -> float:
    return servicer.metrics.snapshot()["strata_requests_in_flight"]


def _wait(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_generate_streams_text_and_usage(make_server, backend) -> None:
    client, servicer = make_server()
    res = client.generate(
        prompt="Hi there", max_tokens=100, temperature=0, seed=3, cache_salt="tenant-a", timeout=10
    )
    assert res.text == "héllo wörld ✓"
    assert bytes(res.token_ids).decode() == res.text
    assert res.finish_reason == "stop"
    assert res.usage.prompt_tokens == 8 and res.usage.completion_tokens == len(res.token_ids)
    assert res.usage.cached_tokens_by_tier == {"host": 16}
    assert (res.usage.prefill_worker, res.usage.decode_worker) == ("prefill-0", "decode-1")
    assert 0 < res.ttft_ms_server <= res.ttft_ms_client <= res.e2e_ms
    sent = backend.requests[-1]
    assert sent.prompt_token_ids == tuple(b"Hi there") and sent.sampling.seed == 3
    assert sent.sampling.temperature == 0.0 and sent.cache_salt == "tenant-a"
    # the deadline travels as a grpc-timeout header, rounded up to its unit: a little over 10 s
    assert 0 < backend.deadlines[-1] <= 10.5
    # streaming: one message per token; a split multi-byte character arrives whole
    chunks = list(client.stream(prompt_token_ids=[1, 2], max_tokens=3, timeout=10))
    assert [c.text for c in chunks] == ["h", "", "é"]
    assert chunks[-1].finish_reason == "length" and chunks[0].finish_reason is None
    text = render(servicer.metrics.registry)
    assert 'strata_requests_total{status="OK"} 2.0' in text
    assert "strata_ttft_seconds_count 2.0" in text
    assert 'strata_cached_tokens_total{tier="host"} 32.0' in text


def test_stats_and_health(make_server, backend) -> None:
    client, _ = make_server()
    stats = client.stats()
    assert stats["prefill-0"] == {"queue_depth": 2.0, "hit_rate_host": 0.5}
    assert stats["router"]["strata_requests_in_flight"] == 0.0
    assert client.health() == (True, "serving")
    channel = grpc.insecure_channel(client.address)
    hstub = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service="strata.v1.Generation")
    assert hstub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    backend.is_healthy = False
    assert client.health()[0] is False
    assert hstub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    rstub = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(
        rstub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"strata.v1.Generation", "grpc.health.v1.Health"} <= names
    channel.close()


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"prompt": ""}, "INVALID_ARGUMENT"),
        ({"prompt_token_ids": [1, 999]}, "INVALID_ARGUMENT"),
        ({"prompt": "x", "max_tokens": 0}, "INVALID_ARGUMENT"),
        ({"prompt": "!noworker"}, "UNAVAILABLE"),
        ({"prompt": "!busy"}, "RESOURCE_EXHAUSTED"),
    ],
)
def test_error_status_codes(make_server, kwargs, code) -> None:
    from tests.router.conftest import wire_request

    client, _ = make_server()
    with pytest.raises(RemoteError) as e:  # sent as is: the server's checks answer
        list(client.stream_request(wire_request(**kwargs), timeout=10))
    assert e.value.code == code
    assert e.value.details  # the reason travels to the client


def test_overload_is_resource_exhausted(make_server, backend) -> None:
    client, servicer = make_server(max_in_flight=1, max_workers=4)
    slow = client.stream(prompt="!slow", timeout=30)
    assert next(slow).token_ids == (ord("x"),)  # occupies the only slot
    with pytest.raises(RemoteError) as e:
        client.generate(prompt="hi", timeout=10)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "busy" in e.value.details
    slow.close()  # client cancels -> the slot frees up
    assert _wait(lambda: _in_flight(servicer) == 0)
    assert client.generate(prompt="hi", timeout=10).finish_reason == "stop"


def test_client_cancel_reaches_backend(make_server, backend) -> None:
    client, servicer = make_server()
    stream = client.stream(prompt="!slow", request_id="r-cancel", timeout=30)
    next(stream)
    stream.close()
    assert backend.cancel_event.wait(5)
    assert _wait(lambda: _in_flight(servicer) == 0)
    assert backend.cancelled == ["r-cancel"]


def test_deadline_exceeded_cancels_backend(make_server, backend) -> None:
    client, _ = make_server()
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        client.generate(prompt="!slow", request_id="r-late", timeout=0.3)
    assert e.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 3
    assert backend.cancel_event.wait(5) and backend.cancelled == ["r-late"]


def test_server_side_default_timeout(make_server, backend) -> None:
    client, _ = make_server(default_timeout_s=0.3)
    with pytest.raises(RemoteError) as e:
        client.generate(prompt="!slow", request_id="r-def")
    assert e.value.code == "DEADLINE_EXCEEDED"
    assert backend.deadlines[-1] == pytest.approx(0.3, abs=0.05)
    assert _wait(lambda: backend.cancelled == ["r-def"])


def test_bearer_token(make_server, backend) -> None:
    client, _ = make_server(token="tok-123")
    assert client.generate(prompt="hi", timeout=10).text
    assert client.stats()["prefill-0"]
    for bad in (None, "wrong"):
        other = StrataClient(client.address, token=bad)
        calls = (other.stats, other.health, lambda c=other: c.generate(prompt="hi", timeout=10))
        for call in calls:
            with pytest.raises(RemoteError) as e:
                call()
            assert e.value.code == "UNAUTHENTICATED"
        # the standard health check stays open for probes
        hstub = health_pb2_grpc.HealthStub(other._channel)
        assert hstub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        other.close()
    assert len(backend.requests) == 1


def test_concurrent_requests(make_server, backend) -> None:
    client, _ = make_server()
    results: list[str] = []

    def run() -> None:
        results.append(client.generate(prompt="abc", max_tokens=5, timeout=10).text)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["héll"] * 4  # 5 tokens = 5 bytes of the reply


def test_public_client_takes_address_and_token_from_the_environment(
    make_server, monkeypatch
) -> None:
    import strata

    client, _ = make_server(token="env-t0k")
    monkeypatch.setenv("STRATA_SERVER", client.address)
    monkeypatch.setenv("STRATA_TOKEN", "env-t0k")
    with strata.Client() as public:
        res = public.generate(prompt="hi", max_tokens=3, temperature=0.0)
        assert isinstance(res, strata.GenerationResult) and len(res.token_ids) == 3
        with pytest.raises(ValueError, match="max_tokens must be in"):
            public.generate(prompt="hi", max_tokens=1 << 40)
    monkeypatch.delenv("STRATA_TOKEN")
    with strata.Client() as anonymous, pytest.raises(strata.RemoteError) as e:
        anonymous.generate(prompt="hi", max_tokens=3)
    assert e.value.code == "UNAUTHENTICATED"


def test_async_client(make_server, backend) -> None:
    """``AsyncStrataClient``: the same answers as the sync client, many streams on one loop."""
    import asyncio

    from router.aio_client import AsyncStrataClient

    client, _ = make_server()

    async def scenario() -> None:
        async with AsyncStrataClient(client.address) as aio:
            results = await asyncio.gather(
                *(aio.generate(prompt="abc", max_tokens=5, timeout=10) for _ in range(4))
            )
            assert [r.text for r in results] == ["héll"] * 4
            assert results[0].usage.completion_tokens == 5
            chunks = [c async for c in aio.stream(prompt_token_ids=[1, 2], max_tokens=3)]
            assert [c.text for c in chunks] == ["h", "", "é"]
            async for chunk in aio.stream(prompt="!slow", request_id="r-aio", timeout=30):
                assert chunk.token_ids == (ord("x"),)
                break  # leaving the loop cancels the request
            with pytest.raises(RemoteError) as e:
                await aio.generate(prompt="!noworker", timeout=10)
            assert e.value.code == "UNAVAILABLE"
            assert (await aio.health()) == (True, "serving")
            assert (await aio.stats())["prefill-0"]["queue_depth"] == 2.0

    asyncio.run(scenario())
    assert _wait(lambda: "r-aio" in backend.cancelled), backend.cancelled
