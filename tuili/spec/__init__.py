"""Speculative decoding: proposers (n-gram / prompt lookup, draft model) and exact verification (greedy prefix,
rejection sampling). The scheduler reserves k lookahead slots per decoding sequence, the engine asks a proposer
to fill them, the runner verifies them in one target pass (Sampler.verify), and the engine appends the accepted
run and rolls the rest back (tuili/engine/llm_engine.py)."""
from tuili.spec.rejection import verify_greedy, verify_sampled
from tuili.spec.ngram import NgramProposer, propose_ngram

__all__ = ["NgramProposer", "propose_ngram", "verify_greedy", "verify_sampled"]
