"""kvstore.cost.plan_load: the one load-or-recompute function of the engine and the router."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvstore.cost import (
    LOAD_MARGIN_S,
    LOAD_SLACK,
    SPLIT_GAIN,
    Speeds,
    SpeedTracker,
    plan_load,
    tier_runs,
)

MB = 1 << 20
BS = 16  # tokens a block


def _brute_force(loads: list[float], prompt_len: int, speed: float) -> float:
    """Least max(compute(h), load(h, t)) + compute(rest) over every head h and end t."""
    best = prompt_len / speed
    for t in range(len(loads) + 1):
        rest = (prompt_len - t * BS) / speed
        for h in range(t + 1):
            best = min(best, max(h * BS / speed, sum(loads[h:t])) + rest)
    return best


def test_sequential_loads_the_leading_blocks_that_pay() -> None:
    speeds = Speeds(1000.0, {"host": 1000 * MB, "disk": 100 * MB})
    plan = plan_load(tier_runs(["host", "host", "disk"]), 100, BS, 2 * MB, speeds, overlap=False)
    # 2 ms a host block, 20 ms the disk one, 16 ms to compute a block: the disk one is computed
    assert plan.num_load_blocks == 2 and plan.num_head_blocks == 0
    assert plan.ttft_s == pytest.approx(2 * 0.002 + (100 - 32) / 1000)
    slow = Speeds(1000.0, {"disk": 1 * MB})  # 2 s a block: never worth it
    assert plan_load([("disk", 5)], 100, BS, 2 * MB, slow, overlap=False).num_load_blocks == 0
    none = Speeds(1000.0, {"host": 1000 * MB})  # no disk tier here: it ends what can be loaded
    plan = plan_load(tier_runs(["host", "disk", "host"]), 100, BS, 2 * MB, none, overlap=False)
    assert plan.num_load_blocks == 1


def test_the_split_meets_in_the_middle() -> None:
    # a block computes in 1 s and loads in 10 s: compute 29 blocks while the last 2 load
    plan = plan_load([("disk", 31)], 500, BS, 10_000, Speeds(16.0, {"disk": 1000.0}))
    assert (plan.num_head_blocks, plan.num_load_blocks) == (29, 2)
    assert plan.ttft_s == pytest.approx(29.0 + 4 / 16)
    assert plan.deadline_s == pytest.approx(20.0 * LOAD_SLACK + LOAD_MARGIN_S)
    # a load slower than the whole prompt's compute: plain recompute
    hopeless = plan_load([("disk", 31)], 500, BS, 10_000, Speeds(16.0, {"disk": 100.0}))
    assert (hopeless.num_head_blocks, hopeless.num_load_blocks) == (0, 0)
    assert hopeless.ttft_s == pytest.approx(500 / 16) and hopeless.deadline_s is None
    # a fast tier: load everything, no head
    fast = plan_load([("host", 31)], 500, BS, 10_000, Speeds(16.0, {"host": 1e9}))
    assert (fast.num_head_blocks, fast.num_load_blocks) == (0, 31)


def test_unknown_speeds_load_everything_without_a_deadline() -> None:
    plan = plan_load([("disk", 31)], 500, BS, 10_000, Speeds(None, {}, unknown_loads=True))
    assert (plan.num_head_blocks, plan.num_load_blocks, plan.deadline_s) == (0, 31, None)
    plan = plan_load([("disk", 31)], 500, BS, 10_000, Speeds(16.0, {}, unknown_loads=True))
    assert plan.num_load_blocks == 31 and math.isnan(plan.load_s)
    # the router's view: a tier it has no speed for cannot be loaded
    assert plan_load([("disk", 31)], 500, BS, 10_000, Speeds(16.0, {})).num_load_blocks == 0


@settings(max_examples=200, deadline=None)
# loading every hit (a fast host block, then a slow disk one) lost to loading the host block alone
@example(tiers=["host", "disk"], extra=7, speed=10420.0, host_bw=278454908.0, disk_bw=37007914.0)
@given(
    tiers=st.lists(st.sampled_from(["device", "host", "disk"]), min_size=0, max_size=24),
    extra=st.integers(1, 40),
    speed=st.floats(10.0, 1e5),
    host_bw=st.floats(1e3, 1e9),
    disk_bw=st.floats(1e2, 1e8),
)
def test_the_split_is_optimal_and_never_worse_than_computing(
    tiers: list[str], extra: int, speed: float, host_bw: float, disk_bw: float
) -> None:
    prompt_len = len(tiers) * BS + extra
    nbytes = 64 << 10
    speeds = Speeds(speed, {"host": host_bw, "disk": disk_bw})
    plan = plan_load(tier_runs(tiers), prompt_len, BS, nbytes, speeds, overlap=True)
    seq = plan_load(tier_runs(tiers), prompt_len, BS, nbytes, speeds, overlap=False)
    bw = {"device": math.inf, "host": host_bw, "disk": disk_bw}
    loads = [nbytes / bw[t] for t in tiers[: (prompt_len - 1) // BS]]
    cold = prompt_len / speed
    assert plan.ttft_s <= cold * (1 + 1e-9)
    assert plan.ttft_s <= seq.ttft_s * (1 + 1e-9) + 1e-12
    best = _brute_force(loads, prompt_len, speed)
    if plan.num_head_blocks:  # the split runs only where it is the optimum
        assert plan.ttft_s == pytest.approx(best, rel=1e-9)
    else:  # else the optimum, or a load without a split within SPLIT_GAIN of it
        assert best <= plan.ttft_s * (1 + 1e-9) and best >= SPLIT_GAIN * plan.ttft_s * (1 - 1e-9)
    assert plan.num_head_blocks + plan.num_load_blocks <= len(loads)


def test_the_tracker_follows_observations() -> None:
    speeds = SpeedTracker()
    assert speeds.snapshot().prefill_tokens_per_s is None
    speeds.observe_prefill(1000, 1.0)
    speeds.observe_prefill(2000, 1.0)
    assert speeds.prefill_tokens_per_s == pytest.approx(0.2 * 2000 + 0.8 * 1000)
    speeds.set_tier("disk", 1e9)
    speeds.observe_load("disk", 100, 1e-6)
    assert speeds.tier_bytes_per_s()["disk"] == pytest.approx(0.2 * 1e8 + 0.8 * 1e9)
    assert speeds.snapshot().unknown_loads
