"""``bench.ttft``'s warm-vs-cold gate on logits (bf16 on a CPU): a near-tie that flips the
greedy token passes, a wrong KV block fails loudly, deterministic mode demands equal bits."""

from __future__ import annotations

import random

import pytest
import torch

from bench.common import BenchmarkError, progress
from bench.logits_gate import check_warm_logits, logit_gap
from bench.ttft import _cycle
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig

BF16 = "torch.bfloat16"


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def test_a_flipped_near_tie_passes_and_a_far_one_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    cold = torch.randn(320, generator=gen)
    top2 = cold.topk(2).indices
    cold[top2[1]] = cold[top2[0]] - 1e-3  # a near-tie, as random weights make them
    warm = cold.clone()
    warm[top2[1]] = cold[top2[0]] + 1e-3  # the runner-up overtakes by a rounding step
    gap = logit_gap(cold, warm)
    assert not gap["same_token"] and gap["cold_top1_rank"] == 1
    assert check_warm_logits(cold, warm, BF16) is None
    assert "bit-identical" in (check_warm_logits(cold, warm, BF16, exact=True) or "")
    assert check_warm_logits(cold, cold.clone(), BF16, exact=True) is None
    far = cold.clone()
    far[cold.argmin()] = cold.max() + 0.01  # the worst token becomes the best
    assert "ranks" not in (check_warm_logits(cold, far, BF16) or "ranks")  # rank 1 is fine...
    assert "of the largest" in (check_warm_logits(cold, far, BF16) or "")  # ...the size is not
    sunk = cold.clone()
    sunk[top2[0]] = cold.min()  # the cold top-1 sinks to the bottom
    assert "ranks" in (check_warm_logits(cold, sunk, BF16) or "")


@pytest.fixture
def engine(make_engine, tmp_path):
    store = StoreConfig(host_capacity_bytes=4 << 20, disk_path=str(tmp_path / "kv"),
                        disk_capacity_bytes=64 << 20)  # fmt: skip
    return make_engine(store, model="tiny", dtype="bfloat16", kv_cache_bytes=4 << 20)


def test_honest_warm_runs_pass_the_gate(engine) -> None:
    runs = _cycle(engine, _prompt(64, 1), SamplingParams(max_tokens=1), progress(4, "", True))
    assert [mode for mode, _, _, _ in runs] == ["cold", "device", "host", "disk"]
    for _, _, gap, _ in runs[1:]:
        assert gap["rel"] <= 0.1 and gap["cold_top1_rank"] < 5
    rereads = [reread for _, _, _, reread in runs]
    assert rereads[:3] == [None, None, None]  # only the disk run read from disk
    assert engine.store.disk is not None
    if engine.store.disk.direct_io:
        assert rereads[3] is not None and rereads[3] > 0


def test_a_wrong_block_fails_loudly(engine) -> None:
    prompt, other = _prompt(64, 2), _prompt(64, 3)
    engine.generate([other], SamplingParams(max_tokens=1))
    generate = engine.generate
    calls = []

    def corrupt_after_the_cold_run(prompts, sampling):
        res = generate(prompts, sampling)
        if not calls:  # block 1 of the prompt now holds block 1 of another prompt
            pool = engine.kv.pool
            dst = pool.lookup(engine.block_hashes(prompt)[:2])[1]
            src = pool.lookup(engine.block_hashes(other)[:2])[1]
            for cache in engine.kv.kv_caches:
                cache[dst] = cache[src]
        calls.append(1)
        return res

    engine.generate = corrupt_after_the_cold_run
    with pytest.raises(BenchmarkError, match="warm-device run of 64 tokens: .*of the largest"):
        _cycle(engine, prompt, SamplingParams(max_tokens=1), progress(4, "", True))
