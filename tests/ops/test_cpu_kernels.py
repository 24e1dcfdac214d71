"""tuili's C++ CPU kernels (tuili/ops/cpu_kernels.cpp) against the torch references, on random inputs."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from tuili.ops import cpu_kernels, quant_matmul

FLAGS = set(cpu_kernels._cpu_flags().split())
HAS_AVX2 = platform.machine() == "x86_64" and {"avx2", "fma"} <= FLAGS
needs_kernels = pytest.mark.skipif(not HAS_AVX2, reason="not an x86-64 CPU with AVX2: tuili uses torch's kernels")


def test_kernels_build_where_the_cpu_has_avx2():
    # where the instruction set is there, a failure to build (compiler, headers) must not pass unnoticed
    assert cpu_kernels.available() == HAS_AVX2, cpu_kernels.why_not()
    if HAS_AVX2:
        assert cpu_kernels.isa() == ("avx512_bf16" if "avx512_bf16" in FLAGS else "avx2")


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # the kernels sum in fp32 and round once to bf16: within a few bf16 ulps of the output's scale
    assert (out.float() - ref).abs().max() <= 0.01 * ref.abs().max(), (out.float() - ref).abs().max()


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_gemv_matches_the_reference(group, symmetric, rows, dtype):
    gen = torch.Generator().manual_seed(rows * group)
    for n, k in ((33, 128), (100, 640), (7, 1536)):  # odd column counts: the last row pair is a single row
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).to(dtype)
        offsets = None if symmetric else (torch.randn(n, k // group, generator=gen) * 0.05).to(dtype)
        x = torch.randn(rows, k, generator=gen).to(dtype)
        ref = quant_matmul.int4_linear(x.double(), qweight, scales.double(),
                                       None if offsets is None else offsets.double(), group)
        packed = cpu_kernels.pack_int4(qweight, scales, offsets, group)
        assert packed[1].dtype == dtype  # fp32 layers keep fp32 scales and offsets
        out = cpu_kernels.int4_gemv(x, packed, group)
        assert out.dtype == dtype
        if dtype == torch.float32:  # exact products, fp32 sums: fp32 rounding only
            assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (out.double() - ref).abs().max()
        else:
            _close(out, ref.float())


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_dequant_and_the_dense_product_for_many_rows(group, dtype):
    gen = torch.Generator().manual_seed(group)
    n, k = 37, 640
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).to(dtype)
    offsets = (torch.randn(n, k // group, generator=gen) * 0.05).to(dtype)
    packed = cpu_kernels.pack_int4(qweight, scales, offsets, group)
    assert cpu_kernels.available()
    weight = torch.ops.tuili.int4_dequant(*packed, group)
    ref = quant_matmul.dequantize_int4(qweight, scales, offsets, group)  # fp32 (one FMA against a mul and an add)
    assert weight.dtype == torch.float32 and (weight - ref).abs().max() <= 1e-6 * ref.abs().max()
    if dtype == torch.bfloat16:  # the product for prefill-sized bf16 batches
        x = torch.randn(cpu_kernels.GEMV_ROWS_AVX2 + 5, k, generator=gen).to(dtype)
        out = cpu_kernels.int4_dense(x, packed, group)
        assert out.dtype == dtype
        _close(out, quant_matmul.int4_linear(x.double(), qweight, scales.double(), offsets.double(), group).float())
    # an AVX2 build runs bf16 batches through int4_gemv up to GEMV_ROWS_AVX2 rows and int4_dense beyond
    avx2 = cpu_kernels.isa() == "avx2"
    assert cpu_kernels.GEMV_ROWS == (cpu_kernels.GEMV_ROWS_AVX2 if avx2 else 1)
    assert cpu_kernels.DENSE_ROWS == (cpu_kernels.GEMV_ROWS_AVX2 if avx2 else 1 << 62)


@pytest.mark.parametrize("rows", [3, cpu_kernels.FLOAT_ROWS + 1, 64])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])  # fp32: an INT8 layer's dequantized copy
def test_dense_linear_goes_through_fp32_for_bf16_batches_where_the_bf16_gemm_is_slow(rows, weight_dtype):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    weight = torch.randn(40, 96, generator=gen).to(weight_dtype)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16)
    out = cpu_kernels.dense_linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 40)
    if rows > cpu_kernels.FLOAT_ROWS and cpu_kernels.slow_bf16_gemm():
        assert torch.equal(out, torch.nn.functional.linear(x.float(), weight.float(), bias.float()).bfloat16())
    elif weight_dtype == torch.bfloat16 and cpu_kernels.available():  # tuili's bf16 GEMV, then the bias
        assert torch.equal(out, cpu_kernels.bf16_gemv(x, weight) + bias)
    else:
        assert torch.equal(out, torch.nn.functional.linear(x, weight.bfloat16(), bias))


def test_int4_pack_refuses_shapes_the_kernel_does_not_take():
    q = torch.zeros(4, 48, dtype=torch.uint8)  # K = 96: not a multiple of 64
    assert cpu_kernels.pack_int4(q, torch.ones(4, 3), None, 32) is None
    q = torch.zeros(4, 64, dtype=torch.uint8)  # group 16 (GGUF Q6_K-like)
    assert cpu_kernels.pack_int4(q, torch.ones(4, 8), None, 16) is None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
@pytest.mark.parametrize("group", [0, 16, 32])  # 0: per output channel; 16 / 32: GGUF Q6_K / Q8_0's groups
def test_int8_gemv_matches_the_reference(dtype, rows, group):
    gen = torch.Generator().manual_seed(rows + group)
    for n, k in ((49, 64), (300, 576)):
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scales = (torch.rand((n, k // group) if group else (n,), generator=gen) * 0.01).to(dtype)
        x = torch.randn(rows, k, generator=gen).to(dtype)
        ref = quant_matmul.int8_linear(x.float(), qweight, scales.float(), group_size=group)
        out = cpu_kernels.int8_gemv(x, qweight, scales)
        assert out.dtype == dtype
        _close(out, ref)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [0, 16, 32])
def test_int8_dequant_and_the_dense_product_for_many_rows(dtype, group):
    """The weight for prefill-sized batches of an INT8 layer, made per call: exactly the reference's fp32 weight."""
    gen = torch.Generator().manual_seed(group)
    n, k = 70, 256
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand((n, k // group) if group else (n,), generator=gen) * 0.01).to(dtype)
    weight = torch.ops.tuili.int8_dequant(qweight, scales)
    assert torch.equal(weight, quant_matmul.dequantize_int8(qweight, scales, group))
    x = torch.randn(40, k, generator=gen).to(dtype)
    out = cpu_kernels.int8_dense(x, qweight, scales)
    assert out.dtype == dtype
    _close(out, x.float() @ weight.T)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_bf16_gemv_matches_the_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    for n, k in ((49, 64), (300, 576), (577, 1536)):
        weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        out = cpu_kernels.bf16_gemv(x, weight)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        _close(out, x.float() @ weight.float().T)


@needs_kernels
def test_bad_inputs_get_clear_errors():
    packed = cpu_kernels.pack_int4(torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), None, 32)  # fp32
    with pytest.raises(RuntimeError, match="x must be contiguous bf16 or fp32"):
        torch.ops.tuili.int4_gemv(torch.zeros(1, 64, dtype=torch.float16), *packed, 32)
    with pytest.raises(RuntimeError, match="scales and offsets must be contiguous .* in x's dtype"):
        torch.ops.tuili.int4_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), *packed, 32)  # packed from fp32
    with pytest.raises(RuntimeError, match="w must be contiguous uint8"):
        torch.ops.tuili.int4_gemv(torch.zeros(1, 128, dtype=torch.bfloat16), *packed, 32)
    with pytest.raises(RuntimeError, match="scales must be contiguous"):
        torch.ops.tuili.int8_gemv(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"scales must be contiguous \[N\] or \[N, K / group\] \(group 16 or 32\)"):
        torch.ops.tuili.int8_gemv(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(RuntimeError, match="K a multiple of 32"):
        torch.ops.tuili.int8_dequant(torch.zeros(8, 48, dtype=torch.int8), torch.ones(8, 3))
    with pytest.raises(RuntimeError, match="K must be a multiple of 64 and of the group"):
        torch.ops.tuili.int4_dequant(packed[0], packed[1], 48)
    with pytest.raises(RuntimeError, match="scales and offsets must be contiguous"):
        torch.ops.tuili.int4_dequant(packed[0], packed[1][:, :4], 32)
    with pytest.raises(RuntimeError, match="K must be a multiple of 16"):
        torch.ops.tuili.bf16_gemv(torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(8, 40, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="w must be contiguous bf16"):
        torch.ops.tuili.bf16_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64))


@needs_kernels
@pytest.mark.skipif("avx512_bf16" not in FLAGS, reason="the default build is the AVX2 one here already")
def test_the_avx2_build_on_an_avx512_machine(tiny_models, tmp_path):
    """The kernels of CPUs without AVX-512 BF16, built here (-march=x86-64-v3): the same checks, in a subprocess."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import test_cpu_kernels as t\n"
        "from tuili.ops import cpu_kernels\n"
        "assert cpu_kernels.isa() == 'avx2', (cpu_kernels.isa(), cpu_kernels.why_not())\n"
        "for group in (32, 128):\n"
        "    for rows in (1, 3, 5):\n"
        "        for dtype in (t.torch.bfloat16, t.torch.float32):\n"
        "            t.test_int4_gemv_matches_the_reference(group, False, rows, dtype)\n"
        "t.test_int4_gemv_matches_the_reference(64, True, 2, t.torch.bfloat16)\n"
        "for rows in (1, 4, 6):\n"
        "    for group in (0, 16, 32):\n"
        "        t.test_int8_gemv_matches_the_reference(t.torch.bfloat16, rows, group)\n"
        "t.test_native_step_generates_what_the_scripted_step_does({'llama': %r}, 'int4')\n"
    ) % (tests, tiny_models["llama"])
    env = dict(os.environ, TUILI_CPU_MARCH="x86-64-v3", TUILI_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_turned_off_the_ops_say_why_and_the_engine_runs_on_torchs_kernels(tiny_models):
    code = (
        "import torch, pytest\n"
        "from tuili import LLM, SamplingParams\n"
        "from tuili.ops import cpu_kernels\n"
        "from tuili.runner.cpu_step import INT4\n"
        "assert not cpu_kernels.available() and 'TUILI_CPU_KERNELS=0' in cpu_kernels.why_not()\n"
        "with pytest.raises(RuntimeError, match='not available here'):\n"
        "    torch.ops.tuili.int8_gemv(torch.zeros(1, 32), torch.zeros(2, 32, dtype=torch.int8), torch.ones(2))\n"
        f"llm = LLM({tiny_models['llama']!r}, device='cpu', dtype='bfloat16', quantization='int4',\n"
        "          quant_group_size=32, kv_cache_memory=0.01)\n"
        "step = llm.engine.runner.cpu_step\n"
        "assert step.native is None and step.args[True][2][0] == [INT4] * 4\n"
        "params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)\n"
        "out = llm.generate([[1, 2, 3]], params, use_tqdm=False)\n"
        "assert len(out[0].outputs[0].token_ids) == 4\n")
    env = dict(os.environ, TUILI_CPU_KERNELS="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_kernels
@pytest.mark.parametrize("quantization", ["int4", "int8", None])  # None: bf16 layers (bf16_gemv)
def test_native_step_generates_what_the_scripted_step_does(tiny_models, quantization):
    from tuili import LLM, SamplingParams

    quant = {None: {}, "int8": dict(quantization="int8"), "int4": dict(quantization="int4", quant_group_size=32)}
    quant = quant[quantization]
    llm = LLM(tiny_models["llama"], device="cpu", dtype="bfloat16", kv_cache_memory=0.01, **quant)
    step = llm.engine.runner.cpu_step
    assert step.native is not None
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7] * 40]
    run = lambda: [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]  # noqa: E731
    together = lambda: [o.outputs[0].token_ids for o in llm.generate(prompts * 2, params, use_tqdm=False)]  # noqa
    calls = []
    native_run = step.run
    step.run = lambda *a, **k: calls.append(a[2].query_lens_cpu) or native_run(*a, **k)
    native, batched = run(), together()  # one sequence at a time (its steps the CPU step's), then 4 at once
    assert [1, 1, 1, 1] in calls  # a decode step of four sequences went through it
    step.native = None  # the scripted function for one sequence, the eager layers for several
    assert native == run() and batched == together() and batched == native * 2


@needs_kernels
def test_native_attention_over_a_long_context_splits_the_keys(tiny_models):
    """Past 128 keys per split the C++ step splits a sequence's keys among the threads and merges the parts: its
    hidden states stay the scripted step's (bf16 roundings apart)."""
    from tuili import LLM, SamplingParams

    llm = LLM(tiny_models["llama"], device="cpu", dtype="bfloat16", quantization="int4", quant_group_size=32,
              kv_cache_memory=0.05)
    step = llm.engine.runner.cpu_step
    native_run, seen = step.run, []

    def spy(input_ids, positions, meta, native=True):
        out = native_run(input_ids, positions, meta, native)
        if native and step._native(meta):  # the same step again through the scripted function
            seen.append((out.float(), native_run(input_ids, positions, meta, native=False).float()))
        return out

    step.run = spy
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 kv heads, 4 threads: the keys in min(4, 420 // 128) = 3 splits
    try:
        prompt = torch.randint(1, 500, (420,), generator=torch.Generator().manual_seed(0)).tolist()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 3
    for out, ref in seen:  # (equal here; one split left out of the merge: 3% of the largest value)
        assert (out - ref).abs().max() <= 0.01 * ref.abs().max(), ((out - ref).abs().max(), ref.abs().max())


@needs_kernels
def test_decode_step_refuses_inconsistent_arguments(tiny_models):
    from tuili import LLM

    llm = LLM(tiny_models["llama"], device="cpu", dtype="bfloat16", quantization="int4", quant_group_size=32,
              kv_cache_memory=0.01)
    step = llm.engine.runner.cpu_step
    tensors, kinds, groups = step.native
    norm, eps, heads, kv_heads, scale, _ = step.consts
    d = tensors[10].shape[3]
    x, cos2, sin2 = torch.zeros(1, 64, dtype=torch.bfloat16), *torch.ones(2, 1, 1, d, dtype=torch.bfloat16)
    table = torch.zeros(1, 4, dtype=torch.int32)

    def call(slot=0, kinds=kinds, tensors=tensors, lengths=(1,)):
        return torch.ops.tuili.decode_step(x, cos2, sin2, torch.tensor([slot]), table, list(lengths), tensors, kinds,
                                           groups, norm, eps, heads, kv_heads, scale)

    assert call().shape == (1, 64)
    with pytest.raises(RuntimeError, match="one new token for each of the B sequences"):
        call(lengths=(1, 1))
    with pytest.raises(RuntimeError, match="within the block table"):
        call(lengths=(4 * 16 + 1,))
    with pytest.raises(RuntimeError, match="4 kinds"):
        call(kinds=kinds[:-1])
    with pytest.raises(RuntimeError, match="slot range"):
        call(slot=10**6)
    swapped = list(tensors)
    swapped[1], swapped[3] = swapped[3], swapped[1]  # the o projection where the qkv one belongs
    with pytest.raises(RuntimeError, match="linear shapes"):
        call(tensors=swapped)


@needs_kernels
def test_fp32_int4_layers_run_on_the_kernel_up_to_its_row_count(monkeypatch):
    """An fp32 INT4 layer (fp32 scales) takes tuili's kernel in fp32 for 1..GEMV_ROWS_F32 rows (torch's int4 kernel
    is ~13x slower in fp32, the reference dequantizes per call) and the reference beyond; both within fp32 rounding
    of the float64 product."""
    from tuili.layers.linear import Linear

    gen = torch.Generator().manual_seed(0)
    layer = Linear(256, 48)
    qweight = torch.randint(0, 256, (48, 128), dtype=torch.uint8, generator=gen)
    scales, offsets = torch.rand(48, 8, generator=gen) * 0.02, torch.randn(48, 8, generator=gen) * 0.05
    layer.set_quantized(qweight, scales, offsets, 32)
    calls = []
    kernel = cpu_kernels.int4_gemv
    monkeypatch.setattr(cpu_kernels, "int4_gemv", lambda x, *a: calls.append(x.shape[0]) or kernel(x, *a))
    for rows in (1, 5, cpu_kernels.GEMV_ROWS_F32, cpu_kernels.GEMV_ROWS_F32 + 1):
        x = torch.randn(rows, 256, generator=gen)
        out = layer(x)
        ref = quant_matmul.int4_linear(x.double(), qweight, scales.double(), offsets.double(), 32)
        assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert calls == [1, 5, cpu_kernels.GEMV_ROWS_F32]
    # bf16 x on this layer packed in fp32: not the kernel (whose scales must be x's dtype), the reference path
    out = layer(torch.randn(1, 256, generator=gen).bfloat16())
    assert out.dtype == torch.bfloat16 and len(calls) == 3
