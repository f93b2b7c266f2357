"""Strata's engine computes what Hugging Face transformers computes, on the same weights.

Tolerance: last-position logits within atol 1e-4 / rtol 1e-4 in float32 (the two differ only in
the order of floating-point reductions); greedy continuations of 40 tokens identical.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.sampling import SamplingParams
from tests.engine.hf_models import ARCHS, hf_greedy, write_checkpoint

N_NEW = 40
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = write_checkpoint(request.param, str(path))
    return request.param, str(path), model


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def _logits_of(engine, prompt: list[int]) -> torch.Tensor:
    """Last-position logits through the engine's own step (prefill of the whole prompt)."""
    from engine.sequence import Sequence

    seq = Sequence("logits", list(prompt), len(prompt), SamplingParams(max_tokens=1), "", 0.0)
    engine.scheduler.add(seq)
    engine._seqs["logits"] = seq
    batch = engine.scheduler.schedule()
    input_ids, positions, meta = engine.runner.prepare(batch)
    hidden = engine.runner.model(input_ids, positions, engine.kv.kv_caches, meta)
    logits = engine.runner.model.compute_logits(hidden[-1:])[0]
    engine.abort("logits")
    return logits


def test_logits_and_greedy_match(checkpoint, make_engine):
    arch, path, hf = checkpoint
    eng = make_engine(model=path, dtype="float32", kv_cache_bytes=8 << 20)
    prompt = _prompt(70, 1)
    ref_tokens, ref_logits = hf_greedy(hf, prompt, N_NEW)
    logits = _logits_of(eng, prompt)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-4)
    out = eng.generate([prompt], SamplingParams(max_tokens=N_NEW, ignore_eos=True))[0]
    assert out.output_token_ids == ref_tokens, arch


def test_chunked_prefill_matches(checkpoint, make_engine):
    arch, path, hf = checkpoint
    # Chunks of 32 tokens over a 150-token prompt; mistral's window (48) is crossed too.
    eng = make_engine(
        model=path, dtype="float32", kv_cache_bytes=8 << 20, max_num_batched_tokens=32
    )
    prompt = _prompt(150, 2)
    ref_tokens, _ = hf_greedy(hf, prompt, N_NEW)
    out = eng.generate([prompt], SamplingParams(max_tokens=N_NEW, ignore_eos=True))[0]
    assert out.output_token_ids == ref_tokens, arch


def test_batch_of_different_lengths(checkpoint, make_engine):
    arch, path, hf = checkpoint
    eng = make_engine(model=path, dtype="float32", kv_cache_bytes=8 << 20)
    prompts = [_prompt(n, 10 + n) for n in (5, 33, 64, 97)]
    refs = [hf_greedy(hf, p, 32)[0] for p in prompts]
    outs = eng.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    assert [o.output_token_ids for o in outs] == refs, arch


def test_cached_prefix_matches(checkpoint, make_engine):
    arch, path, hf = checkpoint
    eng = make_engine(model=path, dtype="float32", kv_cache_bytes=8 << 20)
    shared = _prompt(96, 3)
    first = shared + _prompt(11, 4)
    second = shared + _prompt(23, 5)
    eng.generate([first], SamplingParams(max_tokens=4, ignore_eos=True))
    out = eng.generate([second], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert out.num_cached_tokens == 96 and out.cached_by_tier == {"device": 96}
    assert out.output_token_ids == hf_greedy(hf, second, 32)[0], arch
