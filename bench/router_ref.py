"""The plain per-worker block index and placement loop: the reference the fast ones must match.

One dict per worker (block hash -> tier bit mask); a placement asks every worker in turn for its
leading run and evaluates the cost model once per worker and block, with no bound on the work.
The incarnation rules (``router.incarnation``) are written out again here, plainly, one dict per
worker. Kept as the oracle of the property tests (``tests/router/test_index_property.py``) and
as the "before" row of ``strata bench router``; the router itself uses
``router.index.GlobalBlockIndex`` and ``CostModel.choose_prefill``. It lives in ``bench`` (not
``router``, which serves, nor ``tests``, which the shipped benchmarks cannot import).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kvstore.keys import BlockHash
from proto.vocab import EventKind
from proto.worker_api import BlockEvent
from router.errors import NoWorkerError
from router.incarnation import MAX_PAST_EPOCHS
from router.index import TIERS, EventBatchLike, tier_bit
from router.placement import REMOTE_TIER, CostModel, Placement


def best_tier(mask: int) -> str:
    assert mask, "best_tier of a block held in no tier"
    return TIERS[(mask & -mask).bit_length() - 1]


class ReferenceBlockIndex:
    """Per worker: block hash -> bit mask of the tiers holding it (not thread-safe)."""

    def __init__(self) -> None:
        self._workers: dict[str, dict[bytes, int]] = {}
        # worker -> {"epoch", "seq", "synced", "dropped", "past"}: see router.incarnation
        self._inc: dict[str, dict] = {}

    def add_worker(self, worker_id: str) -> None:
        self._workers.setdefault(worker_id, {})

    def remove_worker(self, worker_id: str) -> int:
        inc = self._inc.get(worker_id)
        if inc is not None:
            inc["dropped"], inc["synced"] = True, False
        return len(self._workers.pop(worker_id, {}))

    def replace_worker(self, worker_id: str, blocks: Mapping[str, Iterable[BlockHash]],
                       epoch: int | None = None, seq: int = 0) -> bool:
        fresh: dict[bytes, int] = {}
        for tier, hashes in blocks.items():
            bit = tier_bit(tier)
            for h in hashes:
                fresh[h] = fresh.get(h, 0) | bit
        if epoch is not None:
            inc = self._inc.get(worker_id)
            if inc is None:
                inc = self._inc[worker_id] = {"epoch": epoch, "seq": 0, "past": []}
            elif epoch != inc["epoch"]:
                if epoch in inc["past"]:
                    return False
                inc["past"] = (inc["past"] + [inc["epoch"]])[-MAX_PAST_EPOCHS:]
                inc["epoch"] = epoch
            elif seq <= inc["seq"]:
                return False
            inc.update(seq=seq, synced=True, dropped=False)
        self._workers[worker_id] = fresh
        return True

    def in_sync(self, worker_id: str) -> bool:
        inc = self._inc.get(worker_id)
        return inc is None or inc["synced"] or inc["dropped"]

    def apply_batch(self, worker_id: str, batch: EventBatchLike) -> bool:
        events = list(batch.events)
        for e in events:
            tier_bit(e.tier)  # a bad event fails before anything changes
            if e.kind not in (EventKind.STORED, EventKind.REMOVED):
                raise ValueError(f"unknown event kind {e.kind!r}")
        epoch, seq = batch.epoch, batch.seq
        inc = self._inc.get(worker_id)
        if inc is None:  # no baseline: apply, wait for a snapshot
            self._inc[worker_id] = {"epoch": epoch, "seq": seq, "synced": False,
                                    "dropped": False, "past": []}
            reset = True
        elif epoch != inc["epoch"]:
            if epoch in inc["past"]:
                return self.in_sync(worker_id)
            inc["past"] = (inc["past"] + [inc["epoch"]])[-MAX_PAST_EPOCHS:]
            inc.update(epoch=epoch, seq=seq, synced=False)
            if inc["dropped"]:
                return self.in_sync(worker_id)
            reset = True
        elif inc["dropped"] or seq <= inc["seq"]:
            inc["seq"] = max(inc["seq"], seq)
            return self.in_sync(worker_id)
        else:
            reset = batch.lost or seq != inc["seq"] + 1
            inc["seq"] = seq
            if reset:
                inc["synced"] = False
        if reset:
            self._workers[worker_id] = {}
        self.apply_many(worker_id, events)
        return self.in_sync(worker_id)

    def workers(self) -> list[str]:
        return sorted(self._workers)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        blocks = self._workers.get(worker_id, {})
        if tier is None:
            return len(blocks)
        bit = tier_bit(tier)
        return sum(1 for mask in blocks.values() if mask & bit)

    def apply_many(self, worker_id: str, events: Iterable[BlockEvent]) -> None:
        blocks = self._workers.setdefault(worker_id, {})
        for event in events:
            bit = tier_bit(event.tier)
            if event.kind == EventKind.STORED:
                for h in event.block_hashes:
                    blocks[h] = blocks.get(h, 0) | bit
            elif event.kind == EventKind.REMOVED:
                for h in event.block_hashes:
                    mask = blocks.get(h, 0) & ~bit
                    if mask:
                        blocks[h] = mask
                    else:
                        blocks.pop(h, None)
            else:
                raise ValueError(f"unknown event kind {event.kind!r}")

    def leading_tiers(self, worker_id: str, hashes: Sequence[BlockHash]) -> list[str]:
        blocks = self._workers.get(worker_id, {})
        out: list[str] = []
        for h in hashes:
            mask = blocks.get(h, 0)
            if not mask:
                break
            out.append(best_tier(mask))
        return out


def reference_choose_prefill(
    cost: CostModel,
    candidates: Sequence[str],
    index: ReferenceBlockIndex,
    hashes: Sequence[BlockHash],
    prompt_len: int,
) -> Placement:
    """Every worker's leading run, then one cost evaluation per candidate (ties: more local
    prefix, then fewer queued, then fewer blocks cached, then id); the donor of a pull is the
    worker with the longest run (ties: larger id)."""
    live = [w for w in candidates if w in cost.profiles]
    if not live:
        raise NoWorkerError(f"no prefill worker available among {list(candidates)}")
    held = {w: index.leading_tiers(w, hashes) for w in index.workers()}
    best: tuple[float, int, int, int, str] | None = None
    chosen: Placement | None = None
    for w in live:
        profile = cost.profiles[w]
        local = held.get(w, [])
        donor = max(
            (d for d in held if d != w and len(held[d]) > len(local)),
            key=lambda d: (len(held[d]), d),
            default=None,
        )
        tiers = list(local)
        if donor is not None and profile.net_bytes_per_s > 0:
            tiers += [REMOTE_TIER] * (len(held[donor]) - len(local))
        plan = cost.plan_load(profile, tiers, prompt_len)
        num_pull = max(0, plan.num_load_blocks - len(local))
        key = (plan.ttft_s, -len(local), profile.queue_depth, index.num_blocks(w), w)
        if best is None or key < best:
            best = key
            chosen = Placement(w, plan, len(local), donor if num_pull else None, num_pull)
    assert chosen is not None
    return chosen
