"""``LLMEngine``: model + paged KV pool + tiered store + continuous-batching scheduler.

Not thread-safe: one thread drives it (the workers run it on a dedicated loop thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.kv_manager import KVCacheManager
from engine.loader import LoadedModel, load_model, model_fingerprint_fields
from engine.runner import GraphSpec, ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import RequestResult, Sequence, StepOutput
from kvstore.config import StoreConfig
from kvstore.keys import BlockHash, hash_prompt_blocks, model_fingerprint
from kvstore.layout import KVLayout
from proto.vocab import FinishReason, Tier

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30
LOAD_WAIT_S = 0.005  # a step with nothing to run but loads waits this long for them at most
MIN_OBSERVED_PREFILL = 64  # prefill tokens a step needs for its speed to count

# (index of the first block, pool block ids): a watched request's newly computed full blocks
BlockListener = Callable[[int, list[int]], None]


@dataclass(slots=True)
class _Watch:
    listener: BlockListener
    num_blocks: int  # blocks to report (the prompt's full blocks)
    num_reported: int = 0


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        store_config: StoreConfig | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.seed)
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.layout = KVLayout(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, self.loaded.dtype
        )
        self.fingerprint = model_fingerprint(
            model_fingerprint_fields(self.loaded, config.block_size)
        )
        self.store = None
        if store_config is not None and (store_config.host_enabled or store_config.disk_enabled):
            from kvstore.store import TieredStore

            self.store = TieredStore(self.layout, self.fingerprint, store_config)
        num_blocks = self._num_pool_blocks()
        self.kv = KVCacheManager(
            self.layout,
            num_blocks,
            self.device,
            self.fingerprint,
            self.store,
            config.enable_prefix_caching,
        )
        grid = config.max_num_batched_tokens if config.deterministic else 0
        if grid:
            self.kv.set_hit_grid(grid // config.block_size)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, grid
        )
        graphs = GraphSpec(self.kv.scratch_block, config.max_num_seqs, self.max_model_len)
        self.runner = ModelRunner(
            self.loaded.model,
            self.kv.kv_caches,
            config.block_size,
            self.device,
            config.attention_backend,
            graphs if config.cuda_graphs else None,
            deterministic=config.deterministic,
        )
        self._seqs: dict[str, Sequence] = {}
        self._watches: dict[str, _Watch] = {}
        # (req_id, listener, first index, block ids) reported after the step's outputs
        self._deferred_reports: list[tuple[str, BlockListener, int, list[int]]] = []
        self.num_steps = 0  # steps that ran a batch, and their seconds (``stats``)
        self.step_seconds = 0.0
        logger.info(
            "engine ready: model=%s dtype=%s device=%s pool=%d blocks of %d tokens (%.1f MiB)",
            config.model,
            self.loaded.dtype,
            self.device,
            num_blocks,
            self.block_size,
            num_blocks * self.layout.block_nbytes / 2**20,
        )

    def _num_pool_blocks(self) -> int:
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = CPU_DEFAULT_KV_BYTES
        n = budget // self.layout.block_nbytes
        if n < 1:
            raise ValueError(
                f"kv_cache_bytes={budget} holds no block of {self.layout.block_nbytes} bytes; "
                "raise it"
            )
        return int(n)

    @property
    def num_blocks(self) -> int:
        return self.kv.pool.num_blocks

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], sampling: SamplingParams) -> None:
        """Raise ValueError with the reason if the request cannot be served."""
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                f"= {total} exceeds the context window of {self.max_model_len} tokens"
            )
        if self.kv.blocks_needed(total) > self.num_blocks:
            raise ValueError(
                f"request needs {self.kv.blocks_needed(total)} KV blocks but the pool has "
                f"{self.num_blocks}; shorten it or raise kv_cache_bytes"
            )

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams,
        cache_salt: str = "",
        prefill_len: int | None = None,
    ) -> None:
        """Queue a request. ``prefill_len``: how many leading tokens of ``prompt_token_ids`` are
        the prompt, when the tokens after them were sampled already (a decode worker continuing
        a prefill worker's request); deterministic mode computes those one per step."""
        if req_id in self._seqs:
            raise ValueError(f"request id {req_id!r} is already in use")
        self.validate(prompt_token_ids, sampling)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise OverflowError(
                f"{len(self.scheduler.waiting)} requests already waiting; try later"
            )
        ids = [int(t) for t in prompt_token_ids]
        seq = Sequence(req_id, ids, len(ids), sampling, cache_salt, time.perf_counter())
        if prefill_len is not None:
            seq.prefill_len = max(1, min(prefill_len, len(ids)))
        self._seqs[req_id] = seq
        self.scheduler.add(seq)

    def watch_blocks(self, req_id: str, listener: BlockListener, num_blocks: int) -> None:
        """Report ``req_id``'s first ``num_blocks`` full blocks as steps compute them (loaded
        prefix blocks count as computed by the first step): ``listener(first_index, block_ids)``
        runs on this thread right after the step, while the blocks are still the request's, so
        it can copy them out (``kv.read_pool_blocks_into``). Ends when the request does.

        The blocks of the step that finishes the request are reported after its outputs went
        out (``flush_block_reports``, which the loop calls after delivering a step's outputs),
        so copying them never delays the request's last token; they are held meanwhile."""
        if req_id not in self._seqs:
            raise ValueError(f"unknown request {req_id!r}")
        if num_blocks > 0:
            self._watches[req_id] = _Watch(listener, num_blocks)

    def _report_blocks(self, seqs: list[Sequence], finishing: set[str]) -> None:
        for seq in seqs:
            w = self._watches.get(seq.req_id)
            if w is None:
                continue
            n = min(seq.num_computed_tokens // self.block_size, w.num_blocks)
            if n > w.num_reported:
                first, w.num_reported = w.num_reported, n
                ids = seq.block_ids[first:n]
                if seq.req_id in finishing:  # after the outputs: hold the blocks till then
                    self.kv.pool.touch(ids)
                    self._deferred_reports.append((seq.req_id, w.listener, first, ids))
                else:
                    self._call_listener(seq.req_id, w.listener, first, ids)
            if w.num_reported >= w.num_blocks:
                self._watches.pop(seq.req_id, None)

    def _call_listener(
        self, req_id: str, listener: BlockListener, first: int, ids: list[int]
    ) -> None:
        try:
            listener(first, ids)
        except Exception:  # a listener failure must not fail the step
            logger.exception("block listener of %s failed; unwatching", req_id)
            self._watches.pop(req_id, None)

    def flush_block_reports(self) -> None:
        """Report the blocks held back from the last step (see ``watch_blocks``)."""
        reports, self._deferred_reports = self._deferred_reports, []
        for req_id, listener, first, ids in reports:
            try:
                self._call_listener(req_id, listener, first, ids)
            finally:
                self.kv.pool.free(ids)

    def abort(self, req_id: str) -> bool:
        self._watches.pop(req_id, None)
        seq = self._seqs.pop(req_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def step(self) -> list[StepOutput]:
        entered = time.perf_counter()
        if self._deferred_reports:  # a caller that did not flush them (engine.generate)
            self.flush_block_reports()
        self.kv.poll_copies()
        self.kv.poll_loads()  # arrived blocks go to the pool; finished loads free their sequence
        batch = self.scheduler.schedule()
        if not batch:
            if self.kv.num_loading:  # only loads to wait for: sleep until one progresses
                self.kv.wait_load_progress(LOAD_WAIT_S)
            return []
        self.kv.wait_loads()  # the blocks admission started loading
        start = time.perf_counter()
        pending = self.runner.launch(batch)  # on a GPU queued, not finished: the host goes on
        for item in batch:
            item.seq.num_computed_tokens = item.q_start + item.q_len
        self.kv.register_computed([item.seq for item in batch])  # hashing, offload: meanwhile
        tokens = pending()  # waits for the step
        now = time.perf_counter()
        prefill = sum(item.q_len for item in batch if item.q_len > 1)
        if prefill >= MIN_OBSERVED_PREFILL:  # feeds load-or-recompute (kvstore.cost)
            self.kv.speeds.observe_prefill(prefill, now - start)
        outputs: list[StepOutput] = []
        for item, tok in zip(batch, tokens):
            seq = item.seq
            if tok is None:
                continue
            seq.token_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq, tok)
            outputs.append(self._output(seq, (tok,), reason))
        if self._watches:
            finishing = {out.req_id for out in outputs if out.finished}
            self._report_blocks([item.seq for item in batch], finishing)
        for out in outputs:
            if out.finished:
                self._watches.pop(out.req_id, None)
                seq = self._seqs.pop(out.req_id)
                self.scheduler.finish(seq, out.finish_reason or FinishReason.STOP)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - entered
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> FinishReason | None:
        p = seq.sampling
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.model_config.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(
        self, seq: Sequence, new: tuple[int, ...], reason: FinishReason | None
    ) -> StepOutput:
        ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time else None
        return StepOutput(
            seq.req_id,
            new,
            reason is not None,
            reason,
            seq.prompt_len,
            seq.num_output_tokens,
            seq.num_cached_tokens,
            dict(seq.cached_by_tier),
            ttft,
        )

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams],
        cache_salt: str = "",
    ) -> list[RequestResult]:
        """Run prompts to completion together (continuous batching); results in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        base = f"gen-{time.monotonic_ns()}"
        req_ids = [f"{base}-{i}" for i in range(len(prompts))]
        starts = {}
        for rid, prompt, p in zip(req_ids, prompts, params):
            self.add_request(rid, prompt, p, cache_salt)
            starts[rid] = self._seqs[rid]
        done: dict[str, RequestResult] = {}
        while len(done) < len(req_ids):
            for out in self.step():
                if out.finished:
                    seq = starts[out.req_id]
                    done[out.req_id] = RequestResult(
                        out.req_id,
                        seq.token_ids[: seq.prompt_len],
                        seq.output_token_ids,
                        out.finish_reason or FinishReason.STOP,
                        seq.num_cached_tokens,
                        dict(seq.cached_by_tier),
                        out.ttft_s or 0.0,
                        time.perf_counter() - seq.arrival_time,
                        seq.load_s,
                    )
        self.flush_block_reports()
        return [done[r] for r in req_ids]

    # ---- KV blocks as bytes (prefetch, transfer between workers) -------------------------
    def block_hashes(self, token_ids: Seq[int], cache_salt: str = "") -> list[BlockHash]:
        return hash_prompt_blocks(token_ids, self.block_size, self.fingerprint, cache_salt)

    def prefetch(self, hashes: list[BlockHash]) -> None:
        """Start moving the blocks below the device pool up the tiers, in the background."""
        if self.store is None:
            return
        n_dev = len(self.kv.pool.lookup(hashes))
        if n_dev < len(hashes):
            self.store.prefetch(hashes[n_dev:])

    def has_blocks(self, hashes: list[BlockHash]) -> list[bool]:
        return [
            self.kv.pool.contains(h) or (self.store is not None and bool(self.store.lookup([h])))
            for h in hashes
        ]

    def read_blocks(self, hashes: list[BlockHash]) -> tuple[int, torch.Tensor]:
        """The leading blocks found (pool first, then store) as uint8 ``[n, block_nbytes]``."""
        dev_ids = self.kv.pool.lookup(hashes)
        parts = [self.kv.read_pool_blocks(dev_ids)] if dev_ids else []
        n = len(dev_ids)
        if self.store is not None and n < len(hashes):
            rest = hashes[n:]
            buf = torch.empty((len(rest), self.layout.block_nbytes), dtype=torch.uint8)
            n_store = self.store.load(rest, buf) if self.store.lookup(rest) else 0
            if n_store:
                parts.append(buf[:n_store])
                n += n_store
        if not parts:
            return 0, torch.empty((0, self.layout.block_nbytes), dtype=torch.uint8)
        return n, torch.cat(parts)

    def write_blocks(self, hashes: list[BlockHash], data: torch.Tensor) -> int:
        """Accept blocks computed elsewhere (a push, a pull) into the pool as cached blocks; the
        ones the pool has no room for go to the store. The pool hands the others down to the
        store when it evicts them, so the copy into the host tier is off this (critical) path."""
        n = self.kv.write_pool_blocks(hashes, data)
        if self.store is not None:
            left = [i for i, h in enumerate(hashes) if not self.kv.pool.contains(h)]
            if left:
                rows = (
                    data if len(left) == len(hashes) else data.index_select(0, torch.tensor(left))
                )
                self.store.put([hashes[i] for i in left], rows)
        return n

    def held_blocks(self) -> dict[Tier, list[BlockHash]]:
        """Every block this engine holds, by tier: the pool's cached blocks and the store's."""
        out = {Tier.DEVICE: self.kv.pool.cached_hashes()}
        if self.store is not None:
            out.update(self.store.held())
        return out

    def evict_cached(self, down_to: str = Tier.HOST) -> dict[Tier, int]:
        """Push every free cached block down to tier ``down_to`` (host or disk): for benchmarks
        and tests that measure loads from a given tier. Blocks in use are never touched."""
        if down_to not in (Tier.HOST, Tier.DISK):
            raise ValueError(f"down_to must be 'host' or 'disk', got {down_to!r}")
        out = {Tier.DEVICE: self.kv.evict_all_free()}
        if down_to == Tier.DISK and self.store is not None:
            out[Tier.HOST] = self.store.demote(Tier.DISK)  # later loads read the disk, not RAM
        return out

    # ---- introspection -------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        pool = self.kv.pool
        out: dict[str, float] = {
            "pool_blocks": pool.num_blocks,
            "pool_free_blocks": pool.num_free_blocks,
            "pool_cached_blocks": pool.num_cached_blocks,
            "pool_evicted_blocks": pool.num_evicted,
            "store_hits_recomputed": self.kv.num_hits_recomputed,
            "store_split_loads": self.kv.num_split_loads,
            "store_loads_in_flight": self.kv.num_loading,
            "engine_steps": self.num_steps,  # steps that ran a batch
            "engine_step_seconds": self.step_seconds,  # their time, summed (whole ``step``)
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
        }
        if self.store is not None:
            for k, v in self.store.stats().items():
                if isinstance(v, (int, float)):
                    out[f"store_{k}"] = v
                elif isinstance(v, dict):  # per-tier counters
                    out.update(
                        {
                            f"store_{k}_{k2}": v2
                            for k2, v2 in v.items()
                            if isinstance(v2, (int, float))
                        }
                    )
        return out

    def check_no_leaks(self) -> None:
        self.flush_block_reports()
        assert not self._seqs, f"requests still live: {list(self._seqs)[:5]}"
        self.kv.check_no_leaks()

    def close(self) -> None:
        self.flush_block_reports()
        for req_id in list(self._seqs):
            self.abort(req_id)
        self.kv.close()
        if self.store is not None:
            self.store.close()
            self.store = None
