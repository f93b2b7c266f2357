"""The engine over the tiered store: a prefix served from the device pool, the host slab or the
LMDB disk tier gives exactly the tokens of a cold recompute."""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import time

import pytest

from engine.loop import EngineLoop, RequestAborted
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig
from tests.kvstore.kvstore_testutil import flip_payload_byte

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _store(tmp_path, **kw) -> StoreConfig:
    return StoreConfig(
        host_capacity_bytes=kw.pop("host", 8 << 20),
        disk_path=str(tmp_path / "lmdb"),
        disk_capacity_bytes=kw.pop("disk", 64 << 20),
        **kw,
    )


def test_every_tier_gives_the_cold_tokens(tmp_path, make_engine):
    eng = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    prompt = _prompt(700, 1)
    full = (len(prompt) - 1) // 16 * 16
    cold = eng.generate([prompt], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    warm_dev = eng.generate([prompt], GREEDY)[0]
    assert warm_dev.cached_by_tier == {"device": full}
    eng.evict_cached("host")
    warm_host = eng.generate([prompt], GREEDY)[0]
    assert warm_host.cached_by_tier == {"host": full}
    eng.evict_cached("disk")
    assert set(eng.store.lookup(eng.block_hashes(prompt))) == {"disk"}
    warm_disk = eng.generate([prompt], GREEDY)[0]
    assert warm_disk.cached_by_tier == {"disk": full}
    for warm in (warm_dev, warm_host, warm_disk):
        assert warm.output_token_ids == cold.output_token_ids
    # the load from the store is timed inside the TTFT; nothing loads cold or from the pool
    assert cold.load_s == warm_dev.load_s == 0.0
    assert 0 < warm_disk.load_s <= warm_disk.ttft_s
    assert 0 <= warm_host.load_s <= warm_host.ttft_s


def test_partial_prefix_mixed_tiers(tmp_path, make_engine):
    eng = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    shared = _prompt(320, 2)
    a, b = shared + _prompt(50, 3), shared + _prompt(90, 4)
    eng.generate([a], GREEDY)
    eng.evict_cached("disk")
    out = eng.generate([b], GREEDY)[0]
    assert out.cached_by_tier == {"disk": 320}
    ref = make_engine(model="tiny", kv_cache_bytes=8 << 20, enable_prefix_caching=False)
    assert out.output_token_ids == ref.generate([b], GREEDY)[0].output_token_ids


def test_restart_serves_disk_blocks_and_other_models_never_see_them(tmp_path, make_engine):
    prompt = _prompt(400, 5)
    first = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    cold = first.generate([prompt], GREEDY)[0]
    first.close()
    again = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    warm = again.generate([prompt], GREEDY)[0]
    assert warm.cached_by_tier == {"disk": 384}
    assert warm.output_token_ids == cold.output_token_ids
    again.close()
    other = make_engine(_store(tmp_path), model="tiny", seed=1, kv_cache_bytes=8 << 20)
    assert other.generate([prompt], GREEDY)[0].num_cached_tokens == 0


def test_corrupt_disk_block_is_recomputed(tmp_path, make_engine):
    """A checksum failure in the middle of a lease: that block and every one after it are
    recomputed, and the output is the cold one."""
    prompt = _prompt(400, 6)
    first = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    cold = first.generate([prompt], GREEDY)[0]
    victim = first.block_hashes(prompt)[10]
    first.close()
    flip_payload_byte(str(tmp_path / "lmdb"), victim)
    again = make_engine(_store(tmp_path), model="tiny", kv_cache_bytes=8 << 20)
    out = again.generate([prompt], GREEDY)[0]
    assert out.cached_by_tier == {"disk": 160}  # blocks 0..9, the corrupt 11th ends the prefix
    assert out.output_token_ids == cold.output_token_ids
    assert again.store.stats()["disk"]["corrupt_blocks"] == 1
    assert again.kv.num_hits_recomputed == 24 - 10  # the 14 hits from block 10 on


@pytest.mark.slow
def test_second_cli_process_reuses_the_first_ones_blocks(tmp_path):
    disk = str(tmp_path / "cli-lmdb")
    ids = ",".join(str(t) for t in _prompt(300, 7))
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "generate",
        "--prompt-ids",
        ids,
        "--max-tokens",
        "8",
        "--disk-path",
        disk,
        "--device-capacity",
        "8M",
        "--json",
    ]
    outs = [
        json.loads(
            subprocess.run(
                cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=300
            ).stdout
        )
        for _ in range(2)
    ]
    assert outs[0]["cached_tokens"] == 0
    assert outs[1]["cached_tokens_by_tier"] == {"disk": 288}
    assert outs[1]["output_token_ids"] == outs[0]["output_token_ids"]


def _warm_on_disk(tmp_path, make_engine, prompt, **store_kw):
    eng = make_engine(_store(tmp_path, **store_kw), model="tiny", kv_cache_bytes=8 << 20)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.evict_cached("disk")
    return eng, cold


def test_slow_disk_is_recomputed_not_loaded(tmp_path, make_engine):
    """Load-or-recompute: a disk far slower than recomputing is not read at all."""
    prompt = _prompt(500, 8)
    eng, cold = _warm_on_disk(tmp_path, make_engine, prompt, disk_read_limit_bytes_per_s=64e3)
    blk = eng.layout.block_nbytes
    eng.kv.speeds.set_prefill(1e6)  # a block of 16 tokens recomputes in 16 us
    eng.kv.speeds.set_tier("disk", blk / 10.0)  # and loads in 10 s
    read_before = eng.store.stats()["disk"]["read_bytes"]
    slow = eng.generate([prompt], GREEDY)[0]
    assert slow.num_cached_tokens == 0 and eng.kv.num_hits_recomputed == 31
    assert eng.store.stats()["disk"]["read_bytes"] == read_before  # not one block read
    assert slow.output_token_ids == cold.output_token_ids


def test_split_computes_the_head_while_the_tail_loads(tmp_path, make_engine):
    """Disk and compute of comparable speed: the head is computed while the tail loads from a
    throttled disk, and the output is the cold one."""
    prompt = _prompt(500, 9)
    eng, cold = _warm_on_disk(tmp_path, make_engine, prompt, disk_read_limit_bytes_per_s=256e3)
    blk = eng.layout.block_nbytes
    eng.kv.speeds.set_prefill(16.0)  # one block of 16 tokens recomputes in 1 s
    eng.kv.speeds.set_tier("disk", blk / 10.0)  # and loads in 10 s: compute 29, load 2
    plan = eng.kv.plan_load(["disk"] * 31, len(prompt))
    assert (plan.num_head_blocks, plan.num_load_blocks) == (29, 2)
    out = eng.generate([prompt], GREEDY)[0]
    assert eng.kv.num_split_loads == 1 and eng.kv.loader.num_cut_by_deadline == 0
    assert out.cached_by_tier == {"disk": 32}  # the tail: blocks 29 and 30
    assert out.output_token_ids == cold.output_token_ids


def test_a_load_past_its_deadline_is_recomputed(tmp_path, make_engine):
    """The disk is far slower than measured: the load stops waiting at its deadline and the
    blocks that did not arrive are computed."""
    prompt = _prompt(500, 10)
    eng, cold = _warm_on_disk(tmp_path, make_engine, prompt, disk_read_limit_bytes_per_s=32e3)
    eng.kv.speeds.set_prefill(1000.0)
    eng.kv.speeds.set_tier("disk", 1e9)  # predicted: 1 ms for the 31 blocks
    out = eng.generate([prompt], GREEDY)[0]
    assert eng.kv.loader.num_cut_by_deadline == 1
    assert out.cached_by_tier.get("disk", 0) < 496  # a block of 32 KiB takes ~1 s
    assert out.output_token_ids == cold.output_token_ids


def test_a_short_request_runs_while_a_long_disk_load_is_under_way(tmp_path, make_engine):
    """A long prompt's prefix loads from a disk throttled to a crawl; a short request submitted
    after it is computed and finished, all its tokens, while that load is still under way."""
    long_prompt, short_prompt = _prompt(800, 11), _prompt(40, 12)
    eng, _ = _warm_on_disk(tmp_path, make_engine, long_prompt, disk_read_limit_bytes_per_s=4e3)
    eng.kv.speeds.set_prefill(None)  # unknown: every hit is loaded, with no deadline
    ref = make_engine(model="tiny", kv_cache_bytes=8 << 20, enable_prefix_caching=False)
    expected = ref.generate([short_prompt], GREEDY)[0].output_token_ids
    loop = EngineLoop(eng, name="load-loop")
    try:
        long_stream = loop.submit("long", long_prompt, GREEDY)
        deadline = time.monotonic() + 30
        while loop.call(lambda e: e.kv.num_loading) != 1:
            assert time.monotonic() < deadline, "the long request's load never started"
            time.sleep(0.01)
        short = list(loop.submit("short", short_prompt, GREEDY).iter(timeout=60))
        assert [t for out in short for t in out.new_token_ids] == expected
        assert short[-1].finished and short[0].ttft_s is not None
        assert loop.call(lambda e: e.kv.num_loading) == 1  # the long load is still running
        with pytest.raises(queue.Empty):
            long_stream.get(timeout=0)  # and the long request has no token yet
        loop.abort("long")
        with pytest.raises(RequestAborted):
            long_stream.get(timeout=30)
    finally:
        loop.close()
