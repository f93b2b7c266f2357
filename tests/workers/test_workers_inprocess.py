"""Prefill and decode workers as plain classes (no Ray): the handoff over real gRPC on loopback
gives the same tokens as one engine, and every block is free afterwards."""

from __future__ import annotations

import pytest

from decode_worker.worker import DecodeWorker, continuation
from engine.config import EngineConfig
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig
from prefill_worker.worker import PrefillWorker


@pytest.fixture(scope="module")
def workers(tmp_path_factory):  # noqa: ANN001, ANN201
    cfg = EngineConfig(model="tiny", kv_cache_bytes=16 << 20, max_model_len=4096)
    p = PrefillWorker("prefill-0", cfg, StoreConfig(host_capacity_bytes=8 << 20), secret="s3")
    d = DecodeWorker("decode-0", cfg, StoreConfig(host_capacity_bytes=8 << 20), secret="s3")
    yield p, d
    try:
        assert p.check_no_leaks() and d.check_no_leaks()
    finally:
        p.shutdown()
        d.shutdown()


def _run(
    p: PrefillWorker, d: DecodeWorker, req_id: str, prompt: list[int], sampling: SamplingParams
):  # noqa: ANN202
    res = p.prefill(req_id, prompt, sampling, decode_kv_address=d.kv_address)
    tokens = [res.first_token]
    deltas = list(d.generate(req_id, prompt + [res.first_token], continuation(sampling)))
    for delta in deltas:
        tokens.extend(delta.token_ids)
    return res, deltas, tokens


def test_handoff_matches_single_engine(workers):  # noqa: ANN001
    p, d = workers
    prompt = [(i * 13) % 250 for i in range(300)]
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="ref"))[0]
    res, deltas, tokens = _run(p, d, "r1", prompt, sampling)
    assert tokens == expected.output_token_ids
    assert res.num_blocks_to_push == 300 // 16
    # The decode worker got all full prompt blocks from the push: only the tail was computed.
    assert deltas[-1].cached_tokens == 300 // 16 * 16
    assert deltas[-1].finish_reason == "length"
    assert p.stats()["push_blocks"] >= 300 // 16


def test_seeded_sampling_survives_the_handoff(workers):  # noqa: ANN001
    p, d = workers
    prompt = [(i * 7) % 250 for i in range(100)]
    sampling = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=11, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="x"))[0]
    _, _, tokens = _run(p, d, "r2", prompt, sampling)
    assert tokens == expected.output_token_ids


def test_missing_transfer_times_out_and_recomputes(workers):  # noqa: ANN001
    p, d = workers
    prompt = [(i * 3) % 250 for i in range(90)]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="y"))[0]
    first = expected.output_token_ids[0]
    deltas = list(
        d.generate(
            "r3", prompt + [first], continuation(sampling), cache_salt="y", transfer_timeout_s=0.2
        )
    )
    tokens = [first] + [t for delta in deltas for t in delta.token_ids]
    assert tokens == expected.output_token_ids
    assert d.stats()["transfers_timed_out"] >= 1


def test_prefill_pulls_a_prefix_from_another_worker(workers):  # noqa: ANN001
    p, d = workers
    prompt = [(i * 11) % 250 for i in range(260)]
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    first = _run(p, d, "r4", prompt, sampling)[2]  # p computes it; d receives all full blocks
    # d now holds the prefix: a fresh request on d's side pulls nothing from p...
    res = p.prefill(
        "r5",
        prompt,
        sampling,
        cache_salt="other-tenant",
        pull_from=d.kv_address,
        num_pull_blocks=16,
    )
    assert res.num_pulled_blocks == 0  # ...and another tenant's salt never matches its blocks
    d.evict_cached("host")
    p.loop.call(lambda eng: eng.evict_cached("disk"))
    p.loop.call(lambda eng: eng.store.remove(eng.block_hashes(prompt)))
    res = p.prefill("r6", prompt, sampling, pull_from=d.kv_address, num_pull_blocks=16)
    assert res.num_pulled_blocks == 16
    assert res.cached_tokens == 16 * 16  # the pulled blocks were loaded, not recomputed
    deltas = list(
        d.generate("r6", prompt + [res.first_token], continuation(sampling), expect_transfer=False)
    )
    assert [res.first_token] + [t for x in deltas for t in x.token_ids] == first
