"""The CPU's scripted step (tuili/runner/cpu_step.py) against the eager layers it replaces: bit for bit; and its
native form (cpu_kernels.decode_step, one C++ call) against them within bf16 roundings."""
from __future__ import annotations

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.ops import cpu_kernels
from tuili.ops.attention_metadata import set_attention_metadata
from tuili.runner.cpu_step import GEMV4, GEMV8, GEMV16, INT4

CONTEXT = 37  # tokens already in the cache (3 blocks of 16)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # plain, q/k/v biases, q/k norms
@pytest.mark.parametrize("dtype,quantization", [("bfloat16", None), ("float32", None), ("bfloat16", "int8"),
                                                ("bfloat16", "int4"), ("float32", "int8")])
def test_cpu_step_equals_eager_layers(tiny_models, family, dtype, quantization):
    group = dict(quant_group_size=32) if quantization == "int4" else {}
    llm = LLM(tiny_models[family], device="cpu", dtype=dtype, quantization=quantization, kv_cache_memory=0.01, **group)
    runner, model = llm.engine.runner, llm.engine.model
    step = runner.cpu_step
    assert step is not None
    native = cpu_kernels.available() and dtype == "bfloat16" and family == "llama"  # (qwen2: biases, qwen3: norms)
    assert (step.native is not None) == native
    if quantization is None and dtype == "bfloat16" and cpu_kernels.available():  # bf16 layers: tuili's GEMV
        assert step.args[True][2][0] == step.args[False][2][0] == [GEMV16] * 4
    if quantization == "int4":  # more than GEMV_ROWS rows: torch's packed int4 kernel; up to that: tuili's
        assert step.args[False][2][0] == [INT4] * 4
        assert step.args[True][2][0] == [GEMV4 if cpu_kernels.available() else INT4] * 4
    if quantization == "int8" and dtype == "bfloat16" and cpu_kernels.available():
        assert step.args[True][2][0] == [GEMV8] * 4
    gen = torch.Generator().manual_seed(0)
    table = [3, 0, 5]
    with torch.no_grad():
        ids = torch.randint(0, 512, (CONTEXT,), generator=gen)
        slots = [table[p // 16] * 16 + p % 16 for p in range(CONTEXT)]
        meta, _ = runner._metadata([CONTEXT], [CONTEXT], [table], slots)
        set_attention_metadata(meta)
        model(ids, torch.arange(CONTEXT))  # the context, eagerly (more than 16 new tokens)
        set_attention_metadata(None)
        for q_len in (1, 4):  # a decode, a verification of 3 proposals
            ids = torch.randint(0, 512, (q_len,), generator=gen)
            positions = torch.arange(CONTEXT, CONTEXT + q_len)
            meta, _ = runner._metadata([q_len], [CONTEXT + q_len], [table],
                                       [table[p // 16] * 16 + p % 16 for p in positions.tolist()])
            assert step.handles(meta)
            k_cache = model.layers[1].self_attn.attn.k_cache
            one_call = native and q_len <= cpu_kernels.GEMV_ROWS
            if one_call:  # the C++ step: the same computation; bf16 roundings may fall differently (sums' order)
                out = step.run(ids, positions, meta)
                k_native = k_cache.clone()
            scripted = step.run(ids, positions, meta, native=False)
            k_after = k_cache.clone()
            set_attention_metadata(meta)
            eager = model(ids, positions)
            set_attention_metadata(None)
            assert torch.equal(scripted, eager), (scripted - eager).abs().max()
            assert torch.equal(k_cache, k_after)  # the same K/V stored
            if one_call:
                assert (out.float() - eager.float()).abs().max() <= 0.01 * eager.float().abs().max()
                written = k_after.flatten(0, 1)[meta.slot_mapping.long()].float()
                assert (k_native.flatten(0, 1)[meta.slot_mapping.long()].float() - written).abs().max() <= \
                    0.03 * written.abs().max()


def test_cpu_step_is_used_and_enforce_eager_turns_it_off(tiny_models):
    prompts = [[1, 2, 3, 4, 5], [7] * 30]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for eager in (False, True):
        llm = LLM(tiny_models["llama"], device="cpu", dtype="bfloat16", kv_cache_memory=0.01, enforce_eager=eager)
        runner = llm.engine.runner
        assert (runner.cpu_step is None) == eager
        calls = []
        if not eager:
            run = runner.cpu_step.run
            runner.cpu_step.run = lambda *a: calls.append(1) or run(*a)
        outputs[eager] = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        if not eager:  # every decode step, and the short prompt's prefill
            assert len(calls) == 2 * 11 + 1
    assert outputs[False] == outputs[True]


@pytest.mark.parametrize("args", [dict(dtype="bfloat16", kv_cache_dtype="int8"),  # a quantized KV cache
                                  dict(dtype="float32", quantization="int4", quant_group_size=32)])  # (fp32 INT4)
def test_cpu_step_leaves_what_it_does_not_cover_to_the_eager_path(tiny_models, args):
    llm = LLM(tiny_models["llama"], device="cpu", kv_cache_memory=0.01, **args)
    assert llm.engine.runner.cpu_step is None
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
