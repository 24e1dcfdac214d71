"""On a CUDA GPU: the fast path (Triton kernels + CUDA graphs) against the torch path and HF transformers.

Run on the lent GPU; on a machine without CUDA the module is skipped as a whole (CI has no GPU; the kernels
are tested there through the Triton interpreter in tests/ops)."""
from __future__ import annotations

import pytest
import torch

from reference import hf_greedy
from tuili import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SMALL_CACHE = dict(num_gpu_blocks_override=256)  # several engines share the GPU in one test process


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def prompts(count: int, vocab: int, lengths=(3, 17, 64, 130, 1, 250)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(count)]


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_fast_path_equals_torch_path_fp32(tiny_models, family):
    """Greedy output with Triton kernels and CUDA graphs is identical to the torch reference path."""
    path = tiny_models[family]
    ps = prompts(12, 512)
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", no_fused_ops=True,
              enforce_eager=True, async_scheduling="off", max_num_seqs=16, **SMALL_CACHE)
    fast = LLM(path, device="cuda", dtype="float32", max_num_seqs=16, **SMALL_CACHE)
    assert fast.engine.runner.graphs is not None and fast.engine.async_scheduling
    assert token_ids(fast.generate(ps, GREEDY, use_tqdm=False)) == token_ids(ref.generate(ps, GREEDY, use_tqdm=False))
    # chunked prefill and preemption on the fast path too
    tight = LLM(path, device="cuda", dtype="float32", max_num_seqs=16, max_num_batched_tokens=32,
                num_gpu_blocks_override=24, max_model_len=384)
    assert token_ids(tight.generate(ps, GREEDY, use_tqdm=False)) == token_ids(ref.generate(ps, GREEDY, use_tqdm=False))
    assert tight.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("quant", [dict(quantization="int8"), dict(quantization="int4", quant_group_size=32),
                                   dict(quantization="int4", quant_group_size=64, quant_symmetric=True),
                                   dict(kv_cache_dtype="fp8"), dict(kv_cache_dtype="int8")],
                         ids=["int8", "int4-g32", "int4-g64-sym", "kv-fp8", "kv-int8"])
def test_quantized_fast_path_equals_torch_path_fp32(tiny_models, quant):
    """The dequant-fused Triton matmuls (decode GEMV tiles in CUDA graphs, with the layers' norms and residual
    adds inside; GEMM tiles for prefill) and the attention kernels over an fp8/int8 KV cache give the same greedy
    tokens as the torch references on the same packed weights / the same quantized cache."""
    path = tiny_models["llama"]
    ps = prompts(12, 512)
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", no_fused_ops=True,
              enforce_eager=True, async_scheduling="off", max_num_seqs=16, **SMALL_CACHE, **quant)
    fast = LLM(path, device="cuda", dtype="float32", max_num_seqs=16, **SMALL_CACHE, **quant)
    assert quant.get("quantization") is None or fast.engine.model.layers[0].mlp.down_proj.qweight is not None
    # decode steps of one sequence run with the norms and residual adds inside the GEMVs
    assert fast.engine.model.norms_fuse(1) == (quant.get("quantization") is not None)
    assert token_ids(fast.generate(ps, GREEDY, use_tqdm=False)) == token_ids(ref.generate(ps, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("quant", [dict(quantization="int8"), dict(quantization="int4", quant_group_size=32)],
                         ids=["int8", "int4-g32"])
def test_quantized_decode_batches_past_16_rows_equal_torch_path_fp32(tiny_models, quant):
    """Decode steps of 17-24 sequences: INT8 per channel through the tensor-core kernel's batch tiles (K tiles of
    256), INT4 through int4_gemm_triton (weight tiles dequantized in registers), in CUDA graphs: the same greedy
    tokens as the torch references on the same packed weights."""
    path = tiny_models["llama"]
    ps = prompts(24, 512)
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", no_fused_ops=True,
              enforce_eager=True, async_scheduling="off", max_num_seqs=32, **SMALL_CACHE, **quant)
    fast = LLM(path, device="cuda", dtype="float32", max_num_seqs=32, **SMALL_CACHE, **quant)
    assert token_ids(fast.generate(ps, GREEDY, use_tqdm=False)) == token_ids(ref.generate(ps, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_batch_one_with_l2_prefetch_equals_torch_path(tiny_models, quant):
    """One sequence at a time: its decode graphs also prefetch each layer's o and gate/up weights into the L2 on
    a side stream while it attends (Hopper, ops/prefetch.py); same greedy tokens as the torch references."""
    from tuili.ops import prefetch

    path = tiny_models["llama"]
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", no_fused_ops=True,
              enforce_eager=True, async_scheduling="off", **SMALL_CACHE, quantization=quant)
    fast = LLM(path, device="cuda", dtype="float32", **SMALL_CACHE, quantization=quant)
    attn = fast.engine.model.layers[0].self_attn
    assert bool(attn.l2_prefetch) == prefetch.supported(torch.cuda.current_device())
    if attn.l2_prefetch:  # all of o's packed weights first, then (here) all of gate/up's: tiny ones fit AHEAD
        o, gate_up = attn.o_proj.qweight, fast.engine.model.layers[0].mlp.gate_up_proj.qweight
        assert attn.l2_prefetch[0] == (o.data_ptr(), o.numel() * o.element_size())
        assert attn.l2_prefetch[-1] == (gate_up.data_ptr(), gate_up.numel() * gate_up.element_size())
    off = LLM(path, device="cuda", dtype="float32", **SMALL_CACHE, quantization=quant, no_l2_prefetch=True)
    assert not any(layer.self_attn.l2_prefetch for layer in off.engine.model.layers)
    for p in prompts(3, 512):
        assert token_ids(fast.generate([p], GREEDY, use_tqdm=False)) == token_ids(
            ref.generate([p], GREEDY, use_tqdm=False))


@pytest.mark.parametrize("family", ["llama", "llama3-scaled", "qwen3"])
def test_fast_path_matches_hf_fp32(tiny_models, family):
    from transformers import AutoModelForCausalLM

    path = tiny_models[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    llm = LLM(path, device="cuda", dtype="float32", **SMALL_CACHE)
    for p in prompts(4, 512):
        got = llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        with torch.device("cuda"):
            assert got == hf_greedy(hf, p, 48)


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-3), ("bfloat16", 0.15)])
def test_dummy_1b_logits_match_hf(dtype, atol):
    """Whole-model log-probabilities of the dummy Llama-3.2-1B shape against HF with the same weights."""
    from tuili.bench.latency import hf_reference_model

    llm = LLM("llama-3.2-1b", load_format="dummy", dtype=dtype, max_model_len=1024, max_num_seqs=8, **SMALL_CACHE)
    hf = hf_reference_model(llm)
    prompt = prompts(1, 128256, lengths=(200,))[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0].float(), dim=-1).cpu()
    worst = 0.0
    for pos in range(1, len(prompt)):
        for token_id, lp in out.prompt_logprobs[pos].items():
            worst = max(worst, abs(lp.logprob - float(ref[pos - 1, token_id])))
    assert worst < atol, worst


def test_int4_decode_batches_through_the_tensor_core_gemv(monkeypatch):
    """INT4 g128 in bf16 with int4_mma's GEMM off (the GEMV is what layers it does not fit take): decode batches of
    3-16 sequences run every projection through int4_mma's GEMV with the norms and residual adds inside (in the
    CUDA graphs), and their log-probs agree with the Triton kernels' where the greedy tokens agree (random weights:
    near-ties may part the two after a few tokens)."""
    from tuili.ops import int4_mma, quant_matmul

    monkeypatch.setattr(quant_matmul, "GEMM_MMA", False)
    calls = []
    real = int4_mma.int4_gemv
    monkeypatch.setattr(int4_mma, "int4_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    args = dict(load_format="dummy", dtype="bfloat16", quantization="int4", max_model_len=512, max_num_seqs=8,
                **SMALL_CACHE)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    ps = prompts(8, 128256, lengths=(20, 33, 47, 64))
    fast = LLM("llama-3.2-1b", **args)
    assert fast.engine.model.norms_fuse(8) and fast.engine.model.norms_fuse(3)
    got = fast.generate(ps, params, use_tqdm=False)
    assert calls and set(calls) <= set(range(3, 17))
    del fast
    monkeypatch.setattr(quant_matmul, "MMA_MIN_ROWS", 17)  # the Triton kernels only
    ref = LLM("llama-3.2-1b", **args).generate(ps, params, use_tqdm=False)
    compared = _decode_steps_agreeing(got, ref, 0.15)
    assert compared >= 16, compared


@pytest.mark.parametrize("path", ["int4_gemm_mma", "int4_gemm_triton"])
def test_int4_decode_batches_past_16_rows_read_the_packed_weights(monkeypatch, path):
    """INT4 g128 in bf16, 24 sequences: every projection of GEMM_MIN_ROWS-64 rows goes through int4_mma's GEMM (or,
    with it off, those of 17-64 rows through int4_gemm_triton: the weight dequantized in registers) in the CUDA
    graphs, and gives what the dequantize-then-cuBLAS path gives where the greedy tokens agree."""
    from tuili.ops import int4_mma, quant_matmul

    calls = []
    module, name = (int4_mma, "int4_gemm") if path == "int4_gemm_mma" else (quant_matmul, "int4_gemm_triton")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.setattr(quant_matmul, "GEMM_MMA", path == "int4_gemm_mma")
    args = dict(load_format="dummy", dtype="bfloat16", quantization="int4", max_model_len=512, max_num_seqs=24,
                **SMALL_CACHE)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    ps = prompts(24, 128256, lengths=(20, 33, 47, 64))
    got = LLM("llama-3.2-1b", **args).generate(ps, params, use_tqdm=False)
    low = quant_matmul.GEMM_MIN_ROWS if path == "int4_gemm_mma" else quant_matmul.DEQUANT_MIN_ROWS
    assert 24 in calls and set(calls) <= set(range(low, quant_matmul.INT4_GEMM_MAX_ROWS + 1))
    monkeypatch.setattr(quant_matmul, "GEMM_MMA", False)
    monkeypatch.setattr(quant_matmul, "INT4_GEMM_MAX_ROWS", 0)  # dequantize, then cuBLAS
    ref = LLM("llama-3.2-1b", **args).generate(ps, params, use_tqdm=False)
    compared = _decode_steps_agreeing(got, ref, 0.15)  # as for int4_mma above (0.05 held on the H100; 0.063 H200)
    assert compared >= 48, compared


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_batch_one_bf16_through_stream_gemv(monkeypatch, quant):
    """bf16 batch 1 on Hopper: every INT8 (per channel) or INT4 g128 projection, the fused forms included, goes
    through stream_gemv in the CUDA graph, and gives the Triton GEMV's log-probs where the greedy tokens agree."""
    from tuili.ops import quant_matmul, stream_gemv

    if not stream_gemv.available(torch.device("cuda")):
        pytest.skip("stream_gemv needs compute capability 9.0+ and NVRTC (Hopper)")
    calls = []
    real = stream_gemv.stream_gemv
    monkeypatch.setattr(stream_gemv, "stream_gemv", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    args = dict(load_format="dummy", dtype="bfloat16", quantization=quant, max_model_len=512, max_num_seqs=8,
                **SMALL_CACHE)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    ps = prompts(3, 128256, lengths=(20, 47, 64))
    fast = LLM("llama-3.2-1b", **args)
    assert fast.engine.model.norms_fuse(1)
    got = [fast.generate([p], params, use_tqdm=False)[0] for p in ps]
    assert set(calls) == ({torch.int8} if quant == "int8" else {torch.uint8, torch.int8})  # int4: the INT8 head
    del fast
    monkeypatch.setattr(quant_matmul, "STREAM_GEMV_INT8", False)
    monkeypatch.setattr(quant_matmul, "STREAM_GEMV", False)
    calls.clear()
    ref_llm = LLM("llama-3.2-1b", **args)
    ref = [ref_llm.generate([p], params, use_tqdm=False)[0] for p in ps]
    assert not calls
    compared = _decode_steps_agreeing(got, ref, 0.15)
    assert compared >= 16, compared


def _decode_steps_agreeing(got, ref, atol: float) -> int:
    """Asserts the chosen tokens' log-probs of two runs within atol while their greedy tokens agree (random weights:
    near-ties may part them after a few tokens); returns how many decode steps were compared (position 0 comes
    from the prefill)."""
    compared = 0
    for a, b in zip(got, ref):
        for pos, (ta, tb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            if ta != tb:
                break
            assert abs(a.outputs[0].logprobs[pos][ta].logprob - b.outputs[0].logprobs[pos][tb].logprob) < atol
            compared += pos > 0
    return compared


def test_launch_early_decode_attention_is_bit_identical(monkeypatch):
    """INT4 g128 in bf16, decode steps of 1 and 3 rows: where the o projection loads its weights before its wait
    (stream_gemv, int4_mma), the decode attention and its split merge let it launch at once (launch_early); the
    CUDA graphs then give the same tokens and log-probs, bit for bit, as with the usual launch order (only when
    kernels start differs)."""
    from tuili.ops import quant_matmul, stream_gemv

    kw = dict(load_format="dummy", dtype="bfloat16", quantization="int4", max_model_len=1024, max_num_seqs=4,
              **SMALL_CACHE)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    ps = prompts(3, 128256, lengths=(300, 310, 320))  # 300-360 cached tokens: several attention splits

    def run(llm):
        outs = [*llm.generate(ps[:1], params, use_tqdm=False), *llm.generate(ps, params, use_tqdm=False)]
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                for o in outs]

    early = LLM("llama-3.2-1b", **kw)
    layers = early.engine.model.layers
    hopper = stream_gemv.available(torch.device("cuda"))
    assert all((1 in layer.self_attn.attn.launch_early_rows) == hopper
               and (3 in layer.self_attn.attn.launch_early_rows or not hopper) for layer in layers)
    got = run(early)
    del early, layers
    monkeypatch.setattr(quant_matmul, "loads_before_wait", lambda *args: False)
    usual = LLM("llama-3.2-1b", **kw)
    assert not any(layer.self_attn.attn.launch_early_rows for layer in usual.engine.model.layers)
    assert got == run(usual)
