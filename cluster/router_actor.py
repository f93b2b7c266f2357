"""The router's process as the cluster starts it (a Ray actor): the ``RayBackend`` plus the
client-facing gRPC server and, with ``http_port`` set, the OpenAI-compatible HTTP API
(``router/http_api.py``), all on one asyncio event loop (``router.event_loop``). The actor's own
methods are plain (threaded) calls. It lives in ``cluster`` because it assembles the router from
the service's configuration (``cluster.config``), which the router package never imports."""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry

from cluster.config import ServiceConfig
from router.backend import RayBackend
from router.config import RouterConfig
from router.event_loop import RouterLoop
from router.http_api import HttpFrontDoor
from router.metrics import RouterMetrics, start_metrics_http
from router.server import serve
from router.servicer import GenerationServicer
from router.worker_metrics import WorkerCollector
from textproc.tokenizer import Tokenizer, load_tokenizer, render_chat

logger = logging.getLogger(__name__)


class _ModelVocab:
    """The model's tokenizer and chat template, judged by the model's vocabulary size (it may
    exceed the tokenizer's); without a tokenizer only ``prompt_token_ids`` are accepted."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        self._tok = tokenizer
        self.vocab_size = vocab_size
        self.has_chat_template = tokenizer is not None and tokenizer.chat_template is not None

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            raise ValueError("this model has no tokenizer: send prompt_token_ids instead of text")
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if self._tok is not None else ""

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self._tok, messages)


class RouterActor:
    def __init__(
        self, workers: list[tuple[str, Any]], service: ServiceConfig, detach: bool = False
    ) -> None:
        logging.basicConfig(level=logging.WARNING)  # the command line prints where it serves
        self.service = service  # kept for `strata scale` (the configuration of new workers)
        self.detach = detach
        model = service.engine.model
        self.loop = RouterLoop.shared()
        # One registry for this process: the router's metrics and the workers' (collected
        # from them at scrape time, named by router.worker_metrics).
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.backend = RayBackend(
            workers, service.backend, secret=service.secret, loop=self.loop, metrics=self.metrics
        )
        cfg = RouterConfig(
            **{**service.router.__dict__, "max_model_len": self.backend.max_model_len}
        )
        tok = _ModelVocab(load_tokenizer(model), self.backend.vocab_size)
        self.registry.register(WorkerCollector(self.backend.stats))  # type: ignore[arg-type]
        self.servicer = GenerationServicer(self.backend, tok, cfg, self.metrics, model=model)
        self.server, self.port = serve(self.servicer, loop=self.loop)
        self.http: HttpFrontDoor | None = None
        if cfg.http_port is not None:
            self.http = HttpFrontDoor(
                self.servicer, cfg.host, cfg.http_port, cfg.auth_token, loop=self.loop
            )
        host = cfg.host
        if host in ("0.0.0.0", "::", "[::]"):
            # Bound to every interface: the address clients are given is the node's (the one
            # Ray knows it by, as the workers advertise), not a hostname they may not resolve.
            import ray

            host = ray.util.get_node_ip_address()
        self.address = f"{host}:{self.port}"
        self.metrics_port: int | None = None
        if cfg.metrics_port is not None:
            http, _ = start_metrics_http(self.registry, cfg.metrics_port, addr=cfg.host)
            self.metrics_port = http.server_port
        logger.info("router serving gRPC on %s", self.address)

    def address_of(self) -> str:
        return self.address

    def http_port_of(self) -> int | None:
        return self.http.port if self.http is not None else None

    def metrics_port_of(self) -> int | None:
        return self.metrics_port

    def sync_index(self) -> None:
        self.backend.sync_index()

    def cpu_seconds(self) -> float:
        """CPU time of this process so far (user + system, every thread)."""
        return time.process_time()

    def index_prefix(self, worker_id: str, hashes: list[bytes]) -> dict[str, int]:
        return self.backend.index.prefix_hits(worker_id, hashes)

    def block_hashes(self, token_ids: list[int], cache_salt: str = "") -> list[bytes]:
        from kvstore.keys import hash_prompt_blocks

        return hash_prompt_blocks(
            token_ids, self.backend.block_size, self.backend.fingerprint, cache_salt
        )

    def check_no_leaks(self) -> dict[str, bool]:
        import ray

        return {
            w.worker_id: ray.get(w.handle.check_no_leaks.remote(), timeout=30)
            for w in self.backend.members.snapshot()
            if w.alive
        }

    # ---- membership (`strata scale`, health of the cluster) ------------------------------
    def service_config(self) -> tuple[ServiceConfig, bool]:
        """The service's configuration and whether it is detached (for new workers)."""
        return self.service, self.detach

    def workers(self) -> list[dict[str, Any]]:
        """Every worker the router knows: id, role, state, pid, restarts, node."""
        return [
            {
                "worker_id": w.worker_id,
                "role": w.role,
                "state": w.state,
                "pid": w.info.pid,
                "restarts": w.restarts,
                "node_id": w.info.node_id,
                "kv_address": w.info.kv_address,
                "in_flight": w.in_flight,
                "down_at": w.down_at,
                "up_at": w.up_at,
                "down_reason": w.down_reason,
                "started_at": w.info.started_at,
            }
            for w in self.backend.members.snapshot()
        ]

    def add_workers(self, workers: list[tuple[str, Any]]) -> list[str]:
        return self.backend.add_workers(workers)

    def retire_workers(self, worker_ids: list[str], drain_timeout_s: float = 60.0) -> list[Any]:
        return self.backend.retire_workers(worker_ids, drain_timeout_s)

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.server.stop(grace=2.0)
        self.backend.close()
