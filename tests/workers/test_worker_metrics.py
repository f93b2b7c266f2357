"""Worker metrics as Prometheus users expect them: every stat of real workers (both roles, every
tier on) gets a conventional name; the Grafana dashboard's queries name only metrics the service
exposes."""

from __future__ import annotations

import json
import os
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from kvstore.config import StoreConfig
from prefill_worker.worker import PrefillWorker
from router.metrics import RouterMetrics
from router.worker_metrics import WorkerCollector
from worker.spec import WorkerSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "cluster", "deploy", "grafana-dashboard.json")
# What the router's backend adds to each worker's stats (router/backend.py).
BACKEND_STATS = {"alive": 1.0, "restarts": 0.0, "in_flight": 0.0, "index_blocks": 0.0}


@pytest.fixture(scope="module")
def worker_stats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    cfg = EngineConfig(model="tiny", kv_cache_bytes=4 << 20, max_model_len=512)

    def store(name: str) -> StoreConfig:
        return StoreConfig(
            host_capacity_bytes=4 << 20, disk_path=str(tmp / name), disk_capacity_bytes=64 << 20
        )

    p = PrefillWorker(WorkerSpec("prefill-0", cfg, store("p"), secret="s"))
    d = DecodeWorker(WorkerSpec("decode-0", cfg, store("d"), secret="s"))
    try:
        yield {
            "prefill-0": {**p.stats(), **BACKEND_STATS},
            "decode-0": {**d.stats(), **BACKEND_STATS},
        }
    finally:
        p.shutdown()
        d.shutdown()


def exposition(worker_stats: dict) -> tuple[dict[str, str], str]:
    """(metric family name -> type, the text) of one registry holding the router's and the
    workers' metrics."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    registry.register(WorkerCollector(lambda: worker_stats))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}, text


def test_worker_stats_get_conventional_names(worker_stats) -> None:
    assert worker_stats["prefill-0"]["prefill_tokens_per_s"] > 0
    families, text = exposition(worker_stats)
    worker_families = {n: t for n, t in families.items() if n.startswith("strata_worker_")}
    assert len(worker_families) > 30
    for name, kind in worker_families.items():
        assert kind in ("counter", "gauge", "histogram"), (name, kind)
        assert not re.search(r"_s$|_s_|_latency", name), f"{name}: seconds are _seconds"
        if kind == "gauge":
            assert not name.endswith("_total"), name
    # counters are exposed as *_total (the parser strips the suffix from the family name)
    assert "strata_worker_store_hits_total{" in text
    assert "strata_worker_push_bytes_total{" in text and "strata_worker_pid" not in text
    assert families["strata_worker_store_hits"] == "counter"
    assert families["strata_worker_pool_free_blocks"] == "gauge"
    assert families["strata_worker_store_load_seconds"] == "histogram"
    assert 'strata_worker_store_hits_total{tier="disk",worker="prefill-0"}' in text
    assert 'strata_worker_store_load_seconds_bucket{le="+Inf",worker="decode-0"}' in text


def dashboard_metrics() -> set[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return {m for e in exprs for m in re.findall(r"\bstrata_[a-z0-9_]+", e)}


def test_dashboard_queries_name_exposed_metrics(worker_stats) -> None:
    registry = CollectorRegistry()
    router = RouterMetrics(registry)
    # every labelled router metric shows once it has a sample
    router.requests_total.labels(status="OK").inc()
    router.cached_tokens_total.labels(tier="device").inc()
    registry.register(WorkerCollector(lambda: worker_stats))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    missing = sorted(dashboard_metrics() - samples)
    assert not missing, f"the dashboard queries metrics the service does not expose: {missing}"
