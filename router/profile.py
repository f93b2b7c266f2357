"""What the router knows of one worker's speed and load: ``WorkerProfile``.

Measured by the worker (prefill speed, per-tier load bandwidth at start-up), then moving
averages of what the router observes (service times, pull bandwidth); the queue depth is
kept by the backend. A load plan depends on the speeds only (``speed_key``), so workers of
equal speeds share one plan per residency in ``CostModel.choose_prefill``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kvstore.cost import Speeds, ewma

REMOTE_TIER = "remote"  # a block pulled from another worker over the network

# the fields a load plan depends on (everything but the queue)
_SPEED_FIELDS = frozenset({"prefill_tokens_per_s", "load_bytes_per_s", "net_bytes_per_s"})
_SPEED_KEYS: dict[tuple[object, ...], tuple[object, ...]] = {}  # interned speed keys


@dataclass(slots=True)
class WorkerProfile:
    worker_id: str
    prefill_tokens_per_s: float  # measured prefill throughput (tokens/s)
    # bytes/s moving one block from a tier into HBM ("device" missing -> free); read-only:
    # assign a new mapping to change it
    load_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    net_bytes_per_s: float = 0.0  # pull bandwidth from another worker; 0 -> never pull
    queue_depth: int = 0  # requests queued or running on the worker
    mean_service_s: float = 0.0  # moving average of one request's service time
    ewma_alpha: float = 0.2  # weight of a new observation in the moving averages
    _speed: tuple[object, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prefill_tokens_per_s > 0:
            raise ValueError(f"{self.worker_id}: prefill_tokens_per_s must be > 0 (measure it)")
        for tier, bw in self.load_bytes_per_s.items():
            if not bw > 0:
                raise ValueError(f"{self.worker_id}: load_bytes_per_s[{tier!r}] must be > 0")
        if self.net_bytes_per_s < 0 or self.queue_depth < 0 or self.mean_service_s < 0:
            raise ValueError(f"{self.worker_id}: bandwidth, queue depth and times must be >= 0")
        self.load_bytes_per_s = MappingProxyType(dict(self.load_bytes_per_s))

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _SPEED_FIELDS:
            object.__setattr__(self, "_speed", None)

    @property
    def queue_wait_s(self) -> float:
        return self.queue_depth * self.mean_service_s

    def speed_key(self) -> tuple[object, ...]:
        """Everything but the queue that a load plan depends on, kept until one of those fields
        is assigned again. Interned: workers of equal speeds return the same object, so its
        ``id`` tells equal speeds apart as long as the profiles live."""
        key = self._speed
        if key is None:
            key = (
                self.prefill_tokens_per_s,
                self.net_bytes_per_s,
                tuple(sorted(self.load_bytes_per_s.items())),
            )
            if len(_SPEED_KEYS) > 4096:  # speeds that changed: forget them (profiles keep theirs)
                _SPEED_KEYS.clear()
            key = self._speed = _SPEED_KEYS.setdefault(key, key)
        return key

    def speeds(self) -> Speeds:
        """The speeds ``kvstore.cost.plan_load`` plans with (a pull is tier ``REMOTE_TIER``)."""
        loads = dict(self.load_bytes_per_s)
        if self.net_bytes_per_s > 0:
            loads[REMOTE_TIER] = self.net_bytes_per_s
        return Speeds(self.prefill_tokens_per_s, loads)

    def bandwidth(self, tier: str) -> float:
        if tier == REMOTE_TIER:
            return self.net_bytes_per_s
        return self.load_bytes_per_s.get(tier, math.inf if tier == "device" else 0.0)

    def observe_service(self, seconds: float) -> None:
        a = self.ewma_alpha
        self.mean_service_s = (
            seconds if self.mean_service_s == 0 else (a * seconds + (1 - a) * self.mean_service_s)
        )

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = ewma(
                self.prefill_tokens_per_s, num_tokens / seconds, self.ewma_alpha
            )

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            new = ewma(self.load_bytes_per_s.get(tier), nbytes / seconds, self.ewma_alpha)
            self.load_bytes_per_s = MappingProxyType({**self.load_bytes_per_s, tier: new})
