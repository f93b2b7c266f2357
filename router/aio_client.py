"""The asyncio Python client of the Strata service (``grpc.aio``): many streams on one thread.

    async with AsyncStrataClient("127.0.0.1:50051") as client:
        result = await client.generate(prompt="Hello", max_tokens=16, temperature=0)
        async for chunk in client.stream(prompt_token_ids=[1, 2, 3], max_tokens=8):
            print(chunk.token_ids)

It takes the same keywords and returns the same objects as ``StrataClient`` (``router.client``);
failures raise ``RemoteError`` with the gRPC status name in ``.code``. Make and use it inside one
running event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from proto import strata_pb2, strata_pb2_grpc
from router.auth import bearer_metadata
from router.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    GenerationResult,
    StrataClient,
    StreamChunk,
    channel_options,
    chunk_from_pb,
    collect,
    remote_error,
)


class AsyncStrataClient:
    def __init__(
        self,
        address: str,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self._metadata = bearer_metadata(token)
        self._channel = grpc.aio.insecure_channel(
            address, options=channel_options(max_message_bytes)
        )
        self._stub = strata_pb2_grpc.GenerationStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncStrataClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[StreamChunk]:
        """``StreamChunk``s of one request (its keywords: ``router.client.GenerateParams``);
        leaving the loop early cancels the request on the server."""
        req = StrataClient.build_request(prompt=prompt, **params)
        async for chunk in self.stream_request(req, timeout):
            yield chunk

    async def stream_request(
        self, req: strata_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[StreamChunk]:
        call = self._stub.Generate(req, timeout=timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise remote_error("Generate", e) from e
        finally:
            call.cancel()  # no-op once the stream completed

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Any
    ) -> GenerationResult:
        """Run one request to completion and collect its stream."""
        t0 = time.perf_counter()
        chunks: list[tuple[float, StreamChunk]] = []
        async for chunk in self.stream(prompt, timeout=timeout, **params):
            chunks.append((time.perf_counter(), chunk))
        return collect(t0, chunks)

    async def stats(self, timeout: float = 10.0) -> dict[str, dict[str, float]]:
        try:
            resp = await self._stub.Stats(
                strata_pb2.StatsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise remote_error("Stats", e) from e
        return {worker: dict(ws.metrics) for worker, ws in resp.workers.items()}

    async def health(self, timeout: float = 5.0) -> tuple[bool, str]:
        """(serving, detail)."""
        try:
            resp = await self._stub.Health(
                strata_pb2.HealthRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise remote_error("Health", e) from e
        return resp.serving, resp.detail
