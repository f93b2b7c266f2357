"""The engine's KV cache: the paged pool tensors, prefix reuse, and the tiered store below.

On admission a sequence's prompt blocks are found, in order, in the device pool (a hit costs
nothing), then in the tiered store (host slab, then disk). ``kvstore.cost.plan_load`` decides,
with the speeds this engine measured and observed (``speeds``), which store hits to load and
how many leading ones to compute meanwhile (the split); the load runs while the engine keeps
stepping (``engine.prefix_loader``), its blocks copied from the slab rows into fresh pool blocks
on the load lane (``engine.block_copier``) as they arrive; the step that reads them waits for
that copy; only the rest is computed. Full blocks are registered in the pool's prefix cache and
offloaded to the store on the offload lane, off the critical path; a cached block evicted from
the pool is demoted to the store if the store lacks it, so it is never simply dropped.

The pool tensor has one block more than the block pool hands out: ``scratch_block``, where the
padding lanes of a captured decode graph write (``engine.cuda_graphs``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from engine.block_copier import BlockCopier
from engine.block_pool import BlockPool
from engine.prefix_loader import LoadResult, PrefixLoader
from engine.sequence import Sequence
from kvstore.cost import LoadPlan, SpeedTracker, plan_load, tier_runs
from kvstore.keys import BlockHash, extend_hashes
from kvstore.layout import KVLayout
from kvstore.pool_copy import gather_blocks, scatter_blocks
from kvstore.store import TieredStore
from proto.vocab import Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmitPlan:
    num_device_blocks: int  # leading blocks already in the pool
    num_head_blocks: int = 0  # store hits after them computed while the next ones load
    store_tiers: tuple[str, ...] = ()  # tier of each store hit to load (after the head)
    load_deadline_s: float | None = None  # stop waiting for the load this long after its start
    num_store_hits: int = 0  # leading store hits found (loaded or not)


class KVCacheManager:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: torch.device,
        fingerprint: bytes,
        store: TieredStore | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.device = device
        self.fingerprint = fingerprint
        self.store = store
        self.enable_prefix_caching = enable_prefix_caching
        shape = (num_blocks + 1, *layout.pool_block_shape())  # + the scratch block
        # One allocation for all layers keeps the pool contiguous; per-layer views into it.
        self._pool = torch.zeros((layout.num_layers, *shape), dtype=layout.dtype, device=device)
        self.kv_caches = list(self._pool.unbind(0))
        self.scratch_block = num_blocks  # never handed out by the block pool
        self.pool = BlockPool(num_blocks, on_evict=self._demote if store is not None else None)
        self.copier: BlockCopier | None = None
        # Load-or-recompute: speeds measured (workers, at start-up) and observed (every load
        # and prefill); until one is known, every hit is loaded.
        self.speeds = SpeedTracker()
        self.loader: PrefixLoader | None = None
        if store is not None:
            self.copier = BlockCopier(self._pool, layout, self.pool, store, device)
            self.loader = PrefixLoader(store, self.copier, self.block_size, self.speeds)
        self.num_hits_recomputed = 0  # store hits recomputed because loading them was slower
        self.num_split_loads = 0  # loads planned with a computed head (the split)
        # Deterministic mode (``set_hit_grid``): prefix hits count in whole chunks of this many
        # blocks, so the rest is computed in the chunks a cold run computes.
        self.hit_grid_blocks = 1

    def set_hit_grid(self, num_blocks: int) -> None:
        """Round every prefix hit down to a multiple of ``num_blocks`` blocks (deterministic
        mode), and what a load cut short brings too (``PrefixLoader.grid_blocks``)."""
        self.hit_grid_blocks = num_blocks
        if self.loader is not None:
            self.loader.grid_blocks = num_blocks

    # ---- hashing -------------------------------------------------------------------------
    def update_hashes(self, seq: Sequence) -> None:
        extend_hashes(
            seq.block_hashes, seq.token_ids, self.block_size, self.fingerprint, seq.cache_salt
        )

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ---- admission -----------------------------------------------------------------------
    def plan(self, seq: Sequence) -> AdmitPlan:
        """Where the sequence's leading full blocks are cached (at least one token is computed)
        and which of the store hits to load."""
        if not self.enable_prefix_caching:
            return AdmitPlan(0)
        self.update_hashes(seq)
        max_hit = (len(seq.token_ids) - 1) // self.block_size
        hashes = seq.block_hashes[:max_hit]
        n_dev = len(self.pool.lookup(hashes))
        if self.store is None or n_dev == len(hashes):
            return self._on_grid(AdmitPlan(n_dev))
        tiers = self.store.lookup(hashes[n_dev:])
        if not tiers:
            return self._on_grid(AdmitPlan(n_dev))
        lp = self.plan_load(tiers, len(seq.token_ids) - n_dev * self.block_size)
        head, n = lp.num_head_blocks, lp.num_load_blocks
        if self.hit_grid_blocks > 1 and n:  # deterministic: no computed head, it loads too
            head, n = 0, head + n
        plan = AdmitPlan(n_dev, head, tuple(tiers[head : head + n]), lp.deadline_s, len(tiers))
        return self._on_grid(plan)

    def _on_grid(self, plan: AdmitPlan) -> AdmitPlan:
        """Deterministic mode: the hit rounded down to whole chunks (no head there)."""
        g = self.hit_grid_blocks
        if g <= 1:
            return plan
        keep = (plan.num_device_blocks + len(plan.store_tiers)) // g * g
        n_dev = min(plan.num_device_blocks, keep)
        return replace(plan, num_device_blocks=n_dev, store_tiers=plan.store_tiers[: keep - n_dev])

    def plan_load(self, tiers: list[Tier], num_tokens: int) -> LoadPlan:
        """``kvstore.cost.plan_load`` (with the split) for store hits of these tiers, leading a
        prompt of ``num_tokens`` tokens."""
        known = self.speeds.tier_bytes_per_s()
        if Tier.HOST in tiers and Tier.HOST not in known:
            self.speeds.set_tier(Tier.HOST, self._probe_host_speed())
        if Tier.DISK in tiers and Tier.DISK not in known and self.store is not None:
            if self.store.tier(Tier.DISK) is not None:  # the tier's own reads so far, if any
                self.speeds.set_tier(Tier.DISK, self.store.read_speed(Tier.DISK))
        return plan_load(
            tier_runs(tiers), num_tokens, self.block_size, self.layout.block_nbytes,
            self.speeds.snapshot(), overlap=True,
        )

    def _probe_host_speed(self, nbytes: int = 16 << 20) -> float:
        """Bytes/s of a copy from host memory into the pool's device (a few ms, once)."""
        cuda = self.device.type == "cuda"
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        best = math.inf
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t0)
        return nbytes / max(best, 1e-9)

    def num_new_blocks(self, seq: Sequence, plan: AdmitPlan) -> int:
        return self.blocks_needed(len(seq.token_ids)) - plan.num_device_blocks

    def admit(self, seq: Sequence, plan: AdmitPlan) -> bool:
        """Reserve blocks for the whole sequence and start loading the cached ones; False if
        short of blocks."""
        hashes = seq.block_hashes
        dev_ids = self.pool.lookup(hashes[: plan.num_device_blocks])
        assert len(dev_ids) == plan.num_device_blocks, "device hits changed between plan and admit"
        self.pool.touch(dev_ids)  # before allocating, which could otherwise evict them
        new_ids = self.pool.allocate(self.num_new_blocks(seq, plan))
        if new_ids is None:
            self.pool.free(dev_ids)
            return False
        seq.block_ids = dev_ids + new_ids
        seq.num_registered_blocks = len(dev_ids)
        seq.num_computed_tokens = len(dev_ids) * self.block_size
        if seq.first_token_time is None:  # a preempted sequence keeps its first accounting
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.cached_by_tier = {Tier.DEVICE: seq.num_computed_tokens} if dev_ids else {}
        self.num_hits_recomputed += plan.num_store_hits - len(plan.store_tiers)
        if plan.store_tiers:
            assert self.loader is not None
            self.num_split_loads += plan.num_head_blocks > 0
            first = len(dev_ids) + plan.num_head_blocks
            res = self.loader.start(seq, first, len(plan.store_tiers), plan.load_deadline_s)
            if res is not None:
                self.loaded(seq, res)
        return True

    def loaded(self, seq: Sequence, res: LoadResult) -> None:
        """A load finished (``seq``'s computed tokens already jumped over its blocks)."""
        self.num_hits_recomputed += res.num_planned - res.num_blocks
        if seq.first_token_time is None:
            seq.load_s += res.load_s
            by_tier = seq.cached_by_tier
            for tier in res.tiers:
                by_tier[tier] = by_tier.get(tier, 0) + self.block_size
            seq.num_cached_tokens += res.num_blocks * self.block_size

    def compute_limit(self, seq: Sequence) -> int:
        """Tokens of ``seq`` that may be computed now (while it loads: its head only)."""
        return len(seq.token_ids) if self.loader is None else self.loader.compute_limit(seq)

    def poll_loads(self) -> int:
        """Advance the loads under way (between steps); how many finished."""
        if self.loader is None:
            return 0
        finished = self.loader.poll()
        for seq, res in finished:
            self.loaded(seq, res)
        return len(finished)

    @property
    def num_loading(self) -> int:
        return self.loader.num_loading if self.loader is not None else 0

    def wait_load_progress(self, timeout_s: float) -> None:
        """Sleep until a load progresses (or ``timeout_s``): nothing else can run meanwhile."""
        if self.loader is not None:
            self.loader.wait_progress(timeout_s)

    # ---- growth, registration, release ---------------------------------------------------
    def append_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for K/V up to ``num_tokens`` tokens; False if the pool is short."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_ids)
        if extra <= 0:
            return True
        ids = self.pool.allocate(extra)
        if ids is None:
            return False
        seq.block_ids.extend(ids)
        return True

    def register_computed(self, seqs: list[Sequence]) -> None:
        """Offer newly completed full blocks to the prefix cache and write them through."""
        if not self.enable_prefix_caching:
            return
        new_ids: list[int] = []
        new_hashes: list[BlockHash] = []
        for seq in seqs:
            self.update_hashes(seq)
            n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
            for i in range(seq.num_registered_blocks, n_full):
                if self.pool.cache_block(seq.block_ids[i], seq.block_hashes[i]):
                    new_ids.append(seq.block_ids[i])
                    new_hashes.append(seq.block_hashes[i])
            seq.num_registered_blocks = max(seq.num_registered_blocks, n_full)
        if new_ids and self.store is not None:
            self._offload(new_hashes, new_ids, hold=True)

    def _offload(self, hashes: list[BlockHash], block_ids: list[int], hold: bool) -> None:
        assert self.store is not None and self.copier is not None
        res = self.store.reserve(hashes)
        if res.num_blocks == 0:
            self.store.cancel(res)
            return
        fence = self.copier.offload(res, [block_ids[i] for i in res.indices], hold=hold)
        if not hold:
            fence.make_compute_wait()  # the blocks are about to be reused

    def free(self, seq: Sequence) -> None:
        if self.loader is not None:
            self.loader.cancel(seq)
        if seq.block_ids:
            self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0

    # ---- bytes in and out ----------------------------------------------------------------
    def read_pool_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Block-major copies of pool blocks, as uint8 ``[n, block_nbytes]`` on the CPU."""
        n = len(block_ids)
        out = torch.empty(
            (n, *self.layout.block_shape), dtype=self.layout.dtype, device=self.device
        )
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        gather_blocks(self.kv_caches, ids, out, self.layout)
        return out.cpu().view(torch.uint8).view(n, -1)

    def read_pool_blocks_into(self, block_ids: list[int], out: torch.Tensor) -> None:
        """Copy pool blocks block-major into ``out`` (uint8 ``[n, block_nbytes]``, e.g. a view of
        a shared-memory slot or a host buffer); synchronous."""
        n = len(block_ids)
        assert out.dtype == torch.uint8 and out.shape == (n, self.layout.block_nbytes), out.shape
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        dst = out.view(self.layout.dtype).view(n, *self.layout.block_shape)
        if out.device == self.device:
            gather_blocks(self.kv_caches, ids, dst, self.layout)
            return
        shape = (n, *self.layout.block_shape)
        tmp = torch.empty(shape, dtype=self.layout.dtype, device=self.device)
        gather_blocks(self.kv_caches, ids, tmp, self.layout)
        dst.copy_(tmp)

    def write_pool_blocks(self, hashes: list[BlockHash], data: torch.Tensor) -> int:
        """Insert blocks (uint8 ``[n, block_nbytes]``) into the pool as free cached blocks."""
        todo = [i for i, h in enumerate(hashes) if not self.pool.contains(h)]
        if not todo:
            return 0
        ids = self.pool.allocate(len(todo))
        if ids is None:
            return 0
        # every block new (the sender skipped the held ones): no copy of the batch
        picked = data if len(todo) == len(hashes) else data.index_select(0, torch.tensor(todo))
        src = picked.view(self.layout.dtype).view(len(todo), *self.layout.block_shape)
        idx = torch.tensor(ids, dtype=torch.int64, device=self.device)
        scatter_blocks(self.kv_caches, idx, src.to(self.device), self.layout)
        for i, block_id in zip(todo, ids):
            self.pool.cache_block(block_id, hashes[i])
        self.pool.free(ids)
        return len(todo)

    def _demote(self, evicted: list[tuple[int, BlockHash]]) -> None:
        """Pool eviction: hand blocks the store does not hold yet down to it (the next compute
        on these blocks waits for the copy)."""
        assert self.store is not None
        missing = [(i, h) for i, h in evicted if not self.store.lookup([h])]
        if missing:
            self._offload([h for _, h in missing], [i for i, _ in missing], hold=False)

    # ---- copies under way ----------------------------------------------------------------
    def wait_loads(self) -> None:
        """The next compute waits for every load issued so far (call before a step)."""
        if self.copier is not None:
            self.copier.wait_loads()

    def poll_copies(self) -> int:
        """Finish the copies that completed: loaded blocks cached, offloads readable."""
        return self.copier.poll() if self.copier is not None else 0

    def finish_copies(self) -> None:
        """Wait for every copy under way and finish it."""
        if self.copier is not None:
            self.copier.finish()

    @property
    def num_pending_copies(self) -> int:
        return self.copier.num_pending if self.copier is not None else 0

    def evict_all_free(self) -> int:
        """Drop every free cached block from the pool (demoted to the store); how many."""
        self.finish_copies()
        num = self.pool.evict_all_free()
        self.finish_copies()  # the demotions it started
        return num

    def check_no_leaks(self) -> None:
        """Every copy finished, every block free, every lease and reservation given back."""
        assert not self.num_loading, f"{self.num_loading} loads not finished"
        self.finish_copies()
        if self.store is not None:
            assert self.store.wait_loads(timeout_s=30.0), "disk reads of ended loads still running"
        self.pool.check_no_leaks()
        if self.store is not None:
            assert self.store.num_lent() == 0, f"{self.store.num_lent()} leases not released"
            assert self.store.num_reserved() == 0, f"{self.store.num_reserved()} slots reserved"

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        if self.copier is not None:
            self.copier.close()
