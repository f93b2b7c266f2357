"""The engine's copies between pool and slab in their CPU form (copy lanes on threads), raced.

A lane is held shut by a copy that waits on an event, so the engine's own copies queue behind
it: that is a copy "in flight" for as long as the test likes. After every test the fixture
checks every block, lease and reservation was given back.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from engine.sampling import SamplingParams
from kvstore.config import StoreConfig

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _engine(make_engine, tmp_path, **store_kw):
    pool = store_kw.pop("pool", 4 << 20)
    store = StoreConfig(host_capacity_bytes=store_kw.pop("host", 8 << 20),
                        disk_path=str(tmp_path / "lmdb"), **store_kw)
    return make_engine(store, model="tiny", kv_cache_bytes=pool)


def _hold_lane(eng, lane: str) -> threading.Event:
    gate = threading.Event()
    eng.kv.copier.copies.submit(lane, lambda: gate.wait(30))
    return gate


def _until(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_offload_in_flight_is_invisible_and_its_blocks_held(tmp_path, make_engine) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(200, 1)  # 12 full blocks
    hashes = eng.block_hashes(prompt)
    gate = _hold_lane(eng, "offload")
    cold = eng.generate([prompt], GREEDY)[0]  # finished; its offload waits behind the gate
    assert eng.kv.num_pending_copies == 1
    assert eng.store.lookup(hashes) == [] and eng.store.num_reserved() == 12  # not readable yet
    ids = eng.kv.pool.lookup(hashes)
    assert len(ids) == 12 and all(eng.kv.pool.blocks[i].ref_cnt == 1 for i in ids)  # the copy's
    assert eng.kv.pool.evict_all_free() == 0  # the pool cannot take them from under the copy
    again = eng.generate([prompt], GREEDY)[0]  # a new request finds them in the pool meanwhile
    assert again.cached_by_tier == {"device": 192}
    assert again.output_token_ids == cold.output_token_ids
    gate.set()
    eng.kv.finish_copies()
    assert eng.store.lookup(hashes) == ["host"] * 12 and eng.store.num_reserved() == 0
    assert all(eng.kv.pool.blocks[i].ref_cnt == 0 for i in ids)


def test_host_eviction_while_a_load_reads_the_slab(tmp_path, make_engine) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(300, 2)
    hashes = eng.block_hashes(prompt)[:18]
    cold = eng.generate([prompt], GREEDY)[0]
    eng.evict_cached("host")
    gate = _hold_lane(eng, "load")
    got: dict[str, object] = {}
    runner = threading.Thread(target=lambda: got.update(out=eng.generate([prompt], GREEDY)[0]))
    runner.start()  # admits, lends the slab rows, then waits for the load before computing
    _until(lambda: eng.store.num_lent() == 1)
    assert eng.store.host.num_pinned() == 18
    assert eng.store.evict_host(10_000) == 0  # every lent slot is pinned
    assert eng.store.lookup(hashes) == ["host"] * 18
    gate.set()
    runner.join(30)
    out = got["out"]
    assert out.cached_by_tier == {"host": 288} and out.output_token_ids == cold.output_token_ids
    eng.kv.finish_copies()
    assert eng.store.num_lent() == 0 and eng.store.host.num_pinned() == 0


def test_abort_while_its_load_is_in_flight(tmp_path, make_engine) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(260, 3)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.evict_cached("host")
    gate = _hold_lane(eng, "load")
    eng.add_request("r", prompt, GREEDY)
    eng.scheduler.schedule()  # admission starts the load; the step that would wait never runs
    assert eng.kv.num_pending_copies == 1
    ids = list(eng._seqs["r"].block_ids[:16])
    assert eng.abort("r")
    assert all(eng.kv.pool.blocks[i].ref_cnt == 1 for i in ids)  # only the copy holds them
    gate.set()
    eng.kv.finish_copies()
    assert eng.kv.pool.lookup(eng.block_hashes(prompt)) == ids  # loaded, now reusable
    out = eng.generate([prompt], GREEDY)[0]
    assert out.cached_by_tier == {"device": 256} and out.output_token_ids == cold.output_token_ids


def test_abort_while_its_offload_is_in_flight(tmp_path, make_engine) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(300, 4)
    gate = _hold_lane(eng, "offload")
    eng.add_request("r", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()  # the prefill; its 18 full blocks queue for the offload
    ids = list(eng._seqs["r"].block_ids[:18])
    assert eng.abort("r")
    assert all(eng.kv.pool.blocks[i].ref_cnt == 1 for i in ids)
    gate.set()
    eng.kv.finish_copies()
    assert eng.store.lookup(eng.block_hashes(prompt)) == ["host"] * 18


def test_a_failed_load_caches_nothing_and_leaks_nothing(tmp_path, make_engine, monkeypatch) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(200, 5)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.evict_cached("host")

    def broken(*args: object) -> None:
        raise OSError("copy engine fault")

    monkeypatch.setattr(eng.kv.copier, "_to_pool_cpu", broken)
    eng.add_request("r", prompt, GREEDY)
    with pytest.raises(OSError, match="copy engine fault"):
        eng.step()  # compute waits for the load and sees it failed
    assert eng.abort("r")
    eng.kv.finish_copies()
    assert eng.kv.pool.lookup(eng.block_hashes(prompt)) == []  # no block cached with garbage
    monkeypatch.undo()
    out = eng.generate([prompt], GREEDY)[0]  # the host blocks are intact: loaded again
    assert out.cached_by_tier == {"host": 192} and out.output_token_ids == cold.output_token_ids


def test_pool_eviction_demotes_what_the_store_lacks(tmp_path, make_engine) -> None:
    eng = _engine(make_engine, tmp_path)
    prompt = _prompt(200, 6)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.kv.finish_copies()
    hashes = eng.block_hashes(prompt)[:12]
    assert eng.store.remove(hashes) == 12  # only the pool has them now
    assert eng.evict_cached("host")["device"] >= 12  # demoted: copied before the blocks go
    assert eng.store.lookup(hashes) == ["host"] * 12
    out = eng.generate([prompt], GREEDY)[0]
    assert out.cached_by_tier == {"host": 192} and out.output_token_ids == cold.output_token_ids


def test_many_requests_under_pressure_equal_recompute(tmp_path, make_engine) -> None:
    """Small pool and host: loads, offloads, demotions, evictions to disk and spills all run
    while requests share prefixes; every output equals a recompute without any cache."""
    eng = _engine(make_engine, tmp_path, host=48 * 32 * 1024, pool=40 * 32 * 1024)
    ref = make_engine(model="tiny", kv_cache_bytes=4 << 20, enable_prefix_caching=False)
    rng = random.Random(7)
    bases = [_prompt(160, 100 + i) for i in range(4)]
    prompts = [rng.choice(bases)[: rng.randrange(40, 161)] + _prompt(rng.randrange(1, 40), i)
               for i in range(24)]
    for i in range(0, len(prompts), 3):
        batch = prompts[i : i + 3]
        outs = eng.generate(batch, GREEDY)
        want = ref.generate(batch, GREEDY)
        assert [o.output_token_ids for o in outs] == [w.output_token_ids for w in want]
    stats = eng.stats()
    assert stats["store_host_hits"] > 0 and stats["store_host_evictions"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lanes_give_the_cold_tokens(tmp_path, make_engine) -> None:
    store = StoreConfig(host_capacity_bytes=8 << 20, disk_path=str(tmp_path / "lmdb"))
    eng = make_engine(store, model="tiny", kv_cache_bytes=8 << 20, device="cuda")
    assert eng.kv.copier.copies.is_cuda and eng.store.host.registered
    eng.kv.copier.chunk_blocks = 5  # several chunks through the device buffer
    prompt = _prompt(700, 8)
    cold = eng.generate([prompt], GREEDY)[0]
    eng.kv.finish_copies()
    assert eng.store.lookup(eng.block_hashes(prompt)) == ["host"] * 43  # offloaded, readable
    for tier in ("host", "disk"):
        eng.evict_cached(tier)
        warm = eng.generate([prompt], GREEDY)[0]
        assert warm.cached_by_tier == {tier: 688}
        assert warm.output_token_ids == cold.output_token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fence_orders_compute_after_the_copy() -> None:
    from engine.fence import CopyEngine, CudaFence

    eng = CopyEngine(torch.device("cuda"))
    src = torch.arange(1 << 26, dtype=torch.float32).pin_memory()
    dst = torch.empty(src.shape, dtype=torch.float32, device="cuda")
    fence = eng.submit("load", lambda: dst.copy_(src, non_blocking=True))
    assert isinstance(fence, CudaFence)
    fence.make_compute_wait()  # the host does not wait; the compute stream does
    total = dst.sum()
    assert fence.wait(30) and fence.done()
    assert total.item() == src.sum().item()
    eng.close()
