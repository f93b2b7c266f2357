"""Shared pieces of the router tests: a byte-level tokenizer and a scripted backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from proto.vocab import FinishReason
from router.errors import NoWorkerError, OverloadedError
from router.types import GenRequest, TokenDelta, Usage

EOS = 256


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus EOS (257 ids); a small chat template when
    ``chat=True`` (``<role>content`` lines, the assistant's turn opened)."""

    vocab_size = 257

    def __init__(self, chat: bool = False) -> None:
        from textproc.chat import ChatTemplate

        self.template = ChatTemplate(CHAT_TEMPLATE) if chat else None
        self.has_chat_template = chat

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.template is None:
            raise ValueError("this model has no chat template")
        return self.encode(self.template.render(messages))


class ScriptedBackend:
    """Answers every request with ``reply`` (one token per delta), or follows commands in the
    prompt: "!slow" streams one token every 50 ms until cancelled, "!noworker"/"!busy" fail.
    Its ``generate`` is an async generator, like the real backend's (the router's loop runs
    it)."""

    def __init__(self, reply: str = "héllo wörld ✓") -> None:
        self.reply = list(reply.encode())
        self.requests: list[GenRequest] = []
        self.deadlines: list[float] = []
        self.cancelled: list[str] = []
        self.cancel_event = threading.Event()
        self.is_healthy = True

    async def generate(
        self, req: GenRequest, context_deadline_s: float
    ) -> AsyncIterator[TokenDelta]:
        self.requests.append(req)
        self.deadlines.append(context_deadline_s)
        prompt = bytes(i for i in req.prompt_token_ids if i < 256)
        if prompt.startswith(b"!noworker"):
            raise NoWorkerError("no decode worker alive")
        if prompt.startswith(b"!busy"):
            raise OverloadedError("prefill queues full")
        if prompt.startswith(b"!slow"):
            for _ in range(400):
                if req.req_id in self.cancelled:
                    yield TokenDelta(finish_reason=FinishReason.ABORT, usage=Usage())
                    return
                yield TokenDelta(token_ids=(ord("x"),))
                await asyncio.sleep(0.05)
            raise AssertionError("slow request never cancelled")
        out = self.reply[: req.max_tokens]
        for tok in out[:-1]:
            yield TokenDelta(token_ids=(tok,))
        reason = FinishReason.LENGTH if len(out) == req.max_tokens else FinishReason.STOP
        yield TokenDelta(
            token_ids=(out[-1],),
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=req.num_prompt_tokens,
                completion_tokens=len(out),
                cached_tokens=16,
                cached_tokens_by_tier={"host": 16},
                prefill_worker="prefill-0",
                decode_worker="decode-1",
            ),
        )

    def cancel(self, req_id: str) -> None:
        self.cancelled.append(req_id)
        self.cancel_event.set()

    def stats(self) -> dict[str, dict[str, float]]:
        return {"prefill-0": {"queue_depth": 2.0, "hit_rate_host": 0.5}}

    def healthy(self) -> bool:
        return self.is_healthy


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


def wire_request(**kwargs):  # a strata_pb2.GenerateRequest
    """A request as any gRPC client could send it, without ``StrataClient``'s own checks (the
    server's validation is what the router tests test)."""
    from proto import strata_pb2

    messages = kwargs.pop("messages", None) or ()
    req = strata_pb2.GenerateRequest(
        messages=[strata_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        **kwargs,
    )
    return req
