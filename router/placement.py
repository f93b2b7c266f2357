"""Where to run a request: a TTFT cost model over measured per-worker parameters.

Predicted TTFT of prefill on worker W = queue wait(W) + load time of the cached blocks W chooses
to load + compute time of the tokens it does not load. Each leading block can be loaded (its
best tier's bandwidth; "remote" = pulled from another worker over the network) or recomputed;
``plan_load`` picks the number of leading blocks to load that minimises the sum, so a slow disk
loses to recompute when the GPU is fast. Parameters come from measurements the workers report
(start-up benchmarks, then moving averages), never from constants here.

At cluster scale (``choose_prefill``): one walk of the index finds every holder of the prompt's
prefix, grouped by residency; a plan is computed once per residency and worker speed (over runs
of equal tiers, so its cost does not grow with the prompt), and every other candidate costs a
few additions: a lower bound (queue + the prompt beyond what it could load) skips the plan of
any worker that cannot win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from kvstore.cost import plan_load, tier_runs
from kvstore.keys import BlockHash
from router.errors import NoWorkerError
from router.index import GlobalBlockIndex
from router.profile import REMOTE_TIER, WorkerProfile

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


class CostModel:
    def __init__(self, block_size: int, block_nbytes: int) -> None:
        if block_size < 1 or block_nbytes < 1:
            raise ValueError("block_size and block_nbytes must be >= 1")
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.profiles: dict[str, WorkerProfile] = {}

    def update(self, profile: WorkerProfile) -> None:
        self.profiles[profile.worker_id] = profile

    def remove(self, worker_id: str) -> None:
        self.profiles.pop(worker_id, None)

    def compute_time_s(self, profile: WorkerProfile, num_tokens: int) -> float:
        return num_tokens / profile.prefill_tokens_per_s

    def plan_load(self, profile: WorkerProfile, tiers: Sequence[str], prompt_len: int) -> LoadPlan:
        """Best number of leading blocks to load, given each leading block's tier (the last
        prompt token is always computed, to produce the first output token)."""
        return self.plan_runs(profile, tier_runs(tiers), prompt_len)

    def plan_runs(
        self, profile: WorkerProfile, runs: Sequence[tuple[str, int]], prompt_len: int
    ) -> LoadPlan:
        """``plan_load`` over runs of equal tiers, ``(tier, num_blocks)``: loading or computing
        blocks is linear within a run, so only the run ends need to be compared."""
        num_load, load_s, compute_s = self._plan(profile, runs, prompt_len)
        return LoadPlan(num_load, load_s, compute_s, profile.queue_wait_s)

    def _plan(
        self, profile: WorkerProfile, runs: Sequence[tuple[str, int]], prompt_len: int
    ) -> tuple[int, float, float]:
        """``kvstore.cost.plan_load`` without the split (the blocks a worker pulls are the
        leading ones): (blocks to load, load time, compute time)."""
        plan = plan_load(
            runs, prompt_len, self.block_size, self.block_nbytes, profile.speeds(), overlap=False
        )
        return plan.num_load_blocks, plan.load_s, plan.rest_s

    def _pull_plan(
        self, profile: WorkerProfile, num_blocks: int, prompt_len: int
    ) -> tuple[int, float, float]:
        """``_plan(profile, [(REMOTE_TIER, n)], prompt_len)`` for ``num_blocks`` = min(n, the
        loadable blocks) > 0: load all of them or none."""
        return self._plan(profile, [(REMOTE_TIER, num_blocks)], prompt_len)

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
        one (ties: the larger id), when that beats recomputing them.

        One walk over the prompt's blocks finds every holder (``index.residency``); the load
        plan is computed once per distinct residency and worker speed, so a candidate costs a
        dictionary lookup and an addition, whether it holds a prefix or not.
        """
        profiles = self.profiles
        live = [w for w in candidates if w in profiles]
        if not live:
            raise NoWorkerError(f"no prefill worker available among {list(candidates)}")
        groups = index.residency(hashes) if hashes else []
        held: dict[str, tuple[int, int]] = {}  # holder -> (its group, its leading blocks)
        longest, donor = 0, None
        for gi, g in enumerate(groups):
            num = g.num_blocks
            held.update(zip(g.worker_ids, repeat((gi, num))))
            if num >= longest:
                top = max(g.worker_ids)
                if num > longest or donor is None or top > donor:
                    longest, donor = num, top
        plans: dict[tuple[int, bool, int], tuple[int, float, float]] = {}
        none = (-1, 0)
        max_blocks = (prompt_len - 1) // self.block_size
        best_w, best_ttft, best_local, best_plan = "", math.inf, 0, (0, 0.0, 0.0)
        best_depth, best_blocks = 0, None
        bs = self.block_size
        for w in live:
            profile = profiles[w]
            gi, local = held.get(w, none)
            queue_s = profile.queue_depth * profile.mean_service_s  # as queue_wait_s
            pull = local < longest and profile.net_bytes_per_s > 0
            reach = longest if pull else local  # blocks it could load
            if reach > max_blocks:
                reach = max_blocks
            if not reach:  # nothing to load: the plan is the whole prompt's compute
                compute = prompt_len / profile.prefill_tokens_per_s  # as compute_time_s
                if queue_s + compute > best_ttft:
                    continue
                plan = (0, 0.0, compute)
            else:
                # loading costs >= 0: the prompt beyond ``reach`` bounds the TTFT from below
                if queue_s + (prompt_len - reach * bs) / profile.prefill_tokens_per_s > best_ttft:
                    continue
                if gi < 0:  # holds nothing, could pull: ``_plan`` of one remote run, inline
                    plan = self._pull_plan(profile, reach, prompt_len)
                else:
                    key = (gi, pull, id(profile.speed_key()))  # interned: equal speeds, one id
                    cached = plans.get(key)
                    if cached is None:
                        runs = list(groups[gi].runs)
                        if pull:
                            runs.append((REMOTE_TIER, longest - local))
                        cached = plans[key] = self._plan(profile, runs, prompt_len)
                    plan = cached
            ttft = queue_s + plan[1] + plan[2]  # the same sum, in the same order, as ttft_s
            blocks = None
            if ttft == best_ttft:  # ties: see the docstring
                mine, theirs = (-local, profile.queue_depth), (-best_local, best_depth)
                if mine == theirs:
                    if best_blocks is None:
                        best_blocks = index.num_blocks(best_w)
                    blocks = index.num_blocks(w)
                    better = (blocks, w) < (best_blocks, best_w)
                else:
                    better = mine < theirs
            else:
                better = ttft < best_ttft
            if better:
                best_w, best_ttft, best_local, best_plan = w, ttft, local, plan
                best_depth, best_blocks = profile.queue_depth, blocks
        if not best_w:  # every candidate's TTFT is infinite or NaN: keep the first one's
            best_w = live[0]
            best_local = held.get(best_w, none)[1]
        num_load, load_s, compute_s = best_plan
        num_pull = max(0, num_load - best_local)
        return Placement(
            worker_id=best_w,
            plan=LoadPlan(num_load, load_s, compute_s, profiles[best_w].queue_wait_s),
            num_local_blocks=best_local,
            pull_from=donor if num_pull else None,
            num_pull_blocks=num_pull,
        )

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
