"""Counters and latency histograms of the tiered store (plain numbers; no exporter here).

The service layer turns ``StoreMetrics.snapshot()`` into Prometheus metrics; this module only
counts. Every method is thread safe and cheap (one short lock).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

from proto.vocab import Tier

# Upper bounds (seconds) of the latency histogram buckets; the last bucket is +Inf.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    1e-5,
    5e-5,
    1e-4,
    5e-4,
    1e-3,
    5e-3,
    1e-2,
    5e-2,
    0.1,
    0.5,
    1.0,
    5.0,
)


@dataclass(slots=True)
class LatencyStat:
    sum_s: float = 0.0  # total seconds observed
    count: int = 0  # number of observations
    # counts per bucket of LATENCY_BUCKETS_S (non-cumulative); the extra last one is +Inf
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    def observe(self, seconds: float) -> None:
        self.sum_s += seconds
        self.count += 1
        self.buckets[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    def as_flat(self, base: str) -> dict[str, float]:
        """Flat stats in the exposition's convention (``router.worker_metrics``): cumulative
        ``<base>_bucket_le_<bound>``, ``<base>_sum`` (seconds) and ``<base>_count``."""
        out: dict[str, float] = {}
        total = 0
        for bound, n in zip(LATENCY_BUCKETS_S, self.buckets, strict=False):
            total += n
            out[f"{base}_bucket_le_{bound:g}"] = float(total)
        out[f"{base}_sum"] = self.sum_s
        out[f"{base}_count"] = float(self.count)
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "sum_s": self.sum_s,
            "count": self.count,
            "bucket_bounds_s": list(LATENCY_BUCKETS_S),
            "buckets": list(self.buckets),
        }


class StoreMetrics:
    """Hits, misses and bytes per tier; load/store latency; prefetch counts."""

    def __init__(self, tiers: tuple[str, ...] = (Tier.HOST, Tier.DISK)) -> None:
        self._lock = threading.Lock()
        self._tiers = tiers
        self.hits = {t: 0 for t in tiers}  # blocks served by each tier (leading prefix only)
        self.hit_bytes = {t: 0 for t in tiers}
        self.stored = {t: 0 for t in tiers}  # blocks accepted by each tier on put
        self.stored_bytes = {t: 0 for t in tiers}
        self.misses = 0  # requested blocks that no tier could serve (load)
        self.loads = 0  # calls to load
        self.puts = 0  # calls to put
        self.prefetched = 0  # blocks moved disk -> host by prefetch
        self.prefetch_expired = 0  # prefetch pins released by timeout (never loaded)
        self.promoted = 0  # disk hits copied into host on load
        self.load_latency = LatencyStat()
        self.store_latency = LatencyStat()

    def record_load(
        self, seconds: float, hits: dict[str, int], num_missed: int, nbytes: int
    ) -> None:
        with self._lock:
            self.loads += 1
            self.misses += num_missed
            for tier, n in hits.items():
                self.hits[tier] += n
                self.hit_bytes[tier] += n * nbytes
            self.load_latency.observe(seconds)

    def record_put(self, seconds: float, stored: dict[str, int], nbytes: int) -> None:
        with self._lock:
            self.puts += 1
            for tier, n in stored.items():
                self.stored[tier] += n
                self.stored_bytes[tier] += n * nbytes
            self.store_latency.observe(seconds)

    def add(self, name: str, n: int = 1) -> None:
        """Bump one of the plain counters (``prefetched``, ``prefetch_expired``, ``promoted``)."""
        assert name in ("prefetched", "prefetch_expired", "promoted"), f"unknown counter {name}"
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def latency_stats(self) -> dict[str, float]:
        """The load and put latency histograms as flat stats (``store_load_seconds_*``,
        ``store_put_seconds_*``)."""
        with self._lock:
            return {
                **self.load_latency.as_flat("store_load_seconds"),
                **self.store_latency.as_flat("store_put_seconds"),
            }

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "loads": self.loads,
                "puts": self.puts,
                "misses": self.misses,
                "prefetched": self.prefetched,
                "prefetch_expired": self.prefetch_expired,
                "promoted": self.promoted,
                **{f"{t}_hits": self.hits[t] for t in self._tiers},
                **{f"{t}_hit_bytes": self.hit_bytes[t] for t in self._tiers},
                **{f"{t}_stored": self.stored[t] for t in self._tiers},
                **{f"{t}_stored_bytes": self.stored_bytes[t] for t in self._tiers},
                "load_latency": self.load_latency.as_dict(),
                "store_latency": self.store_latency.as_dict(),
            }
