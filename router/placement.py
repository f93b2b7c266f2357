"""Where to run a request: a TTFT cost model over measured per-worker parameters.

Predicted TTFT of prefill on worker W = queue wait(W) + load time of the cached blocks W chooses
to load + compute time of the tokens it does not load. Each leading block can be loaded (its
best tier's bandwidth; "remote" = pulled from another worker over the network) or recomputed;
``load_plan`` picks the number of leading blocks to load that minimises the sum, so a slow disk
loses to recompute when the GPU is fast. Parameters come from measurements the workers report
(start-up benchmarks, then moving averages), never from constants here.

At cluster scale (``choose_prefill``) the work per request is bounded, not proportional to the
cluster: one walk of the index finds every holder of the prompt's prefix, grouped by residency
(it follows only the workers that could still win, when no worker can pull); every candidate
gets a lower bound on its TTFT at once, from arrays (its queue, plus computing what it could
not load even if loading were free); the distinct (residency, pull, speed) keys are then given
a full load plan in the order of their best bound, until no bound can beat the best plan found
or ``max_plans`` plans were made; the winner among the workers whose key has a plan is picked
from arrays again. Only the first ``max_plans`` keys by bound are ever planned: with more
distinct residencies than that, all of them able to win, the choice is the best of those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.cost import plan_load, tier_runs
from kvstore.keys import BlockHash
from router.errors import NoWorkerError
from router.index import TIERS, GlobalBlockIndex
from router.profile import REMOTE_TIER, ProfileTable, WorkerProfile
from router.residency import Residency

__all__ = ["REMOTE_TIER", "CostModel", "LoadPlan", "Placement", "WorkerProfile", "tier_runs"]

@dataclass(frozen=True)
class LoadPlan:
    num_load_blocks: int  # leading blocks to load; the rest of the prompt is computed
    load_s: float
    compute_s: float
    queue_s: float

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.load_s + self.compute_s


@dataclass(frozen=True)
class Placement:
    worker_id: str
    plan: LoadPlan
    num_local_blocks: int  # leading blocks the worker itself holds
    pull_from: str | None = None  # worker to pull blocks [num_local_blocks, num_load_blocks)
    num_pull_blocks: int = 0


@dataclass(frozen=True)
class _Selection:
    """The candidates with a profile, resolved to their slots (cached per candidate list)."""

    key: tuple[object, ...]
    names: tuple[str, ...]
    table_slots: np.ndarray  # in the profile table
    index_slots: np.ndarray  # in the index (-1: the index does not know the worker)


class CostModel:
    def __init__(self, block_size: int, block_nbytes: int, max_plans: int = 32) -> None:
        if block_size < 1 or block_nbytes < 1:
            raise ValueError("block_size and block_nbytes must be >= 1")
        if max_plans < 1:
            raise ValueError(f"max_plans must be >= 1, got {max_plans}")
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.max_plans = max_plans  # load plans made per placement at most
        self.profiles: dict[str, WorkerProfile] = {}
        self.table = ProfileTable()
        self._selection: _Selection | None = None

    def update(self, profile: WorkerProfile) -> None:
        self.profiles[profile.worker_id] = profile
        self.table.add(profile)

    def remove(self, worker_id: str) -> None:
        self.profiles.pop(worker_id, None)
        self.table.remove(worker_id)

    def compute_time_s(self, profile: WorkerProfile, num_tokens: int) -> float:
        return num_tokens / profile.prefill_tokens_per_s

    def plan_load(self, profile: WorkerProfile, tiers: Sequence[str], prompt_len: int) -> LoadPlan:
        """Best number of leading blocks to load, given each leading block's tier (the last
        prompt token is always computed, to produce the first output token)."""
        return self.plan_runs(profile, tier_runs(tiers), prompt_len)

    def plan_runs(
        self, profile: WorkerProfile, runs: Sequence[tuple[str, int]], prompt_len: int
    ) -> LoadPlan:
        """``plan_load`` over runs of equal tiers, ``(tier, num_blocks)``."""
        num_load, load_s, compute_s = self.load_plan(profile, runs, prompt_len)
        return LoadPlan(num_load, load_s, compute_s, profile.queue_wait_s)

    def load_plan(
        self, profile: WorkerProfile, runs: Sequence[tuple[str, int]], prompt_len: int
    ) -> tuple[int, float, float]:
        """The one evaluation of a candidate's cost: (leading blocks to load, load seconds,
        compute seconds) for a worker whose leading blocks sit in ``runs`` of equal tiers,
        ``kvstore.cost.plan_load`` without the split (the blocks a worker pulls are the
        leading ones). Placement calls nothing else to cost a candidate."""
        plan = plan_load(
            runs, prompt_len, self.block_size, self.block_nbytes, profile.speeds(), overlap=False
        )
        return plan.num_load_blocks, plan.load_s, plan.rest_s

    def predicted_ttft(self, worker_id: str, tiers: Sequence[str], prompt_len: int) -> float:
        return self.plan_load(self._profile(worker_id), tiers, prompt_len).ttft_s

    def choose_prefill(
        self,
        candidates: Sequence[str],
        index: GlobalBlockIndex,
        hashes: Sequence[BlockHash],
        prompt_len: int,
    ) -> Placement:
        """The candidate with the lowest predicted TTFT. Ties: more local prefix, then fewer
        requests queued (a queue whose service time is not measured yet predicts no wait),
        then fewer blocks cached (a new prefix goes where it evicts the least), then id.
        A worker may pull the blocks beyond its own prefix from the worker holding the longest
        one (ties: the larger id), when that beats recomputing them. The work is bounded: see
        the module's docstring."""
        sel = self._select(candidates, index)
        if not sel.names:
            raise NoWorkerError(f"no prefill worker available among {list(candidates)}")
        t, cs = self.table, sel.table_slots
        queue_s, tokens_per_s, net = t.queue_s[cs], t.tokens_per_s[cs], t.net[cs]
        bs = self.block_size
        max_blocks = (prompt_len - 1) // bs
        follow = None
        if not (net > 0).any():  # no pulls: only the workers that could still win matter
            floor = queue_s + (prompt_len - max_blocks * bs) / tokens_per_s
            bound = (queue_s + prompt_len / tokens_per_s).min()  # computing it all
            follow = sel.index_slots[floor <= bound * (1 + 1e-9)]
        res, names = index.walk(hashes, follow) if hashes else index.walk((), None)
        if not res.longest:  # nobody holds the prefix: every plan computes the whole prompt
            compute = prompt_len / tokens_per_s  # as load_plan's, with nothing to load
            win = self._winner(sel, index, queue_s + compute, np.zeros(len(cs), np.int64))
            return Placement(sel.names[win], LoadPlan(0, 0.0, float(compute[win]),
                                                      float(queue_s[win])), 0)
        known = sel.index_slots >= 0
        at = np.where(known, sel.index_slots, 0) if len(res.ends) else None
        local = np.where(known, res.ends[at], 0) if at is not None else np.zeros(len(cs), int)
        group = np.where(known, res.group_of[at], -1) if at is not None else local - 1
        longest = res.longest
        pull = (local < longest) & (net > 0)
        bound = self._bound(cs, res, at, known, local, pull, queue_s, prompt_len)
        key = ((group + 1) * 2 + pull) * max(1, t.num_speeds) + t.speed[cs]
        plans = self._plan_keys(sel, res, key, bound, queue_s, local, pull, prompt_len)
        planned = np.array(sorted(plans), np.int64)
        at = np.minimum(np.searchsorted(planned, key), len(planned) - 1)
        loads = np.array([plans[k][1] for k in planned.tolist()])[at]
        computes = np.array([plans[k][2] for k in planned.tolist()])[at]
        ttft = np.where(planned[at] == key, queue_s + loads + computes, np.inf)
        win = self._winner(sel, index, ttft, local)
        w = sel.names[win]
        num_load, load_s, compute_s = plans.get(int(key[win]), (0, 0.0, 0.0))
        if not np.isfinite(ttft[win]):  # every candidate's TTFT is infinite or NaN
            num_load, load_s, compute_s = 0, 0.0, 0.0
        num_local = int(local[win])
        num_pull = max(0, num_load - num_local)
        donor = None
        if num_pull:  # the longest holder (ties: the larger id)
            donor = max(names[s] for s in np.flatnonzero(res.ends == longest).tolist())
        return Placement(
            worker_id=w,
            plan=LoadPlan(num_load, load_s, compute_s, float(queue_s[win])),
            num_local_blocks=num_local,
            pull_from=donor,
            num_pull_blocks=num_pull,
        )

    def _bound(self, cs: np.ndarray, res: Residency, at: np.ndarray | None, known: np.ndarray,
               local: np.ndarray, pull: np.ndarray, queue_s: np.ndarray, prompt_len: int,
               ) -> np.ndarray:
        """A lower bound on each candidate's TTFT: its queue, plus the whole prompt's compute
        less what loading could save on each block it holds or could pull (each block loaded
        or computed, whichever is cheaper, with no prefix rule)."""
        t = self.table
        block_s = self.block_size / t.tokens_per_s[cs]  # computing one block
        bound = queue_s + prompt_len / t.tokens_per_s[cs]
        if at is not None:
            blocks = np.where(known[:, None], res.tier_blocks[at], 0)  # [candidate, tier]
            with np.errstate(divide="ignore"):
                load_s = self.block_nbytes / t.tier_bw[cs]  # inf: cannot load from the tier
            bound -= (blocks * np.maximum(block_s[:, None] - load_s, 0.0)).sum(axis=1)
        if pull.any():
            with np.errstate(divide="ignore"):
                pull_s = self.block_nbytes / t.net[cs]
            bound -= np.where(pull, res.longest - local, 0) * np.maximum(block_s - pull_s, 0.0)
        return bound * (1 - 1e-9)  # below any plan's sum, rounding included

    def _plan_keys(self, sel: _Selection, res: Residency, key: np.ndarray, bound: np.ndarray,
                   queue_s: np.ndarray, local: np.ndarray, pull: np.ndarray, prompt_len: int,
                   ) -> dict[int, tuple[int, float, float]]:
        """A load plan per key, keys taken by their best bound, until no bound can beat the
        best TTFT planned or ``max_plans`` are made."""
        order = np.argsort(bound, kind="stable")
        _, first = np.unique(key[order], return_index=True)
        reps = order[np.sort(first)]  # per key, its candidate of the lowest bound
        plans: dict[int, tuple[int, float, float]] = {}
        best = np.inf
        profile_at = self.table.profile_at
        for r in reps.tolist():
            if bound[r] > best or len(plans) >= self.max_plans:
                break
            profile = profile_at[int(sel.table_slots[r])]
            assert profile is not None
            g = int(key[r]) // max(1, self.table.num_speeds) // 2 - 1
            runs = [(TIERS[t], num) for t, num in res.runs(g)] if g >= 0 else []
            if pull[r]:
                runs.append((REMOTE_TIER, res.longest - int(local[r])))
            plan = self.load_plan(profile, runs, prompt_len)
            plans[int(key[r])] = plan
            best = min(best, queue_s[r] + plan[1] + plan[2])
        return plans

    def _winner(self, sel: _Selection, index: GlobalBlockIndex, ttft: np.ndarray,
                local: np.ndarray) -> int:
        """The position of the lowest TTFT; ties: more local prefix, fewer queued, fewer
        blocks cached, then the smaller id."""
        low = ttft.min()
        if not np.isfinite(low):
            return 0
        tied = np.flatnonzero(ttft == low)
        if len(tied) > 1:
            tied = tied[local[tied] == local[tied].max()]
        if len(tied) > 1:
            depth = self.table.depth[sel.table_slots[tied]]
            tied = tied[depth == depth.min()]
        if len(tied) > 1:
            blocks = index.held_counts(sel.index_slots[tied])
            tied = tied[blocks == blocks.min()]
        return int(min(tied.tolist(), key=sel.names.__getitem__))

    def _select(self, candidates: Sequence[str], index: GlobalBlockIndex) -> _Selection:
        key = (tuple(candidates), id(index), index.layout_version, self.table.version)
        sel = self._selection
        if sel is None or sel.key != key:
            get = self.table.slot_of.get
            found = [(w, get(w)) for w in candidates]  # (a worker removed meanwhile: None)
            names = tuple(w for w, slot in found if slot is not None)
            slots = np.array([slot for _, slot in found if slot is not None], np.int64)
            sel = _Selection(key, names, slots, index.slots(names))
            self._selection = sel
        return sel

    def choose_decode(
        self, candidates: Sequence[str], index: GlobalBlockIndex, hashes: Sequence[BlockHash]
    ) -> str:
        """Least loaded decode worker; ties go to the one holding the longest prefix."""
        live = [w for w in candidates if w in self.profiles]
        if not live:
            raise NoWorkerError(f"no decode worker available among {list(candidates)}")
        depth = min(self.profiles[w].queue_depth for w in live)
        tied = [w for w in live if self.profiles[w].queue_depth == depth]
        if len(tied) == 1 or not hashes:
            return min(tied)
        lengths = index.leading_lengths(hashes)
        return min(tied, key=lambda w: (-lengths.get(w, 0), w))

    def _profile(self, worker_id: str) -> WorkerProfile:
        profile = self.profiles.get(worker_id)
        if profile is None:
            raise NoWorkerError(f"no profile for worker {worker_id!r} (not registered or dead)")
        return profile
