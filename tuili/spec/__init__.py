"""Speculative decoding: proposers (n-gram / prompt lookup) and exact verification (rejection sampling).

This stop holds the parts that are pure functions, each tested on its own; their use inside the engine
(scheduling k + 1 tokens per sequence, KV rollback, a draft model's cache, metrics) is issue 8's next step.
"""
from tuili.spec.ngram import propose_ngram
from tuili.spec.rejection import verify_greedy, verify_sampled

__all__ = ["propose_ngram", "verify_greedy", "verify_sampled"]
