"""Through the real service, one prefill and one decode worker on one host (the KV handoff
through shared memory, prompts prefilled in chunks of 256 tokens): greedy output equals the
in-process engine, also for 64 streams at once; prefixes are reused from every tier; bad
requests get the right status and the service keeps serving; a client that stops reading is cut
off while the others go on; every block is free when requests end, and no shared-memory segment
outlives the service."""

from __future__ import annotations

import random
import threading

import grpc
import pytest
import ray

from engine.sampling import SamplingParams
from router.client import StrataClient
from router.config import BackendConfig
from router.errors import RemoteError
from tests.e2e.conftest import (
    TOKEN,
    prompt,
    shm_segments_of,
    start,
    wait_no_leaks,
    worker_pids,
)

pytestmark = pytest.mark.timeout(900)
MAX_BUFFERED = 64  # a client further behind its decode worker than this is cut off


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start(
        tmp_path_factory.mktemp("svc"),
        1,
        1,
        chunk_tokens=256,
        backend=BackendConfig(transfer_timeout_s=10.0, max_buffered_tokens=MAX_BUFFERED),
        max_in_flight=80,
        max_workers=100,
        metrics_port=0,
    )
    pids = worker_pids(svc)
    yield svc
    svc.shutdown()
    assert not shm_segments_of(pids), "a worker left its shared-memory segment behind"


@pytest.fixture(scope="module")
def client(service):
    with StrataClient(service.address, token=TOKEN) as c:
        yield c


def _expected(ref, ids: list[int], n: int) -> list[int]:
    return ref.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].output_token_ids


def test_greedy_equals_in_process_engine(client, reference_engine):
    for n, seed in ((40, 1), (333, 2), (1500, 13)):  # the last one: 6 chunks, streamed
        ids = prompt(n, seed)
        res = client.generate(prompt_token_ids=ids, max_tokens=20, temperature=0.0, ignore_eos=True)
        assert list(res.token_ids) == _expected(reference_engine, ids, 20)
        assert res.finish_reason == "length"
        assert res.usage.prefill_worker == "prefill-0" and res.usage.decode_worker == "decode-0"


def test_text_prompt_and_max_tokens_one(client, reference_engine):
    res = client.generate(prompt="Hello, Strata!", max_tokens=1, temperature=0.0)
    ids = list(b"Hello, Strata!")
    assert list(res.token_ids) == _expected(reference_engine, ids, 1)
    assert res.usage.completion_tokens == 1


def test_prefix_reuse_from_each_tier(service, client, reference_engine):
    ids = prompt(640, 3)
    expected = _expected(reference_engine, ids, 8)
    cold = client.generate(prompt_token_ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert cold.usage.cached_tokens == 0
    warm = client.generate(prompt_token_ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert dict(warm.usage.cached_tokens_by_tier) == {"device": 624}
    p0 = service.prefill[0]
    ray.get(p0.evict_cached.remote("disk"), timeout=60)
    from_disk = client.generate(
        prompt_token_ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True
    )
    assert dict(from_disk.usage.cached_tokens_by_tier) == {"disk": 624}
    for r in (cold, warm, from_disk):
        assert list(r.token_ids) == expected


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"prompt_token_ids": []}, "INVALID_ARGUMENT"),
        ({"prompt": ""}, "INVALID_ARGUMENT"),
        ({"prompt_token_ids": [1, 2, 99999]}, "INVALID_ARGUMENT"),
        ({"prompt_token_ids": [1, 2, 3], "max_tokens": 10**6}, "INVALID_ARGUMENT"),
        ({"prompt_token_ids": [1, 2, 3], "temperature": -1.0}, "INVALID_ARGUMENT"),
    ],
)
def test_bad_requests_get_status_and_service_keeps_serving(client, kwargs, code):
    from tests.router.conftest import wire_request

    with pytest.raises(RemoteError) as err:  # sent as is (the client would refuse some first)
        list(client.stream_request(wire_request(**kwargs), timeout=60))
    assert err.value.code == code
    ok = client.generate(prompt_token_ids=[5, 6, 7], max_tokens=2)
    assert len(ok.token_ids) == 2


def test_wrong_token_is_unauthenticated(service):
    with StrataClient(service.address, token="wrong") as bad, pytest.raises(RemoteError) as err:
        bad.generate(prompt_token_ids=[1, 2, 3], max_tokens=2)
    assert err.value.code == "UNAUTHENTICATED"
    with StrataClient(service.address) as none, pytest.raises(RemoteError) as err2:
        none.generate(prompt_token_ids=[1, 2, 3], max_tokens=2)
    assert err2.value.code == "UNAUTHENTICATED"


def test_32_streams_with_random_cancellations(service, client, reference_engine):
    rng = random.Random(0)
    prompts = [prompt(rng.randrange(20, 200), 100 + i) for i in range(32)]
    cancel = set(rng.sample(range(32), 10))
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            if i in cancel:
                stream = client.stream(
                    prompt_token_ids=prompts[i],
                    max_tokens=60,
                    temperature=0.0,
                    ignore_eos=True,
                    timeout=300,
                )
                for n, _ in enumerate(stream):
                    if n >= 2:
                        break  # closing the stream cancels the request on the server
                stream.close()
                results[i] = "cancelled"
            else:
                results[i] = client.generate(
                    prompt_token_ids=prompts[i],
                    max_tokens=12,
                    temperature=0.0,
                    ignore_eos=True,
                    timeout=300,
                )
        except Exception as e:  # recorded and asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i in range(32):
        if i in cancel:
            assert results[i] == "cancelled", results[i]
        else:
            res = results[i]
            assert not isinstance(res, Exception), res
            assert list(res.token_ids) == _expected(reference_engine, prompts[i], 12)  # type: ignore[attr-defined]
    wait_no_leaks(service)  # aborts reach the workers asynchronously


def test_stats_and_health(client):
    ok, _ = client.health()
    assert ok
    stats = client.stats()
    assert {"prefill-0", "decode-0", "router"} <= set(stats)
    assert stats["prefill-0"]["push_blocks"] > 0
    assert stats["prefill-0"]["push_shm_bytes"] > 0  # same host: the bytes skipped the socket
    assert stats["decode-0"]["transfers_ok"] > 0
    assert stats["decode-0"]["shm_torn_frames"] == 0


def test_grpc_health_service(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(service.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_prometheus_metrics_of_router_and_workers(service, client):
    import urllib.request

    client.generate(prompt_token_ids=list(range(40)), max_tokens=3)
    port = ray.get(service.router.metrics_port_of.remote(), timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert "strata_ttft_seconds_bucket" in text
    assert "strata_time_between_tokens_seconds_count" in text
    assert 'strata_worker_pool_free_blocks{worker="prefill-0"}' in text
    assert 'strata_worker_push_bytes_total{worker="prefill-0"}' in text  # counters: *_total
    assert 'strata_worker_store_hits_total{tier="host",worker="decode-0"}' in text
    assert 'strata_worker_store_load_seconds_bucket{le="+Inf",worker="decode-0"}' in text
    assert "# TYPE strata_worker_push_bytes_total counter" in text
    assert "strata_worker_pid" not in text


@pytest.mark.slow
def test_64_streams_at_once_equal_the_engine(client, reference_engine):
    prompts = [prompt(30 + 7 * i, 500 + i) for i in range(64)]
    expected = reference_engine.generate(
        prompts, SamplingParams(max_tokens=10, ignore_eos=True)
    )
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = client.generate(
                prompt_token_ids=prompts[i], max_tokens=10, temperature=0.0, ignore_eos=True,
                timeout=300,
            )
        except Exception as e:  # asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i in range(64):
        res = results[i]
        assert not isinstance(res, Exception), res
        assert list(res.token_ids) == expected[i].output_token_ids, i  # type: ignore[attr-defined]


def test_client_that_stops_reading_is_cut_off(service, client, reference_engine):
    import grpc as _grpc

    from proto import strata_pb2, strata_pb2_grpc

    # A raw client that reads two messages, then nothing: once its connection's flow-control
    # window is full (64 KiB: window growth is off), its stream backs up in the router.
    channel = _grpc.insecure_channel(service.address, options=[("grpc.http2.bdp_probe", 0)])
    stub = strata_pb2_grpc.GenerationStub(channel)
    stalled = stub.Generate(
        strata_pb2.GenerateRequest(
            prompt_token_ids=prompt(50, 900), max_tokens=3900, temperature=0.0, ignore_eos=True
        ),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
        timeout=300,
    )
    for _ in range(2):
        next(stalled)
    others = [prompt(40, 901 + i) for i in range(8)]
    expected = reference_engine.generate(others, SamplingParams(max_tokens=8, ignore_eos=True))
    for ids, exp in zip(others, expected):  # the others are served meanwhile, correctly
        res = client.generate(prompt_token_ids=ids, max_tokens=8, temperature=0.0,
                              ignore_eos=True)
        assert list(res.token_ids) == exp.output_token_ids
    # once it fell MAX_BUFFERED tokens behind, its sequence was aborted
    wait_no_leaks(service, within_s=240)
    with pytest.raises(_grpc.RpcError) as err:  # reading on: what was sent, then the status
        for _ in stalled:
            pass
    assert err.value.code() == _grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "behind" in (err.value.details() or "")
    channel.close()


def test_wrong_secret_refused_by_the_workers(service) -> None:
    from kvtransfer.sender import KVSender

    info = ray.get(service.decode[0].info.remote(), timeout=60)
    for shm_bytes in (0, 1 << 20):  # the gRPC path and the shared-memory offer alike
        sender = KVSender(secret="not-it", owner="e2e-intruder", block_nbytes=info.block_nbytes,
                          shm_bytes=shm_bytes)
        try:
            session = sender.open_push(info.kv_address, "intruder", info.fingerprint,
                                       [b"h" * 16], deadline_s=10)
            session.finish()
            with pytest.raises(Exception) as err:
                session.wait(20)
            assert getattr(err.value, "code", "") == "UNAUTHENTICATED"
            assert not session.shm_ok
        finally:
            sender.close()
