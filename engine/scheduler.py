"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first: decodes
take one token, unfinished prefills take a chunk. Waiting sequences are admitted in arrival order
while the pool can hold their whole prompt (never over-committed); the first one that does not
fit waits (backpressure) until blocks are freed. A running sequence that cannot grow preempts the
most recently admitted one (its blocks stay in the prefix cache, so re-admission is cheap). A
sequence whose cached prefix is loading computes only up to ``kv.compute_limit`` (its head, if
the load plan split it) and is skipped otherwise: the others run meanwhile.

With ``grid`` set (deterministic mode: the chunk size) every prompt is cut at the multiples of
``grid`` and at its end, whatever else runs, so a chunk's shapes never depend on the batch or on
how much of the prompt was cached (hits are rounded to the same grid); a chunk that does not
fit the step's budget waits, unless it is the step's first; tokens after the prompt go one per
step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kv_manager import KVCacheManager
from engine.sequence import SeqStatus, Sequence
from proto.vocab import FinishReason


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    q_start: int  # first position computed in this step
    q_len: int  # tokens computed in this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens: a new token is sampled."""
        return self.q_start + self.q_len == len(self.seq.token_ids)


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, grid: int = 0
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.grid = grid  # 0: chunks as large as the budget allows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _num_tokens(self, seq: Sequence, budget: int, batch: list[ScheduledSeq]) -> int:
        """Tokens ``seq`` computes in this step (0: it waits, its cached prefix still loading
        or, on the grid, its chunk not fitting the budget)."""
        done = seq.num_computed_tokens
        limit = self.kv.compute_limit(seq)
        if limit <= done:
            return 0  # its cached prefix is loading: scheduled once it arrived
        if not self.grid:
            return min(limit - done, budget)
        if done >= seq.prefill_len:
            return 1
        n = min(seq.prefill_len, (done // self.grid + 1) * self.grid, limit) - done
        return n if n <= budget or all(item.q_len == 1 for item in batch) else 0

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self._num_tokens(seq, budget, batch)
            if n == 0:
                continue
            while not self.kv.append_slots(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            plan = self.kv.plan(seq)
            if self.kv.num_new_blocks(seq, plan) > self.kv.pool.num_free_blocks:
                break  # backpressure: wait until running sequences free blocks
            if not self.kv.admit(seq, plan):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = self._num_tokens(seq, budget, batch)
            if n:
                batch.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.register_computed([seq])  # keep what it computed reusable
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
