"""The service across hosts that are really separate (``cluster/testbed``): a head, three worker
hosts and a client, each with its own network namespace (an address on one bridge), mount
namespace (its own /dev/shm and /tmp) and hostname; Ray started on them with ``ray start`` as
the README says, the service with ``strata up --address auto`` on the head, requests from the
client host over gRPC and HTTP.

host-a offers one ``prefill`` and one ``decode`` unit (two workers that really share a host),
host-b one ``prefill``, host-c one ``decode``. What holds: the hosts are separate; roles land on
their hosts and every worker advertises its host's address; greedy outputs equal the in-process
engine; the KV crosses hosts over gRPC (at a measured rate) and takes the shared-memory path only
between the two workers of host-a; placement follows the prefix across hosts; ``strata bench
ttft --server`` and ``strata bench soak --server`` run against it from the client host; nothing
of the cluster is left after it is torn down, even when the process that built it is killed.
The network faults are in ``test_multihost_faults.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib

import pytest

from cluster.testbed.cluster import CLIENT, HEAD
from cluster.testbed.host import ROOT, Host, Lan, unavailable
from engine.sampling import SamplingParams
from tests.e2e.conftest import prompt
from tests.e2e.multihost_util import TOKEN, MultiHost, build

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


@pytest.fixture(scope="module", name="testbed")
def _testbed(tmp_path_factory):
    yield from build(str(tmp_path_factory.mktemp("hosts")))


def _expected(ref, ids: list[int], n: int) -> list[int]:
    return ref.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].output_token_ids


def test_hosts_are_separate(testbed: MultiHost) -> None:
    tb = testbed.tb
    seen: dict[str, list[str]] = {}
    probe = ("import os, socket; from kvtransfer.shm import host_id;"
             "print(socket.gethostname(), host_id(), os.stat('/dev/shm').st_dev)")
    for name, host in tb.hosts.items():
        host.run(["sh", "-c", f"echo {name} > /tmp/whoami"])
    for name, host in tb.hosts.items():
        seen[name] = host.run([sys.executable, "-c", probe]).stdout.split()
        assert seen[name][0] == name  # its hostname
        assert host.run(["cat", "/tmp/whoami"]).stdout.strip() == name  # its own /tmp
        links = host.run(["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"inet {host.address}/24" in links and links.count("inet ") == 2  # lo + eth0
        assert host.run(["ip", "route", "show", "default"]).stdout.strip() == ""  # no way out
    assert len({s[1] for s in seen.values()}) == len(seen)  # a distinct host id each
    assert len({s[2] for s in seen.values()}) == len(seen)  # a /dev/shm each
    # The router's port is reachable at the head's address, but its loopback is its own.
    check = ("import socket, sys\ntry:\n socket.create_connection((sys.argv[1], 50051), 3)"
             "\n print('open')\nexcept OSError as e:\n print(type(e).__name__)")
    client = tb.hosts[CLIENT]
    assert client.run([sys.executable, "-c", check, tb.hosts[HEAD].address]).stdout.strip() == (
        "open")
    assert client.run([sys.executable, "-c", check, "127.0.0.1"]).stdout.strip() == (
        "ConnectionRefusedError")


def test_roles_on_their_hosts_and_addresses_advertised(testbed: MultiHost) -> None:
    tb = testbed.tb
    workers = testbed.workers()
    assert sorted(workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    node_ips = testbed.head.call("node_ips")
    for wid, w in workers.items():
        host = testbed.host_of(w)  # the address it advertises is its host's
        assert node_ips[w["node_id"]] == tb.hosts[host].address, w
        spec = tb.specs[host]
        assert (spec.prefill if w["role"] == "prefill" else spec.decode) >= 1, (wid, host)
    hosts = {wid: testbed.host_of(w) for wid, w in workers.items()}
    assert sorted(hosts.values()) == ["host-a", "host-a", "host-b", "host-c"]
    assert testbed.grpc == f"{tb.hosts[HEAD].address}:50051"  # not a name clients can't resolve


def test_greedy_over_grpc_and_http_equals_in_process(testbed: MultiHost,
                                                     reference_engine) -> None:
    from textproc.tokenizer import load_tokenizer

    for i, n in enumerate((700, 40)):  # 700: three chunks, pushed block by block as they end
        ids = prompt(n, 300 + i)
        res = testbed.generate(ids, 8, request_id=f"greedy-{i}")
        assert res["status"] == "OK", res
        assert res["tokens"] == _expected(reference_engine, ids, 8)
    ids = prompt(200, 310)
    want = _expected(reference_engine, ids, 6)
    out = testbed.client.call("http_post", url=f"http://{testbed.http}/v1/completions",
                              token=TOKEN, body={"model": "tiny", "prompt": ids,
                                                 "max_tokens": 6, "temperature": 0,
                                                 "ignore_eos": True})
    assert out["status"] == 200
    assert out["body"]["choices"][0]["text"] == load_tokenizer("tiny").decode(want)


def _push_delta(testbed: MultiHost, before: dict, workers: list[str]) -> dict[str, dict]:
    """What each prefill worker pushed since ``before`` (its counters land just after the
    request's end: polled until every one of ``workers`` pushed)."""
    keys = ("push_bytes", "push_shm_bytes", "push_seconds", "push_frames")
    for _ in range(40):
        now = testbed.stats()
        delta = {p: {k: now[p][k] - before[p][k] for k in keys}
                 for p in now if p.startswith("prefill")}
        if all(delta[p]["push_frames"] > 0 for p in workers):
            return delta
        time.sleep(0.25)
    raise AssertionError(f"no push counted for {workers}: {delta}")


def test_kv_between_hosts_over_grpc_and_shm_only_within_a_host(testbed: MultiHost) -> None:
    """A pair of workers on two hosts moves every byte in gRPC frames; the pair on host-a
    through shared memory (from the moment the receiver confirmed the segment: the first frames
    may go inline). Placement decides the pairs: an idle service gives a new prompt to the
    prefill worker measured fastest and the first decode worker; a long request holding that
    decode worker sends the next ones to the other. One request at a time, each push read from
    its prefill worker's counters; then, if the fastest prefill worker is not host-a's, a burst
    of concurrent requests (queues spread them over both prefill workers; up to three bursts,
    as a fast service may finish one before a queue builds up)."""
    hosts = {wid: testbed.host_of(w) for wid, w in testbed.workers().items()}
    seen: dict[str, list[dict]] = {"same host": [], "across hosts": []}

    def probe(tag: str) -> None:
        before = testbed.stats()
        res = testbed.generate(prompt(1200, zlib.crc32(tag.encode())), 2, request_id=tag)
        assert res["status"] == "OK", res
        p, d = res["usage"]["prefill_worker"], res["usage"]["decode_worker"]
        delta = _push_delta(testbed, before, [p])[p]
        assert delta["push_bytes"] > 0, (p, d, delta)
        if hosts[p] != hosts[d]:
            assert delta["push_shm_bytes"] == 0, (p, d, hosts, delta)  # never across hosts
            seen["across hosts"].append(delta)
        else:
            assert delta["push_shm_bytes"] > 0, (p, d, delta)
            seen["same host"].append(delta)

    probe("kv-idle")
    testbed.client.call("load_start", name="busy", address=testbed.grpc, token=TOKEN,
                        requests=[{"ids": prompt(64, 399), "max_tokens": 3000}],
                        concurrency=1, timeout=300)
    try:
        testbed.tb.wait_until("the long request streaming", lambda: testbed.client.call(
            "load_progress", name="busy")["tokens"] > 2, timeout=60, every=0.2)
        probe("kv-busy")
    finally:
        testbed.client.call("load_stop", name="busy")
        testbed.client.call("load_wait", name="busy", timeout=60)
    for burst in range(3):  # queues spread a burst only when they build up: up to 3 bursts
        if seen["same host"]:
            break
        before = testbed.stats()
        reqs = [{"ids": prompt(1200, 450 + 10 * burst + i), "max_tokens": 2,
                 "request_id": f"kv-burst-{burst}-{i}"} for i in range(8)]
        testbed.client.call("load_start", name="burst", address=testbed.grpc, token=TOKEN,
                            requests=reqs, concurrency=4, timeout=120)
        recs = testbed.client.call("load_wait", name="burst", timeout=180, call_timeout=240)
        assert all(r["status"] == "OK" for r in recs), recs
        pairs = {(r["usage"]["prefill_worker"], r["usage"]["decode_worker"]) for r in recs}
        prefills = sorted({p for p, _ in pairs})
        delta = _push_delta(testbed, before, prefills)
        for p in prefills:
            partners = {hosts[d] for q, d in pairs if q == p}
            if hosts[p] in partners:  # it pushed to the decode worker of its own host
                assert delta[p]["push_shm_bytes"] > 0, (p, pairs, delta)
                seen["same host"].append(delta[p])
            else:  # only to other hosts: not a byte through /dev/shm
                assert delta[p]["push_shm_bytes"] == 0, (p, pairs, delta)
    nbytes = sum(d["push_bytes"] for d in seen["across hosts"])
    secs = sum(d["push_seconds"] for d in seen["across hosts"])
    print(f"\nKV between hosts over gRPC: {nbytes / 1e6:.1f} MB in {secs:.3f} s on the wire, "
          f"{nbytes / max(secs, 1e-9) / 1e9:.2f} GB/s (hosts {hosts})")
    assert seen["across hosts"] and seen["same host"], (hosts, seen)


def test_placement_follows_the_prefix_across_hosts(testbed: MultiHost,
                                                   reference_engine) -> None:
    shared = prompt(900, 500)
    first = testbed.generate(shared + [5], 4, request_id="prefix-0")
    assert first["status"] == "OK" and first["tokens"] == _expected(reference_engine,
                                                                    shared + [5], 4)
    holder = first["usage"]["prefill_worker"]
    testbed.head.call("router_call", method="sync_index", args=[])
    for i in range(2):
        ids = shared + prompt(20, 501 + i)
        res = testbed.generate(ids, 4, request_id=f"prefix-{i + 1}")
        assert res["usage"]["prefill_worker"] == holder
        assert res["usage"]["cached_tokens"] >= 896
        assert res["tokens"] == _expected(reference_engine, ids, 4)
        testbed.head.call("router_call", method="sync_index", args=[])
    assert all(testbed.wait_no_leaks().values())


def test_bench_ttft_and_soak_against_it(testbed: MultiHost) -> None:
    """``strata bench ttft --server`` and ``strata bench soak --server`` from the client host."""
    import glob

    tb = testbed.tb
    out = "/tmp/bench"  # in the client host's /tmp
    ttft = tb.strata(CLIENT, "bench", "ttft", "--server", testbed.grpc, "--token", TOKEN,
                     "--lengths", "256", "--repeats", "1", "--no-progress", "--out", out)
    assert ttft.returncode == 0, ttft.stderr[-3000:]
    soak = tb.strata(CLIENT, "bench", "soak", "--server", testbed.grpc, "--token", TOKEN,
                     "--seconds", "12", "--clients", "2", "--prefix-tokens", "128",
                     "--no-kill", "--no-progress", "--out", out)
    assert soak.returncode == 0, soak.stderr[-3000:]
    from bench import run_files

    # a run writes a summary JSON and its samples beside it; load() puts them back together
    results = {os.path.basename(f).split("-")[0]: run_files.load(f)
               for f in glob.glob(os.path.join(tb.hosts[CLIENT].tmp, "bench", "*.json"))}
    assert {s["mode"] for s in results["ttft"]["samples"]} == {"cold", "warm"}
    warm = [s for s in results["ttft"]["samples"] if s["mode"] == "warm"]
    cold = [s for s in results["ttft"]["samples"] if s["mode"] == "cold"]
    assert all(w["num_cached_tokens"] >= 240 for w in warm)
    assert [w["output_token_ids"] for w in warm] == [c["output_token_ids"] for c in cold]
    r = results["soak"]["runs"][0]
    assert r["num_requests"] > 0 and r["by_status"].get("OK", 0) > 0, r["by_status"]
    assert r["wrong_outputs"] == 0 and r["hung_requests"] == 0, soak.stdout
    assert not r["leaks"]["leaking"] and r["leaks"]["workers_checked"] == 4, r["leaks"]


def test_nothing_is_left_when_the_builder_is_killed(tmp_path) -> None:
    """A process that made two hosts and a bridge is killed (SIGKILL, no clean-up of its own):
    its hosts' processes, namespaces and links all go with it."""
    code = (
        "import sys, time\n"
        "from cluster.testbed.host import Host, Lan\n"
        "lan = Lan()\n"
        "hosts = [Host(f'h{i}', f'10.77.9.{i + 1}', sys.argv[1] + f'/h{i}') for i in range(2)]\n"
        "for h in hosts: lan.plug(h)\n"
        "s = hosts[0].spawn(['sleep', '600'])\n"
        "print(lan.pid, *[h.pid for h in hosts], flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout is not None
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3 and all(os.path.exists(f"/proc/{p}") for p in pids)
    netns = {os.readlink(f"/proc/{p}/ns/net") for p in pids}
    assert len(netns) == 3 and os.readlink("/proc/self/ns/net") not in netns
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    end = time.monotonic() + 30
    while any(_running(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]
    left = [p for p in os.listdir("/proc") if p.isdigit() and _netns_of(p) in netns]
    assert not left  # no process holds any of those network namespaces


def _running(pid: int) -> bool:
    """A process that exists and has not ended (a zombie waits only for its parent to reap
    it: under a PID 1 that does not reap, orphans stay zombies)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _netns_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def test_a_host_and_its_bridge_close_cleanly(tmp_path) -> None:
    lan = Lan()
    host = Host("solo", "10.77.9.9", str(tmp_path / "solo"))
    try:
        lan.plug(host)
        assert host.run(["hostname"]).stdout.strip() == "solo"
        inside = host.spawn(["sleep", "600"])
    finally:
        host.close()
        lan.close()
    inside.wait(timeout=30)  # the host's processes die with it
    assert not _running(host.pid) and not _running(lan.pid)
