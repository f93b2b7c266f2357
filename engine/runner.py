"""Turns a scheduled batch into model inputs, runs the model, samples the next tokens.

Each sequence's attention path is chosen from its own shape (``route``; the reasons are in
``engine.attention``), so which sequences share a step never changes how one is computed.
Steps of decodes and short chunks replay CUDA graphs (``engine.cuda_graphs``) on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import SHORT_MAX_QUERIES, AttnMetadata, SeqSlice, SplitKVLaunch
from engine.cuda_graphs import StepGraphs
from engine.model import CausalLM
from engine.sampling import sample
from engine.scheduler import ScheduledSeq

TORCH, DECODE, SHORT, LONG = "torch", "decode", "short", "long"


@dataclass(frozen=True)
class GraphSpec:
    """Asks the runner for CUDA graphs of short steps (used only on CUDA with Triton)."""

    scratch_block: int  # pool block that padding lanes write (never handed out)
    max_batch: int  # largest batch bucket (rounded up to a power of two)
    max_model_len: int  # largest context a graph covers


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        attention_backend: str = "auto",
        graphs: GraphSpec | None = None,
        deterministic: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.backend = attention_backend
        self.sliding_window = model.config.sliding_window
        self.use_kernels = select_kernels(attention_backend, device, self.sliding_window)
        # Fused norm / RoPE + KV write / SiLU kernels wherever the Triton attention runs on a
        # GPU (on a CPU the interpreter would run them row by row in Python: tests only), and
        # in deterministic mode on any GPU: torch's CUDA reductions pick their split from the
        # row count, the row kernels never do.
        self.fused = (self.use_kernels or deterministic) and device.type == "cuda"
        if self.fused and not self.use_kernels and not _has_triton():
            raise ValueError("deterministic mode on CUDA needs triton (pip install triton)")
        self.deterministic = deterministic
        # Logits of each request's sampled tokens, kept when asked (benchmarks' cold-vs-warm
        # check): req_id -> [n, vocab] float32 on the CPU.
        self.keep_logits = False
        self.kept_logits: dict[str, list[torch.Tensor]] = {}
        self.graphs: StepGraphs | None = None
        if graphs is not None and self.use_kernels and device.type == "cuda":
            self.graphs = StepGraphs(
                model, kv_caches, block_size, device, graphs.scratch_block, graphs.max_batch,
                graphs.max_model_len, fused=self.fused, batch_invariant=deterministic,
            )  # fmt: skip

    def route(self, item: ScheduledSeq) -> str:
        """Which attention path computes this sequence's chunk (its own shape decides)."""
        if not self.use_kernels or item.q_start == 0:
            return TORCH  # CPU, or nothing cached before the chunk: attend its own K/V
        if item.q_len == 1:
            return DECODE
        if item.q_len <= SHORT_MAX_QUERIES:
            return SHORT
        return LONG if self.backend == "triton" else TORCH

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        slot_offset: list[int] = []
        seqs: list[SeqSlice] = []
        groups: dict[str, list[tuple[int, ScheduledSeq]]] = {DECODE: [], SHORT: [], LONG: []}
        bs = self.block_size
        dev = self.device
        for item in batch:
            seq = item.seq
            row = len(ids)
            end = item.q_start + item.q_len
            ids.extend(seq.token_ids[item.q_start : end])
            pos = range(item.q_start, end)
            positions.extend(pos)
            slot_block.extend(seq.block_ids[p // bs] for p in pos)
            slot_offset.extend(p % bs for p in pos)
            path = self.route(item)
            if path == TORCH:
                n_blocks = (end + bs - 1) // bs
                block_ids = torch.tensor(seq.block_ids[:n_blocks], dtype=torch.int64, device=dev)
                seqs.append(SeqSlice(row, item.q_start, item.q_len, block_ids))
            else:
                groups[path].append((row, item))
        launches = tuple(
            self._launch(members, split=path != LONG) for path, members in groups.items() if members
        )
        meta = AttnMetadata(
            slot_block=torch.tensor(slot_block, dtype=torch.int64, device=dev),
            slot_offset=torch.tensor(slot_offset, dtype=torch.int64, device=dev),
            seqs=tuple(seqs),
            block_size=bs,
            sliding_window=self.sliding_window,
            launches=launches,
            fused=self.fused,
            batch_invariant=self.deterministic,
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
        )

    def _launch(self, members: list[tuple[int, ScheduledSeq]], split: bool) -> SplitKVLaunch:
        bs = self.block_size
        ends = [item.q_start + item.q_len for _, item in members]
        width = max(-(-e // bs) for e in ends)
        table: list[int] = []
        for (_, item), end in zip(members, ends):
            n = -(-end // bs)
            table.extend(item.seq.block_ids[:n])
            table.extend([0] * (width - n))
        # one host tensor, one copy: [rows | q_lens | q_starts | table]
        meta = [row for row, _ in members] + [item.q_len for _, item in members]
        meta += [item.q_start for _, item in members]
        flat = torch.tensor(meta + table, dtype=torch.int32).to(self.device, non_blocking=True)
        b = len(members)
        return SplitKVLaunch(
            block_tables=flat[3 * b :].view(b, width),
            q_rows=flat[:b],
            q_lens=flat[b : 2 * b],
            q_starts=flat[2 * b : 3 * b],
            max_q_len=max(item.q_len for _, item in members),
            max_context_len=max(ends),
            split=split,
        )

    def execute(self, batch: list[ScheduledSeq]) -> list[int | None]:
        """Run one step; the sampled token of every sequence whose chunk reached its end."""
        return self.launch(batch)()

    def launch(self, batch: list[ScheduledSeq]) -> Callable[[], list[int | None]]:
        """Queue one step; returns the call that waits for it and gives ``execute``'s tokens.

        On a GPU the step (and, for greedy requests, the argmax and its copy to the host) is
        only queued when this returns, so the host's work between the two calls overlaps it;
        sampling with temperature runs in the second call."""
        if self.graphs is not None and self.graphs.supports(batch):
            logits = self.graphs.run(batch)  # [len(batch), vocab]: every sequence's last row
            sampling_rows = [i for i, item in enumerate(batch) if item.samples]
            if len(sampling_rows) < len(batch):
                logits = logits[sampling_rows]
        else:
            input_ids, positions, meta = self.prepare(batch)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
            last: list[int] = []
            sampling_rows = []
            t = 0
            for i, item in enumerate(batch):
                t += item.q_len
                if item.samples:
                    last.append(t - 1)
                    sampling_rows.append(i)
            if not last:
                return lambda: [None] * len(batch)
            rows = hidden[torch.tensor(last, device=hidden.device)]
            logits = self.model.compute_logits(rows, self.deterministic)
        sampling_items = [batch[i] for i in sampling_rows]
        params = [item.seq.sampling for item in sampling_items]
        greedy: torch.Tensor | None = None
        done: torch.cuda.Event | None = None
        if logits.is_cuda and all(p.greedy for p in params):
            greedy = torch.empty(len(params), dtype=torch.int64, pin_memory=True)
            greedy.copy_(logits.argmax(dim=-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        if self.keep_logits:
            for item, row in zip(sampling_items, logits.cpu()):
                self.kept_logits.setdefault(item.seq.req_id, []).append(row.clone())

        def finish() -> list[int | None]:
            if greedy is not None and done is not None:
                done.synchronize()
                tokens = greedy.tolist()
            else:
                tokens = sample(logits, params, [len(it.seq.token_ids) for it in sampling_items])
            out: list[int | None] = [None] * len(batch)
            for i, tok in zip(sampling_rows, tokens):
                out[i] = tok
            return out

        return finish


def select_kernels(backend: str, device: torch.device, sliding_window: int | None) -> bool:
    """Whether attention runs in the Triton kernels: ``auto`` picks them on CUDA."""
    if backend == "torch":
        return False
    if sliding_window is not None:
        if backend == "triton":
            raise ValueError("attention_backend=triton does not support sliding-window models")
        return False
    if backend == "triton":
        return True
    return device.type == "cuda" and _has_triton()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
