"""GlobalBlockIndex bookkeeping and the TTFT cost model, with hand-computed numbers."""

from __future__ import annotations

import pytest

from kvstore.keys import hash_prompt_blocks
from proto.worker_api import BlockEvent
from router.errors import NoWorkerError
from router.index import GlobalBlockIndex
from router.placement import CostModel, WorkerProfile

H = hash_prompt_blocks(list(range(16 * 8)), 16, b"f" * 16)  # 8 chained block hashes
MB = 1_000_000


def ev(kind: str, tier: str, idx) -> BlockEvent:
    return BlockEvent(kind, tier, tuple(H[i] for i in idx))


def test_index_prefix_hits_by_best_tier() -> None:
    index = GlobalBlockIndex()
    index.apply("w0", ev("stored", "disk", range(6)))
    index.apply("w0", ev("stored", "host", [0, 1, 2]))
    index.apply("w0", ev("stored", "device", [0]))
    assert index.prefix_hits("w0", H) == {"device": 1, "host": 2, "disk": 3}
    assert index.leading_tiers("w0", H) == ["device", "host", "host", "disk", "disk", "disk"]
    # removing the HBM copy leaves the host copy; a hole ends the leading prefix
    index.apply_many("w0", [ev("removed", "device", [0]), ev("removed", "disk", [3])])
    assert index.prefix_hits("w0", H) == {"device": 0, "host": 3, "disk": 0}
    assert index.num_blocks("w0") == 5 and index.num_blocks("w0", "disk") == 5
    index.apply("w0", ev("removed", "host", [0]))
    assert index.prefix_hits("w0", H) == {"device": 0, "host": 2, "disk": 1}
    assert index.prefix_hits("unknown", H) == {"device": 0, "host": 0, "disk": 0}
    index.apply("w1", ev("stored", "host", [0]))
    assert index.all_prefix_hits(H[:1])["w1"]["host"] == 1
    assert index.remove_worker("w0") == 5
    assert index.workers() == ["w1"]


def test_index_rejects_bad_events() -> None:
    index = GlobalBlockIndex()
    with pytest.raises(ValueError, match="tier"):
        index.apply("w", ev("stored", "nvme", [0]))
    with pytest.raises(ValueError, match="kind"):
        index.apply("w", ev("evicted", "host", [0]))


def _model() -> CostModel:
    # 16-token blocks of 2 MB; 1000 tokens/s prefill -> a block computes in 16 ms
    return CostModel(block_size=16, block_nbytes=2 * MB)


def test_plan_load_versus_recompute() -> None:
    cm = _model()
    fast = WorkerProfile("w", 1000.0, {"host": 1000 * MB, "disk": 100 * MB})
    # host block: 2 ms to load vs 16 ms to compute; disk block: 20 ms > 16 ms
    plan = cm.plan_load(fast, ["host", "host", "disk"], prompt_len=100)
    assert plan.num_load_blocks == 2
    assert plan.load_s == pytest.approx(0.004)
    assert plan.compute_s == pytest.approx((100 - 32) / 1000)
    # a later host block makes loading the slow disk block in between worth it
    plan = cm.plan_load(fast, ["disk", "host", "host"], prompt_len=100)
    assert plan.num_load_blocks == 3
    assert plan.ttft_s == pytest.approx(0.020 + 0.004 + 0.052)
    # the last token is always computed: a fully cached 48-token prompt loads 2 blocks
    assert cm.plan_load(fast, ["host"] * 3, prompt_len=48).num_load_blocks == 2
    # device blocks without a measured bandwidth are free
    plan = cm.plan_load(fast, ["device", "nowhere"], prompt_len=40)
    assert (plan.num_load_blocks, plan.load_s) == (1, 0.0)


def test_choose_prefill_weighs_queue_hits_and_pulls() -> None:
    cm = _model()
    index = GlobalBlockIndex()
    index.apply("a", ev("stored", "host", range(6)))
    cm.update(WorkerProfile("a", 1000.0, {"host": 1000 * MB}, queue_depth=2, mean_service_s=0.05))
    cm.update(WorkerProfile("b", 1000.0, {"host": 1000 * MB}))
    # a: 0.1 queue + 6*2ms + 32 tokens = 0.144; b: 128 tokens = 0.128 -> b
    p = cm.choose_prefill(["a", "b"], index, H, prompt_len=128)
    assert (p.worker_id, p.num_local_blocks, p.pull_from) == ("b", 0, None)
    assert p.plan.ttft_s == pytest.approx(0.128)
    assert cm.predicted_ttft("a", index.leading_tiers("a", H), 128) == pytest.approx(0.144)
    # with a network path b pulls a's 6 blocks (10 ms each < 16 ms compute)
    cm.update(WorkerProfile("b", 1000.0, {"host": 1000 * MB}, net_bytes_per_s=200 * MB))
    p = cm.choose_prefill(["a", "b"], index, H, prompt_len=128)
    assert (p.worker_id, p.pull_from, p.num_pull_blocks) == ("b", "a", 6)
    assert p.plan.ttft_s == pytest.approx(0.060 + 0.032)
    # idle a wins outright
    cm.update(WorkerProfile("a", 1000.0, {"host": 1000 * MB}))
    assert cm.choose_prefill(["a", "b"], index, H, 128).worker_id == "a"
    with pytest.raises(NoWorkerError):
        cm.choose_prefill(["ghost"], index, H, 128)


def test_choose_decode_least_loaded_then_prefix() -> None:
    cm = _model()
    index = GlobalBlockIndex()
    index.apply("d1", ev("stored", "device", range(3)))
    for w, depth in (("d0", 1), ("d1", 1), ("d2", 4)):
        cm.update(WorkerProfile(w, 1000.0, queue_depth=depth))
    assert cm.choose_decode(["d0", "d1", "d2"], index, H) == "d1"
    cm.profiles["d1"].queue_depth = 2
    assert cm.choose_decode(["d0", "d1", "d2"], index, H) == "d0"
    with pytest.raises(NoWorkerError):
        cm.choose_decode([], index, H)


def test_profile_measurements() -> None:
    p = WorkerProfile("w", 1000.0, ewma_alpha=0.5)
    p.observe_prefill(3000, 1.0)
    assert p.prefill_tokens_per_s == pytest.approx(2000.0)
    p.observe_load("disk", 100 * MB, 1.0)
    p.observe_load("disk", 300 * MB, 1.0)
    assert p.load_bytes_per_s["disk"] == pytest.approx(200 * MB)
    p.observe_service(0.2)
    p.observe_service(0.4)
    p.queue_depth = 3
    assert p.queue_wait_s == pytest.approx(0.9)
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        WorkerProfile("w", 0.0)


def test_choose_prefill_picks_the_longest_prefix_unless_its_queue_is_slower() -> None:
    cm = _model()
    index = GlobalBlockIndex()
    index.apply("long", ev("stored", "host", range(8)))
    index.apply("short", ev("stored", "device", range(3)))
    for w in ("long", "short", "none"):
        cm.update(WorkerProfile(w, 1000.0, {"host": 1000 * MB}))
    # 7 loadable host blocks (14 ms) + 16 tokens (16 ms) beat 3 free blocks + 80 tokens
    p = cm.choose_prefill(["none", "short", "long"], index, H, prompt_len=128)
    assert (p.worker_id, p.num_local_blocks, p.plan.num_load_blocks) == ("long", 8, 7)
    assert p.plan.ttft_s == pytest.approx(0.014 + 0.016)
    # one request of 60 ms queued on "long": "short" (80 ms of compute) is faster now
    cm.profiles["long"].queue_depth, cm.profiles["long"].mean_service_s = 1, 0.06
    p = cm.choose_prefill(["none", "short", "long"], index, H, prompt_len=128)
    assert (p.worker_id, p.plan.ttft_s) == ("short", pytest.approx(0.080))
    # "short" busy too: an idle worker with nothing cached is the fastest
    cm.profiles["short"].queue_depth, cm.profiles["short"].mean_service_s = 1, 0.1
    assert cm.choose_prefill(["none", "short", "long"], index, H, 128).worker_id == "long"
    cm.profiles["long"].mean_service_s = 0.2
    assert cm.choose_prefill(["none", "short", "long"], index, H, 128).worker_id == "none"


def test_placement_plans_few_keys_in_the_order_of_their_bounds() -> None:
    index = GlobalBlockIndex()
    names = [f"w{i}" for i in range(6)]
    cm = CostModel(block_size=16, block_nbytes=2 * MB, max_plans=32)
    for i, w in enumerate(names):  # six distinct residencies: 1 .. 6 leading host blocks
        index.apply(w, ev("stored", "host", range(i + 1)))
        cm.update(WorkerProfile(w, 1000.0, {"host": 1000 * MB}))
    plans: list[int] = []
    plan = cm.load_plan
    cm.load_plan = lambda profile, runs, n: plans.append(1) or plan(profile, runs, n)  # type: ignore[method-assign]
    # w5: 6 host blocks (12 ms) + 32 tokens (32 ms) = 44 ms; w4's bound, 128 ms less 5 x 14 ms
    # saved, is 58 ms: no other worker can win, none is planned
    p = cm.choose_prefill(names, index, H, prompt_len=128)
    assert (p.worker_id, p.plan.num_load_blocks, len(plans)) == ("w5", 6, 1)
    assert p.plan.ttft_s == pytest.approx(0.044)
    # a slow disk run before a fast host run: loading the host blocks needs the disk ones
    # loaded first, which the bound (each block loaded or computed, whichever is cheaper)
    # does not see; six speeds, six keys whose bounds (72 ms) are below every plan (84 ms)
    index = GlobalBlockIndex()
    for i, w in enumerate(names):
        index.apply_many(w, [ev("stored", "disk", range(3)), ev("stored", "host", range(3, 7))])
        cm.update(WorkerProfile(w, 1000.0 + i, {"host": 1000 * MB, "disk": 100 * MB}))
    plans.clear()
    p = cm.choose_prefill(names, index, H, prompt_len=128)
    assert (p.worker_id, p.plan.num_load_blocks, len(plans)) == ("w5", 7, 6)
    cm.max_plans = 2
    plans.clear()
    assert cm.choose_prefill(names, index, H, 128).worker_id == "w5"  # the lowest bound first
    assert len(plans) == 2
    with pytest.raises(ValueError, match="max_plans"):
        CostModel(16, 2 * MB, max_plans=0)
