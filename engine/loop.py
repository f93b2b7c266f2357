"""``EngineLoop``: one thread drives an ``LLMEngine``; other threads submit, abort and call in.

The engine is not thread-safe, so everything that touches it (adding requests, stepping,
reading or writing KV blocks) runs on the loop thread; callers get per-request streams of
``StepOutput`` and futures for calls. A request submitted with ``publish=True`` has no stream:
its outputs go, with those of every other published request of the same step, to the loop's
``on_outputs`` callback in one call per step (a decode worker turns that into one message).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from engine.engine import BlockListener, LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import StepOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")
# (outputs of published requests in one step, errors that ended published requests)
OutputSink = Callable[[list[StepOutput], dict[str, BaseException]], None]


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


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, name: str = "engine-loop", on_outputs: OutputSink | None = None
    ) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self._cmds: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._published: set[str] = set()
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
        on_blocks: tuple[BlockListener, int] | None = None,
    ) -> RequestStream:
        """Queue a request; bad input raises ValueError here, in the caller's thread.
        ``on_blocks``: (listener, number of blocks) for ``LLMEngine.watch_blocks``."""
        self.engine.validate(prompt_token_ids, sampling)  # reads only immutable engine state
        stream = RequestStream(req_id)

        def add() -> None:
            try:
                self.engine.add_request(req_id, prompt_token_ids, sampling, cache_salt)
            except (ValueError, OverflowError) as e:
                stream.put(e)
                return
            self._streams[req_id] = stream
            if on_blocks is not None:
                self.engine.watch_blocks(req_id, *on_blocks)

        self._cmds.put(add)
        return stream

    def submit_published(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str = "",
        prefill_len: int | None = None,
    ) -> None:
        """Queue a request whose outputs go to ``on_outputs``; so do its errors, bad input
        included (nothing is raised here). ``prefill_len``: see ``LLMEngine.add_request``."""
        assert self.on_outputs is not None, "a published request needs the loop's on_outputs"

        def add() -> None:
            try:
                self.engine.add_request(req_id, prompt_token_ids, sampling, cache_salt,
                                        prefill_len)  # fmt: skip
            except (ValueError, OverflowError) as e:
                self._publish([], {req_id: e})
                return
            self._published.add(req_id)

        self._cmds.put(add)

    def abort(self, req_id: str) -> None:
        def do() -> None:
            if self.engine.abort(req_id):
                stream = self._streams.pop(req_id, None)
                if stream is not None:
                    stream.put(_aborted(req_id))
                if req_id in self._published:
                    self._published.discard(req_id)
                    self._publish([], {req_id: _aborted(req_id)})

        self._cmds.put(do)

    def post(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the loop thread (between two steps); returns at once."""
        fut: Future[T] = Future()

        def do() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

        self._cmds.put(do)
        return fut

    def call(self, fn: Callable[[LLMEngine], T], timeout: float | None = 60.0) -> T:
        """Run ``fn(engine)`` on the loop thread and return its result."""
        return self.post(fn).result(timeout=timeout)

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
                self.engine.flush_block_reports()
                self.engine.kv.poll_copies()  # offloads of the last step become readable
            else:
                try:
                    outputs = self.engine.step()
                except Exception as e:  # fail the live requests, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    continue
                published: list[StepOutput] = []
                for out in outputs:
                    if out.req_id in self._published:
                        published.append(out)
                        if out.finished:
                            self._published.discard(out.req_id)
                        continue
                    stream = self._streams.get(out.req_id)
                    if stream is None:
                        continue
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.req_id]
                if published:
                    self._publish(published, {})
                self.engine.flush_block_reports()  # the finished requests' last blocks
        self._fail_all(RuntimeError("engine loop stopped"))

    def _publish(self, outputs: list[StepOutput], errors: dict[str, BaseException]) -> None:
        assert self.on_outputs is not None
        try:
            self.on_outputs(outputs, errors)
        except Exception:  # the sink's failure must not stop the engine
            logger.exception("publishing step outputs failed")

    def _fail_all(self, err: BaseException) -> None:
        for req_id, stream in list(self._streams.items()):
            self.engine.abort(req_id)
            stream.put(err)
        self._streams.clear()
        if self._published:
            for req_id in self._published:
                self.engine.abort(req_id)
            errors: dict[str, BaseException] = dict.fromkeys(self._published, err)
            self._published.clear()
            self._publish([], errors)


class RequestAborted(Exception):
    pass


def _aborted(req_id: str) -> RequestAborted:
    return RequestAborted(f"request {req_id} was aborted")
