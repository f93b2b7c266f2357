"""validate_request: every rejection names its reason; defaults are filled in."""

from __future__ import annotations

import pytest

from router.client import StrataClient
from router.config import RouterConfig
from router.detokenize import IncrementalDetokenizer
from router.validation import validate_request

CFG = RouterConfig(max_model_len=64, default_max_tokens=16)
req = StrataClient.build_request


def test_defaults_and_text_prompt(tokenizer) -> None:
    g = validate_request(req(prompt="hi"), tokenizer, CFG)
    assert g.prompt_token_ids == (104, 105)
    sp = g.sampling
    assert (g.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (16, 1.0, 1.0, 0, None)
    assert len(g.req_id) == 32
    g = validate_request(
        req(
            prompt_token_ids=[1, 2],
            max_tokens=3,
            temperature=0,
            top_p=0.5,
            top_k=4,
            seed=0,
            stop_token_ids=[256],
            cache_salt="t",
            request_id="r1",
            ignore_eos=True,
        ),
        tokenizer,
        CFG,
    )
    sp = g.sampling
    assert (g.req_id, g.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (
        "r1",
        3,
        0.0,
        0.5,
        4,
        0,
    )
    assert g.sampling.stop_token_ids == (256,) and g.cache_salt == "t" and g.sampling.ignore_eos
    # near the context limit the default max_tokens shrinks to fit
    assert validate_request(req(prompt_token_ids=[1] * 60), tokenizer, CFG).max_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({}, "empty prompt"),
        ({"prompt": ""}, "empty prompt"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one of"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "exactly one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no chat template"),
        ({"prompt_token_ids": [1, 257]}, "outside the vocabulary"),
        ({"prompt_token_ids": [-1]}, "outside the vocabulary"),
        ({"prompt_token_ids": [1], "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"prompt_token_ids": [1] * 10, "max_tokens": 55}, "exceeds max_model_len"),
        ({"prompt_token_ids": [1] * 64}, "prompt too long"),
        ({"prompt_token_ids": [1], "temperature": -0.1}, "temperature"),
        ({"prompt_token_ids": [1], "temperature": float("nan")}, "temperature"),
        ({"prompt_token_ids": [1], "top_p": 0.0}, "top_p"),
        ({"prompt_token_ids": [1], "top_p": 1.5}, "top_p"),
        ({"prompt_token_ids": [1], "top_k": -1}, "top_k"),
        ({"prompt_token_ids": [1], "stop_token_ids": [999]}, "stop_token_ids"),
        ({"prompt_token_ids": [1], "request_id": "x" * 200}, "request_id"),
    ],
)
def test_rejections(tokenizer, kwargs: dict, reason: str) -> None:
    from tests.router.conftest import wire_request

    wire = wire_request(**kwargs)  # as any client could send it
    with pytest.raises(ValueError, match=reason):
        validate_request(wire, tokenizer, CFG)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"max_tokens": 99999999999}, r"max_tokens must be in \[1, 2147483647\]"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed must be in"),
        ({"top_k": 1 << 40}, "top_k"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
        ({"stop_token_ids": [1 << 31]}, "stop_token_ids"),
    ],
)
def test_the_client_refuses_out_of_range_fields_before_sending(kwargs: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        req(prompt="x", **kwargs) if "prompt_token_ids" not in kwargs else req(**kwargs)


def test_chat_messages_rendered_with_the_template() -> None:
    from tests.router.conftest import ByteTokenizer

    chat = ByteTokenizer(chat=True)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    g = validate_request(req(messages=msgs), chat, CFG)
    assert bytes(g.prompt_token_ids).decode() == "<system>be brief\n<user>hi\n<assistant>"
    for bad, reason in (
        ([{"role": "wizard", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": "x" * 80}], "prompt too long"),
    ):
        with pytest.raises(ValueError, match=reason):
            validate_request(req(messages=bad), chat, CFG)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        RouterConfig(max_in_flight=10, max_workers=10)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        RouterConfig(max_model_len=10, max_prompt_tokens=10)
    assert RouterConfig(max_model_len=10, max_prompt_tokens=4).prompt_limit == 4


def test_incremental_detokenizer_holds_split_characters(tokenizer) -> None:
    text = "aé✓b"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in text.encode()]
    assert deltas == ["a", "", "é", "", "", "✓", "b"]
    assert "".join(deltas) + detok.flush() == text
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(list("✓".encode())[:2]) == ""
    assert detok.flush() == "\ufffd"  # an incomplete tail is emitted as U+FFFD at the end
