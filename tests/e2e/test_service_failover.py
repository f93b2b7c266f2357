"""No request lost to a worker's death: two prefill and two decode workers, processes killed with
SIGKILL (Ray restarts them). A request whose decode worker dies goes on elsewhere from the tokens
already streamed, greedy and seeded alike, and equals an uninterrupted run; a request whose
prefill worker dies is computed elsewhere; the killed worker leaves placement and comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import ray

from engine.sampling import SamplingParams
from kvtransfer.config import TransferConfig
from router.client import StrataClient
from tests.e2e.conftest import TOKEN, prompt, start, wait_no_leaks

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

SEEDED = {"temperature": 0.9, "top_p": 0.9}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start(
        tmp_path_factory.mktemp("failover"),
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


def _workers(service) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in ray.get(service.router.workers.remote(), timeout=60)}


def _expected(ref, ids: list[int], n: int, seed: int | None = None) -> list[int]:
    extra = {} if seed is None else {**SEEDED, "seed": seed}
    params = SamplingParams(max_tokens=n, ignore_eos=True, **extra)
    return ref.generate([ids], params)[0].output_token_ids


def _kill(service, worker_id: str) -> int:
    pid = _workers(service)[worker_id]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_back(service, worker_id: str, old_pid: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        w = _workers(service)[worker_id]
        if w["state"] == "up" and w["pid"] != old_pid:
            return
        time.sleep(0.5)
    raise AssertionError(f"{worker_id} did not come back")


def _router_counters(client) -> dict[str, float]:
    return {k: v for k, v in client.stats()["router"].items() if k.startswith("strata_router_")}


def test_the_service_runs_at_the_usual_priority(service):
    """Ray starts its workers at niceness 15 unless told otherwise (cluster.quiet): the engines
    and the router would then lose their cores to any other process of the node."""
    for worker_id, w in _workers(service).items():
        with open(f"/proc/{w['pid']}/stat") as f:
            niceness = int(f.read().rsplit(")", 1)[1].split()[16])
        assert niceness == 0, (worker_id, niceness)


def test_decode_worker_killed_mid_decode(service, client, reference_engine):
    seeds = [None, None, 11, 12, None, 13]
    prompts = [prompt(180 + 20 * i, 70 + i) for i in range(len(seeds))]
    expected = [_expected(reference_engine, p, 80, s) for p, s in zip(prompts, seeds)]
    seen: dict[int, list[int]] = {i: [] for i in range(len(seeds))}
    finals: dict[int, object] = {}

    def run(i: int) -> None:
        extra = {"temperature": 0.0} if seeds[i] is None else {**SEEDED, "seed": seeds[i]}
        try:
            for chunk in client.stream(prompt_token_ids=prompts[i], max_tokens=80,
                                       ignore_eos=True, timeout=240, **extra):  # fmt: skip
                seen[i].extend(chunk.token_ids)
                if chunk.finish_reason:
                    finals[i] = chunk
        except Exception as e:  # asserted below: there must be none
            finals[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    victim, old_pid = None, 0
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        stats = client.stats()
        busy = [d for d in ("decode-0", "decode-1") if stats[d].get("requests_decoding", 0) >= 2]
        if busy and sum(len(v) >= 5 for v in seen.values()) >= 3:
            victim = busy[0]
            old_pid = _kill(service, victim)
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=300)
    assert victim is not None, "the batch never got going"
    for i in range(len(seeds)):
        assert not isinstance(finals[i], Exception), (i, finals[i])
        assert seen[i] == expected[i], i  # no token lost, none repeated, the same tokens
    moved = _router_counters(client)
    assert sum(v for k, v in moved.items() if "migrations_total" in k and "role=decode" in k) >= 2
    assert moved.get("strata_router_migration_tokens_recomputed_total", 0) > 0
    _wait_back(service, victim, old_pid)
    ids = prompt(300, 99)
    res = client.generate(prompt_token_ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert list(res.token_ids) == _expected(reference_engine, ids, 8)
    wait_no_leaks(service)


def test_prefill_workers_killed_mid_prefill(service, client, reference_engine):
    # Two long prompts in chunks of 256 tokens: one that decodes, one that ends at its first
    # token (nothing to decode it: it is computed again elsewhere). Both prefill workers die
    # while they compute: the decode workers compute both.
    long_ids = [prompt(2600, 80), prompt(2500, 81)]
    want = [_expected(reference_engine, ids, n) for ids, n in zip(long_ids, (6, 1))]
    out: dict[int, object] = {}

    def run(i: int, n: int) -> None:
        try:
            out[i] = client.generate(prompt_token_ids=long_ids[i], max_tokens=n, temperature=0.0,
                                     ignore_eos=True, timeout=240)  # fmt: skip
        except Exception as e:  # asserted below: there must be none
            out[i] = e

    threads = [threading.Thread(target=run, args=(0, 6)), threading.Thread(target=run, args=(1, 1))]
    for t in threads:
        t.start()
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while len(killed) < 2 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        stats = client.stats()
        for p in ("prefill-0", "prefill-1"):
            if p not in killed and stats[p].get("requests_prefill", 0) > 0:
                killed[p] = _kill(service, p)
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=300)
    assert killed, "no prefill got going"
    for i in range(2):
        assert not isinstance(out[i], Exception), (i, out[i])
        assert list(out[i].token_ids) == want[i], i  # type: ignore[attr-defined]
    moved = _router_counters(client)
    assert any("role=prefill" in k for k in moved if "migrations_total" in k)
    for p, pid in killed.items():
        _wait_back(service, p, pid)
    ids = prompt(400, 98)
    res = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert list(res.token_ids) == _expected(reference_engine, ids, 4)
    wait_no_leaks(service)
