"""The OpenAI-compatible HTTP front door of the router (aiohttp, on the router's event loop).

    GET  /health                 200 {"status": "ok"} or 503 (no token needed)
    GET  /v1/models              the served model
    POST /v1/completions         text or token-id prompt; "stream": true -> server-sent events
    POST /v1/chat/completions    chat messages, rendered with the model's chat template

Each request runs through ``GenerationServicer.stream`` (the gRPC API's own path: admission,
validation, backend, deadline, metrics), on the same loop as the gRPC server: its messages are
awaited, no thread in between. A client that disconnects (or stops reading a stream) cancels the
request in the backend, which frees its blocks. With a token configured every path but
``/health`` needs ``Authorization: Bearer <token>``. Errors are OpenAI-style JSON with the HTTP
status ``servicer.http_status_for`` chooses; an error after a stream started is sent as one
``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
from aiohttp import web

from proto import strata_pb2
from router import openai_api as oa
from router.auth import check_bearer
from router.event_loop import RouterLoop
from router.servicer import HTTP_STATUS, GenerationServicer, http_status_for

logger = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a waiting handler checks whether its client is still there


class HttpFrontDoor:
    def __init__(
        self,
        servicer: GenerationServicer,
        host: str,
        port: int,
        token: str | None,
        loop: RouterLoop | None = None,
    ) -> None:
        self.servicer = servicer
        self.token = token
        self.model = servicer.model
        self.created = oa.now_s()
        self.loop = loop if loop is not None else RouterLoop.shared()
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", lambda r: self._generate(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self._generate(r, chat=True))
        self._runner = web.AppRunner(app, access_log=None)
        self.port: int = self.loop.run(self._start(host, port), timeout=30)
        logger.info("HTTP API on %s:%d", host, self.port)

    async def _start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # the bound socket tells the port picked for port 0
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.loop.run(self._runner.cleanup(), timeout=10)

    # ---- plumbing ------------------------------------------------------------------------
    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self.token and request.path != "/health":
            header = request.headers.get("Authorization", "")
            if not check_bearer([("authorization", header)], self.token):
                status, kind = HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED]
                return _error(status, kind, "missing or wrong bearer token", "invalid_api_key")
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        try:
            ok = self.servicer.backend.healthy()
        except Exception as e:  # reported as not serving
            logger.info("health check failed: %s", e)
            ok = False
        if ok:
            return web.json_response({"status": "ok", "model": self.model})
        return _error(503, "service_unavailable", "no worker can serve")

    async def _models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "strata",
            "max_model_len": self.servicer.config.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            build = oa.chat_request if chat else oa.completion_request
            req = build(body, self.model)
        except (ValueError, json.JSONDecodeError) as e:
            status, kind, message = http_status_for(ValueError(str(e)))
            return _error(status, kind, message)
        stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        gen = self.servicer.stream(req, None)
        handler = asyncio.current_task()
        assert handler is not None
        watchdog = asyncio.get_running_loop().create_task(_watch_client(request, handler))
        answer = _Answer(self, request, chat, gen)
        try:
            if stream:
                return await answer.stream(include_usage)
            return await answer.whole()
        except (ConnectionResetError, asyncio.CancelledError):
            logger.info("HTTP client went away; its request is cancelled")
            raise
        finally:
            watchdog.cancel()
            await gen.aclose()  # cancels in the backend unless the request had finished


async def _watch_client(request: web.Request, handler: asyncio.Task[Any]) -> None:
    """Cancel ``handler`` (and so its request) once the client's connection is closed."""
    while not handler.done():
        await asyncio.sleep(_POLL_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            handler.cancel()
            return


def _error(status: int, kind: str, message: str, code: str | None = None) -> web.Response:
    return web.json_response(oa.error_json(message, kind, code), status=status)


def _sse(obj: Any) -> bytes:  # a JSON value
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Answer:
    """One request's answer: the whole JSON body, or a stream of server-sent events."""

    def __init__(
        self,
        door: HttpFrontDoor,
        request: web.Request,
        chat: bool,
        gen: AsyncGenerator[strata_pb2.GenerateResponse, None],
    ) -> None:
        self.door = door
        self.request = request
        self.chat = chat
        self.gen = gen
        self.created = oa.now_s()
        self.rid = ""

    async def _next(self) -> tuple[str, Any]:
        """("msg", the next message), ("end", None) or ("error", the failure)."""
        try:
            return "msg", await self.gen.__anext__()
        except StopAsyncIteration:
            return "end", None
        except Exception as e:  # answered by the caller with its status
            return "error", e

    def _id(self, msg: strata_pb2.GenerateResponse) -> str:
        if not self.rid:
            self.rid = ("chatcmpl-" if self.chat else "cmpl-") + msg.request_id
        return self.rid

    async def whole(self) -> web.Response:
        texts: list[str] = []
        while True:
            kind, item = await self._next()
            if kind == "error":
                status, etype, message = http_status_for(item)
                return _error(status, etype, message)
            if kind == "end":
                return _error(500, "internal_error", "the stream ended without a final message")
            texts.append(item.text)
            if item.finish_reason:
                body = oa.full_json(
                    self.chat, self._id(item), self.door.model, self.created, "".join(texts),
                    item.finish_reason, oa.usage_json(item.usage),
                )  # fmt: skip
                return web.json_response(body)

    async def stream(self, include_usage: bool) -> web.StreamResponse:
        kind, item = await self._next()  # errors before the first token get a plain status
        if kind == "error":
            status, etype, message = http_status_for(item)
            return _error(status, etype, message)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(self.request)
        first = True
        while True:
            if kind == "error":
                status, etype, message = http_status_for(item)
                await resp.write(_sse(oa.error_json(message, etype)))
                break
            if kind == "end":
                break
            msg: strata_pb2.GenerateResponse = item
            finish = msg.finish_reason or None
            if msg.text or first or finish:
                chunk = oa.chunk_json(
                    self.chat, self._id(msg), self.door.model, self.created, msg.text, finish, first
                )
                await resp.write(_sse(chunk))
                first = False
            if finish:
                if include_usage:
                    usage: dict[str, Any] = {
                        "id": self._id(msg),
                        "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created,
                        "model": self.door.model,
                        "choices": [],
                        "usage": oa.usage_json(msg.usage),
                    }
                    await resp.write(_sse(usage))
                break
            kind, item = await self._next()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
