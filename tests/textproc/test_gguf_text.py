"""The tokenizer built from a GGUF file's metadata encodes and decodes like transformers' GGUF
tokenizer on the same file; the chat template renders like transformers'; bad GGUF files get an
error naming the file and what is wrong."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from textproc.gguf_models import find_gguf
from textproc.tokenizer import load_tokenizer

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    path = find_gguf(MODEL)
    assert path is not None
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer(MODEL), hf


def _strings(n: int) -> list[str]:
    rng = random.Random(7)
    pieces = [
        "Hello", " world", "  ", "\t", "\n", "\n\n", "é", "ü", "ß", "日本語", "中文", "🙂", "👍🏽",
        "don't", " I'll", "2024", " 3.14159", "1,000,000", "<|im_start|>", "<|im_end|>",
        "<|endoftext|>", "user", "assistant", "<think>", "http://example.com/a?b=c", "   x",
        "Ω≈ç√", "\u00a0", "\u200b", "ﬁ", "Ａ", "—", "“quoted”", "#include <stdio.h>", "a_b-c",
    ]  # fmt: skip
    out = ["", " ", "\n", "a"]
    while len(out) < n:
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return out


def test_encode_decode_equal_transformers(pair) -> None:
    """Equal on every string, with one known difference: the file says
    ``tokenizer.ggml.pre = "smollm"``, which splits every digit apart before BPE (llama.cpp
    does, and so does SmolLM2's own tokenizer.json); transformers' GGUF converter ignores it.
    Strings without digits must match transformers as is; with digits, transformers' tokenizer
    with that one digit-splitting step put in front."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok, hf = pair
    assert tok.vocab_size == len(hf) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    digits = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), hf.backend_tokenizer.pre_tokenizer]
    )
    strings = _strings(300)
    assert sum(any(c.isdigit() for c in s) for s in strings) > 50
    for s in strings:
        ids = tok.encode(s)
        if any(c.isdigit() for c in s):
            assert ids == digits.encode(s, add_special_tokens=False).ids, repr(s)
        else:
            assert ids == hf.encode(s, add_special_tokens=False), repr(s)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(s)


def test_chat_template_renders_like_transformers(pair) -> None:
    tok, hf = pair
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! ✓"},
            {"role": "user", "content": "2+2?"},
        ],
    ]
    for conv in convs:
        text = tok.chat_template.render(conv)
        assert text == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="role must be one of"):
        tok.chat_template.render([{"role": "robot", "content": "x"}])


def _small_gguf(path: str, arch: str = "llama", qtype: str = "F32") -> str:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    rng = np.random.default_rng(0)
    if qtype == "F32":
        w.add_tensor("token_embd.weight", rng.standard_normal((3, 32), dtype=np.float32))
    else:  # raw bytes of a type this loader does not dequantize
        w.add_tensor(
            "token_embd.weight",
            np.zeros((3, 36), dtype=np.uint8),  # 2 blocks of 32 values a row
            raw_dtype=gguf.GGMLQuantizationType[qtype],
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_name_the_file_and_the_problem(tmp_path, monkeypatch) -> None:
    from engine.gguf_loader import convert_gguf

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match=f"{garbage}: not a readable GGUF"):
        convert_gguf(str(garbage))
    real = find_gguf(MODEL)
    assert real is not None
    with open(real, "rb") as f:
        head = f.read(40 << 20)
    for cut in (1 << 20, 40 << 20):
        short = tmp_path / f"short-{cut}.gguf"
        short.write_bytes(head[:cut])
        with pytest.raises(ValueError, match=f"{short}: not a readable GGUF file, truncated"):
            convert_gguf(str(short))
    other = _small_gguf(str(tmp_path / "falcon.gguf"), arch="falcon")
    with pytest.raises(ValueError, match=f"{other}: architecture 'falcon' is not supported"):
        convert_gguf(other)
    quant = _small_gguf(str(tmp_path / "iq.gguf"), qtype="IQ4_NL")
    with pytest.raises(ValueError, match=f"{quant}: tensor token_embd.weight has quantization"):
        convert_gguf(quant)
    with pytest.raises(ValueError, match="no such GGUF file"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
