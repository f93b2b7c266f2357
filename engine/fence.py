"""Fences and copy lanes: block copies that run beside compute, one logic in two forms.

``CopyEngine.submit(lane, fn)`` runs ``fn`` (which issues a copy) after everything compute has
issued so far, and returns a ``Fence`` that completes when the copy has.

- CUDA form: each lane is a CUDA stream. The lane first waits for the current (compute) stream,
  so the copy is ordered after the step that wrote its source; ``fn`` issues kernels and
  ``non_blocking`` memcpys on the lane's stream; the fence is an event recorded after them.
  ``done()`` queries the event; ``wait()`` blocks the host on it; ``make_compute_wait()`` makes
  the compute stream wait for it without blocking the host.
- CPU form: each lane is one background thread running its copies in submission order; the
  fence is the task's future. On a CPU the step that wrote the source has returned before
  ``submit`` is called, so running later is ordering enough; ``make_compute_wait()`` blocks
  until the copy ran.

What the callers do is the same in both forms: keep the copy's source and destination alive and
unmovable (a pool ref count, a pinned or reserved slab slot) from ``submit`` until ``done()``,
and only then publish the result (a slot becomes readable, a block is released).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import torch

LANES = ("load", "offload")  # slab -> pool, pool -> slab: two lanes, so neither waits on the other


class Fence(Protocol):
    def done(self) -> bool:
        """The copy has finished (successfully or not); never blocks."""
        ...

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the copy finished; False on timeout. Raises the copy's error."""
        ...

    def make_compute_wait(self) -> None:
        """Order later compute after the copy (CUDA: a stream wait; CPU: block until done)."""
        ...

    def error(self) -> BaseException | None:
        """The copy's error once ``done()`` (None: it succeeded)."""
        ...


class DoneFence:
    """A fence that is already complete: a copy that failed to issue, or had nothing to do."""

    def __init__(self, error: BaseException | None = None) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        if self._error is not None:
            raise self._error
        return True

    def make_compute_wait(self) -> None:
        self.wait()

    def error(self) -> BaseException | None:
        return self._error


class ThreadFence:
    """CPU form: the future of a copy task on a lane's thread."""

    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> bool:
        try:
            self._future.result(timeout_s)
        except FutureTimeout:
            return False
        return True

    def make_compute_wait(self) -> None:
        self.wait()

    def error(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class CudaFence:
    """CUDA form: an event recorded on a lane's stream after the copy's work."""

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self._event = event
        self._device = device

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self, timeout_s: float | None = None) -> bool:
        if timeout_s is None:
            self._event.synchronize()
            return True
        deadline = time.monotonic() + timeout_s
        while not self._event.query():
            if time.monotonic() >= deadline:
                return False
            time.sleep(50e-6)
        return True

    def make_compute_wait(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._event)

    def error(self) -> BaseException | None:
        return None  # a failed CUDA copy is a sticky context error, raised by the next call


class CopyEngine:
    """Copy lanes on one device: CUDA streams on a GPU, one background thread each on a CPU."""

    def __init__(self, device: torch.device, lanes: tuple[str, ...] = LANES) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._closed = False
        for lane in lanes:
            if self.is_cuda:
                self._streams[lane] = torch.cuda.Stream(device)
            else:
                self._threads[lane] = ThreadPoolExecutor(1, f"strata-copy-{lane}")

    def submit(self, lane: str, fn: Callable[[], object]) -> Fence:
        """Run ``fn`` on ``lane`` after the compute issued so far; the fence of its completion."""
        if self.is_cuda:
            stream = self._streams[lane]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(stream):
                    fn()
                    event = torch.cuda.Event()
                    event.record(stream)
            except Exception as e:  # the copy failed to issue: a failed fence
                return DoneFence(e)
            return CudaFence(event, self.device)
        with self._lock:
            if self._closed:
                return DoneFence(RuntimeError("copy engine is closed"))
            return ThreadFence(self._threads[lane].submit(_run, fn))

    def close(self) -> None:
        """Let the queued copies finish, then stop the lanes. Idempotent."""
        with self._lock:
            self._closed = True
        for pool in self._threads.values():
            pool.shutdown(wait=True)
        for stream in self._streams.values():
            stream.synchronize()


def _run(fn: Callable[[], object]) -> None:
    fn()
