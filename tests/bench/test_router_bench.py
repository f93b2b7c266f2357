"""strata bench router: the simulated workers against hand-computed hits and TTFTs, and a small
run of the whole benchmark with its JSON checked."""

from __future__ import annotations

import glob
import json
import os
import random

import numpy as np
import pytest

from bench import cli, router
from bench.router_replay import Workload, replay
from bench.router_sim import SimProfile, SimStore, TraceHasher
from bench.trace_data import TraceRequest, load_trace
from kvstore.keys import hash_prompt_blocks

MB = 1 << 20


def _trace(tmp_path, reqs: list[dict]) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return str(path)


def test_trace_hashes_are_the_real_chained_block_hashes() -> None:
    hasher = TraceHasher(16)
    req = TraceRequest(0.0, 512 * 3 - 5, 1, (7, 3, 9))
    tokens = np.concatenate([hasher.tokens(h) for h in req.hash_ids])[: req.input_length]
    assert hasher.hashes(req) == hash_prompt_blocks(tokens, 16, b"strata-bench-rtr")
    assert len(hasher.hashes(req)) == (512 * 3 - 5) // 16
    # a shared hash_id prefix gives shared blocks, a different parent different ones
    other = hasher.hashes(TraceRequest(0.0, 1024, 1, (7, 4)))
    assert other[:32] == hasher.hashes(req)[:32] and other[32] != hasher.hashes(req)[32]


def test_hit_rate_and_ttft_equal_hand_computed(tmp_path) -> None:
    # r0 fills the pool with its 64 blocks (freed tail first); r1 needs 32 more blocks of a
    # 70-block pool, evicting r0's last 26 (they stay in host); r2 repeats r0: its first 38
    # blocks come from the pool, the next 25 from host (the last token is computed).
    path = _trace(tmp_path, [
        {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},
        {"timestamp": 10_000, "input_length": 512, "output_length": 1, "hash_ids": [5]},
        {"timestamp": 20_000, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},
    ])
    profile = SimProfile(block_nbytes=MB, prefill_tokens_per_s=1000.0, host_bytes_per_s=1e9,
                         disk_bytes_per_s=1e8, net_bytes_per_s=0.0, device_blocks=70,
                         host_blocks=1000, disk_blocks=1000)
    work = Workload.from_trace(load_trace(path), 16)
    assert work.unbounded_blocks == [0, 0, 63]
    for policy in ("prefix-aware", "load-only", "random"):  # one worker: the same for all
        r = replay(work, 1, policy, profile)
        assert r.served_tokens == {"device": 38 * 16, "host": 25 * 16, "disk": 0, "remote": 0}
        assert r.ttft_s == pytest.approx([1.024, 0.512, 25 * MB / 1e9 + 16 / 1000])


def test_prefix_aware_follows_the_prefix_unless_the_queue_says_otherwise(tmp_path) -> None:
    # r0 puts prefix A (128 blocks) on sim-0000; r1 (D, 256 blocks) arrives with it and goes
    # to the idle sim-0001; r2 (long, no prefix) goes to sim-0000, which caches fewer blocks;
    # r3 (A again) would wait behind r2 on the holder (1 x 2.048 s observed + 0.016 s) and is
    # faster recomputed on the idle sim-0001 (2.048 s); r4 (A, everyone idle, both hold it)
    # goes to the one caching fewer blocks and computes only its last block.
    a = [1, 2, 3, 4]
    path = _trace(tmp_path, [
        {"timestamp": 0, "input_length": 2048, "output_length": 1, "hash_ids": a},
        {"timestamp": 0, "input_length": 4096, "output_length": 1, "hash_ids": list(range(50, 58))},
        {"timestamp": 5_000, "input_length": 8192, "output_length": 1,
         "hash_ids": list(range(9, 25))},
        {"timestamp": 5_001, "input_length": 2048, "output_length": 1, "hash_ids": a},
        {"timestamp": 20_000, "input_length": 2048, "output_length": 1, "hash_ids": a},
    ])
    profile = SimProfile(block_nbytes=MB, prefill_tokens_per_s=1000.0, net_bytes_per_s=0.0)
    work = Workload.from_trace(load_trace(path), 16)
    r = replay(work, 2, "prefix-aware", profile)
    assert r.placed == ["sim-0000", "sim-0001", "sim-0000", "sim-0001", "sim-0001"]
    assert r.ttft_s == pytest.approx([2.048, 4.096, 8.192, 2.048, 0.016])
    assert r.served_tokens["device"] == 127 * 16
    assert r.held_tokens == 127 * 16


def test_sim_store_evicts_demotes_and_refuses_like_the_tiers() -> None:
    store = SimStore(SimProfile(device_blocks=4, host_blocks=2, disk_blocks=3))
    hs = [bytes([i]) * 16 for i in range(6)]
    store.serve(hs[:4], [], 0)  # computed: pool 4; host and disk take what fits
    assert list(store.host) == hs[:2] and list(store.disk) == hs[:3]
    store.drain()
    # two more blocks: the pool evicts its LRU blocks (hs[3], hs[2]: freed tail first);
    # hs[3] is nowhere below, so it is demoted: host evicts hs[0] for it, disk drops hs[0]
    store.serve(hs[4:], [], 0)
    assert list(store.device) == [hs[1], hs[0], hs[5], hs[4]]
    assert list(store.host) == [hs[4], hs[5]] and list(store.disk) == [hs[3], hs[4], hs[5]]
    assert store.lookup([hs[2]]) == [] and store.lookup(hs[:2]) == ["device", "device"]
    events = [(e.kind, e.tier, e.block_hashes) for e in store.drain()]
    assert events[0] == ("removed", "device", (hs[3], hs[2]))
    assert ("removed", "disk", (hs[0],)) in events and ("stored", "disk", (hs[3],)) in events


def test_bench_router_small_run(tmp_path) -> None:
    # 40 requests over three shared documents, each with a private tail
    rng = random.Random(0)
    reqs = []
    for i in range(40):
        doc = 1000 * rng.randrange(3)
        ids = [doc + j for j in range(rng.randrange(2, 8))] + [10_000 + i]
        reqs.append({"timestamp": 150 * i, "input_length": 512 * len(ids) - rng.randrange(300),
                     "output_length": 1, "hash_ids": ids})
    argv = ["router", "--trace", _trace(tmp_path, reqs), "--workers", "2,4", "--repeats", "1",
            "--samples", "3", "--ref-samples", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    [path] = glob.glob(os.path.join(tmp_path, "router-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 1000
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert data["trace"]["requests"] == 40
    unbounded = data["trace"]["unbounded_hit_rate"]
    assert 0.0 < unbounded < 1.0
    assert [r["workers"] for r in data["rows"]] == [2, 4]
    for row in data["rows"]:
        for key in ("placement_p50_ms", "placement_p99_ms", "mixed_p50_ms", "events_per_s",
                    "index_bytes", "index_bytes_per_mblock"):
            assert row[key] > 0 and row["before"][key] > 0
        assert row["placement_p50_ms"] <= row["placement_p99_ms"]
        assert row["placement_first_call_ms"] > 0  # timed apart, not pooled
        assert row["placements_agree"] is True and row["ttft_over_reference"] == {}
        assert set(row["placement_ms"]) == {"none", "one", "quarter", "all", "mixed"}
        for pol in ("prefix-aware", "load-only", "random"):
            p = row["policies"][pol]
            assert p["ttft_s"]["count"] == 40
            hr = p["hit_rate"]
            assert hr["total"] == pytest.approx(sum(v for k, v in hr.items() if k != "total"))
            assert 0.0 <= hr["total"] <= unbounded + 1e-9
        assert row["policies"]["prefix-aware"]["hit_rate"]["total"] > 0
    assert router.main(["--workers", "8,x", "--no-progress"]) == 2  # a clear error, no run
