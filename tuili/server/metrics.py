"""Prometheus metrics of the server (prometheus-client, one registry per server)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tuili.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tuili_requests", "Requests by outcome: HTTP status for errors and successes, "
                                "finish reason for finished generations", ["status"], registry=r)
        self.running = Gauge("tuili_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("tuili_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("tuili_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.prompt_tokens = Counter("tuili_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tuili_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("tuili_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("tuili_time_per_output_token_seconds", "Mean time per output token after the "
                              "first", registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                            0.5, 1))
        self.e2e = Histogram("tuili_e2e_request_latency_seconds", "Arrival to finish", registry=r,
                             buckets=_LATENCY_BUCKETS)
        # speculative decoding, cumulative since the engine started (present when the engine speculates)
        self.spec = {name: Gauge(f"tuili_spec_decode_{name}", doc, registry=r) for name, doc in (
            ("proposed", "Tokens proposed by the draft model or n-gram proposer"),
            ("accepted", "Proposed tokens accepted by the target"),
            ("seq_steps", "Verification steps, counted per sequence"),
            ("acceptance_rate", "accepted / proposed"),
            ("mean_accepted_length", "Proposals accepted per sequence per verification step"),
            ("draft_seconds", "Seconds spent proposing"),
            ("verify_seconds", "Seconds of the target's verification steps"))}

    def count_status(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def observe(self, out: RequestOutput) -> None:
        """Called for every engine output; finished requests update the counters and histograms."""
        if not out.finished:
            return
        m = out.metrics
        n_out = sum(len(c.token_ids) for c in out.outputs)
        for c in out.outputs:
            self.requests.labels(status=f"finished_{c.finish_reason}").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(n_out)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            longest = max(len(c.token_ids) for c in out.outputs)
            if longest > 1 and m.finish_time is not None:
                self.tpot.observe((m.finish_time - m.first_token_time) / (longest - 1))
        if m.finish_time is not None:
            self.e2e.observe(m.finish_time - m.arrival_time)

    def render(self, stats: dict) -> bytes:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])
        for name, value in (stats.get("spec") or {}).items():
            if name in self.spec:
                self.spec[name].set(value)
        return generate_latest(self.registry)
