"""Turns a scheduled batch into model inputs, runs the model, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttnMetadata, KernelArgs, SeqSlice
from engine.cuda_graphs import DecodeGraphs
from engine.model import CausalLM
from engine.sampling import sample
from engine.scheduler import ScheduledSeq


@dataclass(frozen=True)
class DecodeGraphSpec:
    """Asks the runner for CUDA-graph decode (used only on CUDA with the Triton kernels)."""

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
        graphs: DecodeGraphSpec | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sliding_window = model.config.sliding_window
        self.use_kernels = select_kernels(attention_backend, device, self.sliding_window)
        self.graphs: DecodeGraphs | None = None
        if graphs is not None and self.use_kernels and device.type == "cuda":
            self.graphs = DecodeGraphs(
                model, kv_caches, block_size, device, graphs.scratch_block, graphs.max_batch,
                graphs.max_model_len,
            )  # fmt: skip

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        slot_offset: list[int] = []
        seqs: list[SeqSlice] = []
        bs = self.block_size
        for item in batch:
            seq = item.seq
            end = item.q_start + item.q_len
            ids.extend(seq.token_ids[item.q_start : end])
            pos = range(item.q_start, end)
            positions.extend(pos)
            slot_block.extend(seq.block_ids[p // bs] for p in pos)
            slot_offset.extend(p % bs for p in pos)
            n_blocks = (end + bs - 1) // bs
            block_ids = torch.tensor(
                seq.block_ids[:n_blocks], dtype=torch.int64, device=self.device
            )
            seqs.append(SeqSlice(item.q_start, item.q_len, block_ids))
        dev = self.device
        meta = AttnMetadata(
            slot_block=torch.tensor(slot_block, dtype=torch.int64, device=dev),
            slot_offset=torch.tensor(slot_offset, dtype=torch.int64, device=dev),
            seqs=tuple(seqs),
            block_size=bs,
            sliding_window=self.sliding_window,
            kernel=self._kernel_args(batch) if self.use_kernels else None,
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
        )

    def _kernel_args(self, batch: list[ScheduledSeq]) -> KernelArgs:
        bs = self.block_size
        ends = [item.q_start + item.q_len for item in batch]
        max_blocks = max((e + bs - 1) // bs for e in ends)
        tables = torch.zeros((len(batch), max_blocks), dtype=torch.int32)
        for i, (item, end) in enumerate(zip(batch, ends)):
            n = (end + bs - 1) // bs
            tables[i, :n] = torch.tensor(item.seq.block_ids[:n], dtype=torch.int32)
        q_lens = [item.q_len for item in batch]
        cu = torch.zeros(len(batch) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
        dev = self.device
        return KernelArgs(
            block_tables=tables.to(dev),
            context_lens=torch.tensor(ends, dtype=torch.int32, device=dev),
            cu_q_lens=cu.to(dev),
            q_starts=torch.tensor([item.q_start for item in batch], dtype=torch.int32, device=dev),
            max_q_len=max(q_lens),
            max_context_len=max(ends),
            all_decode=all(n == 1 for n in q_lens),
            no_prefix=all(item.q_start == 0 for item in batch),
        )

    def execute(self, batch: list[ScheduledSeq]) -> list[int | None]:
        """Run one step; the sampled token of every sequence whose chunk reached its end."""
        if self.graphs is not None and self.graphs.supports(batch):
            logits = self.graphs.run(batch)  # a pure decode step: every sequence samples
            tokens = sample(
                logits,
                [item.seq.sampling for item in batch],
                [len(item.seq.token_ids) for item in batch],
            )
            return list(tokens)
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        last: list[int] = []
        t = 0
        for item in batch:
            t += item.q_len
            if item.samples:
                last.append(t - 1)
        result: list[int | None] = [None] * len(batch)
        if not last:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=hidden.device)])
        sampling_items = [item for item in batch if item.samples]
        tokens = sample(
            logits,
            [item.seq.sampling for item in sampling_items],
            [len(item.seq.token_ids) for item in sampling_items],
        )
        it = iter(tokens)
        for i, item in enumerate(batch):
            if item.samples:
                result[i] = next(it)
        return result


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
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
