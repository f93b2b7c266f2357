"""CUDA graphs of the decode step: one per (batch bucket, context bucket), captured on first use.

A pure decode step (every sequence adds one token) on CUDA with the Triton attention kernels
replays a captured graph of the model's forward and LM head instead of launching its few hundred
kernels one by one from Python. The inputs live in static buffers padded to the bucket: a
padding lane writes its K/V into the pool's scratch block (never handed out by the block pool)
and attends to that one token; its logits are dropped. Buckets: batch sizes 1, 2, 4, ... up to
the engine's ``max_num_seqs``; context lengths (the decode kernel's split count is fixed when
captured) powers of two from 1024 up to ``max_model_len``. Graphs share one memory pool.

Off on a CPU, with the torch attention reference, with sliding windows, and with
``EngineConfig.cuda_graphs = False``. ``capture=False`` runs the same padded static buffers
eagerly: the tests check the padding and bucket logic that way on a CPU under Triton's
interpreter (capture itself needs CUDA: the ``gpu``-marked test compares graph and eager decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttnMetadata, KernelArgs
from engine.model import CausalLM
from engine.scheduler import ScheduledSeq

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

MIN_CONTEXT_BUCKET = 1024


@dataclass(slots=True)
class _Graph:
    vec: torch.Tensor  # [4, B] int64: input ids, positions, slot blocks, slot offsets
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [B, C / block_size] int32
    meta: AttnMetadata  # over the static buffers above
    logits: torch.Tensor | None = None  # [B, vocab] float32, written by each replay
    graph: torch.cuda.CUDAGraph | None = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        scratch_block: int,
        max_batch: int,
        max_model_len: int,
        *,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.scratch_block = scratch_block
        self.max_batch = _next_pow2(max_batch)
        self.max_context = -(-max_model_len // block_size) * block_size
        self.capture = capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._mempool: _POOL_HANDLE | None = None
        self.num_replays = 0

    def supports(self, batch: list[ScheduledSeq]) -> bool:
        return (
            0 < len(batch) <= self.max_batch
            and all(item.q_len == 1 for item in batch)
            and max(item.q_start + 1 for item in batch) <= self.max_context
        )

    def buckets(self, batch: list[ScheduledSeq]) -> tuple[int, int]:
        """(padded batch, padded context) of the graph that runs this batch."""
        ctx = max(item.q_start + 1 for item in batch)
        bucket = min(self.max_context, max(MIN_CONTEXT_BUCKET, _next_pow2(ctx)))
        return _next_pow2(len(batch)), -(-bucket // self.block_size) * self.block_size

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits ``[len(batch), vocab]`` (float32) of the batch's next tokens."""
        key = self.buckets(batch)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._build(*key)
        self._fill(entry, batch)
        if entry.graph is not None:
            entry.graph.replay()
            self.num_replays += 1
            assert entry.logits is not None
            return entry.logits[: len(batch)]
        return self._forward(entry)[: len(batch)]

    # ---- inputs --------------------------------------------------------------------------
    def _fill(self, e: _Graph, batch: list[ScheduledSeq]) -> None:
        bs, n = self.block_size, len(batch)
        pad = e.vec.shape[1] - n
        ids, pos, blocks, offs, ctx = [], [], [], [], []
        for item in batch:
            p = item.q_start
            ids.append(item.seq.token_ids[p])
            pos.append(p)
            blocks.append(item.seq.block_ids[p // bs])
            offs.append(p % bs)
            ctx.append(p + 1)
        vec = torch.tensor(
            [ids + [0] * pad, pos + [0] * pad, blocks + [self.scratch_block] * pad,
             offs + [0] * pad],
            dtype=torch.int64,
        )  # fmt: skip
        width = max(-(-c // bs) for c in ctx)
        table = torch.full((n + pad, width), self.scratch_block, dtype=torch.int32)
        for i, item in enumerate(batch):
            row = item.seq.block_ids[: -(-ctx[i] // bs)]
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        e.vec.copy_(vec, non_blocking=True)
        e.context_lens.copy_(torch.tensor(ctx + [1] * pad, dtype=torch.int32), non_blocking=True)
        e.block_tables[:, :width].copy_(table, non_blocking=True)

    def _build(self, batch: int, context: int) -> _Graph:
        dev = self.device
        vec = torch.zeros((4, batch), dtype=torch.int64, device=dev)
        vec[2].fill_(self.scratch_block)  # every lane a padding lane until filled
        context_lens = torch.ones(batch, dtype=torch.int32, device=dev)
        tables = torch.full(
            (batch, context // self.block_size), self.scratch_block, dtype=torch.int32, device=dev
        )
        kernel = KernelArgs(
            block_tables=tables,
            context_lens=context_lens,
            cu_q_lens=torch.arange(batch + 1, dtype=torch.int32, device=dev),
            q_starts=torch.zeros(batch, dtype=torch.int32, device=dev),
            max_q_len=1,
            max_context_len=context,
            all_decode=True,
            no_prefix=False,
        )
        meta = AttnMetadata(vec[2], vec[3], (), self.block_size, None, kernel)
        entry = _Graph(vec, context_lens, tables, meta)
        if self.capture:
            self._capture(entry)
        return entry

    # ---- capture -------------------------------------------------------------------------
    def _forward(self, e: _Graph) -> torch.Tensor:
        hidden = self.model(e.vec[0], e.vec[1], self.kv_caches, e.meta)  # [B, hidden]
        return self.model.compute_logits(hidden)  # [B, vocab]

    def _capture(self, e: _Graph) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks) off the graph
            for _ in range(2):
                self._forward(e)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            e.logits = self._forward(e)
        self._mempool = graph.pool()
        e.graph = graph
