"""A decode worker's token stream to the router, one message per engine step.

The engine loop hands over the outputs of every published request of a step in one call
(``publish``, on the loop thread; an abort of a request still waiting for its blocks publishes
from the caller's thread), which become one ``StepOutputs`` message (``step_message``: request
ids, token counts, tokens, finish reasons, columns). The router holds one long-lived
``WorkerOutputs.Subscribe`` stream per decode worker; ``decode_worker.output_stream`` says how
the messages are queued and merged for it.

Two ways to serve the stream:
- ``OutputSender`` (what a decode worker uses): the message is serialized and written into a
  pipe to a child process that serves the stream on its own port (``WorkerInfo.outputs_address``),
  so gRPC's threads never take this process's interpreter lock. The child ends when the pipe
  closes; if it dies first, ``on_lost`` is called once (the worker then stops serving: the
  router takes it out of placement and moves its requests) and later outputs are dropped.
- ``OutputHub``: the same stream served in this process, for tests and embedding.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from decode_worker.output_stream import FRAME, SECRET_ENV, StreamHub, _Subscription
from engine.loop import RequestAborted
from engine.sequence import StepOutput
from proto import strata_pb2
from proto.vocab import FinishReason

logger = logging.getLogger(__name__)

__all__ = ["OutputHub", "OutputSender", "step_message", "_Subscription"]

_F_SETPIPE_SZ = 1031  # fcntl: a pipe's capacity (Linux)
PIPE_BYTES = 1 << 20  # capacity asked for (the default limit of an unprivileged process)
WRITE_STALL_S = 10.0  # a child that has not read for this long is taken as gone
START_TIMEOUT_S = 60.0  # for the child to bind its port


def error_code(err: BaseException) -> str:
    """The status a request's error maps to (the router raises the matching error)."""
    if isinstance(err, ValueError):
        return "INVALID_ARGUMENT"
    if isinstance(err, OverflowError):
        return "RESOURCE_EXHAUSTED"
    if isinstance(err, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"


def step_message(
    outputs: list[StepOutput], errors: dict[str, BaseException]
) -> strata_pb2.StepOutputs:
    """One engine step's outputs (and requests' errors) as one message."""
    msg = strata_pb2.StepOutputs(
        req_ids=[o.req_id for o in outputs],
        num_tokens=[len(o.new_token_ids) for o in outputs],
        token_ids=[t for o in outputs for t in o.new_token_ids],
        finish_reasons=[o.finish_reason or "" for o in outputs],
        num_steps=1,
    )
    for o in outputs:
        if o.num_output_tokens == len(o.new_token_ids):  # the sequence's first output
            msg.cache_hits[o.req_id].tokens_by_tier.update(o.cached_by_tier)
    for req_id, err in errors.items():
        msg.req_ids.append(req_id)
        msg.num_tokens.append(0)
        if isinstance(err, RequestAborted):
            msg.finish_reasons.append(FinishReason.ABORT)
            continue
        msg.finish_reasons.append(FinishReason.ERROR)
        msg.errors[req_id].code = error_code(err)
        msg.errors[req_id].message = str(err) or type(err).__name__
    return msg


class OutputHub(StreamHub):
    """The stream served in this process (a ``WorkerOutputs`` servicer)."""

    def publish(self, outputs: list[StepOutput], errors: dict[str, BaseException]) -> None:
        self.put(step_message(outputs, errors))


class OutputSender:
    """The stream served by a child process on ``host``, fed through a pipe."""

    def __init__(
        self,
        host: str,
        secret: str | None = None,
        max_queued: int = 1024,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.on_lost = on_lost
        self.num_messages = 0
        self.num_dropped = 0  # outputs not sent: the child was gone
        self._lock = threading.Lock()  # two publishers' frames never interleave
        self._closing = False
        self._lost = False
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # not Linux, or over the limit: the default capacity will do
            pass
        env = {**os.environ, SECRET_ENV: secret or ""}
        cmd = [sys.executable, "-m", "decode_worker.output_stream", "--fd", str(r),
               "--bind", f"{host}:0", "--max-queued", str(max_queued)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        os.close(r)
        self._w = w
        try:
            self.port = self._read_port()
        except BaseException:
            self.close()
            raise
        os.set_blocking(w, False)  # a full pipe is waited on with a limit, never forever
        self._watcher = threading.Thread(target=self._watch, name="outputs-watch", daemon=True)
        self._watcher.start()

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            code = self.proc.poll()
            raise RuntimeError(
                "the output stream's process did not start"
                + (f" (exit status {code})" if code is not None else f" in {START_TIMEOUT_S} s")
            )
        return int(line)

    def publish(self, outputs: list[StepOutput], errors: dict[str, BaseException]) -> None:
        data = step_message(outputs, errors).SerializeToString()
        frame = memoryview(FRAME.pack(len(data)) + data)
        with self._lock:
            if self._lost or self._closing:  # (a closed pipe's fd number may be reused)
                self.num_dropped += len(outputs) + len(errors)
                return
            try:
                self._write_all(frame)
                self.num_messages += 1
                return
            except OSError as e:
                reason = f"its pipe failed: {e}" if e.errno != errno.EAGAIN else str(e)
                self.num_dropped += len(outputs) + len(errors)
        self._gone(reason)

    def _write_all(self, frame: memoryview) -> None:
        deadline = None
        while frame:
            try:
                n = os.write(self._w, frame)
            except BlockingIOError:
                n = 0
            frame = frame[n:]
            if frame:  # the pipe is full: the child is behind
                now = time.monotonic()
                deadline = deadline or now + WRITE_STALL_S
                if now >= deadline:
                    raise OSError(errno.EAGAIN, f"it read nothing for {WRITE_STALL_S:.0f} s")
                select.select([], [self._w], [], deadline - now)

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self._closing:
            self._gone(f"it exited with status {code}")

    def _gone(self, reason: str) -> None:
        with self._lock:
            if self._lost or self._closing:
                return
            self._lost = True
        logger.error("the output stream's process is gone (%s); outputs are dropped", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        """Close the pipe: the child serves what it holds, then exits."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            os.close(self._w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
