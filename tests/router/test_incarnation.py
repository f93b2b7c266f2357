"""Worker incarnations in the index: batches and snapshots numbered within an epoch, a restart
(a new epoch) and the races of a resync with the event poller, step by step."""

from __future__ import annotations

from kvstore.keys import hash_prompt_blocks
from proto.worker_api import BlockEvent, EventBatch
from router.incarnation import Action, Incarnations
from router.index import GlobalBlockIndex

H = hash_prompt_blocks(list(range(16 * 8)), 16, b"e" * 16)  # 8 chained block hashes
A, B = 1_000, 2_000  # two starts of one worker


def stored(epoch: int, seq: int, tier: str, idx: range, lost: bool = False) -> EventBatch:
    return EventBatch(epoch, seq, (BlockEvent("stored", tier, tuple(H[i] for i in idx)),), lost)


def removed(epoch: int, seq: int, tier: str, idx: range) -> EventBatch:
    return EventBatch(epoch, seq, (BlockEvent("removed", tier, tuple(H[i] for i in idx)),))


def test_a_stale_batch_of_the_last_start_never_credits_the_restarted_worker() -> None:
    """The race of the known bug: the poller drained a batch from the worker, the worker died
    and came back with an empty disk, the resync applied, then the poller's old batch lands."""
    index = GlobalBlockIndex()
    assert index.replace_worker("w", {"disk": H[:4]}, epoch=A, seq=1)
    drained = stored(A, 2, "device", range(8))  # in the poller's hands
    index.remove_worker("w")  # the worker died
    assert index.replace_worker("w", {}, epoch=B, seq=1)  # back with nothing
    assert index.apply_batch("w", drained)  # stale: ignored, the worker stays in sync
    assert index.leading_tiers("w", H) == [] and index.num_blocks("w") == 0
    assert index.apply_batch("w", stored(B, 2, "host", range(2)))
    assert index.leading_tiers("w", H) == ["host", "host"]
    assert not index.replace_worker("w", {"disk": H}, epoch=A, seq=9)  # a stale snapshot


def test_a_snapshot_older_than_an_applied_batch_is_refused_and_a_newer_one_applies() -> None:
    index = GlobalBlockIndex()
    assert index.replace_worker("w", {"host": H[:2]}, epoch=A, seq=1)
    assert index.apply_batch("w", stored(A, 2, "device", range(3)))
    snapshot_taken_before_batch_3 = {"device": H[:3], "host": H[:2]}
    assert index.apply_batch("w", removed(A, 3, "device", range(3)))  # the poller got ahead
    assert not index.replace_worker("w", snapshot_taken_before_batch_3, epoch=A, seq=2)
    assert index.leading_tiers("w", H) == ["host", "host"]  # batch 3 was not undone
    assert index.replace_worker("w", {"host": H[:2]}, epoch=A, seq=4)  # the next one applies
    assert index.apply_batch("w", stored(A, 3, "disk", range(8)))  # (an old batch: ignored)
    assert index.num_blocks("w") == 2


def test_a_restart_nobody_noticed_drops_the_entries_until_a_snapshot() -> None:
    index = GlobalBlockIndex()
    assert index.replace_worker("w", {"device": H[:4], "disk": H[:6]}, epoch=A, seq=1)
    assert not index.apply_batch("w", stored(B, 1, "device", range(2)))  # a new start
    assert not index.in_sync("w")
    assert index.leading_tiers("w", H) == ["device", "device"]  # none of the old entries
    assert not index.apply_batch("w", stored(B, 2, "host", range(2, 3)))  # still waiting
    assert index.replace_worker("w", {"device": H[:2], "disk": H[2:4]}, epoch=B, seq=3)
    assert index.in_sync("w") and index.leading_tiers("w", H) == ["device"] * 2 + ["disk"] * 2
    assert index.apply_batch("w", stored(A, 2, "host", range(8)))  # the old start: ignored
    assert index.num_blocks("w") == 4


def test_a_gap_or_lost_events_distrust_the_entries() -> None:
    index = GlobalBlockIndex()
    assert index.replace_worker("w", {"host": H[:4]}, epoch=A, seq=1)
    assert not index.apply_batch("w", stored(A, 3, "device", range(1)))  # batch 2 never came
    assert index.leading_tiers("w", H) == ["device"]  # the host entries may be stale: gone
    assert index.replace_worker("w", {"host": H[:4]}, epoch=A, seq=4)
    assert not index.apply_batch("w", stored(A, 5, "device", range(1), lost=True))
    assert index.leading_tiers("w", H) == ["device"]


def test_a_dropped_worker_stays_out_until_its_snapshot() -> None:
    index = GlobalBlockIndex()
    assert index.replace_worker("w", {"host": H[:4]}, epoch=A, seq=1)
    index.remove_worker("w")
    assert index.apply_batch("w", stored(A, 2, "host", range(8)))  # its old start: ignored
    assert index.apply_batch("w", stored(B, 1, "host", range(8)))  # its new start: not yet
    assert index.workers() == [] and index.residency(H) == []
    assert not index.replace_worker("w", {"host": H[:1]}, epoch=B, seq=1)  # older than batch 1
    assert index.replace_worker("w", {"host": H[:1]}, epoch=B, seq=2)
    assert index.workers() == ["w"] and index.leading_tiers("w", H) == ["host"]


def test_incarnation_rules() -> None:
    inc = Incarnations()
    assert inc.batch("w", A, 1, False) is Action.RESET and not inc.in_sync("w")  # no baseline
    assert inc.snapshot("w", A, 2) and inc.in_sync("w")
    assert inc.batch("w", A, 2, False) is Action.IGNORE
    assert inc.batch("w", A, 3, False) is Action.APPLY
    assert inc.batch("w", A, 5, False) is Action.RESET  # 4 is missing
    assert inc.batch("w", B, 1, False) is Action.RESET
    assert inc.batch("w", A, 6, False) is Action.IGNORE and not inc.snapshot("w", A, 7)
    inc.drop("w")
    assert inc.in_sync("w") and inc.batch("w", B, 2, False) is Action.IGNORE
    assert not inc.snapshot("w", B, 2) and inc.snapshot("w", B, 3)
