"""The model against HF transformers: logits (through prompt logprobs) and 64 greedy tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import hf_greedy, hf_logprobs
from tuili import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def check_against_hf(llm: LLM, hf, prompt: list[int], atol: float) -> None:
    # logits: every prompt position's top-20 logprobs and the logprob of the actual next token
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=20), use_tqdm=False)[0]
    ref = hf_logprobs(hf, prompt)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[pos - 1, token_id]), abs=atol), (pos, token_id)
        assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
    # 64 greedy tokens, identical
    got = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(hf, prompt, 64)


@pytest.mark.parametrize("family", ["llama", "llama3-scaled", "mistral", "qwen2", "qwen3"])
def test_tiny_families_match_hf(tiny_models, family):
    path = tiny_models[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", kv_cache_memory=0.01)
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    check_against_hf(llm, hf, prompt, atol=1e-4)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_smollm_gguf_matches_hf(smollm, smollm_hf):
    prompt = smollm.encode_chat([{"role": "user", "content": "Tell me about the moon."}])
    check_against_hf(smollm, smollm_hf, prompt, atol=2e-4)


def test_smollm_answers_paris(smollm):
    out = smollm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                      SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
