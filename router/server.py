"""Start the router's gRPC server (``grpc.aio`` on the router's event loop): Generation +
grpc.health.v1 + server reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import strata_pb2
from router.event_loop import RouterLoop
from router.servicer import (
    SERVICE_NAME,
    BearerAuthInterceptor,
    GenerationServicer,
    MalformedRequestError,
    status_for,
)

logger = logging.getLogger(__name__)


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A deserializer that hands unparsable bytes to the method as an error, so the caller gets
    INVALID_ARGUMENT with the reason (gRPC's own would answer INTERNAL)."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as e:  # DecodeError and friends of the protobuf runtime
            return MalformedRequestError(f"malformed {message_class.__name__}: {e}")

    return parse


def add_generation(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """The ``Generation`` methods, each refusing a malformed request message first."""

    async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, MalformedRequestError):
            await context.abort(*status_for(request))
        async for msg in servicer.Generate(request, context):
            yield msg

    def unary(
        method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    ) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequestError):
                await context.abort(*status_for(request))
            return await method(request, context)

        return call

    pb = strata_pb2
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, _lenient(pb.GenerateRequest), pb.GenerateResponse.SerializeToString
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Stats), _lenient(pb.StatsRequest), pb.StatsResponse.SerializeToString
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Health), _lenient(pb.HealthRequest), pb.HealthResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class RouterServer:
    """The running server: ``stop(grace)`` from any thread but the loop's."""

    def __init__(self, server: grpc.aio.Server, loop: RouterLoop) -> None:
        self.server = server
        self.loop = loop

    def stop(self, grace: float | None = None) -> None:
        self.loop.run(self.server.stop(grace), timeout=(grace or 0) + 10)


def serve(
    servicer: GenerationServicer,
    host: str | None = None,
    port: int | None = None,
    auth_token: str | None = None,
    max_message_bytes: int | None = None,
    loop: RouterLoop | None = None,
) -> tuple[RouterServer, int]:
    """Start serving on ``loop`` (the process's router loop by default); returns the server
    and the bound port (``port=0`` picks a free one).

    Unset arguments come from ``servicer.config``. The standard health service reports SERVING
    for "" and ``strata.v1.Generation`` from the start, and follows the answers of the
    ``Health`` RPC afterwards. Stop with ``server.stop(grace)``.
    """
    cfg = servicer.config
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    auth_token = cfg.auth_token if auth_token is None else auth_token
    max_message_bytes = cfg.max_message_bytes if max_message_bytes is None else max_message_bytes
    loop = loop if loop is not None else RouterLoop.shared()
    server, bound = loop.run(_start(servicer, host, port, auth_token, max_message_bytes), 60)
    logger.info("router serving on %s:%d (auth %s)", host, bound, "on" if auth_token else "off")
    return RouterServer(server, loop), bound


async def _start(
    servicer: GenerationServicer,
    host: str,
    port: int,
    auth_token: str | None,
    max_message_bytes: int,
) -> tuple[grpc.aio.Server, int]:
    executor = ThreadPoolExecutor(servicer.config.max_workers, thread_name_prefix="router")
    asyncio.get_running_loop().set_default_executor(executor)  # run_in_executor(None, ...)
    interceptors = [BearerAuthInterceptor(auth_token)] if auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ],
    )
    add_generation(servicer, server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    statuses: dict[bool, int] = {
        True: health_pb2.HealthCheckResponse.SERVING,
        False: health_pb2.HealthCheckResponse.NOT_SERVING,
    }

    async def set_status(ok: bool) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, statuses[ok])

    await set_status(True)
    pending: set[asyncio.Task[None]] = set()

    def on_health(ok: bool) -> None:  # called by the Health RPC, on the loop
        task = asyncio.get_running_loop().create_task(set_status(ok))
        pending.add(task)
        task.add_done_callback(pending.discard)

    servicer.on_health = on_health

    names = (
        strata_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the router to {host}:{port} (port in use?)")
    await server.start()
    return server, bound
