"""What prefill and decode workers share: an engine on its loop thread, its info and stats.

Workers are plain classes (testable without Ray); ``prefill_worker.actor`` and
``decode_worker.actor`` wrap them in thin Ray actors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import warnings
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.engine import LLMEngine
from engine.loop import EngineLoop
from kvstore.keys import BlockHash
from kvtransfer import wire
from kvtransfer.receiver import KVReceiver, add_to_server
from proto.vocab import Tier
from proto.worker_api import BlockEvent, BlockSnapshot, EventBatch, WorkerInfo
from worker.spec import WorkerSpec

logger = logging.getLogger(__name__)


def bytes_tensor(data: memoryview, block_nbytes: int) -> torch.Tensor:
    """uint8 ``[n, block_nbytes]`` over ``data`` without a copy (read-only buffers too: the
    engine only reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
        return torch.frombuffer(data, dtype=torch.uint8).view(-1, block_nbytes)


class BlockSinkAdapter:
    """The engine side of a worker's KV receiver; every engine call runs on the loop thread."""

    def __init__(self, worker: WorkerBase) -> None:
        self.w = worker

    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]:
        return self.w.loop.call(lambda eng: eng.has_blocks(list(hashes)))

    def write_blocks(
        self, req_id: str, hashes: list[BlockHash], data: memoryview, block_nbytes: int
    ) -> Future[int]:
        tensor = bytes_tensor(data, block_nbytes)
        return self.w.loop.post(lambda eng: eng.write_blocks(hashes, tensor))

    def read_blocks(self, hashes: Sequence[BlockHash]) -> tuple[int, memoryview]:
        n, data = self.w.loop.call(lambda eng: eng.read_blocks(list(hashes)))
        return n, data.numpy().data.cast("B")

    def transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        self.w.on_transfer_done(req_id, ok, first_token)


class WorkerBase:
    """Engine + loop thread + a KVTransfer server (other workers push to it and pull from it)."""

    role = "worker"

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.worker_id = worker_id = spec.worker_id
        self.secret = secret = spec.secret
        self.epoch = time.time_ns()  # this start: the router drops events of earlier ones
        self._events = EventNumbering()
        torch.set_num_threads(spec.engine.cpu_threads or os.cpu_count() or 1)
        self.engine = LLMEngine(spec.engine, spec.store)
        self.prefill_tokens_per_s = measure_prefill_speed(self.engine)
        self.tier_bytes_per_s = self._measure_tiers()
        speeds = self.engine.kv.speeds  # load-or-recompute starts from the measured speeds
        speeds.set_prefill(self.prefill_tokens_per_s)
        for tier, bytes_per_s in self.tier_bytes_per_s.items():
            speeds.set_tier(tier, bytes_per_s)
        self.loop = EngineLoop(self.engine, name=f"{worker_id}-loop", on_outputs=self._outputs())
        self.receiver = KVReceiver(BlockSinkAdapter(self), self.engine.fingerprint, secret=secret)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"{worker_id}-grpc"),
            options=wire.channel_options(),
        )
        add_to_server(self.receiver, self.server)
        # the router watches this (a stream that breaks the moment the process dies) and asks
        # it before placing requests here again
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._add_services(self.server)
        bind = f"{spec.kv_host}:{spec.kv_port}"
        port = self.server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"could not bind the worker's gRPC server to {bind}")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.kv_address = f"{spec.advertise_host or spec.kv_host}:{port}"
        self.started_at = time.time()  # ready to serve (wall clock: the router reports it)
        logger.info("%s serving KV transfer on %s", worker_id, self.kv_address)

    def _outputs(self):  # engine.loop.OutputSink | None
        """The loop's sink of published outputs (decode workers publish theirs)."""
        return None

    def _add_services(self, server: grpc.Server) -> None:
        """Register the role's own gRPC services on the worker's server (before it starts)."""

    def on_transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        """A push of ``req_id``'s blocks into this worker ended (``ok``: completely), with the
        first token if the push carried one."""

    def _measure_tiers(self) -> dict[Tier, float]:
        if self.engine.store is None:
            return {}
        try:
            gbps = self.engine.store.measure_bandwidth()  # GB/s per tier
            return {k: float(v) * 1e9 for k, v in gbps.items() if v > 0}
        except Exception:  # a measurement failure must not stop the worker
            logger.exception("tier bandwidth measurement failed")
            return {}

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            epoch=self.epoch,
            pid=os.getpid(),
            worker_id=self.worker_id,
            role=self.role,
            node=socket.gethostname(),
            fingerprint=e.fingerprint,
            block_size=e.block_size,
            block_nbytes=e.layout.block_nbytes,
            vocab_size=e.model_config.vocab_size,
            max_model_len=e.max_model_len,
            kv_address=self.kv_address,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            tier_bytes_per_s=self.tier_bytes_per_s,
            started_at=self.started_at,
        )

    def stats(self) -> dict[str, float]:
        """Flat stats (``strata stats``; Prometheus names them by ``router.worker_metrics``'s
        rule): the engine's and store's counters and levels, the store's latency histograms,
        the prefill speed measured at start-up, and the pid (which is no metric)."""

        def collect(eng: LLMEngine) -> dict[str, float]:
            s = eng.stats()
            if eng.store is not None:
                for old in ("store_load_latency_", "store_store_latency_"):
                    s.pop(old + "sum_s", None)
                    s.pop(old + "count", None)
                s.update(eng.store.metrics.latency_stats())
            return s

        s = self.loop.call(collect)
        s["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        s["torch_threads"] = torch.get_num_threads()  # the engine's intra-op threads
        s["pid"] = os.getpid()  # `strata bench soak --server` kills workers by it; not a metric
        return s

    def drain_events(self) -> EventBatch:
        """Store and pool events since the last call, numbered within this start's epoch."""

        def drain(eng: LLMEngine) -> EventBatch:
            events, lost = self._events.drain(eng)
            return EventBatch(self.epoch, self._events.next_seq(), tuple(events), lost)

        return self.loop.call(drain)

    def snapshot_blocks(self) -> BlockSnapshot:
        """Every block this worker holds, by tier (the router rebuilds its index entries from
        it); the pending events are dropped in the same loop call (they are in the snapshot)
        and the snapshot takes the next number: later batches apply on top of it."""

        def snap(eng: LLMEngine) -> BlockSnapshot:
            self._events.drain(eng)
            blocks = {tier: [bytes(h) for h in hs] for tier, hs in eng.held_blocks().items()}
            return BlockSnapshot(self.epoch, self._events.next_seq(), blocks)

        return self.loop.call(snap)

    def evict_cached(self, down_to: str = Tier.HOST) -> dict[Tier, int]:
        return self.loop.call(lambda eng: eng.evict_cached(down_to))

    def check_no_leaks(self) -> bool:
        self.loop.call(lambda eng: eng.check_no_leaks())
        return True

    def abort(self, req_id: str) -> None:
        """Stop ``req_id`` and free its blocks (the roles also drop their transfer state)."""
        self.loop.abort(req_id)

    def prefetch(self, hashes: list[bytes]) -> None:
        block_hashes = [BlockHash(h) for h in hashes]
        self.loop.call(lambda eng: eng.prefetch(block_hashes))

    def shutdown(self) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=1.0)
        self.loop.close()
        self.engine.close()
        self.receiver.segments.close()


class WorkerActorBase:
    """What the Ray actor shells of both roles share: the worker (``worker_class``) is built in
    the actor's process, and calls and results cross the actor boundary as plain values, so the
    router's process never imports torch or the engine. Ray exposes inherited methods."""

    worker_class: type[WorkerBase] = WorkerBase

    def __init__(self, spec: WorkerSpec) -> None:
        import ray

        # On all interfaces (a cluster of machines) the worker advertises its node's address,
        # the one other nodes reach it at.
        if spec.binds_all:
            spec = dataclasses.replace(spec, advertise_host=ray.util.get_node_ip_address())
        self.node_id = ray.get_runtime_context().get_node_id()
        self.worker = self.worker_class(spec)

    def info(self) -> WorkerInfo:
        return dataclasses.replace(self.worker.info(), node_id=self.node_id)

    def snapshot_blocks(self) -> BlockSnapshot:
        return self.worker.snapshot_blocks()

    def prefetch(self, hashes: list[bytes]) -> None:
        self.worker.prefetch(hashes)

    def abort(self, req_id: str) -> None:
        self.worker.abort(req_id)

    def stats(self) -> dict[str, float]:
        return self.worker.stats()

    def drain_events(self) -> EventBatch:
        return self.worker.drain_events()

    def evict_cached(self, down_to: str = Tier.HOST) -> dict[Tier, int]:
        return self.worker.evict_cached(down_to)

    def check_no_leaks(self) -> bool:
        return self.worker.check_no_leaks()

    def shutdown(self) -> None:
        self.worker.shutdown()


class EventNumbering:
    """This start's block events as numbered batches (on the engine loop thread only)."""

    def __init__(self) -> None:
        self._seq = 0
        self._store_dropped = 0  # the store's count of dropped events at the last drain

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def drain(self, eng: LLMEngine) -> tuple[list[BlockEvent], bool]:
        """(events, whether some were dropped since the last drain: a full queue drops)."""
        pool_events = eng.kv.pool.events
        lost = pool_events.maxlen is not None and len(pool_events) >= pool_events.maxlen
        out = eng.kv.pool.drain_events()
        if eng.store is not None:
            out += eng.store.drain_events()
            dropped = eng.store.events.num_dropped
            lost = lost or dropped != self._store_dropped
            self._store_dropped = dropped
        return out, lost


def measure_prefill_speed(engine: LLMEngine, num_tokens: int = 256) -> float:
    """Prefill tokens/s of this engine, timed on a throwaway prompt at start-up."""
    from engine.sampling import SamplingParams

    n = min(num_tokens, engine.max_model_len - 1, engine.num_blocks * engine.block_size - 1)
    prompt = [(i * 31 + 7) % engine.model_config.vocab_size for i in range(n)]
    params = SamplingParams(max_tokens=1)
    caching = engine.kv.enable_prefix_caching
    engine.kv.enable_prefix_caching = False  # keep the throwaway prompt out of every tier
    try:
        engine.generate([prompt], params)  # warm-up
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        dt = time.perf_counter() - t0
    finally:
        engine.kv.enable_prefix_caching = caching
    return n / dt if dt > 0 else float("inf")
