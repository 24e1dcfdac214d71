"""Continuous batching, batch invariance, chunked prefill and preemption: outputs never depend on scheduling."""
from __future__ import annotations

import pytest
import torch

from tuili import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# "on": step N+1 is scheduled and launched before step N's tokens reach the host (the CUDA default, run on
# the CPU here so that CI checks its bookkeeping); outputs must not change
ASYNC_MODES = ["off", "on"]


def random_prompts(count: int, lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(count)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference(tiny_models):
    """Each prompt run alone on a roomy engine."""
    llm = LLM(tiny_models["llama"], dtype="float32", kv_cache_memory=0.05)
    prompts = random_prompts(8, [5, 70, 17, 33, 1, 120, 48, 9])
    alone = [token_ids(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]
    return prompts, alone


def test_smollm_batch_invariance(smollm):
    """Each request's greedy output is the same alone and inside a batch of 8 mixed lengths."""
    tok = smollm.get_tokenizer()
    texts = ["Hi", "Name three colors.", "Write a haiku about the sea and the wind in the evening.",
             "What is 2+2?", "Tell me a short story about a cat who learns to fly over the mountains.",
             "Translate 'good morning' to French.", "List the planets of the solar system in order.", "Why?"]
    prompts = [smollm.encode_chat([{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == 8
    params = SamplingParams(temperature=0, max_tokens=16)
    batch = token_ids(smollm.generate(prompts, params, use_tqdm=False))
    for p, b in zip(prompts, batch):
        assert token_ids(smollm.generate(p, params, use_tqdm=False))[0] == b
    assert tok.decode(batch[0])


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_batch_of_mixed_lengths_equals_alone(tiny_models, reference, mode):
    prompts, alone = reference
    llm = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, kv_cache_memory=0.05)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_requests_join_while_others_decode(tiny_models, reference, mode):
    prompts, alone = reference
    llm = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, kv_cache_memory=0.05)
    engine = llm.engine
    done: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:  # a new request every third step, while the others decode
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert [done[str(i)] for i in range(len(prompts))] == alone
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_chunked_prefill_gives_same_output(tiny_models, reference, mode):
    prompts, alone = reference
    llm = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, kv_cache_memory=0.05,
              max_num_batched_tokens=16)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_preemption_keeps_outputs(tiny_models, reference, mode):
    prompts, alone = reference
    # 14 blocks of 16 tokens = 224 slots for 8 requests needing up to 144 each: preemption is forced
    llm = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, num_gpu_blocks_override=14,
              max_model_len=224)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_seeded_sampling_survives_preemption(tiny_models, mode):
    prompts = random_prompts(8, [30, 60, 90])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True)
    roomy = LLM(tiny_models["llama"], dtype="float32", kv_cache_memory=0.05)
    tight = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, num_gpu_blocks_override=14,
                max_model_len=224)
    assert token_ids(tight.generate(prompts, params, use_tqdm=False)) == \
        token_ids(roomy.generate(prompts, params, use_tqdm=False))
    assert tight.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_abort_frees_blocks(tiny_models, mode):
    llm = LLM(tiny_models["llama"], dtype="float32", async_scheduling=mode, kv_cache_memory=0.05)
    engine = llm.engine
    for i, p in enumerate(random_prompts(4, [40])):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for i in range(4):
        engine.abort_request(str(i))
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


def test_timing_and_finish_reason(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="float32", kv_cache_memory=0.05)
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.finished and out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time
