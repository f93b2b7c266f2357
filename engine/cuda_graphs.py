"""CUDA graphs of short steps: decodes, and short chunks over cached prefixes (a warm hit).

A step whose sequences all compute a few tokens (decode: one each; short: up to
``SHORT_MAX_QUERIES``, each after a cached prefix) replays a captured graph of the model's
forward and LM head instead of launching its few hundred kernels one by one from Python. One
graph per (kind, batch bucket, context bucket), captured on first use; graphs share one memory
pool. Buckets: batch sizes 1, 2, 4, ... up to ``max_num_seqs``; contexts (the split-KV kernel's
partition count is fixed when captured) powers of two from 1024 up to ``max_model_len``.

Every lane of a graph owns ``rows`` consecutive rows of the flat batch (1 for a decode graph,
16 for a short one); a sequence fills the first ``q_len`` of them, padding rows and padding
lanes write their K/V into the pool's scratch block (never handed out) and attend to nothing
(``q_len`` 0 rows are skipped by the kernel); their logits are dropped.

Host work per step is kept small, since the GPU waits for it: the inputs go from one pinned
staging buffer to the device in one copy, and a lane's block-table row is only written where it
changed (a new block, another sequence), not rebuilt from the whole block list each step.

Off on a CPU, with the torch attention path, with sliding windows, and with
``EngineConfig.cuda_graphs = False``. ``capture=False`` runs the same padded static buffers
eagerly: the tests check the padding, buckets and incremental tables that way on a CPU under
Triton's interpreter (capture itself needs CUDA: the ``gpu`` tests compare graph and eager).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.attention import SHORT_MAX_QUERIES, AttnMetadata, SplitKVLaunch
from engine.model import CausalLM
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

MIN_CONTEXT_BUCKET = 1024


@dataclass(slots=True)
class _Graph:
    rows: int  # rows of the flat batch per lane
    batch: int  # lanes
    vec: torch.Tensor  # int64 [4 * B * rows + 3 * B]: ids, positions, slot blocks, slot
    # offsets (B * rows each), then q_lens, q_starts, last rows (B each)
    staging: torch.Tensor  # the same, in pinned host memory
    block_tables: torch.Tensor  # [B, C / block_size] int32
    meta: AttnMetadata  # over the static buffers above
    # per lane: (sequence, its preemption count, block-table entries written) at the last fill
    lanes: list[tuple[Sequence | None, int, int]] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [B, vocab] float32, written by each replay
    graph: torch.cuda.CUDAGraph | None = None

    def part(self, i: int) -> torch.Tensor:
        return _part(self.vec, self.batch, self.rows, i)


def _part(vec: torch.Tensor, batch: int, rows: int, i: int) -> torch.Tensor:
    """Slice ``i`` of a graph's ``vec``: 0-3 the per-row inputs, 4-6 the per-lane ones."""
    n = batch * rows
    start = 4 * n + (i - 4) * batch if i >= 4 else i * n
    return vec[start : start + (batch if i >= 4 else n)]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class StepGraphs:
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
        fused: bool = True,
        batch_invariant: bool = False,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.scratch_block = scratch_block
        self.max_batch = _next_pow2(max_batch)
        self.max_context = -(-max_model_len // block_size) * block_size
        self.fused = fused
        # Deterministic mode: a decode must run in a decode graph's one-query tiles, as it does
        # eagerly, so short graphs take no decodes then.
        self.batch_invariant = batch_invariant
        self.capture = capture
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._mempool: _POOL_HANDLE | None = None
        self.num_replays = 0

    def kind(self, batch: list[ScheduledSeq]) -> int | None:
        """Rows per lane of the graph that can run this batch (1 or 16), or None."""
        if not 0 < len(batch) <= self.max_batch:
            return None
        if max(item.q_start + item.q_len for item in batch) > self.max_context:
            return None
        if all(item.q_len == 1 for item in batch):
            return 1
        short = all(
            1 <= item.q_len <= SHORT_MAX_QUERIES and (item.q_start > 0 or item.q_len == 1)
            for item in batch
        )
        if not short or (self.batch_invariant and any(item.q_len == 1 for item in batch)):
            return None
        return SHORT_MAX_QUERIES

    def supports(self, batch: list[ScheduledSeq]) -> bool:
        return self.kind(batch) is not None

    def buckets(self, batch: list[ScheduledSeq]) -> tuple[int, int]:
        """(padded batch, padded context) of the graph that runs this batch."""
        ctx = max(item.q_start + item.q_len for item in batch)
        bucket = min(self.max_context, max(MIN_CONTEXT_BUCKET, _next_pow2(ctx)))
        return _next_pow2(len(batch)), -(-bucket // self.block_size) * self.block_size

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits ``[len(batch), vocab]`` (float32) at each sequence's last computed token."""
        rows = self.kind(batch)
        assert rows is not None, "a batch no graph supports"
        key = (rows, *self.buckets(batch))
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
        bs, rows, lanes = self.block_size, e.rows, e.batch
        n = lanes * rows
        ids = [0] * n
        pos = [0] * n
        blocks = [self.scratch_block] * n
        offs = [0] * n
        q_lens = [0] * lanes
        q_starts = [0] * lanes
        last = [0] * lanes
        cells: list[int] = []  # flat block-table indices to write, and their values
        values: list[int] = []
        width = e.block_tables.shape[1]
        for i, item in enumerate(batch):
            seq, r0 = item.seq, i * rows
            for j in range(item.q_len):
                p = item.q_start + j
                ids[r0 + j] = seq.token_ids[p]
                pos[r0 + j] = p
                blocks[r0 + j] = seq.block_ids[p // bs]
                offs[r0 + j] = p % bs
            q_lens[i], q_starts[i], last[i] = item.q_len, item.q_start, r0 + item.q_len - 1
            need = -(-(item.q_start + item.q_len) // bs)
            old_seq, old_pre, written = e.lanes[i]
            if old_seq is not seq or old_pre != seq.num_preemptions or written > need:
                written = 0
            if need > written:
                cells.extend(range(i * width + written, i * width + need))
                values.extend(seq.block_ids[written:need])
            e.lanes[i] = (seq, seq.num_preemptions, need)
        for i in range(len(batch), lanes):
            e.lanes[i] = (None, 0, 0)
        # The last step's copy out of ``staging`` is done: that step's logits were read since.
        e.staging.copy_(torch.tensor(ids + pos + blocks + offs + q_lens + q_starts + last))
        e.vec.copy_(e.staging, non_blocking=True)
        if cells:
            idx = torch.tensor(cells, dtype=torch.int64).to(self.device, non_blocking=True)
            val = torch.tensor(values, dtype=torch.int32).to(self.device, non_blocking=True)
            e.block_tables.view(-1).index_copy_(0, idx, val)

    def _build(self, rows: int, batch: int, context: int) -> _Graph:
        dev = self.device
        size = 4 * batch * rows + 3 * batch
        vec = torch.zeros(size, dtype=torch.int64, device=dev)
        staging = torch.zeros(size, dtype=torch.int64, pin_memory=dev.type == "cuda")
        tables = torch.full(
            (batch, context // self.block_size), self.scratch_block, dtype=torch.int32, device=dev
        )
        _part(vec, batch, rows, 2).fill_(self.scratch_block)  # padding rows until filled
        launch = SplitKVLaunch(
            block_tables=tables,
            q_rows=torch.arange(batch, dtype=torch.int64, device=dev) * rows,
            q_lens=_part(vec, batch, rows, 4),
            q_starts=_part(vec, batch, rows, 5),
            max_q_len=rows,
            max_context_len=context,
        )
        meta = AttnMetadata(
            _part(vec, batch, rows, 2), _part(vec, batch, rows, 3), (), self.block_size, None,
            (launch,), fused=self.fused, batch_invariant=self.batch_invariant,
        )  # fmt: skip
        entry = _Graph(rows, batch, vec, staging, tables, meta, [(None, 0, 0)] * batch)
        if self.capture:
            self._capture(entry)
        return entry

    # ---- capture -------------------------------------------------------------------------
    def _forward(self, e: _Graph) -> torch.Tensor:
        hidden = self.model(e.part(0), e.part(1), self.kv_caches, e.meta)  # [B * rows, hidden]
        last = hidden.index_select(0, e.part(6))  # [B, hidden]
        return self.model.compute_logits(last, e.meta.batch_invariant)  # [B, vocab]

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
