"""Checkpoint loading: sharded safetensors, tokenizers, and clear errors naming the file."""

from __future__ import annotations

import json
import os

import pytest

from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.engine.hf_models import hf_greedy, write_checkpoint


def test_sharded_checkpoint_with_index(tmp_path, make_engine):
    hf = write_checkpoint("llama", str(tmp_path), max_shard_size="300KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    eng = make_engine(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 << 20)
    prompt = list(range(40))
    out = eng.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert out.output_token_ids == hf_greedy(hf, prompt, 16)[0]
    assert eng.tokenizer is None  # no tokenizer files: ids only


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json: missing"):
        load_model(str(tmp_path))


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: malformed JSON"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_model(str(tmp_path))


def test_missing_shard_named(tmp_path):
    write_checkpoint("llama", str(tmp_path), max_shard_size="300KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=shard):
        load_model(str(tmp_path))


def test_corrupt_safetensors_named(tmp_path):
    write_checkpoint("llama", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_no_weights(tmp_path):
    write_checkpoint("llama", str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_unknown_name():
    with pytest.raises(ValueError, match="neither a built-in name"):
        load_model("no-such-model")


def test_hf_tokenizer_roundtrip(tmp_path, make_engine):
    from tokenizers import Tokenizer, models, pre_tokenizers

    write_checkpoint("llama", str(tmp_path))
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    eng = make_engine(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 << 20)
    assert eng.tokenizer is not None
    ids = eng.tokenizer.encode("abcz")
    assert ids == [0, 1, 2, 25]
    out = eng.generate([ids], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 3
