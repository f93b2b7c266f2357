"""Start the router's gRPC server: Generation + grpc.health.v1 + server reflection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import strata_pb2
from router.servicer import (
    SERVICE_NAME,
    BearerAuthInterceptor,
    GenerationServicer,
    MalformedRequestError,
    status_for,
)

logger = logging.getLogger(__name__)


def _lenient(message_class: Any) -> Callable[[bytes], Any]:  # noqa: ANN401
    """A deserializer that hands unparsable bytes to the method as an error, so the caller gets
    INVALID_ARGUMENT with the reason (gRPC's own would answer INTERNAL)."""

    def parse(data: bytes) -> Any:  # noqa: ANN401
        try:
            return message_class.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends of the protobuf runtime
            return MalformedRequestError(f"malformed {message_class.__name__}: {e}")

    return parse


def add_generation(servicer: GenerationServicer, server: grpc.Server) -> None:
    """The ``Generation`` methods, each refusing a malformed request message first."""

    def generate(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: ANN401
        if isinstance(request, MalformedRequestError):
            context.abort(*status_for(request))
        yield from servicer.Generate(request, context)

    def unary(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:  # noqa: ANN401
            if isinstance(request, MalformedRequestError):
                context.abort(*status_for(request))
            return method(request, context)

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


def serve(
    servicer: GenerationServicer,
    host: str | None = None,
    port: int | None = None,
    max_workers: int | None = None,
    auth_token: str | None = None,
    max_message_bytes: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (``port=0`` picks a free one).

    Unset arguments come from ``servicer.config``. The standard health service reports SERVING
    for "" and ``strata.v1.Generation`` from the start, and follows the answers of the
    ``Health`` RPC afterwards. Stop with ``server.stop(grace)``.
    """
    cfg = servicer.config
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    max_workers = cfg.max_workers if max_workers is None else max_workers
    auth_token = cfg.auth_token if auth_token is None else auth_token
    max_message_bytes = cfg.max_message_bytes if max_message_bytes is None else max_message_bytes
    interceptors = [BearerAuthInterceptor(auth_token)] if auth_token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="router"),
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ],
    )
    add_generation(servicer, server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def set_health(ok: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, status)

    set_health(True)
    servicer.on_health = set_health

    names = (
        strata_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the router to {host}:{port} (port in use?)")
    server.start()
    logger.info("router serving on %s:%d (auth %s)", host, bound, "on" if auth_token else "off")
    return server, bound
