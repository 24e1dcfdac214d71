"""Sequence (one stream of tokens with its KV blocks) and Request (a prompt with its n sequences)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from tuili.sampling_params import PositionLogprobs, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One generated stream: prompt + output tokens, how many of them have K/V in the cache, and its blocks."""

    def __init__(self, request: "Request", index: int) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.params: SamplingParams = request.params
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0          # tokens whose K/V are in the cache
        self.num_pending = 0                  # sampled on the device, not yet appended (async scheduling)
        self.block_table: list[int] = []
        self.num_draft_computed = 0           # tokens whose K/V are in the draft model's cache (speculation)
        self.spec_steps = 0                   # speculative steps, tokens proposed and accepted in them
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # prompt logprobs are computed once, on the first prefill (not again after a preemption)
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if self.params.prompt_logprobs is not None else None)
        self.output_text = ""
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)  # incremental detokenizer state
        self.read_offset = self.num_prompt_tokens
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            # each of the n sequences of a seeded request gets its own stream, fixed by (seed, index)
            self.generator = torch.Generator().manual_seed(self.params.seed * 1_000_003 + index)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_tokens(self) -> int:
        """Tokens known to the host plus those sampled by a step still in flight."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling needs its token history on the host (penalties) or prompt logprobs are still due: the
        engine finishes the step in flight before it schedules this sequence (no overlap)."""
        p = self.params
        return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
                or self.wants_prompt_logprobs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


class PrefixView:
    """`seq` as it would be with `extra` tokens appended: what the logits processors read when they score a
    speculative position (penalties see the proposed tokens before it; min_tokens counts them)."""

    def __init__(self, seq: Sequence, extra: list[int]) -> None:
        self.seq, self.extra = seq, extra
        self.params, self.generator, self.num_pending = seq.params, seq.generator, seq.num_pending

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)


@dataclass
class Request:
    """A user request: one prompt, its sampling parameters and the n sequences generated from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    draft_time: float = 0.0       # seconds of the speculative steps it was in: proposing, verifying
    verify_time: float = 0.0
    seqs: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seqs = [Sequence(self, i) for i in range(self.params.n)]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
