"""A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``: a head, two
nodes offering ``prefill``, two offering ``decode``), the service started on it the way the
README says (``strata up --address ... --detach``): roles land on their nodes, workers advertise
their node's address and the KV moves between nodes over gRPC there, placement follows the
prefix across nodes, a worker whose process is killed comes back (its disk tier served again),
``strata scale`` changes the worker counts, a removed node's requests end in time."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from engine.sampling import SamplingParams
from router.client import StrataClient
from router.errors import RemoteError
from tests.e2e.conftest import TOKEN, prompt, strata_cli

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        "prefill": [c.add_node(num_cpus=1, resources={"prefill": 1}) for _ in range(2)],
        "decode": [c.add_node(num_cpus=1, resources={"decode": 1}) for _ in range(2)],
    }
    c.wait_for_nodes()
    cfg = tmp_path_factory.mktemp("multinode") / "svc.yaml"
    disk = tmp_path_factory.mktemp("multinode-kv")
    cfg.write_text(
        "num_prefill: 2\nnum_decode: 2\nsecret: multi-node-secret\n"
        "engine: {model: tiny, kv_cache_bytes: 16M, max_model_len: 4096,"
        " max_num_batched_tokens: 256}\n"
        f"store: {{host_capacity_bytes: 16M, disk_path: {disk}, disk_capacity_bytes: 256M}}\n"
        f"router: {{port: 0, auth_token: {TOKEN}}}\n"
        "backend: {transfer_timeout_s: 10}\n"
        "transfer: {shm_bytes: 0}\n"  # one machine, but the bytes take the cross-node path
    )
    up = strata_cli("up", "--address", c.address, "--config", str(cfg), "--detach", timeout=600)
    assert up.returncode == 0, up.stderr
    address = next(
        line.split()[4] for line in up.stdout.splitlines() if "serving gRPC on" in line
    )
    ray.init(address=c.address, namespace="strata")
    yield c, nodes, address
    down = strata_cli("down", "--address", c.address, timeout=600)
    assert down.returncode == 0, down.stderr
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def router(cluster):
    return ray.get_actor("strata-router")


@pytest.fixture(scope="module")
def client(cluster):
    with StrataClient(cluster[2], token=TOKEN) as c:
        yield c


def _workers(router) -> dict[str, dict]:
    return {w["worker_id"]: w for w in ray.get(router.workers.remote(), timeout=60)}


def _expected(ref, ids: list[int], n: int) -> list[int]:
    return ref.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].output_token_ids


def test_roles_land_on_their_nodes_and_advertise_node_addresses(cluster, router) -> None:
    c, nodes, _ = cluster
    router_node = ray.get(
        router.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()), timeout=60
    )
    assert router_node == c.head_node.node_id  # where `strata up` ran, not a worker node
    node_of_role = {role: {n.node_id for n in ns} for role, ns in nodes.items()}
    workers = _workers(router)
    assert sorted(workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    for w in workers.values():
        assert w["node_id"] in node_of_role[w["role"]], w
        host = w["kv_address"].rsplit(":", 1)[0]
        assert host not in ("0.0.0.0", "127.0.0.1", "::"), w  # reachable from other nodes
    assert len({w["node_id"] for w in workers.values()}) == 4  # one worker a node


def test_greedy_across_nodes_and_placement_by_prefix(cluster, router, client,
                                                     reference_engine) -> None:
    shared = prompt(900, 70)  # 4 chunks, pushed between nodes over gRPC
    first = client.generate(prompt_token_ids=shared + [5], max_tokens=8, temperature=0.0,
                            ignore_eos=True)
    assert list(first.token_ids) == _expected(reference_engine, shared + [5], 8)
    holder = first.usage.prefill_worker
    ray.get(router.sync_index.remote(), timeout=60)
    for i in range(2):
        ids = shared + prompt(20, 71 + i)
        res = client.generate(prompt_token_ids=ids, max_tokens=6, temperature=0.0,
                              ignore_eos=True)
        assert res.usage.prefill_worker == holder and res.usage.cached_tokens >= 896
        assert list(res.token_ids) == _expected(reference_engine, ids, 6)
        ray.get(router.sync_index.remote(), timeout=60)
    stats = client.stats()
    assert sum(stats[p]["push_bytes"] for p in ("prefill-0", "prefill-1")) > 0
    assert all(stats[p]["push_shm_bytes"] == 0 for p in ("prefill-0", "prefill-1"))


def test_killed_worker_comes_back_and_serves_its_disk_tier(cluster, router, client,
                                                           reference_engine) -> None:
    ids = prompt(640, 80)
    cold = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0, ignore_eos=True)
    holder = cold.usage.prefill_worker
    handle = ray.get_actor(f"strata-{holder}")
    ray.get(handle.evict_cached.remote("disk"), timeout=60)  # its blocks only on disk now
    old = _workers(router)[holder]
    os.kill(old["pid"], signal.SIGKILL)  # the process dies; Ray restarts the actor
    t0 = time.monotonic()
    while True:
        w = _workers(router)[holder]
        if w["state"] == "up" and w["restarts"] == 1:
            break
        assert time.monotonic() - t0 < 120, w
        time.sleep(0.5)
    print(f"{holder} back after {time.monotonic() - t0:.1f} s (pid {old['pid']} -> {w['pid']})")
    assert w["pid"] != old["pid"]
    res = client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert res.usage.prefill_worker == holder  # the rebuilt index knows its disk blocks
    assert res.usage.cached_tokens_by_tier.get("disk", 0) + res.usage.cached_tokens_by_tier.get(
        "host", 0
    ) >= 624
    assert list(res.token_ids) == list(cold.token_ids) == _expected(reference_engine, ids, 4)


def test_scale_down_and_up(cluster, router, client, reference_engine) -> None:
    c, _, _ = cluster
    down = strata_cli("scale", "--address", c.address, "--decode", "1", timeout=600)
    assert down.returncode == 0, down.stderr
    assert "removed ['decode-1']" in down.stdout
    live = [w for w in _workers(router).values() if w["state"] != "gone"]
    assert sorted(w["worker_id"] for w in live) == ["decode-0", "prefill-0", "prefill-1"]
    ids = prompt(100, 90)
    res = client.generate(prompt_token_ids=ids, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert res.usage.decode_worker == "decode-0"
    up = strata_cli("scale", "--address", c.address, "--decode", "2", timeout=600)
    assert up.returncode == 0, up.stderr
    assert "added ['decode-1']" in up.stdout and "2 prefill + 2 decode" in up.stdout
    assert list(res.token_ids) == _expected(reference_engine, ids, 5)


def test_removed_node_ends_its_requests_in_time(cluster, router, client) -> None:
    c, nodes, _ = cluster
    workers = _workers(router)
    victim_node = next(n for n in nodes["decode"] if n.node_id == workers["decode-0"]["node_id"])
    stream = client.stream(prompt_token_ids=prompt(150, 95), max_tokens=400, temperature=0.0,
                           ignore_eos=True, timeout=180)
    t0 = time.monotonic()
    got: list[int] = []
    outcome = "finished"
    try:
        for chunk in stream:
            got.extend(chunk.token_ids)
            if len(got) == 3:
                c.remove_node(victim_node)
    except RemoteError as e:
        outcome = e.code
    assert outcome in ("finished", "UNAVAILABLE"), outcome
    assert time.monotonic() - t0 < 180
    ok, _ = client.health()
    assert ok  # the other decode worker serves on
    res = client.generate(prompt_token_ids=prompt(60, 96), max_tokens=3, temperature=0.0)
    assert len(res.token_ids) == 3
