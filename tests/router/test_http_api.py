"""The OpenAI-compatible HTTP front door over a scripted backend, driven by the official
``openai`` client (and raw HTTP where the client hides the wire: SSE framing, /health)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from router.config import RouterConfig
from router.http_api import HttpFrontDoor
from router.metrics import RouterMetrics
from router.servicer import GenerationServicer
from tests.router.conftest import ByteTokenizer, ScriptedBackend

TOKEN = "http-token"
MODEL = "byte-model"


@pytest.fixture
def door(backend: ScriptedBackend):
    cfg = RouterConfig(port=0, max_model_len=256, max_in_flight=2, max_workers=8)
    servicer = GenerationServicer(
        backend, ByteTokenizer(chat=True), cfg, RouterMetrics(), model=MODEL
    )
    front = HttpFrontDoor(servicer, "127.0.0.1", 0, TOKEN)
    yield front
    front.stop()


def _client(door: HttpFrontDoor, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{door.port}/v1", api_key=token, max_retries=0, timeout=10
    )


def test_chat_and_completions_not_streamed(door, backend) -> None:
    client = _client(door)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=50
    )
    assert chat.choices[0].message.content == "héllo wörld ✓"
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens == len("<user>hi\n<assistant>")
    assert chat.usage.prompt_tokens_details.cached_tokens == 16
    assert bytes(backend.requests[-1].prompt_token_ids).decode() == "<user>hi\n<assistant>"
    assert backend.requests[-1].sampling.temperature == 0.0

    comp = client.completions.create(model=MODEL, prompt="abc", max_tokens=4)  # é: 2 bytes
    assert comp.choices[0].text == "hél" and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 4 and comp.usage.total_tokens == 7
    assert backend.requests[-1].sampling.temperature == 1.0  # the API's default: sampling
    comp = client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=2)
    assert backend.requests[-1].prompt_token_ids == (104, 105)
    # unset max_tokens: the router's default (256), shortened to fit the context window
    client.completions.create(model=MODEL, prompt="x")
    assert backend.requests[-1].max_tokens == 255


def test_streams_end_with_done(door) -> None:
    client = _client(door)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "héllo wörld ✓"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 16
    comp = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in comp) == "héllo"

    body = json.dumps({"model": MODEL, "prompt": "abc", "max_tokens": 2, "stream": True})
    raw = _post(door, "/v1/completions", body.encode()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_bad_requests_get_400_with_the_reason(door) -> None:
    client = _client(door)
    cases = [
        (dict(messages=[{"role": "wizard", "content": "x"}]), "role must be one of"),
        (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "user", "content": "x"}], temperature=-1), "temperature"),
        (dict(messages=[{"role": "user", "content": "x"}], n=2), "n must be 1"),
        (dict(messages=[{"role": "user", "content": "x"}], stop=["\n"]), "stop strings"),
        (dict(messages=[{"role": "user", "content": "x" * 300}]), "prompt too long"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(openai.BadRequestError, match=reason) as info:
            client.chat.completions.create(model=MODEL, **kwargs)
        assert info.value.status_code == 400
        assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="is not served here"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[999], stream=True)
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(door, "/v1/completions", b"{not json")
    assert err.value.code == 400


def test_no_chat_template_is_400(backend) -> None:
    cfg = RouterConfig(port=0, max_model_len=256, max_in_flight=2, max_workers=8)
    servicer = GenerationServicer(backend, ByteTokenizer(), cfg, RouterMetrics(), model=MODEL)
    front = HttpFrontDoor(servicer, "127.0.0.1", 0, None)
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            _client(front, "unused").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
    finally:
        front.stop()


def test_auth_health_and_overload(door, backend) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(door, "wrong").models.list()
    assert info.value.status_code == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{door.port}/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"  # no token needed
    backend.is_healthy = False
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{door.port}/health", timeout=5)
    assert err.value.code == 503
    client = _client(door)
    with pytest.raises(openai.InternalServerError) as e503:
        client.completions.create(model=MODEL, prompt="!noworker")
    assert e503.value.status_code == 503
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="!busy")
    # max_in_flight = 2: a third concurrent request is refused with 429
    streams = [
        client.completions.create(model=MODEL, prompt="!slow", stream=True) for _ in range(2)
    ]
    for s in streams:
        next(iter(s))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="x")
    for s in streams:
        s.close()


def test_cancelled_stream_cancels_in_the_backend(door, backend) -> None:
    client = _client(door)
    stream = client.completions.create(model=MODEL, prompt="!slow", stream=True)
    got = []
    for chunk in stream:
        got.append(chunk.choices[0].text)
        if len(got) == 3:
            break
    stream.close()  # the client hangs up mid-stream
    assert backend.cancel_event.wait(5), "the backend was never told to cancel"
    assert backend.cancelled == [backend.requests[-1].req_id]
    # the service keeps serving
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=1).choices[0].text


def test_concurrent_clients(door) -> None:
    client = _client(door)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            out = client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
            assert out.choices[0].text == "hél"
        except BaseException as e:  # collected for the assert below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    time.sleep(0.05)


def _post(door: HttpFrontDoor, path: str, body: bytes) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{door.port}{path}",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()
