"""The real model from its GGUF file (``smollm2-135m``) computes what transformers computes on
the same file: the same weights after dequantization, the same greedy continuations (32 tokens,
float32) for a chat prompt and a ~1K-token document, also when the document's prefix comes back
from the device pool, the host tier or the disk tier."""

from __future__ import annotations

import pytest
import torch

from engine.loader import load_model
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig
from tests.smollm2_refs import MODEL, N_NEW, chat_ids, document_ids

GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL, dtype="float32", device="cpu")


def test_weights_equal_transformers(loaded, smollm2_reference) -> None:
    ref = smollm2_reference.model.state_dict()
    mine = loaded.model.state_dict()
    assert set(ref) <= set(mine)
    for name, t in ref.items():  # lm_head is tied to the embeddings in both
        assert torch.equal(mine[name], t), name
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192


def test_chat_prompt_matches_transformers(loaded, make_engine, smollm2_reference) -> None:
    eng = make_engine(loaded=loaded, model=MODEL, kv_cache_bytes=64 << 20)
    ids = chat_ids()
    out = eng.generate([ids], GREEDY)[0]
    assert out.output_token_ids == smollm2_reference.greedy(tuple(ids))
    assert eng.tokenizer.decode(out.output_token_ids).startswith("The capital of France is Paris")


def test_document_from_every_tier_matches_transformers(
    loaded, make_engine, smollm2_reference, tmp_path
) -> None:
    store = StoreConfig(
        host_capacity_bytes=128 << 20, disk_path=str(tmp_path / "kv"), disk_capacity_bytes=1 << 30
    )
    eng = make_engine(store, loaded=loaded, model=MODEL, kv_cache_bytes=128 << 20)
    ids = document_ids()
    assert 1000 <= len(ids) <= 1200
    ref = smollm2_reference.greedy(tuple(ids))
    full = (len(ids) - 1) // 16 * 16
    cold = eng.generate([ids], GREEDY)[0]
    assert cold.num_cached_tokens == 0 and cold.output_token_ids == ref
    for tier in ("device", "host", "disk"):
        if tier != "device":
            eng.evict_cached(tier)
        warm = eng.generate([ids], GREEDY)[0]
        assert warm.cached_by_tier == {tier: full}
        assert warm.output_token_ids == ref, tier
