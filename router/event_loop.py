"""``RouterLoop``: the router's asyncio event loop, on a thread of its own.

Everything on the request path runs on this one loop: the client-facing gRPC server
(``grpc.aio``), the HTTP API (aiohttp), the subscriptions to the decode workers' output streams,
the health watches on every worker, and each request's run. A token travels from a decode
worker's stream to its client's stream by resolving a future on this loop: no thread per stream,
no thread switch per token. Blocking work (Ray ``ray.get`` calls, a worker's revival, the
``Stats`` RPC's calls into every worker) runs on other threads and reaches the loop through
``call_soon`` / ``run``.

One loop serves the whole process (``RouterLoop.shared()``): ``grpc.aio`` objects belong to the
loop they were made on, and a second loop would only add a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_shared: RouterLoop | None = None
_shared_lock = threading.Lock()


class RouterLoop:
    def __init__(self, name: str = "router-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    @classmethod
    def shared(cls) -> RouterLoop:
        """The process's router loop (started on first use; it lives as long as the process)."""
        global _shared
        with _shared_lock:
            if _shared is None or not _shared._thread.is_alive():
                _shared = cls()
            return _shared

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def on_loop(self) -> bool:
        """Whether the caller runs on the loop's thread."""
        return threading.get_ident() == self._thread.ident

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any thread but the loop's)."""
        if self.on_loop:
            coro.close()
            raise RuntimeError("RouterLoop.run() called on the loop itself: await it instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coro`` on the loop; returns at once."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the loop: at once when called there, else soon (thread-safe)."""
        if self.on_loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)


def ray_result(ref: Any) -> asyncio.Future[Any]:  # a ray.ObjectRef
    """An asyncio future of a Ray call's result, on the running loop (never cancels the call)."""
    return asyncio.wrap_future(ref.future())


async def first_of(
    main: asyncio.Future[T], stop: asyncio.Future[Any], timeout: float
) -> tuple[bool, T | None]:
    """Wait for ``main`` unless ``stop`` resolves first or ``timeout`` passes: (True, result)
    when ``main`` finished (its exception raised), (False, None) when ``stop`` came first;
    ``asyncio.TimeoutError`` on timeout. An abandoned ``main`` is left to finish on its own
    (its outcome is dropped), never cancelled."""
    try:
        done, _ = await asyncio.wait(
            {main, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:  # cancelled (the client left): leave `main` behind
        main.add_done_callback(_drop_outcome)
        raise
    if main in done:
        return True, main.result()
    main.add_done_callback(_drop_outcome)
    if stop in done:
        return False, None
    raise asyncio.TimeoutError()


def _drop_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning
