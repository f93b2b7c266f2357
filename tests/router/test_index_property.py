"""The global index and the placement at scale against the plain per-worker reference: the same
answers after any sequence of stored / removed / worker-gone / resync events, numbered batches
and snapshots of several incarnations (epochs) included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.router_ref import ReferenceBlockIndex, reference_choose_prefill
from kvstore.keys import hash_prompt_blocks
from proto.worker_api import BlockEvent
from router.block_rows import merge_ops, op_code
from router.index import TIERS, GlobalBlockIndex, _words_of
from router.placement import CostModel, WorkerProfile

H = hash_prompt_blocks(list(range(16 * 10)), 16, b"p" * 16)  # 10 chained block hashes
MB = 1_000_000

block = st.integers(0, len(H) - 1)
# any blocks, or a run of consecutive ones (a stored prefix, an evicted tail)
blocks = st.one_of(st.lists(block, max_size=12),
                   st.builds(lambda a, b: list(range(min(a, b), max(a, b) + 1)), block, block))
tiers = st.sampled_from(TIERS)


def ops(num_workers: int) -> st.SearchStrategy:
    worker = st.integers(0, num_workers - 1).map(lambda i: f"w{i:02d}")
    kind = st.sampled_from(["stored", "removed"])
    event = st.tuples(kind, worker, tiers, blocks)
    # several events of one worker in one apply_many (folded per block by the index)
    batch = st.tuples(st.just("batch"), worker,
                      st.lists(st.tuples(kind, tiers, blocks), min_size=2, max_size=6))
    # several events of one batch on the same hashes (a block written through to host and
    # disk): merged into one pass over the rows where their tiers differ
    same = st.tuples(st.just("same"), worker, blocks,
                     st.lists(st.tuples(kind, tiers), min_size=2, max_size=5))
    # events on a few hash lists, interleaved (evicted from HBM, stored in HBM, evicted from
    # host, written through to host and disk): merged across the events between them
    lists = st.tuples(st.just("lists"), worker, st.lists(blocks, min_size=2, max_size=3),
                      st.lists(st.tuples(kind, tiers, st.integers(0, 2)), min_size=2,
                               max_size=7))
    gone = st.tuples(st.just("gone"), worker)
    resync = st.tuples(st.just("resync"), worker, st.dictionaries(tiers, blocks, max_size=3))
    compact = st.just(("compact",))
    # numbered batches and snapshots of incarnations 1..3: in order, repeated, late, lost
    epoch, seq = st.integers(1, 3), st.integers(1, 6)
    numbered = st.tuples(st.just("numbered"), worker, epoch, seq, st.booleans(),
                         st.lists(st.tuples(kind, tiers, blocks), max_size=3))
    snapshot = st.tuples(st.just("snapshot"), worker, epoch, seq,
                         st.dictionaries(tiers, blocks, max_size=3))
    return st.lists(st.one_of(event, event, batch, batch, same, lists, gone, resync, compact,
                              numbered, numbered, snapshot), max_size=60)


@dataclass(frozen=True)
class Numbered:
    epoch: int
    seq: int
    lost: bool
    events: tuple[BlockEvent, ...]


query = st.one_of(st.lists(block, max_size=12), st.just(list(range(len(H)))))
queries = st.lists(query, min_size=1, max_size=4)


def _index(few_points: int = 16) -> GlobalBlockIndex:
    index = GlobalBlockIndex()
    index.SCRUB_ROWS_PER_BATCH = 1  # removed workers' bits linger across several batches
    index.FIRST_CHUNK = 2  # a walk crosses chunk boundaries
    index.FEW_POINTS = few_points  # 0: groups found from the changes, never by splitting
    return index


def _apply(op: tuple, index: GlobalBlockIndex, ref: ReferenceBlockIndex) -> None:
    if op[0] == "compact":
        index.compact()
    elif op[0] == "gone":
        assert index.remove_worker(op[1]) == ref.remove_worker(op[1])
    elif op[0] == "batch":
        events = [BlockEvent(kind, tier, tuple(H[i] for i in idx)) for kind, tier, idx in op[2]]
        index.apply_many(op[1], events)
        ref.apply_many(op[1], events)
    elif op[0] == "same":
        hashes = tuple(H[i] for i in op[2])
        events = [BlockEvent(kind, tier, hashes) for kind, tier in op[3]]
        index.apply_many(op[1], events)
        ref.apply_many(op[1], events)
    elif op[0] == "lists":
        hashes = [tuple(H[i] for i in idx) for idx in op[2]]
        events = [BlockEvent(kind, tier, hashes[i % len(hashes)]) for kind, tier, i in op[3]]
        index.apply_many(op[1], events)
        ref.apply_many(op[1], events)
    elif op[0] == "resync":
        held = {tier: [H[i] for i in idx] for tier, idx in op[2].items()}
        index.replace_worker(op[1], held)
        ref.replace_worker(op[1], held)
    elif op[0] == "numbered":
        _, w, epoch, seq, lost, evs = op
        numbered = Numbered(epoch, seq, lost,
                            tuple(BlockEvent(k, t, tuple(H[i] for i in idx)) for k, t, idx in evs))
        assert index.apply_batch(w, numbered) == ref.apply_batch(w, numbered)
    elif op[0] == "snapshot":
        _, w, epoch, seq, blocks = op
        held = {tier: [H[i] for i in idx] for tier, idx in blocks.items()}
        assert index.replace_worker(w, held, epoch, seq) == ref.replace_worker(w, held, epoch, seq)
    else:
        kind, w, tier, idx = op
        event = BlockEvent(kind, tier, tuple(H[i] for i in idx))
        index.apply(w, event)
        ref.apply_many(w, [event])


def _check(index: GlobalBlockIndex, ref: ReferenceBlockIndex, query: list[bytes]) -> None:
    assert index.workers() == ref.workers()
    for w in ref.workers():
        assert index.in_sync(w) == ref.in_sync(w)
        assert index.num_blocks(w) == ref.num_blocks(w)
        for tier in TIERS:
            assert index.num_blocks(w, tier) == ref.num_blocks(w, tier)
        assert index.leading_tiers(w, query) == ref.leading_tiers(w, query)
    expected = {w: ref.leading_tiers(w, query) for w in ref.workers()}
    groups = index.residency(query)
    seen = [w for g in groups for w in g.worker_ids]
    assert sorted(seen) == sorted(w for w, t in expected.items() if t)  # each holder once
    assert len({g.runs for g in groups}) == len(groups)  # one group per distinct residency
    for g in groups:
        assert all(n > 0 for _, n in g.runs)
        for w in g.worker_ids:
            assert g.tiers() == expected[w]
    hits = index.all_prefix_hits(query)
    assert hits == {w: {t: tiers.count(t) for t in TIERS} for w, tiers in expected.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_workers=st.sampled_from([3, 6, 70]), few_points=st.sampled_from([0, 3, 16]),
       events=st.data(), query_idx=queries)
def test_index_matches_reference(num_workers: int, few_points: int, events: st.DataObject,
                                 query_idx: list[list[int]]) -> None:
    index, ref = _index(few_points), ReferenceBlockIndex()
    for op in events.draw(ops(num_workers)):
        _apply(op, index, ref)
        _check(index, ref, [H[i] for i in query_idx[0]])
    for idx in query_idx:
        _check(index, ref, [H[i] for i in idx])


profiles = st.builds(
    lambda speed, host, disk, net, depth, service: (speed, host, disk, net, depth, service),
    st.sampled_from([500.0, 1000.0]), st.sampled_from([100 * MB, 1000 * MB]),
    st.sampled_from([50 * MB, 200 * MB]), st.sampled_from([0.0, 150 * MB]),
    st.integers(0, 3), st.sampled_from([0.0, 0.01, 0.05]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_workers=st.sampled_from([3, 6, 40]), few_points=st.sampled_from([0, 16]),
       events=st.data(), query_idx=queries, extra_tokens=st.integers(1, 40), params=st.data())
def test_choose_prefill_matches_reference(num_workers: int, few_points: int,
                                          events: st.DataObject, query_idx: list[list[int]],
                                          extra_tokens: int, params: st.DataObject) -> None:
    index, ref = _index(few_points), ReferenceBlockIndex()
    for op in events.draw(ops(num_workers)):
        _apply(op, index, ref)
    cost = CostModel(block_size=16, block_nbytes=2 * MB, max_plans=64)  # > keys: exact
    names = [f"w{i:02d}" for i in range(num_workers)]
    for w in names:
        speed, host, disk, net, depth, service = params.draw(profiles)
        cost.update(WorkerProfile(w, speed, {"host": host, "disk": disk}, net, depth, service))
    candidates = params.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    for idx in query_idx:
        query = [H[i] for i in idx]
        prompt_len = 16 * len(query) + extra_tokens
        got = cost.choose_prefill(candidates, index, query, prompt_len)
        assert got == reference_choose_prefill(cost, candidates, ref, query, prompt_len)
        want = min(candidates, key=lambda w: (cost.profiles[w].queue_depth,
                                              -len(ref.leading_tiers(w, query)), w))
        assert cost.choose_decode(candidates, index, query) == want


def test_resync_and_removal_leave_no_entries() -> None:
    index = GlobalBlockIndex()
    index.apply("a", BlockEvent("stored", "host", tuple(H)))
    index.apply("b", BlockEvent("stored", "disk", tuple(H[:4])))
    index.replace_worker("a", {"device": H[:2]})
    assert index.leading_tiers("a", H) == ["device", "device"]
    assert index.num_blocks("a") == 2 and index.num_blocks("a", "host") == 0
    assert index.remove_worker("b") == 4 and index.remove_worker("b") == 0
    index.remove_worker("a")
    assert index.workers() == [] and index.residency(H) == []
    index.add_worker("c")  # the retired slots still have bits in rows: not reused yet
    assert index._slot_of["c"] == 3 and len(index._rows)  # (the resync retired slot 0 too)
    index.compact()
    assert len(index) == 0 and len(index._rows) == 0  # nothing left behind
    index.add_worker("d")  # a scrubbed slot is reused
    assert index._slot_of["d"] == 0
    with pytest.raises(ValueError, match="tier"):
        index.replace_worker("c", {"nvme": H[:1]})


def test_removal_is_immediate_and_its_rows_are_scrubbed_by_later_batches() -> None:
    index = GlobalBlockIndex()
    index.SCRUB_ROWS_PER_BATCH = 1
    index.apply("a", BlockEvent("stored", "host", tuple(H)))
    index.apply("b", BlockEvent("stored", "disk", tuple(H[:2])))
    assert len(index._rows) == 2  # {a host, b disk} for H[:2], {a host} for the rest
    assert index.remove_worker("a") == len(H)
    assert [g.worker_ids for g in index.residency(H)] == [("b",)]
    assert index.num_blocks("a") == 0 and len(index) == len(H)
    batches = 0
    while index._scrub.busy:  # a row a batch, then the blocks left to nobody swept out
        index.apply("b", BlockEvent("stored", "device", tuple(H[:1])))
        batches += 1
    assert batches > 2 and len(index) == 2 and len(index._rows) == 2
    assert index.leading_tiers("b", H) == ["device", "disk"] and index.num_blocks("b") == 2
    index.add_worker("c")  # slot 0 is free again
    assert index._slot_of["c"] == 0 and index.residency(H[:1])[0].worker_ids == ("b",)


def test_the_table_grows_and_drops_what_nobody_holds() -> None:
    many = hash_prompt_blocks(list(range(16 * 9000)), 16, b"g" * 16)
    index = GlobalBlockIndex()
    index.apply("a", BlockEvent("stored", "host", tuple(many)))
    assert len(index) == len(many) and index._table.capacity >= 2 * len(many)
    assert index.leading_tiers("a", many[:3]) == ["host"] * 3
    index.apply("a", BlockEvent("removed", "host", tuple(many[100:])))
    index.apply("b", BlockEvent("stored", "disk", tuple(many[:5000])))  # rebuilds the table
    assert len(index) == 5000 and index.num_blocks("a") == 100
    assert index.leading_lengths(many) == {"a": 100, "b": 5000}
    assert index.all_prefix_hits(many)["b"] == {"device": 0, "host": 0, "disk": 5000}


def test_bit_sets_of_slots() -> None:
    slots = np.array([0, 5, 63, 64, 200, 1023, -1] + list(range(300, 340)))
    words = _words_of(slots, 16)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    assert np.flatnonzero(bits).tolist() == sorted(int(s) for s in slots if s >= 0)


def test_events_on_the_same_hashes_merge_across_events_on_other_tiers() -> None:
    a, b, c = (tuple(H[i : i + 3]) for i in (0, 3, 6))
    dev, host, disk = (TIERS.index(t) for t in ("device", "host", "disk"))
    batch = [(op_code(dev, False), a), (op_code(dev, True), b), (op_code(host, False), c),
             (op_code(host, True), b), (op_code(disk, True), tuple(H[3:6]))]
    # HBM store of b moves past the host removal of c; the disk store (equal hashes) joins
    assert merge_ops(batch) == [
        (op_code(dev, False), a), (op_code(host, False), c),
        (op_code(dev, True) | op_code(host, True) | op_code(disk, True), b)]
    # the later event moves back past an event on another tier (host), where the earlier
    # one (HBM) could not move past one on its own (HBM)
    assert merge_ops([(op_code(dev, True), b), (op_code(host, False), a),
                      (op_code(disk, True), b)]) == [
        (op_code(dev, True) | op_code(disk, True), b), (op_code(host, False), a)]
    assert merge_ops([(op_code(host, True), b), (op_code(dev, False), a),
                      (op_code(dev, True), b)]) == [
        (op_code(dev, False), a), (op_code(host, True) | op_code(dev, True), b)]
    # neither commutes with the events between them (one on each one's tier): kept apart
    apart = [(op_code(dev, True), b), (op_code(dev, False), a), (op_code(host, False), c),
             (op_code(host, True), b)]
    assert merge_ops(apart) == apart


def test_a_batch_with_repeated_blocks_folds_them_and_leaves_other_rows_alone() -> None:
    index = GlobalBlockIndex()
    index.apply("a", BlockEvent("stored", "disk", tuple(H[:4])))
    index.apply_many("b", [BlockEvent("stored", "device", (H[0], H[1], H[0])),
                           BlockEvent("removed", "device", (H[1],)),
                           BlockEvent("stored", "host", (H[1], H[2]))])
    assert index.leading_tiers("a", H[:4]) == ["disk"] * 4
    assert index.leading_tiers("b", H[:4]) == ["device", "host", "host"]
    assert (index.num_blocks("b"), index.num_blocks("b", "device")) == (3, 1)
