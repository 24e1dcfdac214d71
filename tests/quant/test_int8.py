"""INT8 weight-only quantization: the kernel against its reference, the model against the unquantized one."""
from __future__ import annotations

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.ops.quant_matmul import int8_linear, int8_linear_cpu
from tuili.quant import quantize_per_channel

PROMPTS = ["What is the capital of France? Answer in one sentence.", "Name three primary colors.",
           "Write a haiku about autumn.", "What is 12 times 12?", "Who wrote Romeo and Juliet?"]


def test_quantize_per_channel_error_is_half_a_step():
    w = torch.randn(96, 200) * torch.rand(96, 1) * 3
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses the full range


@pytest.mark.parametrize("rows", [5, 40])  # the packed kernel, and the dequantize + GEMM path for prefill
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 0.5)])
def test_cpu_kernel_matches_reference(dtype, atol, rows):
    x = torch.randn(rows, 576, dtype=dtype)
    q, scales = quantize_per_channel(torch.randn(192, 576))
    bias = torch.randn(192, dtype=dtype)
    ref = int8_linear(x.float(), q, scales.float(), bias.float())
    got = int8_linear_cpu(x, q, scales.to(dtype), bias)
    assert got.dtype == dtype and torch.allclose(got.float(), ref, atol=atol, rtol=1e-2)


@pytest.fixture(scope="module")
def smollm_int8(default_model_path):
    return LLM(default_model_path, dtype="float32", quantization="int8", kv_cache_memory=0.1)


def test_int8_answers_like_the_unquantized_model(smollm, smollm_int8):
    question = [{"role": "user", "content": PROMPTS[0]}]
    params = SamplingParams(temperature=0, max_tokens=24)
    assert smollm_int8.chat(question, params, use_tqdm=False)[0].outputs[0].text == \
        smollm.chat(question, params, use_tqdm=False)[0].outputs[0].text == "The capital of France is Paris."
    assert smollm_int8.engine.model.layers[0].mlp.down_proj.qweight.dtype == torch.int8


def test_int8_greedy_agreement_and_logprobs(smollm, smollm_int8):
    """Teacher-forced on the unquantized model's greedy answers to the fixed prompts: the INT8 model picks the
    same next token at >= 90% of positions, and its log-probabilities stay close."""
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers = smollm.chat(convs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    agree, diffs = [], []
    for conv, answer in zip(convs, answers):
        ids = smollm.encode_chat(conv) + answer.outputs[0].token_ids
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        ref = smollm.generate(ids, params, use_tqdm=False)[0].prompt_logprobs
        got = smollm_int8.generate(ids, params, use_tqdm=False)[0].prompt_logprobs
        start = len(ids) - len(answer.outputs[0].token_ids)
        for pos in range(start, len(ids)):
            agree.append(got[pos][ids[pos]].rank == 1)
            diffs.append(abs(got[pos][ids[pos]].logprob - ref[pos][ids[pos]].logprob))
    assert sum(agree) / len(agree) >= 0.9, sum(agree) / len(agree)
    assert sum(diffs) / len(diffs) < 0.15, sum(diffs) / len(diffs)


def test_unknown_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="quantization must be int8"):
        LLM(quantization="int3")


def quantize_tiny(tiny_models, family: str, out) -> str:
    from tuili.cli import main

    assert main(["quantize", "--model", tiny_models[family], "--out", str(out), "--dtype", "float32"]) == 0
    return str(out)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied head / tied head
def test_quantize_save_load_round_trip(tiny_models, tmp_path, family):
    """`tuili quantize` writes a folder that loads to exactly the model --quantization int8 makes at load time."""
    path = quantize_tiny(tiny_models, family, tmp_path / "q")
    saved = LLM(path, dtype="float32", kv_cache_memory=0.01)
    at_load = LLM(tiny_models[family], dtype="float32", quantization="int8", kv_cache_memory=0.01)
    assert saved.engine.model.layers[1].self_attn.qkv_proj.qweight.dtype == torch.int8
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=2)
    a, b = (llm.generate(prompt, params, use_tqdm=False)[0] for llm in (saved, at_load))
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert {t: lp.logprob for t, lp in ea.items()} == {t: lp.logprob for t, lp in eb.items()}


def test_quantized_folder_with_missing_or_wrong_config_fails_clearly(tiny_models, tmp_path):
    import json

    path = quantize_tiny(tiny_models, "llama", tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gptq' of this checkpoint is not supported"):
        LLM(path, dtype="float32", kv_cache_memory=0.01)
    del config["quantization_config"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config"):
        LLM(path, dtype="float32", kv_cache_memory=0.01)


def test_int8_perplexity_close_to_unquantized(smollm, smollm_int8):
    """On the first 1024 tokens of the shipped prose, INT8 perplexity is within 2% of the unquantized model's."""
    from tuili.bench.perplexity import DEFAULT_TEXT, perplexity

    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        ids = smollm.get_tokenizer().encode(f.read(20000), add_special_tokens=False)[:1024]
    ref, count = perplexity(smollm, ids, context=512)
    got, _ = perplexity(smollm_int8, ids, context=512)
    assert count == 1022 and 5 < ref < 60
    assert abs(got / ref - 1) < 0.02, (got, ref)
