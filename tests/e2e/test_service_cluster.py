"""Two prefill and two decode workers, the KV handoff over gRPC frames (shared memory off) and
prompts prefilled in chunks of 256 tokens: placement follows the cached prefix (in any tier), and
a worker killed mid-request — a prefill worker between chunks or after its first token, a decode
worker in the middle of a batch — never leaves a request hanging, wrong, or failed while a worker
of its role is alive."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from engine.sampling import SamplingParams
from kvtransfer.config import TransferConfig
from router.client import StrataClient
from router.errors import RemoteError
from tests.e2e.conftest import TOKEN, assert_no_leaks, prompt, start, wait_no_leaks

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start(
        tmp_path_factory.mktemp("cluster"),
        2,
        2,
        transfer=TransferConfig(shm_bytes=0),
        chunk_tokens=256,
    )
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def client(service):
    with StrataClient(service.address, token=TOKEN) as c:
        yield c


def _expected(ref, ids: list[int], n: int) -> list[int]:
    return ref.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].output_token_ids


def _sync(service) -> None:
    ray.get(service.router.sync_index.remote(), timeout=60)


def test_greedy_equals_in_process_engine(client, reference_engine):
    for seed in (1, 2, 3, 4):
        ids = prompt(150 + 300 * seed, seed)  # up to 1350 tokens: up to 6 chunks, streamed
        res = client.generate(prompt_token_ids=ids, max_tokens=16, temperature=0.0, ignore_eos=True)
        assert list(res.token_ids) == _expected(reference_engine, ids, 16)
    stats = client.stats()
    pushed = sum(stats[p]["push_bytes"] for p in ("prefill-0", "prefill-1"))
    assert pushed > 0
    assert all(stats[p]["push_shm_bytes"] == 0 for p in ("prefill-0", "prefill-1"))


def test_shared_prefix_goes_to_the_worker_holding_it(service, client, reference_engine):
    shared = prompt(800, 10)
    first = client.generate(
        prompt_token_ids=shared + prompt(20, 11), max_tokens=4, temperature=0.0, ignore_eos=True
    )
    holder = first.usage.prefill_worker
    _sync(service)
    for i in range(3):  # every follow-up lands on the holder and reuses the 800-token prefix
        ids = shared + prompt(30, 20 + i)
        res = client.generate(prompt_token_ids=ids, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert res.usage.prefill_worker == holder
        assert res.usage.cached_tokens >= 800
        assert list(res.token_ids) == _expected(reference_engine, ids, 6)
        _sync(service)


def test_prefix_only_on_disk_is_still_reused(service, client, reference_engine):
    shared = prompt(640, 30)
    first = client.generate(prompt_token_ids=shared + [1], max_tokens=2, temperature=0.0)
    holder = first.usage.prefill_worker
    handle = service.prefill[int(holder.split("-")[1])]
    ray.get(handle.evict_cached.remote("disk"), timeout=60)
    _sync(service)
    ids = shared + prompt(25, 31)
    res = client.generate(prompt_token_ids=ids, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert res.usage.prefill_worker == holder
    assert res.usage.cached_tokens_by_tier.get("disk", 0) >= 640
    assert list(res.token_ids) == _expected(reference_engine, ids, 6)


def test_prefill_worker_killed_between_chunks(service, client, reference_engine):
    ids = prompt(3000, 60)  # 12 chunks of 256 tokens
    expected = _expected(reference_engine, ids, 6)
    before = {w: s.get("pool_cached_blocks", 0) for w, s in client.stats().items()}
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["res"] = client.generate(
                prompt_token_ids=ids, max_tokens=6, temperature=0.0, ignore_eos=True, timeout=240
            )
        except Exception as e:  # asserted below
            out["res"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    while victim is None and time.monotonic() - t0 < 120:
        stats = client.stats()
        busy = [p for p in ("prefill-0", "prefill-1") if stats[p].get("in_flight", 0) > 0]
        landed = any(
            stats[d].get("pool_cached_blocks", 0) > before[d] for d in ("decode-0", "decode-1")
        )
        if busy and landed:  # mid-prefill, and the first chunks reached the decode worker
            victim = busy[0]
        time.sleep(0.01)
    assert victim is not None, "the prefill never got going"
    ray.kill(service.prefill[int(victim.split("-")[1])], no_restart=True)
    thread.join(timeout=300)
    res = out["res"]
    assert not isinstance(res, Exception), res
    assert time.monotonic() - t0 < 240
    assert list(res.token_ids) == expected  # type: ignore[attr-defined]
    # The decode worker went on from the blocks that had landed and computed the rest.
    usage = res.usage  # type: ignore[attr-defined]
    assert usage.prefill_worker == victim and 0 < usage.cached_tokens < 3000
    healthy, _ = client.health()
    assert healthy  # the other prefill worker serves on


def _kill_when(predicate, victim) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 120
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.005)
        ray.kill(victim, no_restart=True)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_killed_decode_worker_mid_batch(service, client, reference_engine):
    prompts = [prompt(200 + 10 * i, 40 + i) for i in range(6)]
    expected = [_expected(reference_engine, ids, 120) for ids in prompts]
    seen: dict[int, list[int]] = {i: [] for i in range(6)}
    finals: dict[int, object] = {}
    victim = service.decode[0]
    killer = _kill_when(lambda: sum(len(v) >= 5 for v in seen.values()) >= 3, victim)
    t0 = time.monotonic()

    def run(i: int) -> None:
        try:
            for chunk in client.stream(prompt_token_ids=prompts[i], max_tokens=120,
                                       temperature=0.0, ignore_eos=True, timeout=240):
                seen[i].extend(chunk.token_ids)
                if chunk.finish_reason:
                    finals[i] = chunk
        except RemoteError as e:  # asserted below: there must be none
            finals[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    killer.join()
    assert time.monotonic() - t0 < 240
    for i in range(6):  # every request went on on decode-1: no error, the same tokens
        final = finals[i]
        assert not isinstance(final, RemoteError), (i, final)
        assert seen[i] == expected[i], i
        assert final.usage.decode_worker == "decode-1"  # type: ignore[attr-defined]
    assert_no_leaks(service)


def test_killed_prefill_worker_mid_transfer(service, client, reference_engine):
    # Both prefill workers may serve this prompt; kill the one that did, right after its first
    # token (its push to the decode worker is in flight). The decode worker then sees a broken
    # stream and computes what it lacks: the request goes on, right.
    ids = prompt(1500, 50)
    stream = client.stream(
        prompt_token_ids=ids, max_tokens=10, temperature=0.0, ignore_eos=True, timeout=240
    )
    tokens: list[int] = []
    killed = False
    t0 = time.monotonic()
    for chunk in stream:
        tokens.extend(chunk.token_ids)
        if not killed:
            for h in service.prefill:
                ray.kill(h, no_restart=True)  # whichever served it: both, to be sure
            killed = True
        if chunk.finish_reason:
            assert chunk.usage.completion_tokens == 10
    assert time.monotonic() - t0 < 240
    assert tokens == _expected(reference_engine, ids, 10)
    # With every prefill worker gone the service says so clearly, instead of hanging.
    with pytest.raises(RemoteError) as err:
        client.generate(prompt_token_ids=[1, 2, 3], max_tokens=2, timeout=60)
    assert err.value.code == "UNAVAILABLE"
    ok, _ = client.health()
    assert not ok
    # The surviving decode worker holds no blocks once its requests ended.
    wait_no_leaks(service)
