"""What the engine hands back per request per step (names as in vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

from tuili.sampling_params import PositionLogprobs


@dataclass
class CompletionOutput:
    """One of a request's n generated sequences, so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None       # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecMetrics:
    """Speculative decoding of one request (all its sequences): verification steps, proposed and accepted
    tokens, and the seconds of the steps it was in spent proposing (draft) and verifying (target pass)."""

    steps: int
    proposed_tokens: int
    accepted_tokens: int
    draft_time: float
    verify_time: float

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Proposals accepted per verification step (each step also emits one token of the target's)."""
        return self.accepted_tokens / self.steps if self.steps else None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of the request's life, for TTFT and latency; speculation's counts."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    spec: SpecMetrics | None = None    # None when the engine does not speculate

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = field(default=None)
