"""The trained ``smollm2-135m`` in bf16 on a GPU: the same greedy text cold, warm from every tier
and after a prefill -> decode handoff (bit-identical logits in deterministic mode), and the
logits and greedy text of transformers in bf16 on the same GGUF file.

Tolerance against transformers (bf16 on both sides, different kernels): the last prompt
position's top-1 token is the same and max |Strata - transformers| <= 5% of max |logit| (on a
CPU, where both run the same torch kernels, they are bit-identical); the greedy tokens agree up
to the end of sequence or 16 tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.loader import load_model
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig
from tests.smollm2_refs import MODEL, chat_ids, document_ids
from textproc.gguf_models import find_gguf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)
HF_RTOL = 0.05


@pytest.fixture(scope="module")
def loaded():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs kernels on CPU tensors; run without TRITON_INTERPRET")
    try:
        find_gguf(MODEL)
    except ValueError as e:  # its package is not installed here
        pytest.skip(str(e))
    return load_model(MODEL, "bfloat16", "cuda")


def _run(eng, ids: list[int], params: SamplingParams = GREEDY):
    eng.runner.keep_logits = True
    res = eng.generate([ids], params)[0]
    return res, torch.stack(eng.runner.kept_logits.pop(res.req_id))


@pytest.mark.parametrize("deterministic", [False, True])
def test_same_text_cold_warm_every_tier_and_after_handoff(
    loaded, make_engine, tmp_path, deterministic: bool
) -> None:
    store = StoreConfig(host_capacity_bytes=128 << 20, disk_path=str(tmp_path / "kv"),
                        disk_capacity_bytes=1 << 30)  # fmt: skip
    kw = dict(loaded=loaded, model=MODEL, kv_cache_bytes=256 << 20, deterministic=deterministic)
    eng = make_engine(store, **kw)
    ids = document_ids()
    cold, cold_logits = _run(eng, ids)
    for tier in ("device", "host", "disk"):
        if tier != "device":
            eng.evict_cached(tier)
        warm, logits = _run(eng, ids)
        assert set(warm.cached_by_tier) == {tier}, tier
        assert warm.output_token_ids == cold.output_token_ids, tier
        if deterministic:
            assert torch.equal(logits, cold_logits), tier
    decode = make_engine(**kw)  # the handoff: the prompt's full blocks, then prompt + 1st token
    hashes = eng.block_hashes(ids)[: len(ids) // 16]
    n, data = eng.read_blocks(hashes)
    decode.write_blocks(hashes[:n], data)
    rest = SamplingParams(max_tokens=31, ignore_eos=True)
    decode.runner.keep_logits = True
    decode.add_request("handoff", ids + cold.output_token_ids[:1], rest, prefill_len=len(ids))
    tokens: list[int] = []
    while decode.has_unfinished():
        tokens += [t for out in decode.step() for t in out.new_token_ids]
    decode.flush_block_reports()
    assert tokens == cold.output_token_ids[1:]
    if deterministic:
        assert torch.equal(torch.stack(decode.runner.kept_logits.pop("handoff")), cold_logits[1:])


def test_matches_transformers_in_bf16(loaded, make_engine) -> None:
    from transformers import AutoModelForCausalLM

    path = find_gguf(MODEL)
    assert path is not None
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.bfloat16
    ).cuda().eval()
    eng = make_engine(loaded=loaded, model=MODEL, kv_cache_bytes=256 << 20)
    eos = set(loaded.config.eos_token_ids)
    for ids in (chat_ids(), document_ids()):
        res, logits = _run(eng, ids, SamplingParams(max_tokens=16, ignore_eos=True))
        with torch.no_grad():
            x = torch.tensor([ids], device="cuda")
            ref = hf(x, logits_to_keep=1).logits[0, -1].float().cpu()
            out = hf.generate(x, max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
        mine = logits[0]
        assert int(mine.argmax()) == int(ref.argmax())
        assert float((mine - ref).abs().max()) <= HF_RTOL * float(ref.abs().max())
        n = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
        assert res.output_token_ids[:n] == out[:n]
