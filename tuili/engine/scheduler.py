"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption by recompute."""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch

from tuili.config import SchedulerConfig
from tuili.engine.block_manager import BlockManager
from tuili.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence in this step's batch and how many of its tokens get computed now."""

    seq: Sequence
    num_new_tokens: int
    num_lookahead: int = 0        # speculation: slots reserved for up to this many proposed tokens
    draft_token_ids: list[int] = field(default_factory=list)  # the proposals (included in num_new_tokens)
    draft_probs: torch.Tensor | None = None  # [len(draft_token_ids), V]: the draft's q (sampled draft only)
    num_filler: int = 0           # proposals added only to give the verification step its graph's shape

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a new token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens

    def set_drafts(self, token_ids: list[int], probs: torch.Tensor | None = None) -> None:
        assert len(token_ids) <= self.num_lookahead
        self.num_new_tokens += len(token_ids) - len(self.draft_token_ids)
        self.draft_token_ids, self.draft_probs = token_ids, probs

    def pad_drafts(self) -> None:
        """Fill the proposals up to num_lookahead by repeating the last token (deterministic ones only: a
        one-hot q). They are verified like any proposal, so the output is unchanged; metrics leave them out."""
        assert self.draft_probs is None
        missing = self.num_lookahead - len(self.draft_token_ids)
        last = (self.draft_token_ids or self.seq.token_ids)[-1]
        self.set_drafts(self.draft_token_ids + [last] * missing)
        self.num_filler = missing


class Scheduler:
    """Every step: running sequences first (oldest first), then waiting ones join while budget and blocks last.

    When blocks run out, the newest running sequence is preempted: its blocks are freed and it goes back to
    the front of the queue, to be recomputed (prompt + output so far) when memory allows; its output is
    unchanged because recompute reproduces the same K/V.

    Speculation (num_speculative_tokens k > 0): while at most speculative_disable_batch_size sequences run, a
    decoding sequence gets blocks and budget for 1 + k tokens; the engine fills in the proposals.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept sorted by seq_id, i.e. by age: the newest is last
        self.num_preemptions = 0
        self.full_lookahead = False  # see _lookahead

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                self._preempt(self.running[-1])
                preempted = True
                if i >= len(self.running):  # `seq` itself was the newest and is gone
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                batch.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        # speculation's lookahead comes second, from what is left: it never preempts anyone
        if self.speculation_on():
            for item in batch:
                k = self._lookahead(item.seq, budget + 1)
                total = item.seq.num_computed_tokens + item.num_new_tokens + k
                if k and self.block_manager.can_allocate(item.seq, total):
                    self.block_manager.allocate(item.seq, total)
                    item.num_lookahead = k
                    budget -= k
        # no new admissions in a step that had to preempt: memory is short
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def speculation_on(self) -> bool:
        """The batch-size rule: speculate while at most speculative_disable_batch_size sequences run."""
        return 0 < len(self.running) <= self.config.speculative_disable_batch_size

    def can_speculate(self, seq: Sequence) -> bool:
        """A decoding sequence (one new token) whose request does not want logprobs."""
        return seq.num_uncomputed_tokens == 1 and seq.params.logprobs is None

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """How many tokens `seq` may have proposed this step: k, bounded by the budget, max_model_len and (unless
        `full_lookahead`) max_tokens; none while a token is in flight, in prefill, or when the request wants
        logprobs. `full_lookahead` (set where verification has CUDA graphs, for k proposals only): the last
        steps of a request keep k, the ones past max_tokens are verified and dropped, in a graph's time
        instead of an eager pass's (several times longer)."""
        if seq.num_pending or not self.can_speculate(seq):
            return 0
        k = min(self.config.num_speculative_tokens, budget - 1, self.config.max_model_len - len(seq) - 1)
        if seq.params.max_tokens is not None and not self.full_lookahead:
            k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(k, 0)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues and free its blocks at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
