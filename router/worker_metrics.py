"""The workers' stats as Prometheus metrics, read from the workers at scrape time.

Every stat a worker reports (``WorkerBase.stats``, the flat view ``strata stats`` prints) is
named here by one rule, so the names stay systematic as stats are added:

- the name is ``strata_worker_<stat>``, labelled ``worker``; a ``store_host_*`` or
  ``store_disk_*`` stat drops the tier from its name into a ``tier`` label;
- a stat in ``GAUGES`` is a gauge (a level that goes up and down); every other stat counts
  since the worker started and is a counter, named ``..._total``;
- seconds are named ``_seconds`` (a stat's ``_s`` suffix is renamed), rates ``_per_second``;
- a histogram arrives as ``<base>_bucket_le_<bound>`` (cumulative), ``<base>_sum`` and
  ``<base>_count`` stats and leaves as one Prometheus histogram ``strata_worker_<base>``;
- ``pid`` is never a metric (it is in the worker's info).

A new stat that is a level belongs in ``GAUGES``; ``tests/router/test_worker_metrics.py`` checks
that each stat of a real worker gets a conventional name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proto.vocab import Tier

PREFIX = "strata_worker_"
TIERS = (Tier.HOST, Tier.DISK)
SKIP = frozenset({"pid"})
HIST_BUCKET = re.compile(r"^(?P<base>.+)_bucket_le_(?P<le>.+)$")

# Stats that are levels, not counts since start (after the tier is taken out of the name).
GAUGES = frozenset(
    {
        "alive",
        "in_flight",
        "index_blocks",
        "num_running",
        "num_waiting",
        "admissions_waiting",
        "pool_blocks",
        "pool_free_blocks",
        "pool_cached_blocks",
        "prefill_tokens_per_s",
        "torch_threads",
        "store_blocks",
        "store_capacity_bytes",
        "store_used_bytes",
        "store_pinned_blocks",
        "store_queued_blocks",
        "store_map_size",
        "store_disabled_by_error",
        "store_enabled",
        "store_prefetch_inflight_blocks",
        "store_prefetch_pinned_blocks",
    }
)


def metric_name(stat: str, histogram: bool = False) -> tuple[str, str | None, bool]:
    """(Prometheus name, tier label or None, is a counter) of a flat worker stat (of a
    histogram's base name with ``histogram``)."""
    tier = None
    m = re.match(r"^store_(host|disk)_(.+)$", stat)
    base = stat
    if m:
        tier, base = m.group(1), f"store_{m.group(2)}"
    counter = base not in GAUGES and not histogram
    name = re.sub(r"_s$", "_seconds", base)
    name = re.sub(r"_per_s$", "_per_second", name)
    name = name.replace("_per_seconds", "_per_second")
    return PREFIX + name + ("_total" if counter else ""), tier, counter


class WorkerCollector:
    """A custom collector: ``stats()`` returns ``{worker_id: {stat: value}}`` (the router
    backend's ``stats``), called once per scrape."""

    def __init__(self, stats: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # names depend on what the workers report; described at collect time

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        hists: dict[tuple[str, str | None], dict[str, dict[str, float]]] = {}
        for worker, stats in sorted(self._stats().items()):
            hist_bases = {
                m.group("base") for k in stats if (m := HIST_BUCKET.match(k)) is not None
            }
            for key, value in stats.items():
                if key in SKIP:
                    continue
                m = HIST_BUCKET.match(key)
                base = m.group("base") if m else key.rsplit("_", 1)[0]
                if m or (key.endswith(("_sum", "_count")) and base in hist_bases):
                    name, tier, _ = metric_name(base, histogram=True)
                    hists.setdefault((name, tier), {}).setdefault(worker, {})[key] = value
                    continue
                name, tier, counter = metric_name(key)
                labels = ["worker"] if tier is None else ["worker", "tier"]
                fam = families.get(name)
                if fam is None:
                    kind = CounterMetricFamily if counter else GaugeMetricFamily
                    fam = families[name] = kind(name, f"worker stat {key}", labels=labels)
                fam.add_metric([worker] if tier is None else [worker, tier], float(value))
        yield from families.values()
        yield from _histograms(hists)


def _histograms(
    hists: dict[tuple[str, str | None], dict[str, dict[str, float]]],
) -> Iterator[Metric]:
    by_name: dict[str, HistogramMetricFamily] = {}
    for (name, tier), per_worker in hists.items():
        for worker, keys in per_worker.items():
            buckets = sorted(
                (float(m.group("le")), v)
                for k, v in keys.items()
                if (m := HIST_BUCKET.match(k)) is not None
            )
            count = next((v for k, v in keys.items() if k.endswith("_count")), 0.0)
            total = next((v for k, v in keys.items() if k.endswith("_sum")), 0.0)
            fam = by_name.get(name)
            if fam is None:
                labels = ["worker"] if tier is None else ["worker", "tier"]
                fam = by_name[name] = HistogramMetricFamily(
                    name, "worker latency histogram (seconds)", labels=labels
                )
            points = [(f"{le:g}", v) for le, v in buckets] + [("+Inf", count)]
            fam.add_metric([worker] if tier is None else [worker, tier], points, total)
    yield from by_name.values()
