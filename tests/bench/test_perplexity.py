"""Perplexity through the engine equals perplexity computed from HF transformers' logits."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import hf_logprobs
from tuili import LLM
from tuili.bench.perplexity import perplexity


def test_perplexity_matches_hf(tiny_models):
    path = tiny_models["llama"]
    llm = LLM(path, dtype="float32", kv_cache_memory=0.01)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (75,), generator=torch.Generator().manual_seed(5)).tolist()
    ppl, count = perplexity(llm, ids, context=32)
    total = 0.0
    for start in range(0, len(ids), 32):  # windows 32, 32, 11
        window = ids[start:start + 32]
        ref = hf_logprobs(hf, window)
        total += sum(float(ref[p - 1, window[p]]) for p in range(1, len(window)))
    assert count == 31 + 31 + 10
    assert ppl == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_perplexity_rejects_degenerate_input(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="float32", kv_cache_memory=0.01)
    with pytest.raises(ValueError, match="too short"):
        perplexity(llm, [5], context=16)
    with pytest.raises(ValueError, match="context must be"):
        perplexity(llm, [5, 6, 7], context=1)
