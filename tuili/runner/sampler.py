"""Sampler: batched logits processing and sampling with per-request parameters, all on the logits' device.

Order per row: penalties (repetition on prompt + output, presence / frequency on output), min_tokens (EOS and
stop ids banned), then greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample. On GPUs sampling uses
the exponential race (argmax p / E, E ~ Exp(1)): one pass, no host sync; on the CPU, where a sync costs nothing, the
inverse CDF at one uniform per row (Sampler._sample_cpu). A seeded request draws from its own generator, so its
output does not depend on what else is in the batch. Logprobs are of the raw model distribution (log_softmax of
the logits), as in vLLM and the OpenAI API.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.engine.sequence import PrefixView, Sequence
from tuili.sampling_params import Logprob, PositionLogprobs
from tuili.spec.rejection import verify_greedy, verify_sampled


@dataclass
class SamplerOutput:
    """Device tensors (no host sync yet): the sampled tokens and the logprob parts of the rows that asked."""

    token_ids: torch.Tensor                       # [N]
    logprob_rows: list[int]                       # rows whose request asked for logprobs
    logprob_parts: list[torch.Tensor] | None      # top_logprob_tensors() of those rows
    logprob_nums: list[int]

    def tensors(self) -> list[torch.Tensor]:
        return [self.token_ids, *(self.logprob_parts or [])]

    def lists(self) -> tuple[list[int], list[PositionLogprobs | None]]:
        """Token ids and logprobs as host lists, synchronously."""
        host = [t.cpu() for t in self.tensors()]
        return self.to_lists(host, self.logprob_rows, self.logprob_nums, len(self.token_ids))

    @staticmethod
    def to_lists(host: list[torch.Tensor], rows: list[int], nums: list[int], n: int
                 ) -> tuple[list[int], list[PositionLogprobs | None]]:
        """From the host copies of `tensors()`: the token ids and each row's logprobs (None where not asked)."""
        tokens = host[0].tolist()
        logprobs: list[PositionLogprobs | None] = [None] * n
        if rows:
            chosen = [tokens[i] for i in rows]
            for i, entry in zip(rows, logprob_entries(host[1:], chosen, nums)):
                logprobs[i] = entry
        return tokens, logprobs


def top_logprob_tensors(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[torch.Tensor]:
    """On the device: each row's chosen-token logprob and rank, and its top-k logprobs and token ids."""
    chosen_lp = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs > chosen_lp).sum(1) + 1
    parts = [chosen_lp[:, 0], ranks]
    if k:
        parts += list(logprobs.topk(k, dim=1))
    return parts


def logprob_entries(parts: list[torch.Tensor], chosen: list[int], num: list[int]) -> list[PositionLogprobs]:
    chosen_lp, ranks = parts[0].tolist(), parts[1].tolist()
    top_lp, top_ids = (parts[2].tolist(), parts[3].tolist()) if len(parts) > 2 else (None, None)
    out = []
    for i in range(len(chosen)):
        entry = {chosen[i]: Logprob(chosen_lp[i], ranks[i])}
        for r in range(num[i]):
            entry.setdefault(top_ids[i][r], Logprob(top_lp[i][r], r + 1))
        out.append(entry)
    return out


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num: list[int]) -> list[PositionLogprobs]:
    """For each row of `logprobs` [N, V]: the chosen token's logprob and rank plus the top-num[i] tokens."""
    return logprob_entries(top_logprob_tensors(logprobs, chosen, max(num)), chosen.tolist(), num)


def _has_processors(seq: Sequence) -> bool:
    """Penalties, or a min_tokens not yet reached: the logits need processing before the argmax."""
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or seq.num_output_tokens + seq.num_pending < p.min_tokens)


CANDIDATES = 1024  # logits a CPU row's top-k / top-p / min-p looks at first (Sampler._filter_candidates)


def exponential_noise(shape, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) draws for the exponential race, as -log(U) with U uniform in [tiny, 1) (finite and positive: a
    token of positive probability always beats one of none). torch's exponential_ is ~3.5x slower on the CPU
    (49152 draws: 1.59 against 0.45 ms, a sixth of the default model's step)."""
    u = torch.rand(shape, device=device, generator=generator)
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_()


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) on `device` without a stream sync (pinned + non_blocking on CUDA)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of [N, V]: on CUDA one Triton kernel (ops/argmax.py), ties to the first index; on the CPU
    through fp32 (exact), since torch's CPU argmax is ~3x slower in bf16 (240 against 72 us for 49152 logits)."""
    if x.is_cuda:
        from tuili.ops.argmax import argmax_triton
        return argmax_triton(x)
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).argmax(dim=-1)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        n, device = len(seqs), logits.device
        params = [s.params for s in seqs]
        want_lp = [p.logprobs is not None for p in params]
        if all(p.greedy for p in params) and not any(want_lp) and not any(_has_processors(s) for s in seqs):
            return SamplerOutput(argmax_rows(logits), [], None, [])  # plain greedy: the raw logits' argmax
        logits = logits.to(torch.float32, copy=True)                       # [N, V]; processed in place below
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_min_tokens(logits, seqs)

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            tokens = argmax_rows(logits)
        elif device.type == "cpu":  # each sampled row by its inverse CDF (one uniform, not one Exp(1) per token)
            tokens = argmax_rows(logits) if len(sampled) < n else torch.empty(n, dtype=torch.long)
            tokens[sampled] = self._sample_cpu(logits[sampled], [params[i] for i in sampled],
                                               [seqs[i].generator for i in sampled])
        else:  # the exponential race: argmax p / E (no host sync)
            greedy = to_device([p.greedy for p in params], torch.bool, device)
            probs = self.distribution(logits, params)
            noise = exponential_noise(probs.shape, device)
            seeded = [i for i in sampled if seqs[i].generator is not None]
            if seeded:
                own = torch.stack([exponential_noise((probs.shape[1],), torch.device("cpu"), seqs[i].generator)
                                   for i in seeded])
                noise[to_device(seeded, torch.long, device)] = to_device(own, torch.float32, device)
            tokens = torch.where(greedy, argmax_rows(logits), (probs / noise).argmax(dim=-1))

        rows = [i for i in range(n) if want_lp[i]]
        nums = [params[i].logprobs for i in rows]
        parts = None
        if rows:
            index = to_device(rows, torch.long, device)
            parts = top_logprob_tensors(raw_logprobs[index], tokens[index], max(nums))
        return SamplerOutput(tokens, rows, parts, nums)

    @torch.no_grad()
    def verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
               draft_probs: list[torch.Tensor | None]) -> list[list[int]]:
        """Speculative verification. `logits`: the target's rows, per sequence len(drafts[i]) + 1 of them in
        order (the position before each proposal, then the bonus). Every logits processor applies to each row
        as if the proposals before it were accepted; greedy sequences accept the matching prefix, sampled ones
        go through exact rejection sampling against the draft's q (one-hot where `draft_probs[i]` is None).
        Returns each sequence's new tokens: the accepted proposals, then one token from the target."""
        if all(s.params.greedy and not _has_processors(s) for s in seqs):
            # the common case, greedy without penalties or min_tokens: one argmax, one copy, the prefix on the
            # host (a verification step is serial; its few small ops and copies are host time the GPU waits for)
            argmax, out, row = logits.argmax(dim=-1).tolist(), [], 0
            for d in drafts:
                a = 0
                while a < len(d) and argmax[row + a] == d[a]:
                    a += 1
                out.append(d[:a] + [argmax[row + a]])
                row += len(d) + 1
            return out
        views = [PrefixView(seq, d[:j]) for seq, d in zip(seqs, drafts) for j in range(len(d) + 1)]
        logits = self._apply_min_tokens(self._apply_penalties(logits.to(torch.float32, copy=True), views), views)
        device, k = logits.device, max(len(d) for d in drafts)
        first = [0]
        for d in drafts:
            first.append(first[-1] + len(d) + 1)
        out: list[list[int]] = [[] for _ in seqs]
        for greedy in (True, False):
            group = [i for i, s in enumerate(seqs) if s.params.greedy == greedy]
            if not group:
                continue
            # row of (sequence, position), padded with the sequence's last row; proposals padded with 0
            index = to_device([[first[i] + min(j, len(drafts[i])) for j in range(k + 1)] for i in group],
                              torch.long, device)
            proposed = to_device([drafts[i] + [0] * (k - len(drafts[i])) for i in group], torch.long, device)
            num = to_device([len(drafts[i]) for i in group], torch.long, device)
            if greedy:
                accepted, nxt = verify_greedy(logits.argmax(dim=-1)[index], proposed, num)
            else:
                rows = [r for i in group for r in range(first[i], first[i + 1])]
                row_params = [views[r].params for r in rows]
                probs = torch.zeros_like(logits)
                probs[to_device(rows, torch.long, device)] = self.distribution(logits[rows], row_params)
                q = None
                if any(draft_probs[i] is not None for i in group):
                    q = torch.zeros(len(group), k, logits.shape[1], device=device)
                    for b, i in enumerate(group):
                        n = len(drafts[i])
                        if draft_probs[i] is not None:
                            q[b, :n] = draft_probs[i].float()
                        else:  # a deterministic proposal: q is one-hot
                            q[b, torch.arange(n), torch.tensor(drafts[i], dtype=torch.long)] = 1.0
                accepted, nxt = verify_sampled(probs[index], proposed, num, q, [seqs[i].generator for i in group])
            for i, a, t in zip(group, accepted.tolist(), nxt.tolist()):
                out[i] = drafts[i][:a] + [t]
        return out

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, s in enumerate(seqs):
            p = s.params
            if p.repetition_penalty != 1.0:
                seen = to_device(s.token_ids, torch.long, logits.device).unique()
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.num_output_tokens:
                out = to_device(s.output_token_ids, torch.long, logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).float()
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, s in enumerate(seqs):
            if s.num_output_tokens + s.num_pending < s.params.min_tokens:
                banned = set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    banned |= self.eos_token_ids
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[i, to_device(banned, torch.long, logits.device)] = float("-inf")
        return logits

    @staticmethod
    def distribution(logits: torch.Tensor, params) -> torch.Tensor:
        """Each row's sampling distribution: temperature (1 for greedy rows), then top-k / top-p / min-p."""
        temperature = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32,
                                logits.device)[:, None]
        return Sampler._filter(logits / temperature, params).softmax(dim=-1)

    @staticmethod
    def _candidates(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                    min_p: list[float]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """_filter from each row's largest logits only (topk: ~0.3-0.8 ms for 1024 of 49152 on 2 CPU cores, a sort
        ~5 ms), where that is exact: a row's top-k lies among them, or every token past them is dropped anyway
        (the candidates hold top_p of the mass, or the last of them is below min_p of the best). Returns (the
        candidates' logits, largest first, -inf where dropped: the kept ones are a prefix; their token ids), or
        None where it is not exact (the caller sorts). The same kept tokens and logits as the sort."""
        vocab = logits.shape[1]
        ks = [k for k in top_k if k < vocab]
        limited = torch.tensor([k < vocab for k in top_k])
        count = min(vocab, max(ks) if len(ks) == len(top_k) else max([CANDIDATES] + ks))  # (top-k rows: their k)
        cand, ids = logits.topk(count, dim=-1)                               # sorted, largest first
        k = torch.tensor(top_k)[:, None]
        cand = cand.masked_fill(torch.arange(count)[None, :] >= k, float("-inf"))
        # normaliser: the top-k's (all among the candidates) or the whole row's
        lse = torch.where(limited, cand.logsumexp(-1), logits.logsumexp(-1))
        probs = (cand - lse[:, None]).exp()
        p_t, min_t = torch.tensor(top_p), torch.tensor(min_p)
        exact = limited | (probs.sum(-1) >= p_t) | (probs[:, -1] < min_t * probs[:, 0])
        if count < vocab and not bool(exact.all()):
            return None
        drop = (probs.cumsum(dim=-1) - probs) >= p_t[:, None]                # mass of strictly better tokens
        drop |= probs < min_t[:, None] * probs[:, :1]
        drop[:, 0] = False                                                   # the best token always stays
        return cand.masked_fill(drop, float("-inf")), ids

    @staticmethod
    def _filter_candidates(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                           min_p: list[float]) -> torch.Tensor | None:
        """_candidates' result as _filter's (the whole rows, -inf where dropped), or None."""
        found = Sampler._candidates(logits, top_k, top_p, min_p)
        return None if found is None else torch.full_like(logits, float("-inf")).scatter_(1, *found[::-1])

    @staticmethod
    def _sample_cpu(logits: torch.Tensor, params, generators) -> torch.Tensor:
        """Sampled rows on the CPU: each row's token by the inverse of its distribution's CDF at one uniform draw
        (the row's own generator for a seeded request, over the whole row in vocabulary order so that its tokens
        do not depend on the batch). The race costs an Exp(1) draw per token (0.5 of ~0.7 ms for 49152 logits
        on this project's CPU); this a cumulative sum (~0.08 ms). Where no row is seeded and top-k / top-p /
        min-p are exact among the candidates, only those are summed."""
        vocab = logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params])[:, None]
        logits = logits / temperature
        filters = Sampler._filters(params, vocab)
        tried = filters is not None and vocab > CANDIDATES and all(g is None for g in generators)
        found = Sampler._candidates(logits, *filters) if tried else None
        if found is not None:
            probs, ids = found[0].softmax(dim=-1), found[1]
        else:  # (where the candidates were not exact, straight to the sort)
            probs, ids = Sampler._filter(logits, params, candidates=not tried).softmax(dim=-1), None
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand(1, generator=g)[0] if g is not None else torch.rand(()) for g in generators])
        index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # cdf[i] > u * total >= cdf[i - 1]: token i has positive probability. u * total rounding up to the total
        # (a chance of ~2^-24) finds no such i: the row's mode then
        past = index >= cdf.shape[1]
        if bool(past.any()):
            index = torch.where(past, probs.argmax(dim=-1), index)
        return index if ids is None else ids.gather(1, index[:, None])[:, 0]

    @staticmethod
    def _filters(params, vocab: int) -> tuple[list[int], list[float], list[float]] | None:
        """Each row's (top_k, top_p, min_p), top_k = vocab where off; None where no row filters."""
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if all(k == vocab for k in top_k) and all(p == 1.0 for p in top_p) and not any(min_p):
            return None
        return top_k, top_p, min_p

    @staticmethod
    def _filter(logits: torch.Tensor, params, candidates: bool = True) -> torch.Tensor:
        """top-k, top-p and min-p by masking logits to -inf (rows with them off are untouched); candidates=False:
        the sort, without trying _filter_candidates first."""
        vocab = logits.shape[1]
        filters = Sampler._filters(params, vocab)
        if filters is None:
            return logits
        top_k, top_p, min_p = filters
        if candidates and logits.device.type == "cpu" and vocab > CANDIDATES:  # (a sort: ~5 ms for 49152 logits)
            filtered = Sampler._filter_candidates(logits, top_k, top_p, min_p)
            if filtered is not None:
                return filtered
        device = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= to_device(top_k, torch.long, device)[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)                            # renormalised over the top-k
        mass_before = probs.cumsum(dim=-1) - probs                       # mass of strictly better tokens
        drop = mass_before >= to_device(top_p, torch.float32, device)[:, None]
        drop |= probs < to_device(min_p, torch.float32, device)[:, None] * probs[:, :1]
        drop[:, 0] = False                                                 # the best token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
