"""How the router learns at once that a worker's process is gone, and how it checks that a worker
is back.

Every worker serves the standard ``grpc.health.v1.Health`` service on its gRPC port (the KV
port). The router keeps one ``Health.Watch`` stream open to each worker it places requests on
(``HealthWatch``, a task on the router's loop): when the worker's process dies its socket closes
and the stream breaks within milliseconds, long before Ray reports the actor's death (about a
second later, measured on the 2-core machine). A worker comes back into placement only after it
answered a ``Health.Check`` (``check_serving``, called from the thread that revives it).

The other signals the router acts on are a Ray call that fails with ``RayActorError`` and a
decode worker's broken output stream (``router.outputs``); all of them end in
``Membership.mark_down``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthWatch:
    """A ``Health.Watch`` stream to one worker; ``on_lost(self, reason)`` once it breaks or the
    worker stops serving. Made and closed on the router's loop."""

    def __init__(
        self, worker_id: str, address: str, on_lost: Callable[[HealthWatch, str], None]
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.on_lost = on_lost
        self._closed = False
        self._serving = asyncio.Event()
        # No keepalive pings: the workers' servers answer frequent ones with GOAWAY
        # (too_many_pings), which would break the stream. A node that vanishes without closing
        # its sockets is found by the Ray calls to its workers instead.
        self._channel = grpc.aio.insecure_channel(address)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"health-{worker_id}")

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_serving(self, timeout: float) -> bool:
        """Whether the worker said SERVING on the stream within ``timeout``."""
        try:
            await asyncio.wait_for(self._serving.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        asyncio.get_running_loop().create_task(self._channel.close())

    async def _run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            async for resp in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                if resp.status == SERVING:
                    self._serving.set()
                elif self._serving.is_set():
                    reason = f"stopped serving (health status {resp.status})"
                    break
            else:
                reason = "ended its health stream"
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as e:
            reason = f"health stream broke: {e.code().name}"
        if self._closed:
            return
        self._closed = True
        await self._channel.close()
        self.on_lost(self, reason)


def check_serving(address: str, timeout: float) -> bool:
    """One ``Health.Check`` call (blocking): whether the worker at ``address`` serves."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as e:
            logger.debug("health check of %s failed: %s", address, e)
            return False
    return resp.status == SERVING
