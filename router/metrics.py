"""Prometheus metrics of the router. The router's process has one registry (``RouterActor``
registers these and the workers' collector in it); a ``RouterMetrics`` made without one gets a
private registry, so tests that make several never clash. Counters are exposed as ``*_total``,
latencies as histograms in seconds."""

from __future__ import annotations

import threading
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server

# TTFT spans cache hits (a few ms) to 128K-token recomputes (tens of seconds).
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TBT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft_seconds = Histogram(
            "strata_ttft_seconds",
            "Time from request arrival to the first token (server side)",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.tbt_seconds = Histogram(
            "strata_time_between_tokens_seconds",
            "Time between consecutive streamed token messages of one request",
            buckets=TBT_BUCKETS_S,
            registry=self.registry,
        )
        self.requests_total = Counter(
            "strata_requests",
            "Finished Generate calls by gRPC status code",
            ["status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "strata_requests_in_flight", "Generate calls being served", registry=self.registry
        )
        self.prompt_tokens_total = Counter(
            "strata_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.cached_tokens_total = Counter(
            "strata_cached_tokens",
            "Prompt tokens served from the KV cache, by tier",
            ["tier"],
            registry=self.registry,
        )
        self.completion_tokens_total = Counter(
            "strata_completion_tokens", "Generated tokens", registry=self.registry
        )
        # ---- what the router did about failing workers (router/request_run.py) ------------
        self.migrations_total = Counter(
            "strata_router_migrations_total",
            "Requests that went on elsewhere after the worker serving them was lost: the lost "
            "worker's role, and the request's phase then (prefill, awaiting_first, decoding)",
            ["role", "phase"],
            registry=self.registry,
        )
        self.migration_tokens_recomputed_total = Counter(
            "strata_router_migration_tokens_recomputed_total",
            "Tokens (prompt and output so far) computed again for migrated requests, beyond "
            "what their new worker found cached",
            registry=self.registry,
        )
        self.retries_total = Counter(
            "strata_router_retries_total",
            "Attempts of a request beyond its first: a migration, a decode worker whose stream "
            "was down when the request was sent, or a wait for a restarting worker",
            ["reason"],
            registry=self.registry,
        )
        self.requests_failed_total = Counter(
            "strata_router_requests_failed_total",
            "Requests that ended with an error, by cause (no_worker, retries_exhausted, "
            "deadline, worker_error, invalid, overloaded, internal)",
            ["cause"],
            registry=self.registry,
        )
        self.workers_down_total = Counter(
            "strata_router_workers_down_total",
            "Times a worker left placement (its process died or could not be reached)",
            ["role"],
            registry=self.registry,
        )

    def snapshot(self) -> dict[str, float]:
        """Flat name -> value view of the router's own metrics (for the Stats RPC), with the
        router process's CPU time. The workers' collector in the same registry is left out:
        the Stats RPC reports the workers itself."""
        out: dict[str, float] = {"process_cpu_seconds": time.process_time()}
        own = (
            self.ttft_seconds,
            self.tbt_seconds,
            self.requests_total,
            self.in_flight,
            self.prompt_tokens_total,
            self.cached_tokens_total,
            self.completion_tokens_total,
            self.migrations_total,
            self.migration_tokens_recomputed_total,
            self.retries_total,
            self.requests_failed_total,
            self.workers_down_total,
        )
        for family in (f for metric in own for f in metric.collect()):
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out


def render(registry: CollectorRegistry) -> str:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry).decode()


def start_metrics_http(
    registry: CollectorRegistry, port: int, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` for ``registry`` on ``addr:port`` in a daemon thread (port 0 picks
    one: read it from ``server.server_port``). Stop with ``server.shutdown()``."""
    server, thread = _start_http_server(port, addr=addr, registry=registry)
    return server, thread
