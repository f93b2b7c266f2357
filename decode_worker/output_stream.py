"""The served end of a decode worker's output stream: numbered ``StepOutputs`` messages to one
subscriber (the router), and the process that serves them.

``StreamHub`` queues messages for the one ``WorkerOutputs.Subscribe`` stream open at a time.
When the subscriber lags, the messages waiting are merged into one, so it never falls further
behind than one message of work; one that falls ``max_queued`` messages behind is ended (it
reconnects). A new subscription replaces the old one (a restarted router); while nobody
listens, messages are dropped (the router fails over what it cannot hear).

A decode worker serves its stream from a child process (``python -m
decode_worker.output_stream``, started by ``decode_worker.outputs.OutputSender``): the engine
loop writes each step's message, serialized and length-prefixed, into a pipe, and the child's
gRPC threads do the rest. In the worker's own process those threads took the interpreter lock
for every message and slowed every decode step by a third of a millisecond on a 2-core machine;
a pipe write costs the loop a few microseconds. This module imports no torch: the child stays
small and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc

from kvtransfer import wire
from proto import strata_pb2, strata_pb2_grpc

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0  # how often an idle stream checks that its subscriber is still there
FRAME = struct.Struct("<I")  # a message's length before its bytes, on the pipe
SECRET_ENV = "STRATA_OUTPUTS_SECRET"  # the child's secret (never on its command line)


class _Subscription:
    def __init__(self, subscriber: str, max_queued: int) -> None:
        self.subscriber = subscriber
        self.q: queue.Queue[strata_pb2.StepOutputs] = queue.Queue(max_queued)
        self.ended = threading.Event()


class StreamHub(strata_pb2_grpc.WorkerOutputsServicer):
    def __init__(self, secret: str | None = None, max_queued: int = 1024) -> None:
        self.secret = secret
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._sub: _Subscription | None = None
        self._seq = 0  # steps published to the current subscription
        self.num_messages = 0
        self.num_dropped = 0  # outputs published while nobody listened

    def put(self, msg: strata_pb2.StepOutputs) -> None:
        """Number ``msg`` and queue it for the subscriber (any thread)."""
        with self._lock:  # numbered and queued together: two publishers never swap places
            sub = self._sub
            if sub is None:
                self.num_dropped += len(msg.req_ids)
                return
            self._seq += 1
            msg.seq = self._seq
            try:
                sub.q.put_nowait(msg)
                self.num_messages += 1
                return
            except queue.Full:  # a subscriber this far behind is gone: let it reconnect
                self._sub = None
        logger.warning(
            "subscriber %s fell %d messages behind; ending it", sub.subscriber, self.max_queued
        )
        sub.ended.set()

    # ---- the gRPC service ----------------------------------------------------------------
    def Subscribe(  # gRPC method name
        self, request: strata_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[strata_pb2.StepOutputs]:
        if self.secret is not None:
            given = dict(context.invocation_metadata()).get(wire.SECRET_METADATA_KEY, "")
            if not isinstance(given, str) or not hmac.compare_digest(
                given.encode(), self.secret.encode()
            ):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-strata-secret")
        sub = _Subscription(request.subscriber or context.peer(), self.max_queued)
        with self._lock:
            old, self._sub, self._seq = self._sub, sub, 0
        if old is not None:
            self._end(old)
        logger.info("outputs subscribed by %s", sub.subscriber)
        try:
            yield strata_pb2.StepOutputs(seq=0, num_steps=0)  # tells the subscriber it is on
            while not sub.ended.is_set() and context.is_active():
                try:
                    msg = sub.q.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    continue
                yield _merge_waiting(msg, sub.q)
        finally:
            with self._lock:
                if self._sub is sub:
                    self._sub = None

    def _end(self, sub: _Subscription) -> None:
        with self._lock:
            if self._sub is sub:
                self._sub = None
        sub.ended.set()

    def close(self) -> None:
        with self._lock:
            sub = self._sub
        if sub is not None:
            self._end(sub)


def _merge_waiting(
    msg: strata_pb2.StepOutputs, q: queue.Queue[strata_pb2.StepOutputs]
) -> strata_pb2.StepOutputs:
    """``msg`` with every message already queued behind it appended (columns concatenate)."""
    seq, steps = msg.seq, msg.num_steps
    merged = False
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        msg.MergeFrom(nxt)
        steps += nxt.num_steps
        merged = True
    if merged:
        msg.seq, msg.num_steps = seq, steps
    return msg


# ---- the child process -----------------------------------------------------------------------
def read_frames(fd: int, hub: StreamHub) -> None:
    """Put every message that arrives on the pipe ``fd`` into ``hub``, until the writer closes
    it (the worker stopped or died)."""
    buf = bytearray()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        buf += chunk
        at = 0
        while len(buf) - at >= FRAME.size:
            (n,) = FRAME.unpack_from(buf, at)
            if len(buf) - at - FRAME.size < n:
                break
            start = at + FRAME.size
            hub.put(strata_pb2.StepOutputs.FromString(bytes(buf[start : start + n])))
            at = start + n
        del buf[:at]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="decode_worker.output_stream", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="the pipe the worker writes into")
    p.add_argument("--bind", required=True, help="HOST:PORT to serve on (port 0: any)")
    p.add_argument("--max-queued", type=int, default=1024)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    hub = StreamHub(os.environ.pop(SECRET_ENV, None) or None, args.max_queued)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="outputs"),
        options=wire.channel_options(),
    )
    strata_pb2_grpc.add_WorkerOutputsServicer_to_server(hub, server)
    port = server.add_insecure_port(args.bind)
    if port == 0:
        print(f"error: could not bind the output stream to {args.bind}", file=sys.stderr)
        return 1
    server.start()
    print(port, flush=True)  # the worker waits for this line
    try:
        read_frames(args.fd, hub)
    finally:
        hub.close()
        server.stop(grace=1.0).wait(2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
