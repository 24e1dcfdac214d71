"""Weight-only quantization (INT8, INT4): kernels against their references, models against the unquantized one.

The Triton kernel runs in the interpreter without a GPU (fp32/fp16; bf16 on CUDA only)."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tuili import LLM, SamplingParams  # noqa: E402
from tuili.layers.linear import Linear  # noqa: E402
from tuili.ops import quant_matmul  # noqa: E402
from tuili.ops.activation import silu_and_mul_triton  # noqa: E402
from tuili.ops.quant_matmul import (  # noqa: E402
    dequantize_int4, dequantize_int4_triton, dequantize_int8, int4_cpu_pack, int4_linear, int4_linear_cpu, int8_linear,
    int8_linear_cpu, quant_linear_triton)
from tuili.quant import quantize_groupwise, quantize_per_channel  # noqa: E402
from tuili.quant.gguf_blocks import NATIVE, PackedFormat, common_format, transcode  # noqa: E402
from tuili.quant.int8 import quantize_groupwise_int8  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the Triton interpreter is wrong in bf16)")

PROMPTS = ["What is the capital of France? Answer in one sentence.", "Name three primary colors.",
           "Write a haiku about autumn.", "What is 12 times 12?", "Who wrote Romeo and Juliet?"]


def test_quantize_per_channel_error_is_half_a_step():
    w = torch.randn(96, 200) * torch.rand(96, 1) * 3
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses the full range


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_groupwise_error_is_half_a_step(group_size, symmetric):
    """Each group's full range (ranges=(1.0,)): every weight within half a step of its level."""
    w = torch.randn(48, 200) * torch.rand(48, 1) * 3  # 200: the last group is short for every group size
    q, scales, offsets = quantize_groupwise(w, group_size, symmetric, ranges=(1.0,))
    groups = -(-200 // group_size)
    assert q.dtype == torch.uint8 and q.shape == (48, 100) and scales.shape == (48, groups)
    assert (offsets is None) == symmetric
    step = scales.repeat_interleave(group_size, dim=1)[:, :200]
    assert ((dequantize_int4(q, scales, offsets, group_size) - w).abs() <= step / 2 + 1e-5).all()
    if not symmetric:  # the group minimum is an exact level
        groups_min = torch.stack([w[:, g * group_size:(g + 1) * group_size].amin(dim=1) for g in range(groups)], 1)
        assert torch.allclose(offsets, groups_min)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_searched_ranges_lower_every_groups_error(group_size, symmetric):
    """The default searches each group's range: no group's squared error above its full range's, and on Gaussian
    weights clearly below it in total (measured 0.75-0.94x: the full range spends levels on the tails)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(group_size))

    def group_errors(q):
        err = (dequantize_int4(q[0], q[1], q[2], group_size) - w).square()
        return err.view(64, -1, group_size).sum(-1)

    searched = group_errors(quantize_groupwise(w, group_size, symmetric))
    full = group_errors(quantize_groupwise(w, group_size, symmetric, ranges=(1.0,)))
    assert (searched <= full * (1 + 1e-5) + 1e-9).all()
    assert searched.sum() < 0.95 * full.sum(), (searched.sum(), full.sum())


def test_int4_g32_reproduces_q4_1_blocks_exactly():
    """A weight that is already 4-bit per block of 32 (scale * q + min, GGUF Q4_1's form) comes back unchanged."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 256), generator=gen)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block uses the full range, as Q4_1's quantizer makes it
    d, m = torch.rand(64, 8, generator=gen) / 10, torch.randn(64, 8, generator=gen) / 10
    w = q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    packed, scales, offsets = quantize_groupwise(w, 32)
    torch.testing.assert_close(dequantize_int4(packed, scales, offsets, 32), w, atol=1e-6, rtol=1e-5)


def test_int4_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_groupwise(torch.randn(8, 64), 48)
    with pytest.raises(ValueError, match="odd"):
        quantize_groupwise(torch.randn(8, 63), 32)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("k, group_size", [(576, 128), (200, 32), (1536, 64)])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 0.5)])
def test_int4_cpu_kernel_matches_reference(dtype, atol, k, group_size, rows):
    q, scales, offsets = quantize_groupwise(torch.randn(96, k), group_size)
    x = torch.randn(rows, k).to(dtype)
    scales, offsets = scales.to(dtype), offsets.to(dtype)
    ref = int4_linear(x.float(), q, scales, offsets, group_size)
    got = int4_linear_cpu(x, *int4_cpu_pack(q, scales, offsets, group_size), group_size)
    assert got.dtype == dtype and torch.allclose(got.float(), ref, atol=atol, rtol=1e-2)


def _triton_dtypes() -> list:
    return [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
            pytest.param(torch.bfloat16, id="bf16", marks=needs_cuda)]


TRITON_ATOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 2e-1}


@pytest.mark.parametrize("dtype", _triton_dtypes())
@pytest.mark.parametrize("m, n, k", [(1, 96, 200), (2, 40, 202), (5, 130, 576), (34, 40, 320), (2, 64, 256)])
@pytest.mark.parametrize("method", ["int8", "int8-g16", "int8-g32", "int4-g32", "int4-g64-sym", "int4-g128"])
def test_triton_quant_matmul_matches_reference(method, m, n, k, dtype):
    """The dequant-fused Triton kernels (the GEMV for a few rows, with one or several groups per K tile, the
    tensor-core one with decode and prefill tiles, with and without split-K) against the torch reference on the
    same packed weights."""
    gen = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    if method == "int8":
        q, scales = quantize_per_channel(w)
        offsets, group = None, 0
        ref = int8_linear(x.float(), q.to(DEVICE), scales.to(DEVICE))
    elif method.startswith("int8"):  # groups: the form of GGUF Q8_0 / Q6_K blocks
        group = int(method.split("-")[1][1:])
        (q, scales), offsets = quantize_groupwise_int8(w, group), None
        ref = int8_linear(x.float(), q.to(DEVICE), scales.to(DEVICE), group_size=group)
        torch.testing.assert_close(ref, x.float() @ w.to(DEVICE).t(), atol=0.05 * k ** 0.5, rtol=0)
    else:
        group = int(method.split("-")[1][1:])
        q, scales, offsets = quantize_groupwise(w, group, method.endswith("sym"))
        offsets_dev = None if offsets is None else offsets.to(DEVICE)
        ref = int4_linear(x.float(), q.to(DEVICE), scales.to(DEVICE), offsets_dev, group)
    # scales and offsets group-major, as layers keep them (16-bit ones are read in column pairs); row-major too
    layouts = (quant_matmul.group_major, lambda t: t) if group else (lambda t: t,)
    variants = [(q.to(DEVICE), layout(scales.to(DEVICE).to(dtype)),
                 None if offsets is None else layout(offsets.to(DEVICE).to(dtype)), group) for layout in layouts]
    block_k = min(group or 128, 128) if CUDA else min(group or 32, 32)
    # the GEMV (one row per program) only for the rows it runs (quant_matmul.GEMV_MAX_ROWS: 34 rows of it took
    # 24 s of the interpreter's time in CI): split K; 4 groups per K tile (whole tiles) and one split with 3 K
    # tiles in flight, each with both scale layouts
    gemv_rows = (((1, 32, block_k, 2, 4, 2), variants[0]), *(
        (t, v) for t in ((1, 32, 4 * (group or 32), 2, 4, 1), (1, 16, block_k, 1, 4, 3)) for v in variants)) \
        if m <= quant_matmul.GEMV_MAX_ROWS else ()
    # decode batches past 16 rows: the rule's own tiles (INT8 per channel: K tiles of 256) in the interpreter too
    batch_rule = ((quant_matmul._tiles(m, n, k, group, 132), variants[0]),) if m > 16 else ()
    runs = ((None, variants[0]), *gemv_rows, ((16, 32, block_k, 2, 4, 2), variants[-1]),
            ((32, 64, min(group or 32, 32), 1, 4, 2), variants[0]), *batch_rule)
    for tiles, args in runs:
        if tiles is None and not CUDA:
            continue  # the kernel's own tiles are big: slow in the interpreter, run on the GPU
        got = quant_linear_triton(x.to(dtype), *args, tiles=tiles)
        assert got.dtype == dtype and got.shape == (m, n)
        if tiles and tiles[0] == 1 and tiles[3] > 1:  # the GEMV's split-K counters are back at 0 for the next call
            assert not quant_matmul._COUNTS[got.device].any()
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref, atol=TRITON_ATOL[dtype] * max(1.0, scale / 10), rtol=1e-2)


@pytest.mark.parametrize("dtype", _triton_dtypes())
@pytest.mark.parametrize("m, n, k, group, symmetric, tiles", [
    (17, 40, 256, 128, False, None),                    # the launcher's tiles: two groups per K tile
    (5, 96, 384, 128, True, (16, 32, 128, 1, 4, 2)),   # one group per tile, symmetric, a partial column tile
    (33, 40, 384, 64, False, (32, 32, 128, 2, 4, 2)),  # two groups of 64 per tile, split K, partial row tiles
    (20, 64, 160, 32, False, (16, 64, 32, 1, 4, 3)),   # group 32
    (24, 64, 256, 128, False, (32, 64, 256, 1, 4, 3, True)),  # out^T = W x^T (the weight as the mma's A)
    (9, 40, 384, 64, True, (16, 32, 128, 2, 4, 2, True)),
    (18, 40, 320, 128, False, None),                   # a short last group: K tiles of one group, the last partial
    (64, 40, 512, 128, False, None),  # the rule's 64-row tiles: fp32 x's stages overflow the GPU's shared memory
])
def test_int4_gemm_is_the_matmul_with_the_dequantized_weight(m, n, k, group, symmetric, tiles, dtype):
    """int4_gemm_triton (decode batches past int4_mma's 16 rows) dequantizes its tiles to exactly the values
    dequantize_int4_triton writes: the product equals x @ that weight^T to the accumulation's rounding."""
    from tuili.ops.quant_matmul import int4_gemm_triton

    gen = torch.Generator().manual_seed(m + n + k)
    q, scales, offsets = quantize_groupwise(torch.randn(n, k, generator=gen), group, symmetric)
    q, scales = q.to(DEVICE), quant_matmul.group_major(scales.to(DEVICE).to(dtype))
    offsets = None if offsets is None else quant_matmul.group_major(offsets.to(DEVICE).to(dtype))
    x = torch.randn(m, k, generator=gen).to(DEVICE).to(dtype)
    w = dequantize_int4_triton(q, scales, offsets, group, dtype)
    torch.testing.assert_close(w.float(), dequantize_int4(q, scales, offsets, group).float(), rtol=2 ** -7, atol=0)
    got = int4_gemm_triton(x, q, scales, offsets, group, tiles=tiles)
    assert got.dtype == dtype and got.shape == (m, n)
    ref = x.double() @ w.double().t()
    ulp = {torch.float32: 2 ** -20, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    bound = 2 ** -20 * (x.double().abs() @ w.double().abs().t()) + ulp * ref.abs() + 1e-6
    assert ((got.double() - ref).abs() <= bound).all()
    with pytest.raises(ValueError, match="BLOCK_K"):
        int4_gemm_triton(x, q, scales, offsets, group, tiles=(16, 32, 3 * group, 1, 4, 2))


def test_launch_fitting_drops_stages_until_the_kernel_fits(monkeypatch):
    """Tiles whose pipeline does not fit the GPU's shared memory (Triton raises OutOfResources before anything
    runs) launch again with fewer stages, and the stages that fit are kept for the next call; a kernel that does
    not fit with one stage still raises."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(quant_matmul, "_STAGES", {})
    tried = []

    class Kernel:
        limit = 2

        def __getitem__(self, grid):
            def run(*args, num_stages, **options):
                tried.append(num_stages)
                if num_stages > self.limit:
                    raise OutOfResources(num_stages * 1000, self.limit * 1000, "shared memory")
            return run

    kernel, x = Kernel(), torch.zeros(2, dtype=torch.float32)
    quant_matmul._launch_fitting(kernel, (1,), x, BLOCK_K=256, num_stages=4)
    quant_matmul._launch_fitting(kernel, (1,), x, BLOCK_K=256, num_stages=4)
    quant_matmul._launch_fitting(kernel, (1,), x.half(), BLOCK_K=256, num_stages=2)
    assert tried == [4, 3, 2, 2, 2]
    kernel.limit = 0
    with pytest.raises(OutOfResources):
        quant_matmul._launch_fitting(kernel, (1,), x, BLOCK_K=128, num_stages=3)


@pytest.mark.parametrize("dtype", _triton_dtypes())
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_triton_gemv_fuses_silu_and_mul(method, dtype):
    """A gated MLP's down projection with the activation computed inside the GEMV (silu_mul=True) gives what
    the SiLU kernel followed by the matmul gives, to rounding: whole and partial tiles, split K, and the
    tensor-core path (which runs the SiLU kernel first)."""
    gen = torch.Generator().manual_seed(11)
    for n, k in ((64, 256), (40, 224)):  # whole tiles; partial ones (K tiles past K, columns past N)
        w = torch.randn(n, k, generator=gen)
        if method == "int8":
            args = (*quantize_per_channel(w), None, 0)
        else:
            args = (*quantize_groupwise(w, 32), 32)
        args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
        args = (args[0], args[1].to(dtype), None if args[2] is None else args[2].to(dtype), args[3])
        for rows, tiles in ((1, (1, 32, 64 if method == "int8" else 32, 2, 4, 1)), (3, (16, 32, 32, 1, 4, 2))):
            x = (torch.randn(rows, 2 * k, generator=gen) * 3).to(DEVICE).to(dtype)
            unfused = quant_linear_triton(silu_and_mul_triton(x), *args, tiles=tiles)
            fused = quant_linear_triton(x, *args, tiles=tiles, silu_mul=True)
            tol = {torch.float32: 1e-4, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]  # an ulp in 16 bits:
            torch.testing.assert_close(fused, unfused, rtol=tol, atol=1e-4)  # two compilations contract FMAs apart


@pytest.mark.parametrize("dtype", _triton_dtypes())
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_triton_gemv_fuses_rms_norm_and_residual(method, dtype):
    """A decoder layer's residual add and norm inside the GEMVs: with residual= and norm_weight=, the product is
    added into the residual in place, and h * weight and the sums of squares of each column tile of h come back;
    with norm=, the next GEMV takes that and scales by 1 / rms. Both against the add + RMSNorm kernel and plain
    GEMVs: the sums exactly, the normalised product to the roundings the norm makes elsewhere; whole and partial
    tiles, split K, 1 and 3 rows."""
    from tuili.ops.rmsnorm import fused_add_rms_norm_triton

    gen = torch.Generator().manual_seed(5)
    for n, k in ((64, 256), (40, 224)):  # o_proj-like [n, k] writes h [n]; a gate_up-like [k, n] reads it
        rows = 1 if method == "int8" else 3  # the rows the GEMV takes (INT8 per channel: decode of one)
        layers = []
        for shape in ((n, k), (k, n)):
            w = torch.randn(*shape, generator=gen)
            args = (*quantize_per_channel(w), None, 0) if method == "int8" else (*quantize_groupwise(w, 32), 32)
            args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
            args[1] = args[1].to(dtype)
            args[2] = None if args[2] is None else quant_matmul.group_major(args[2].to(dtype))
            if args[3]:
                args[1] = quant_matmul.group_major(args[1])
            layers.append(args)
        assert quant_matmul.fuses_norms(rows, k, layers[0][3], layers[0][0], layers[0][1])
        x = torch.randn(rows, k, generator=gen).to(DEVICE).to(dtype)
        residual = (torch.randn(rows, n, generator=gen) * 2).to(DEVICE).to(dtype)
        norm_w = (torch.rand(n, generator=gen) + 0.5).to(DEVICE).to(dtype)
        for tiles in ((1, 16, 64, 1, 4, 2), (1, 32, 32 if method == "int4" else 64, 2, 4, 1)):
            y = quant_linear_triton(x, *layers[0], tiles=tiles)
            normed, h = fused_add_rms_norm_triton(y, residual, norm_w, 1e-5)
            want = quant_linear_triton(normed, *layers[1], tiles=tiles)
            stream = residual.clone()
            out, hw, ss = quant_linear_triton(x, *layers[0], tiles=tiles, residual=stream, norm_weight=norm_w)
            assert out is stream and ss.shape == (rows, -(-n // tiles[1]))
            ulp = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
            # the same sum, rounded the same way (two compilations may contract FMAs apart: an ulp)
            torch.testing.assert_close(stream, h, rtol=ulp, atol=ulp)
            torch.testing.assert_close(hw, (stream.float() * norm_w.float()).to(dtype), rtol=0, atol=0)
            torch.testing.assert_close(ss.sum(1), h.float().pow(2).sum(1), rtol=1e-5, atol=0)
            got = quant_linear_triton(hw, *layers[1], tiles=tiles, norm=(1e-5, ss))
            w2 = (dequantize_int8(*layers[1][:2]) if method == "int8" else dequantize_int4(*layers[1][:3], 32)).float()
            # the norm's roundings (an ulp of each x) in another place, and the output's own rounding
            bound = 4 * ulp * (normed.float().abs() @ w2.abs().t()) + 2 * ulp * want.float().abs() + 1e-5
            assert ((got.float() - want.float()).abs() <= bound).all()


@pytest.mark.parametrize("method, family", [("int8", "llama"), ("int4", "llama"), ("int4", "qwen2")])
def test_decoder_layers_with_norms_inside_the_gemvs_decode_the_same_tokens(tiny_models, method, family):
    """What CUDA runs for decode on quantized layers (fuse_norms: RMSNorms and residual adds inside the GEMVs,
    norms_fuse) gives the greedy tokens and log-probs of the separate norm and add: tiny models (Qwen2: a qkv
    bias after the normalised product), eager, on the CPU through the Triton interpreter (CUDA runs it under
    graphs: tests/gpu)."""
    if CUDA:
        pytest.skip("runs the kernels on CPU tensors through the Triton interpreter, which is off on a CUDA machine; "
                    "there tests/gpu/test_engine_gpu.py checks the fused decode under CUDA graphs")
    llm = LLM(tiny_models[family], dtype="float32", quantization=method, enforce_eager=True, kv_cache_memory=0.01,
              max_num_seqs=2)
    model, prompt = llm.engine.model, [5, 17, 300, 42, 7]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    want = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    for module in model.modules():
        if isinstance(module, Linear):
            module.use_triton(True)
    model.fuse_norms, model._fused_rows = True, {}
    try:
        got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    finally:
        model.fuse_norms = False
    assert model._fused_rows == {5: False, 1: True}  # the prompt unfused (5 rows), each decode step fused
    assert got.token_ids == want.token_ids
    for mine, theirs in zip(got.logprobs, want.logprobs):  # the top-3 log-probs at each step, to fp32 rounding
        assert mine.keys() == theirs.keys()
        for token, lp in mine.items():
            assert abs(lp.logprob - theirs[token].logprob) < 1e-4


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_triton_gemv_keeps_fp32_precision_over_a_wide_range_of_x(method):
    """The GEMV reads packed values as denormal floats and scales x by up to 2^77 to match: x spanning 1e-12 to
    1e12 in one row (and a row of tiny values alone) comes out as precise as an fp32 matmul."""
    gen = torch.Generator().manual_seed(3)
    n, k = 64, 256
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(2, k, generator=gen) * 10.0 ** torch.randint(-12, 13, (2, k), generator=gen)
    x[1] = torch.randn(k, generator=gen) * 1e-12
    if method == "int8":
        q, scales = quantize_per_channel(w)
        args, w_float = (q, scales, None, 0), dequantize_int8(q, scales)
    else:
        q, scales, offsets = quantize_groupwise(w, 64)
        args, w_float = (q, scales, offsets, 64), dequantize_int4(q, scales, offsets, 64)
    ref = (x.double() @ w_float.double().t())
    for row in range(2):  # one row: the GEMV, whole tiles (EVEN) and split K
        got = quant_linear_triton(x[row:row + 1].to(DEVICE), *(a if a is None or isinstance(a, int) else a.to(DEVICE)
                                                              for a in args), tiles=(1, 32, 64, 2, 4, 1))
        bound = 1e-5 * (x[row].abs().double() @ w_float.abs().double().t())  # fp32 rounding, not a lost range
        assert ((got.cpu().double()[0] - ref[row]).abs() <= bound).all()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group, symmetric", [(32, False), (128, False), (128, True)])
def test_triton_int4_gemv_integer_products(group, symmetric, dtype):
    """INT4 on CUDA with several groups per K tile and 16-bit x (fp32 x keeps the float products, see
    test_triton_gemv_keeps_fp32_precision_over_a_wide_range_of_x): the GEMV multiplies in integers (x as 16-bit
    integers with an exponent per 8 values, dp2a): against an fp64 reference within the bits that costs (2^-14 of
    each word's largest |x|) and the output's rounding, plain, split K, silu_mul, and the residual add."""
    gen = torch.Generator().manual_seed(13)
    n, k = 96, 2048
    w = torch.randn(n, k, generator=gen)
    q, scales, offsets = quantize_groupwise(w, group, symmetric)
    w_float = dequantize_int4(q, scales.to(dtype), None if offsets is None else offsets.to(dtype), group).double()
    args = (q.to(DEVICE), quant_matmul.group_major(scales.to(dtype)).to(DEVICE),
            None if offsets is None else quant_matmul.group_major(offsets.to(dtype)).to(DEVICE), group)
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    x = (torch.randn(1, 2 * k, generator=gen) * 10.0 ** torch.randint(-1, 2, (1, 2 * k), generator=gen)).to(dtype)
    for tiles in ((1, 32, 1024, 1, 4, 3), (1, 32, 512, 2, 4, 3)):
        for silu_mul in (False, True):
            xin = silu_and_mul_triton(x.to(DEVICE)).cpu().double() if silu_mul else x[:, :k].double()
            ref = xin @ w_float.t()
            got = quant_linear_triton(x.to(DEVICE) if silu_mul else x[:, :k].to(DEVICE), *args, tiles=tiles,
                                      silu_mul=silu_mul).cpu().double()
            bound = 2 ** -10 * (xin.abs() @ w_float.abs().t()) + ulp * ref.abs() + 1e-30
            assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max()
    h = torch.randn(1, n, generator=gen).to(dtype).to(DEVICE)
    nw = (torch.rand(n, generator=gen) + 0.5).to(dtype).to(DEVICE)
    stream = h.clone()
    out, hw, ss = quant_linear_triton(x[:, :k].to(DEVICE), *args, residual=stream, norm_weight=nw)
    want = h.double().cpu() + x[:, :k].double() @ w_float.t()
    bound = 2 ** -10 * (x[:, :k].double().abs() @ w_float.abs().t()) + 2 * ulp * want.abs()
    assert ((out.cpu().double() - want).abs() <= bound).all()
    torch.testing.assert_close(ss.sum(1), out.float().pow(2).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", _triton_dtypes())
@pytest.mark.parametrize("method", ["int4-g32", "int4-g64-sym", "int4-g128"])
def test_triton_int4_prefill_dequantizes_then_matmuls(method, dtype):
    """INT4 with prefill-sized batches: one Triton kernel makes the float weight (as the reference does, the last
    group short here), then a float matmul."""
    gen = torch.Generator().manual_seed(7)
    n, k, group = 72, 320, int(method.split("-")[1][1:])
    q, scales, offsets = quantize_groupwise(torch.randn(n, k, generator=gen), group, method.endswith("sym"))
    args = (q.to(DEVICE), scales.to(DEVICE).to(dtype), None if offsets is None else offsets.to(DEVICE).to(dtype), group)
    w = dequantize_int4_triton(*args, dtype)
    torch.testing.assert_close(w, dequantize_int4(*args, dtype=dtype), atol=1e-6, rtol=2e-3)  # fma or mul + add
    x = torch.randn(40, k, generator=gen).to(DEVICE)
    ref = int4_linear(x.float(), *args[:2], None if offsets is None else args[2].float(), group)
    got = quant_linear_triton(x.to(dtype), *args)  # 40 rows: the dequantizing path
    torch.testing.assert_close(got.float(), ref, atol=TRITON_ATOL[dtype] * max(1.0, ref.abs().max().item() / 10),
                               rtol=1e-2)


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


_REFERENCE: dict[int, list] = {}  # id(smollm) -> (ids, answer length, prompt log-probs) per prompt


def teacher_forced_agreement(smollm, llm) -> tuple[float, float]:
    """Teacher-forced on the unquantized model's greedy answers to the fixed prompts: the fraction of answer
    positions where `llm` picks the same next token, and the mean |log-prob difference| of those tokens. The
    unquantized side is computed once per session (four tests compare against it)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    if id(smollm) not in _REFERENCE:
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        answers = smollm.chat(convs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        _REFERENCE[id(smollm)] = [
            (ids, len(answer.outputs[0].token_ids), smollm.generate(ids, params, use_tqdm=False)[0].prompt_logprobs)
            for conv, answer in zip(convs, answers) for ids in [smollm.encode_chat(conv) + answer.outputs[0].token_ids]]
    agree, diffs = [], []
    for ids, answer_len, ref in _REFERENCE[id(smollm)]:
        got = llm.generate(ids, params, use_tqdm=False)[0].prompt_logprobs
        for pos in range(len(ids) - answer_len, len(ids)):
            agree.append(got[pos][ids[pos]].rank == 1)
            diffs.append(abs(got[pos][ids[pos]].logprob - ref[pos][ids[pos]].logprob))
    return sum(agree) / len(agree), sum(diffs) / len(diffs)


def test_int8_greedy_agreement_and_logprobs(smollm, smollm_int8):
    """INT8 picks the unquantized model's next token at >= 90% of its answers' positions, log-probs close."""
    agree, diff = teacher_forced_agreement(smollm, smollm_int8)
    assert agree >= 0.9 and diff < 0.15, (agree, diff)


def test_int4_g32_answers_like_the_unquantized_model(smollm, default_model_path):
    """INT4 g32 has the form of the file's Q4_1 blocks: same answer, and the same greedy next token at >= 95% of
    the positions of the unquantized model's answers to the fixed prompts (teacher-forced)."""
    llm = LLM(default_model_path, dtype="float32", quantization="int4", quant_group_size=32, kv_cache_memory=0.1)
    assert llm.engine.model.layers[0].mlp.down_proj.qweight.dtype == torch.uint8
    assert llm.engine.quantization == "int4 (group 32, offsets)" and smollm.engine.quantization is None
    question = [{"role": "user", "content": PROMPTS[0]}]
    assert llm.chat(question, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text == \
        "The capital of France is Paris."
    agree, _ = teacher_forced_agreement(smollm, llm)
    assert agree >= 0.95, agree


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_quantized_kv_cache_answers_like_the_full_one(smollm, default_model_path, kv_cache_dtype):
    """An fp8/int8 KV cache (torch path on the CPU; the Triton kernels are tested in tests/ops) holds ~3.8x the
    blocks of an fp32 one in the same memory, gives the same answer, and the same greedy next token at >= 95%
    of the positions of the full-cache model's answers."""
    llm = LLM(default_model_path, dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory=0.25)
    runner = llm.engine.runner
    assert runner.model.layers[0].self_attn.attn.k_cache.dtype == runner.kv_cache_dtype != torch.float32
    blocks, full_blocks = llm.engine.cache_config.num_blocks, smollm.engine.cache_config.num_blocks
    assert blocks == int(0.25 * 2**30) // runner.bytes_per_block() and blocks / full_blocks == pytest.approx(
        (64 * 4) / (64 + 4), rel=0.01)  # head_dim 64: 256 bytes per head and token vs 64 + one fp32 scale
    question = [{"role": "user", "content": PROMPTS[0]}]
    assert llm.chat(question, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text == \
        "The capital of France is Paris."
    agree, diff = teacher_forced_agreement(smollm, llm)
    assert agree >= 0.95 and diff < 0.1, (agree, diff)


def test_bad_kv_cache_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, fp8"):
        LLM(kv_cache_dtype="fp4")


def test_unknown_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="quantization must be int8 or int4"):
        LLM(quantization="int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        LLM(quantization="int4", quant_group_size=100)
    for args in (dict(quant_group_size=32), dict(quantization="int8", quant_symmetric=True)):  # int4's flags alone
        with pytest.raises(ValueError, match="apply to quantization 'int4' only"):
            LLM(**args)


def test_eval_agreement_with_int4_flags(tiny_models, tmp_path, monkeypatch):
    """`tuili eval agreement --quantization int4 --quant-group-size 32`: its unquantized reference drops int4's
    flags with the quantization (they apply to int4 only), and the report compares the two."""
    import json

    from tuili.bench import quality
    from tuili.cli import main

    monkeypatch.setattr(quality, "prompt_ids", lambda llm: [[3, 5, 7, 9], [11, 13, 2]])  # (no tokenizer here)
    out = tmp_path / "agreement.json"
    assert main(["eval", "agreement", "--model", tiny_models["llama"], "--device", "cpu", "--kv-cache-memory",
                 "0.01", "--quantization", "int4", "--quant-group-size", "32", "--max-tokens", "6",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prompts"] == 2 and report["positions"] == 12 and 0 <= report["top1_agreement"] <= 1


def quantize_tiny(tiny_models, family: str, out, *method: str) -> str:
    from tuili.cli import main

    method = method or ("--method", "int8")
    assert main(["quantize", "--model", tiny_models[family], "--out", str(out), "--dtype", "float32", *method]) == 0
    return str(out)


METHOD_FLAGS = {"int8": ("--method", "int8"), "int4-g32": ("--method", "int4", "--group-size", "32"),
                "int4-g128-sym": ("--method", "int4", "--group-size", "128", "--symmetric")}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied head / tied head
def test_quantize_save_load_round_trip(tiny_models, tmp_path, family, method):
    """`tuili quantize` writes a folder that loads to exactly the model --quantization makes at load time."""
    flags = METHOD_FLAGS[method]
    path = quantize_tiny(tiny_models, family, tmp_path / "q", *flags)
    saved = LLM(path, device="cpu", dtype="float32", kv_cache_memory=0.01)
    at_load = LLM(tiny_models[family], device="cpu", dtype="float32", quantization=flags[1], kv_cache_memory=0.01,
                  quant_group_size=int(flags[3]) if len(flags) > 3 else 128, quant_symmetric="--symmetric" in flags)
    qkv = saved.engine.model.layers[1].self_attn.qkv_proj
    assert qkv.qweight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert (qkv.offsets is None) == (method != "int4-g32")
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=2)
    a, b = (llm.generate(prompt, params, use_tqdm=False)[0] for llm in (saved, at_load))
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert {t: lp.logprob for t, lp in ea.items()} == {t: lp.logprob for t, lp in eb.items()}


def test_loading_a_checkpoint_with_another_quantization_fails(tiny_models, tmp_path):
    path = quantize_tiny(tiny_models, "llama", tmp_path / "q", *METHOD_FLAGS["int4-g32"])
    with pytest.raises(ValueError, match="quantized as int4 .group 32, offsets.; it cannot be loaded with"):
        LLM(path, dtype="float32", kv_cache_memory=0.01, quantization="int8")
    import json

    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    del config["quantization_config"]["group_size"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks group_size"):
        LLM(path, dtype="float32", kv_cache_memory=0.01)


def test_quantized_folder_with_missing_or_wrong_config_fails_clearly(tiny_models, tmp_path):
    import json

    path = quantize_tiny(tiny_models, "llama", tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gptq' of this checkpoint is not supported; tuili loads tuili-int8, "
                                         "tuili-int4"):
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


# ---- GGUF blocks kept packed (tests/loader/test_loaders.py runs each type end to end against HF) ------------

def _random_blocks(qtype: str, n: int, k: int, rng) -> np.ndarray:
    """Random bytes as blocks of `qtype`, with finite fp16 factors."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    factors = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[qtype]
    for at in factors:
        raw[..., at:at + 2] = rng.uniform(-0.01, 0.01, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_transcode_exactly_and_mixed_shards_requantize_closely(qtype):
    """Each block type's native packed form is gguf's dequantization exactly; so is the common format of mixed
    fused shards (INT8 g16; INT4 g32 with offsets for Q4_0) except for Q4_1/Q4_K shards in INT8 g16, which stay
    within half an INT8 step of each 16 weights."""
    rng = np.random.default_rng(0)
    n, k = 12, 512
    raw = _random_blocks(qtype, n, k, rng)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, gguf.GGMLQuantizationType[qtype])).reshape(n, k))
    for fmt in {NATIVE[qtype], common_format([NATIVE[qtype], NATIVE["Q4_1"]]),
                common_format([NATIVE[qtype], NATIVE["Q6_K"]])}:
        parts = transcode(raw, qtype, n, k, fmt, torch.float32)
        if fmt.bits == 8:
            got = dequantize_int8(parts["qweight"], parts["scales"], fmt.group_size)
        else:
            got = dequantize_int4(parts["qweight"], parts["scales"], parts.get("offsets"), fmt.group_size)
        if fmt == NATIVE[qtype] or fmt.bits == 4 or qtype in ("Q8_0", "Q4_0"):  # exact transcodes
            assert torch.equal(got, ref), (qtype, fmt)
        else:
            step = ref.view(n, -1, 16).abs().amax(-1, keepdim=True) / 127
            assert ((got - ref).view(n, -1, 16).abs() <= step / 2 * 1.001).all()


def test_gguf_common_format():
    assert common_format([NATIVE["Q4_K"]] * 3) == NATIVE["Q4_K"]
    assert common_format([NATIVE["Q4_0"], NATIVE["Q4_1"]]) == PackedFormat(4, 32, True)
    assert common_format([NATIVE["Q4_K"], NATIVE["Q4_K"], NATIVE["Q6_K"]]) == PackedFormat(8, 16, False)
    assert common_format([NATIVE["Q8_0"], NATIVE["Q6_K"]]) == PackedFormat(8, 16, False)


def test_cpu_bf16_gguf_reads_an_int8_copy_of_the_tied_head(smollm, default_model_path):
    """The default run (GGUF kept packed, CPU, bf16) scores decode rows with an INT8 per-row copy of the tied
    embedding; fp32 keeps the float head (the exact-vs-HF runs); the answer is unchanged (through the native
    CPU step where it runs)."""
    import torch

    from tuili import LLM, SamplingParams

    assert smollm.engine.model.lm_head_int8 is None
    llm = LLM(default_model_path, dtype="bfloat16", kv_cache_memory=0.05)
    model = llm.engine.model
    assert model.lm_head_int8 is not None
    from tuili.ops import cpu_kernels

    step = llm.engine.runner.cpu_step  # its decode steps run as one call: C++ where tuili's CPU kernels build
    assert step is not None and (step.native is not None) == cpu_kernels.available()
    hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    fast = model.compute_logits(hidden).float()
    head, model.lm_head_int8 = model.lm_head_int8, None
    exact = model.compute_logits(hidden).float()
    model.lm_head_int8 = head
    assert (fast - exact).abs().max() < 0.02 * exact.abs().max()
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    prompt = llm.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert out.outputs[0].text == "The capital of France is Paris."
