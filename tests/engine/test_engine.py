"""Engine behaviour on the built-in ``tiny`` model: bad input, sampling, batching, backpressure."""

from __future__ import annotations

import pytest

from engine.engine import LLMEngine
from engine.sampling import SamplingParams

PROMPT = list(range(1, 60))


@pytest.fixture
def tiny(make_engine) -> LLMEngine:
    return make_engine(model="tiny", kv_cache_bytes=4 << 20, max_model_len=2048)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], {}, "prompt is empty"),
        ([1, 2, 10_000], {}, "outside the vocabulary"),
        ([1, -3], {}, "outside the vocabulary"),
        (PROMPT, {"max_tokens": 5000}, "exceeds the context window"),
    ],
)
def test_bad_input_raises_and_engine_stays_usable(tiny, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        tiny.add_request("bad", prompt, SamplingParams(**params))
    out = tiny.generate([PROMPT], SamplingParams(max_tokens=4))[0]
    assert len(out.output_token_ids) == 4


@pytest.mark.parametrize(
    "params, match",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_params(params, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**params)


def test_request_larger_than_pool_is_refused(make_engine):
    eng = make_engine(model="tiny", kv_cache_bytes=40 * 32 * 1024)  # 40 blocks of 16 tokens
    with pytest.raises(ValueError, match="KV blocks but the pool has"):
        eng.add_request("big", list(range(100)) * 8, SamplingParams(max_tokens=10))


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    alone = tiny.generate([PROMPT], p)[0].output_token_ids
    batched = tiny.generate(
        [PROMPT, PROMPT[:20], PROMPT[5:]],
        [p, SamplingParams(max_tokens=5), SamplingParams(max_tokens=9, temperature=1.0, seed=3)],
    )[0]
    assert batched.output_token_ids == alone
    other = tiny.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.9, seed=8))[0]
    assert other.output_token_ids != alone


def test_stop_tokens_and_max_tokens(tiny):
    greedy = tiny.generate([PROMPT], SamplingParams(max_tokens=10))[0]
    assert greedy.finish_reason == "length" and len(greedy.output_token_ids) == 10
    stop_at = greedy.output_token_ids[3]
    first = greedy.output_token_ids.index(stop_at)
    stopped = tiny.generate([PROMPT], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_token_ids == greedy.output_token_ids[: first + 1]


def test_prefix_reuse_and_salt_isolation(tiny):
    long = list(range(1, 200))
    cold = tiny.generate([long], SamplingParams(max_tokens=8))[0]
    warm = tiny.generate([long], SamplingParams(max_tokens=8))[0]
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == (len(long) - 1) // 16 * 16
    assert warm.output_token_ids == cold.output_token_ids
    other_tenant = tiny.generate([long], SamplingParams(max_tokens=8), cache_salt="tenant-b")[0]
    assert other_tenant.num_cached_tokens == 0
    assert other_tenant.output_token_ids == cold.output_token_ids


def test_full_pool_waits_then_completes(make_engine):
    # 24 blocks: each request needs 9 (130 prompt + 10 output tokens), so only two fit at once;
    # the rest wait (backpressure) and some running ones are preempted as they grow.
    eng = make_engine(model="tiny", kv_cache_bytes=24 * 32 * 1024, max_num_batched_tokens=128)
    prompts = [[(i * 7 + j) % 250 for j in range(130)] for i in range(6)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    together = eng.generate(prompts, params)
    alone = [eng.generate([p], params)[0] for p in prompts]
    assert [o.output_token_ids for o in together] == [o.output_token_ids for o in alone]


def test_abort_frees_blocks(tiny):
    tiny.add_request("a", PROMPT, SamplingParams(max_tokens=50))
    tiny.add_request("b", PROMPT[:30], SamplingParams(max_tokens=50))
    for _ in range(3):
        tiny.step()
    assert tiny.abort("a") and tiny.abort("b")
    assert not tiny.abort("a")
    assert not tiny.has_unfinished()
    tiny.check_no_leaks()


def test_duplicate_request_id(tiny):
    tiny.add_request("x", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        tiny.add_request("x", PROMPT, SamplingParams(max_tokens=2))
    tiny.abort("x")


def test_block_hashes_deterministic(tiny):
    from kvstore.keys import hash_prompt_blocks

    h1 = tiny.block_hashes(list(range(100)))
    h2 = hash_prompt_blocks(list(range(100)), 16, tiny.fingerprint)
    assert h1 == h2 and len(h1) == 6 and all(len(h) == 16 for h in h1)
    assert h1[0].hex() == hash_prompt_blocks(list(range(100)), 16, tiny.fingerprint)[0].hex()
    assert tiny.block_hashes(list(range(100)), "salt")[0] != h1[0]
