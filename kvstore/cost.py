"""Load or recompute: one cost model for a prompt whose leading blocks are cached in tiers.

Torch-free, so the router (placement of a request on a worker) and the engine (admission of a
request) call the very same ``plan_load``. A prompt of ``P`` tokens has its leading cached blocks
as runs of equal tiers ``[(tier, n), ...]``. A block can be loaded (``block_nbytes /
bandwidth(tier)``; "device" is free) or recomputed (``block_size / prefill speed``); the last
token is always computed (it gives the first output token). Two shapes of plan:

- sequential (``overlap=False``, the router's): load the first ``t`` blocks, then compute the
  rest; ``T(t) = load(0, t) + compute(P - t*bs)``, minimised over the ends of the runs (the
  cost is linear inside a run). A tier that cannot be loaded (bandwidth 0) ends what can be.
- split (``overlap=True``, the engine's): compute the first ``h`` blocks while blocks ``[h, t)``
  load, then compute the rest: ``T(h, t) = max(compute(h*bs), load(h, t)) + compute(P - t*bs)``,
  minimised exactly in one pass (for each ``t`` the best ``h`` is where computing the head
  outlasts loading the rest, and it only moves right as ``t`` grows). Working from both ends
  beats either alone (two equal blocks of load time ``l`` and compute time ``c`` take
  ``max(c, l)``, not ``min(2c, 2l)``): a slow disk never makes the first token later than
  computing the prompt, and mostly earlier than both. ``t = 0`` is plain recompute.

A split must beat the best plan that loads without one (load the first ``t`` hits, compute the
rest) by ``SPLIT_GAIN`` (10%), else that simpler plan runs (a fraction of a block's load time is
not worth the noise of two moving parts); no plan is ever worse than that one. Every plan has a
load ``deadline_s`` (``LOAD_SLACK`` times the predicted load, plus ``LOAD_MARGIN_S``): past it
the engine stops waiting and recomputes what has not arrived. Where a
speed is not known yet (``Speeds.prefill_tokens_per_s`` None, or a tier missing with
``unknown_loads``), everything loadable is loaded and there is no deadline.

``SpeedTracker`` keeps the speeds a process measured (start-up probes) and observed (every
completed load and prefill, as moving averages) and hands ``Speeds`` snapshots to ``plan_load``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from proto.vocab import Tier

LOAD_SLACK = 2.0  # the deadline of a load, in predicted load times
LOAD_MARGIN_S = 0.25  # plus this (a busy machine's scheduling noise is not a slow disk)
SPLIT_GAIN = 0.9  # a split must beat the best plan without one by 10% (else that one runs)
EWMA_ALPHA = 0.2  # weight of a new observation in the moving averages
DEVICE_TIER = Tier.DEVICE  # already in the device pool: loading it is free
_TIE = 1 - 1e-9  # plans within this factor of each other cost the same


@dataclass(frozen=True)
class Speeds:
    prefill_tokens_per_s: float | None  # None: not measured yet
    bytes_per_s: Mapping[str, float] = field(default_factory=dict)  # load speed per tier
    # a tier missing from ``bytes_per_s`` is not measured yet (True: load it anyway) or cannot
    # be loaded (False: the router's view of a worker without that tier)
    unknown_loads: bool = False

    def bandwidth(self, tier: str) -> float | None:
        """Bytes/s; ``inf`` for the device; 0 when it cannot be loaded; None when unknown."""
        bw = self.bytes_per_s.get(tier)
        if bw is not None:
            return bw
        if tier == DEVICE_TIER:
            return math.inf
        return None if self.unknown_loads else 0.0


@dataclass(frozen=True)
class LoadPlan:
    num_head_blocks: int  # leading blocks computed while the loads run (0: no split)
    num_load_blocks: int  # blocks loaded after the head: [head, head + num_load)
    head_s: float  # predicted compute time of the head
    load_s: float  # predicted load time (nan when a speed is unknown)
    rest_s: float  # predicted compute time after the loaded blocks
    deadline_s: float | None  # stop waiting for the loads this long after they start

    @property
    def compute_s(self) -> float:
        return self.head_s + self.rest_s

    @property
    def ttft_s(self) -> float:
        """Predicted time to the first token (queueing aside)."""
        return max(self.head_s, self.load_s) + self.rest_s


def plan_load(
    runs: Sequence[tuple[str, int]],
    prompt_len: int,
    block_size: int,
    block_nbytes: int,
    speeds: Speeds,
    *,
    overlap: bool = True,
) -> LoadPlan:
    """Which of the leading cached blocks to load and which to compute (see the module)."""
    max_blocks = (prompt_len - 1) // block_size
    loads: list[tuple[float | None, int]] = []  # per run: seconds a block (None: unknown), blocks
    num_loads = 0
    for tier, num in runs:
        bw = speeds.bandwidth(tier)
        if num_loads >= max_blocks or bw is not None and bw <= 0:
            break  # a tier that cannot be loaded here ends what can be loaded
        num = min(num, max_blocks - num_loads)
        loads.append((None if bw is None else block_nbytes / bw, num))
        num_loads += num
    speed = speeds.prefill_tokens_per_s
    if speed is None or any(x is None for x, _ in loads):  # load everything loadable
        known = [x for x, num in loads if x is not None for _ in range(num)]
        load_s = sum(known) if len(known) == num_loads else math.nan
        rest_s = math.nan if speed is None else (prompt_len - num_loads * block_size) / speed
        return LoadPlan(0, num_loads, 0.0, load_s, rest_s, None)
    if not overlap:
        return _sequential(runs, num_loads, prompt_len, block_size, block_nbytes, speeds, speed)
    per_block = [x for x, num in loads if x is not None for _ in range(num)]
    return _split(per_block, prompt_len, block_size, speed)


def _sequential(
    runs: Sequence[tuple[str, int]],
    num_loads: int,
    prompt_len: int,
    block_size: int,
    block_nbytes: int,
    speeds: Speeds,
    speed: float,
) -> LoadPlan:
    best_k, best_load, best_total = 0, 0.0, prompt_len / speed
    k, load = 0, 0.0
    for tier, num in runs:
        if k >= num_loads:
            break
        bw = speeds.bandwidth(tier)
        assert bw is not None and bw > 0
        num = min(num, num_loads - k)
        k += num
        load += num * (block_nbytes / bw)
        total = load + (prompt_len - k * block_size) / speed
        if total < best_total:
            best_k, best_load, best_total = k, load, total
    return LoadPlan(0, best_k, 0.0, best_load, best_total - best_load, _deadline(best_load))


def _split(loads: list[float], prompt_len: int, block_size: int, speed: float) -> LoadPlan:
    n = len(loads)
    cold = prompt_len / speed
    prefix = [0.0]
    for x in loads:
        prefix.append(prefix[-1] + x)
    c = block_size / speed  # compute time of one block
    best_h, best_t, best_total = 0, 0, cold
    plain_t, plain_total = 0, cold  # the best plan without a split: load [0, t), compute the rest
    h = 0  # for each end t: the first head h whose compute outlasts the load of [h, t); it only
    for t in range(1, n + 1):  # moves right as t grows, so one pass finds them all
        while h < t and h * c < prefix[t] - prefix[h]:
            h += 1
        rest = (prompt_len - t * block_size) / speed
        if prefix[t] + rest < plain_total * _TIE:
            plain_t, plain_total = t, prefix[t] + rest
        for k in (h - 1, h):
            if 0 <= k < t:
                total = max(k * c, prefix[t] - prefix[k]) + rest
                # ties (to rounding) between two loads go to the later end: more is loaded
                if total < best_total * _TIE or (best_t and total <= best_total / _TIE):
                    best_h, best_t, best_total = k, t, min(total, best_total)
    # a split must clearly beat loading without one (it always beats recompute, or it would
    # not be the best); no plan may lose to the best one without a split
    if (best_h > 0 and plain_t > 0 and best_total >= SPLIT_GAIN * plain_total
            or plain_total < best_total * _TIE):
        best_h, best_t = 0, plain_t
    if best_t == 0:
        return LoadPlan(0, 0, 0.0, 0.0, cold, None)
    load_s = prefix[best_t] - prefix[best_h]
    rest_s = (prompt_len - best_t * block_size) / speed
    return LoadPlan(best_h, best_t - best_h, best_h * c, load_s, rest_s, _deadline(load_s))


def _deadline(load_s: float) -> float | None:
    return load_s * LOAD_SLACK + LOAD_MARGIN_S if load_s > 0 else None


def tier_runs(tiers: Sequence[str]) -> list[tuple[str, int]]:
    """``["host", "host", "disk"]`` -> ``[("host", 2), ("disk", 1)]``."""
    out: list[tuple[str, int]] = []
    for tier in tiers:
        if out and out[-1][0] == tier:
            out[-1] = (tier, out[-1][1] + 1)
        else:
            out.append((tier, 1))
    return out


def ewma(old: float | None, new: float, alpha: float = EWMA_ALPHA) -> float:
    """The moving average after observing ``new`` (``new`` itself as the first value)."""
    return new if old is None else alpha * new + (1 - alpha) * old


class SpeedTracker:
    """Measured and observed speeds of one engine (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefill: float | None = None
        self._bytes_per_s: dict[str, float] = {}

    def set_prefill(self, tokens_per_s: float | None) -> None:
        """A measured prefill speed (``None`` forgets it)."""
        with self._lock:
            self._prefill = tokens_per_s

    def set_tier(self, tier: str, bytes_per_s: float | None) -> None:
        """A measured load speed of ``tier`` (``None`` forgets it)."""
        with self._lock:
            if bytes_per_s is None:
                self._bytes_per_s.pop(tier, None)
            else:
                self._bytes_per_s[tier] = bytes_per_s

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            with self._lock:
                self._prefill = ewma(self._prefill, num_tokens / seconds)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self._bytes_per_s[tier] = ewma(self._bytes_per_s.get(tier), nbytes / seconds)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        with self._lock:
            return self._prefill

    def tier_bytes_per_s(self) -> dict[str, float]:
        with self._lock:
            return dict(self._bytes_per_s)

    def snapshot(self) -> Speeds:
        """The speeds now; a tier not measured yet is loaded anyway (``unknown_loads``)."""
        with self._lock:
            return Speeds(self._prefill, dict(self._bytes_per_s), unknown_loads=True)
