"""What the router knows of one worker's speed and load: ``WorkerProfile``; and the numbers of
every registered profile as arrays: ``ProfileTable``.

Measured by the worker (prefill speed, per-tier load bandwidth at start-up), then moving
averages of what the router observes (service times, pull bandwidth); the queue depth is
kept by the backend. A load plan depends on the speeds only (``speed_key``), so workers of
equal speeds share one plan per residency in ``CostModel.choose_prefill``, which reads the
queue and speed of every candidate from the table's arrays at once: a profile registered in a
table writes its new numbers there whenever one of them is assigned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from kvstore.cost import Speeds, ewma
from proto.vocab import Tier

REMOTE_TIER = "remote"  # a block pulled from another worker over the network

# the fields a load plan depends on (everything but the queue)
_SPEED_FIELDS = frozenset({"prefill_tokens_per_s", "load_bytes_per_s", "net_bytes_per_s"})
_TABLE_FIELDS = _SPEED_FIELDS | {"queue_depth", "mean_service_s"}  # what the table keeps
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
    _table: ProfileTable | None = field(default=None, init=False, repr=False, compare=False)
    _slot: int = field(default=-1, init=False, repr=False, compare=False)  # in ``_table``

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
        if name in _TABLE_FIELDS:
            if name in _SPEED_FIELDS:
                object.__setattr__(self, "_speed", None)
            try:
                table = self._table
            except AttributeError:  # still in __init__
                return
            if table is not None:
                table.refresh(self)

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
        return self.load_bytes_per_s.get(tier, math.inf if tier == Tier.DEVICE else 0.0)

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


class ProfileTable:
    """Every registered profile's queue wait, queue depth and speeds as arrays indexed by a
    slot per worker, kept up to date by the profiles themselves. Equal ``speed_key``s get the
    same ``speed`` number."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.profile_at: list[WorkerProfile | None] = []
        self._free: list[int] = []
        self.queue_s = np.zeros(0)  # queue_wait_s (queue_depth * mean_service_s)
        self.depth = np.zeros(0, np.int64)
        self.tokens_per_s = np.zeros(0)  # prefill_tokens_per_s
        self.net = np.zeros(0)  # net_bytes_per_s
        self.speed = np.zeros(0, np.int64)  # number of the speed_key
        self.tier_bw = np.zeros((0, len(Tier)))  # bandwidth(tier) of each Tier, fastest first
        self._speed_ids: dict[tuple[object, ...], int] = {}
        self.version = 0  # changes whenever a profile is added or removed

    @property
    def num_speeds(self) -> int:
        return len(self._speed_ids)

    def add(self, profile: WorkerProfile) -> None:
        """Register ``profile`` (it replaces a profile of the same worker)."""
        slot = self.slot_of.get(profile.worker_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = len(self.profile_at)
                self.profile_at.append(None)
                if slot >= len(self.depth):
                    self._grow(max(16, 2 * slot))
            self.slot_of[profile.worker_id] = slot
        old = self.profile_at[slot]
        if old is not None and old is not profile:
            object.__setattr__(old, "_table", None)
        self.profile_at[slot] = profile
        object.__setattr__(profile, "_table", self)
        object.__setattr__(profile, "_slot", slot)
        self.refresh(profile)
        self.version += 1

    def remove(self, worker_id: str) -> None:
        slot = self.slot_of.pop(worker_id, None)
        if slot is None:
            return
        profile = self.profile_at[slot]
        if profile is not None:
            object.__setattr__(profile, "_table", None)
        self.profile_at[slot] = None
        self._free.append(slot)
        self.version += 1

    def refresh(self, profile: WorkerProfile) -> None:
        """Copy ``profile``'s numbers into the arrays."""
        slot = profile._slot
        self.queue_s[slot] = profile.queue_wait_s
        self.depth[slot] = profile.queue_depth
        self.tokens_per_s[slot] = profile.prefill_tokens_per_s
        self.net[slot] = profile.net_bytes_per_s
        self.tier_bw[slot] = [profile.bandwidth(tier) for tier in Tier]
        key = profile.speed_key()
        speed = self._speed_ids.get(key)
        if speed is None:
            if len(self._speed_ids) > 4 * len(self.slot_of) + 64:  # speeds that changed
                self._renumber_speeds()
            speed = self._speed_ids.setdefault(key, len(self._speed_ids))
        self.speed[slot] = speed

    def _renumber_speeds(self) -> None:
        self._speed_ids.clear()
        for p in self.profile_at:
            if p is not None:
                self.speed[p._slot] = self._speed_ids.setdefault(p.speed_key(),
                                                                 len(self._speed_ids))

    def _grow(self, size: int) -> None:
        for name in ("queue_s", "depth", "tokens_per_s", "net", "speed", "tier_bw"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
