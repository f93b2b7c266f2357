"""Python client of the Strata service.

    with StrataClient("127.0.0.1:50051") as client:
        result = client.generate(prompt="Hello", max_tokens=16, temperature=0)
        print(result.text, result.usage.cached_tokens, result.ttft_ms_client)
        chat = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=16)

Failures raise ``RemoteError`` with the gRPC status name in ``.code``. ``router.aio_client``
has the same client for asyncio code (many streams on one thread).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import strata_pb2, strata_pb2_grpc
from router.auth import bearer_metadata
from router.errors import RemoteError
from router.types import Usage
from router.validation import check_field, check_token_ids

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class GenerateParams:
    """One generation request as a client sends it: the keywords of ``generate`` and ``stream``
    (both clients). A prompt is ``prompt`` (text), ``prompt_token_ids`` or ``messages`` (a
    conversation, ``{"role": ..., "content": ...}`` each, rendered by the service with the
    model's chat template). None leaves a field to the service's default."""

    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int = 0  # 0: off
    seed: int | None = None  # same seed, same tokens, on any worker
    stop_token_ids: Sequence[int] = ()  # stop tokens besides the model's EOS
    cache_salt: str = ""  # tenant isolation: part of the first block's hash
    request_id: str = ""  # "" -> the router assigns one
    ignore_eos: bool = False  # keep going past EOS (benchmarks)

    def to_request(self) -> strata_pb2.GenerateRequest:
        """The protobuf request; ValueError naming the field when a number is out of its range
        (nothing is sent)."""
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            check_field(name, getattr(self, name))
        check_token_ids(list(self.prompt_token_ids or ()), "prompt_token_ids")
        check_token_ids(list(self.stop_token_ids), "stop_token_ids")
        req = strata_pb2.GenerateRequest(
            prompt_token_ids=list(self.prompt_token_ids or ()),
            messages=[
                strata_pb2.ChatMessage(role=m["role"], content=m["content"])
                for m in self.messages or ()
            ],
            top_k=self.top_k,
            stop_token_ids=list(self.stop_token_ids),
            cache_salt=self.cache_salt,
            request_id=self.request_id,
            ignore_eos=self.ignore_eos,
        )
        for name in ("prompt", "max_tokens", "temperature", "top_p", "seed"):
            value = getattr(self, name)
            if value is not None:  # proto3 optional: unset means the service's default
                setattr(req, name, value)
        return req


@dataclass(frozen=True)
class StreamChunk:
    token_ids: tuple[int, ...]  # new tokens in this message
    text: str  # text they complete
    finish_reason: str | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk
    request_id: str = ""


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    ttft_ms_client: float  # send -> first streamed token, measured here
    ttft_ms_server: float  # as reported by the router (usage.ttft_ms)
    e2e_ms: float  # send -> last message
    chunk_times_ms: list[float] = field(default_factory=list)  # arrival of each message


def usage_from_pb(usage: strata_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cached_tokens_by_tier=dict(usage.cached_tokens_by_tier),
        ttft_ms=usage.ttft_ms,
        prefill_worker=usage.prefill_worker,
        decode_worker=usage.decode_worker,
    )


def remote_error(what: str, e: grpc.RpcError) -> RemoteError:
    """``e`` (a sync ``grpc.Call`` or a ``grpc.aio.AioRpcError``) as a ``RemoteError``."""
    is_call = isinstance(e, grpc.Call | grpc.aio.AioRpcError)
    code = e.code() if is_call else None
    name = code.name if code is not None else ""
    details = (e.details() if is_call else str(e)) or ""
    return RemoteError(f"{what} failed: {name}: {details}", code=name, details=details)


def collect(t0: float, chunks: list[tuple[float, StreamChunk]]) -> GenerationResult:
    """One request's result from its stream: (arrival ``perf_counter()``, chunk) pairs of a
    request sent at ``t0``."""
    token_ids: list[int] = []
    texts: list[str] = []
    times = [(t - t0) * 1e3 for t, _ in chunks]
    first_ms: float | None = None
    for now_ms, (_, chunk) in zip(times, chunks):
        if chunk.token_ids and first_ms is None:
            first_ms = now_ms
        token_ids.extend(chunk.token_ids)
        texts.append(chunk.text)
    last = chunks[-1][1] if chunks else None
    if last is None or last.finish_reason is None or last.usage is None:
        raise RemoteError("Generate stream ended without a final message", code="DATA_LOSS")
    return GenerationResult(
        request_id=last.request_id,
        token_ids=token_ids,
        text="".join(texts),
        finish_reason=last.finish_reason,
        usage=last.usage,
        ttft_ms_client=first_ms if first_ms is not None else times[-1],
        ttft_ms_server=last.usage.ttft_ms,
        e2e_ms=times[-1],
        chunk_times_ms=times,
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The gRPC channel options of both clients."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def chunk_from_pb(msg: strata_pb2.GenerateResponse) -> StreamChunk:
    """One streamed ``GenerateResponse`` as a ``StreamChunk`` (usage on the last only)."""
    final = bool(msg.finish_reason)
    return StreamChunk(
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=msg.finish_reason if final else None,
        usage=usage_from_pb(msg.usage) if final else None,
        request_id=msg.request_id,
    )


class StrataClient:
    def __init__(
        self,
        address: str,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self._metadata = bearer_metadata(token)
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = strata_pb2_grpc.GenerationStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StrataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def build_request(**params: Any) -> strata_pb2.GenerateRequest:
        """The ``GenerateRequest`` of ``GenerateParams(**params)`` (checked: nothing is sent)."""
        return GenerateParams(**params).to_request()

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> Iterator[StreamChunk]:
        """Stream ``StreamChunk``s of one request (its keywords: ``GenerateParams``); breaking
        out of the loop cancels the request on the server."""
        return self.stream_request(self.build_request(prompt=prompt, **params), timeout)

    def stream_request(
        self, req: strata_pb2.GenerateRequest, timeout: float | None = None
    ) -> Iterator[StreamChunk]:
        call = self._stub.Generate(req, timeout=timeout, metadata=self._metadata)
        try:
            for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise remote_error("Generate", e) from e
        finally:
            call.cancel()  # no-op once the stream completed

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> GenerationResult:
        """Run one request (its keywords: ``GenerateParams``) to completion and collect its
        stream."""
        t0 = time.perf_counter()
        req = self.build_request(prompt=prompt, **params)
        chunks = [(time.perf_counter(), c) for c in self.stream_request(req, timeout)]
        return collect(t0, chunks)

    def stats(self, timeout: float = 10.0) -> dict[str, dict[str, float]]:
        try:
            resp = self._stub.Stats(
                strata_pb2.StatsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise remote_error("Stats", e) from e
        return {worker: dict(ws.metrics) for worker, ws in resp.workers.items()}

    def health(self, timeout: float = 5.0) -> tuple[bool, str]:
        """(serving, detail)."""
        resp = self.health_info(timeout)
        return resp.serving, resp.detail

    def health_info(self, timeout: float = 5.0) -> strata_pb2.HealthResponse:
        """The whole ``Health`` answer: serving, detail and the served model (name, context
        window, vocabulary size, whether it has a chat template)."""
        try:
            return self._stub.Health(
                strata_pb2.HealthRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise remote_error("Health", e) from e
