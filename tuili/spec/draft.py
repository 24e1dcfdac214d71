"""Draft-model proposer: a small model with the target's vocabulary proposes k tokens, one forward each.

Its paged KV cache has the target's block count and block size and is indexed by the same block tables: a
sequence's blocks hold its target K/V and its draft K/V at the same slots. Allocation, preemption and the
rollback of rejected tokens are thus the target's, with no second block manager; `seq.num_draft_computed`
says how many of the sequence's tokens have draft K/V (never more than the target's, after a rollback).
"""
from __future__ import annotations

import torch

from tuili.runner.model_runner import ModelRunner
from tuili.runner.sampler import Sampler
from tuili.spec.rejection import _categorical, _uniform


class DraftProposer:
    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int, vocab_size: int) -> None:
        self.runner = runner
        self.max_num_batched_tokens = max_num_batched_tokens
        self.vocab_size = vocab_size  # the target's: a draft's table padded to another size is cut or padded

    def _forward(self, feed) -> torch.Tensor:
        """One draft forward over (item, tokens, first position) chunks; the hidden state of each chunk's last."""
        runner, bs = self.runner, self.runner.block_size
        ids, positions, slots, last_rows = [], [], [], []
        for item, tokens, start in feed:
            table = item.seq.block_table
            ids += tokens
            pos = range(start, start + len(tokens))
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            last_rows.append(len(ids) - 1)
        meta, (ids_t, pos_t, last_t) = runner._metadata(
            [len(t) for _, t, _ in feed], [s + len(t) for _, t, s in feed],
            [item.seq.block_table for item, _, _ in feed], slots, ids, positions, last_rows)
        hidden = runner._forward(ids_t, pos_t, meta)
        for item, tokens, start in feed:
            item.seq.num_draft_computed = start + len(tokens)
        return hidden[last_t.long()]

    def _catch_up(self, items) -> None:
        """Long gaps (the prompt the first time, the tokens decoded while the batch was too big to speculate)
        are fed in chunks of at most max_num_batched_tokens tokens per forward, all but the newest token."""
        while True:
            budget, feed = self.max_num_batched_tokens, []
            for item in items:
                seq = item.seq
                gap = len(seq.token_ids) - 1 - seq.num_draft_computed
                if gap > 1 and budget > 0:
                    n = min(gap, budget)
                    feed.append((item, seq.token_ids[seq.num_draft_computed:seq.num_draft_computed + n],
                                 seq.num_draft_computed))
                    budget -= n
            if not feed:
                return
            self._forward(feed)

    @torch.no_grad()
    def propose(self, items) -> None:
        """Fill in each item's proposals (up to item.num_lookahead) and, for sampled requests, the draft
        distributions they were drawn from. After the catch-up, the first forward feeds the one or two tokens
        the draft has not seen (the newest ends it); each further forward feeds the last proposal."""
        items = [item for item in items if item.num_lookahead]
        self._catch_up(items)
        drafts = {id(item): [] for item in items}
        probs = {id(item): [] for item in items}
        # (item, tokens to feed, position of the first)
        feed = [(item, item.seq.token_ids[item.seq.num_draft_computed:], item.seq.num_draft_computed)
                for item in items]
        while feed:
            logits = self.runner.model.compute_logits(self._forward(feed)).float()[:, :self.vocab_size]
            if logits.shape[1] < self.vocab_size:
                logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]), value=float("-inf"))
            tokens, q = self._sample(logits, [item.seq for item, _, _ in feed])
            next_feed = []
            for b, ((item, fed, start), token) in enumerate(zip(feed, tokens)):
                drafts[id(item)].append(token)
                if q is not None:
                    probs[id(item)].append(q[b])
                if len(drafts[id(item)]) < item.num_lookahead:
                    next_feed.append((item, [token], start + len(fed)))
            feed = next_feed
        for item in items:
            p = probs[id(item)]
            item.set_drafts(drafts[id(item)], torch.stack(p) if p and not item.seq.params.greedy else None)

    @staticmethod
    def _sample(logits: torch.Tensor, seqs) -> tuple[list[int], torch.Tensor | None]:
        """Greedy requests: the draft's argmax. Sampled ones: a draw from the draft's distribution under the
        request's temperature / top-k / top-p / min-p (any q keeps verification exact; a q close to the
        target's p accepts more), returned with it."""
        tokens = logits.argmax(dim=-1)
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return tokens.tolist(), None
        q = Sampler.distribution(logits, params)
        u = _uniform(len(seqs), 1, [s.generator for s in seqs])[:, 0]
        sampled = _categorical(q, u)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy, tokens, sampled).tolist(), q
