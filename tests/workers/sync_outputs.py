"""A decode worker's output stream for tests that drive workers from plain threads: the router's
``OutputStream`` (which lives on the router's event loop) behind blocking calls."""

from __future__ import annotations

from router.event_loop import RouterLoop
from router.outputs import OutputStream, TokenQueue, Tokens


class SyncQueue:
    def __init__(self, loop: RouterLoop, queue: TokenQueue) -> None:
        self._loop = loop
        self._queue = queue

    def get(self, timeout: float) -> Tokens:
        return self._loop.run(self._queue.get(timeout), timeout=timeout + 5)


class SyncOutputs:
    def __init__(self, worker_id: str, address: str, secret: str | None) -> None:
        self._loop = RouterLoop.shared()

        async def make() -> OutputStream:
            return OutputStream(worker_id, address, secret, on_broken=lambda *_: None)

        self.stream = self._loop.run(make(), timeout=10)

    def wait_connected(self, timeout: float) -> bool:
        return self._loop.run(self.stream.wait_connected(timeout), timeout=timeout + 5)

    def register(self, req_id: str) -> SyncQueue:
        async def register() -> TokenQueue:
            return self.stream.register(req_id)

        return SyncQueue(self._loop, self._loop.run(register(), timeout=10))

    def close(self) -> None:
        async def close() -> None:
            self.stream.close()

        self._loop.run(close(), timeout=10)
