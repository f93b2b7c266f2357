"""Start the router's gRPC server: Generation + grpc.health.v1 + server reflection."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import strata_pb2, strata_pb2_grpc
from router.servicer import SERVICE_NAME, BearerAuthInterceptor, GenerationServicer

logger = logging.getLogger(__name__)


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
    strata_pb2_grpc.add_GenerationServicer_to_server(servicer, server)

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
