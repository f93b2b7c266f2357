"""The real model through the real service (Ray workers, gRPC and the OpenAI-compatible HTTP
API on loopback): greedy answers equal transformers' on the same GGUF file, also when the prefix
is served from the device pool, the host tier or the disk tier; the official ``openai`` client
works against the HTTP API; a stream the client drops frees its blocks."""

from __future__ import annotations

import time

import openai
import pytest
import ray

from cluster.config import ServiceConfig
from cluster.launcher import launch
from engine.config import EngineConfig
from kvstore.config import StoreConfig
from router.client import StrataClient
from router.config import RouterConfig
from tests.e2e.conftest import assert_no_leaks
from tests.smollm2_refs import CHAT, MODEL, N_NEW, chat_ids, document_ids

TOKEN = "smollm2-token"
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    cfg = ServiceConfig(
        engine=EngineConfig(model=MODEL, dtype="float32", kv_cache_bytes=128 << 20),
        store=StoreConfig(
            host_capacity_bytes=128 << 20,
            disk_path=str(tmp_path_factory.mktemp("kv")),
            disk_capacity_bytes=1 << 30,
        ),
        router=RouterConfig(port=0, http_port=0, auth_token=TOKEN, max_model_len=8192),
    )
    service = launch(cfg)
    yield service
    service.shutdown()


def test_chat_and_document_from_every_tier(svc, smollm2_reference) -> None:
    with StrataClient(svc.address, token=TOKEN) as client:
        info = client.health_info()
        assert (info.model, info.max_model_len, info.has_chat_template) == (MODEL, 8192, True)
        res = client.generate(messages=CHAT, max_tokens=N_NEW, temperature=0, ignore_eos=True)
        assert res.token_ids == smollm2_reference.greedy(tuple(chat_ids()))
        assert res.text.startswith("The capital of France is Paris")

        ids = document_ids()
        ref = smollm2_reference.greedy(tuple(ids))
        full = (len(ids) - 1) // 16 * 16
        for tier in ("cold", "device", "host", "disk"):
            if tier in ("host", "disk"):
                ray.get([h.evict_cached.remote(tier) for h in svc.prefill + svc.decode])
            res = client.generate(
                prompt_token_ids=ids, max_tokens=N_NEW, temperature=0, ignore_eos=True
            )
            by_tier = dict(res.usage.cached_tokens_by_tier)
            assert by_tier == ({} if tier == "cold" else {tier: full}), tier
            assert res.token_ids == ref, tier
    assert_no_leaks(svc)


def test_openai_client_against_the_http_api(svc, smollm2_reference) -> None:
    client = openai.OpenAI(
        base_url=f"http://{svc.http_address}/v1", api_key=TOKEN, max_retries=0, timeout=300
    )
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    assert chat.choices[0].message.content.startswith("The capital of France is Paris")
    again = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(again)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again

    doc = client.completions.create(model=MODEL, prompt=document_ids(), max_tokens=4,
                                    temperature=0)  # fmt: skip
    assert doc.usage.prompt_tokens == len(document_ids())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{svc.http_address}/v1", api_key="wrong",
                      max_retries=0).models.list()  # fmt: skip

    # a stream dropped after a few tokens: cancelled in the backend, every block freed
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=2000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            assert_no_leaks(svc)
            break
        except Exception:  # a worker's failed check arrives wrapped by Ray
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
