"""``EngineLoop``: one thread drives an ``LLMEngine``; other threads submit, abort and call in.

The engine is not thread-safe, so everything that touches it (adding requests, stepping,
reading or writing KV blocks) runs on the loop thread; callers get per-request streams of
``StepOutput`` and futures for calls.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import StepOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RequestStream:
    """The outputs of one request, in order; ends with a finished output or an error."""

    def __init__(self, req_id: str) -> None:
        self.req_id = req_id
        self._q: queue.Queue[StepOutput | BaseException] = queue.Queue()

    def put(self, item: StepOutput | BaseException) -> None:
        self._q.put(item)

    def get(self, timeout: float | None = None) -> StepOutput:
        """The next output; raises the request's error, or ``queue.Empty`` on timeout."""
        item = self._q.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def iter(self, timeout: float | None = None) -> Iterator[StepOutput]:
        while True:
            out = self.get(timeout)
            yield out
            if out.finished:
                return

    def iter_merged(self, timeout: float | None = None) -> Iterator[StepOutput]:
        """Like ``iter``, but the outputs already waiting when one is taken are merged into it
        (their tokens concatenated, the latest counters kept): a consumer slower than the engine
        gets fewer, larger deltas instead of falling further behind."""
        while True:
            out = self.get(timeout)
            error: BaseException | None = None
            while not out.finished:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, BaseException):
                    error = item
                    break
                out = dataclasses.replace(
                    item, new_token_ids=out.new_token_ids + item.new_token_ids
                )
            yield out
            if out.finished:
                return
            if error is not None:
                raise error


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._cmds: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- called from any thread ----------------------------------------------------------
    def submit(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str = "",
    ) -> RequestStream:
        """Queue a request; bad input raises ValueError here, in the caller's thread."""
        self.engine.validate(prompt_token_ids, sampling)  # reads only immutable engine state
        stream = RequestStream(req_id)

        def add() -> None:
            try:
                self.engine.add_request(req_id, prompt_token_ids, sampling, cache_salt)
            except (ValueError, OverflowError) as e:
                stream.put(e)
                return
            self._streams[req_id] = stream

        self._cmds.put(add)
        return stream

    def abort(self, req_id: str) -> None:
        def do() -> None:
            if self.engine.abort(req_id):
                stream = self._streams.pop(req_id, None)
                if stream is not None:
                    stream.put(_aborted(req_id))

        self._cmds.put(do)

    def call(self, fn: Callable[[LLMEngine], T], timeout: float | None = 60.0) -> T:
        """Run ``fn(engine)`` on the loop thread and return its result."""
        fut: Future[T] = Future()

        def do() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._cmds.put(do)
        return fut.result(timeout=timeout)

    def close(self) -> None:
        self._stopped.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout=30)

    # ---- the loop thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            idle = not self.engine.has_unfinished()
            wait_s = 0.001 if self.engine.kv.num_pending_copies else 0.05
            try:
                cmd = self._cmds.get(timeout=wait_s) if idle else self._cmds.get_nowait()
                cmd()
                while True:
                    self._cmds.get_nowait()()
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                self.engine.kv.poll_copies()  # offloads of the last step become readable
            else:
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - fail the live requests, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    continue
                for out in outputs:
                    stream = self._streams.get(out.req_id)
                    if stream is None:
                        continue
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.req_id]
        self._fail_all(RuntimeError("engine loop stopped"))

    def _fail_all(self, err: BaseException) -> None:
        for req_id, stream in list(self._streams.items()):
            self.engine.abort(req_id)
            stream.put(err)
        self._streams.clear()


class RequestAborted(Exception):
    pass


def _aborted(req_id: str) -> RequestAborted:
    return RequestAborted(f"request {req_id} was aborted")
