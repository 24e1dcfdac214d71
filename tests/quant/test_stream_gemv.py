"""The streamed batch-1 INT4 GEMV (tuili/ops/stream_gemv.py, CUDA C++ through NVRTC, Hopper): against the torch
reference on the GPU (plain and fused forms, several grids, ring depths, stages before the wait and stage sizes, x
with one large value per group), against the Triton GEMV, its dispatch from quant_linear_triton; the shape plan
and the input checks run everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuili.ops import quant_matmul, stream_gemv
from tuili.ops.activation import silu_and_mul
from tuili.quant import quantize_groupwise

from test_int4_mma import layer, rel  # random INT4 g128 layers (group-major scales), relative error

CUDA = torch.cuda.is_available() and stream_gemv.available(torch.device("cuda"))
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 9.0+ and NVRTC")


def reference(x: torch.Tensor, q, s, z) -> torch.Tensor:
    return quant_matmul.int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)


def test_plan():
    """32-value slices spread evenly over 64-256 threads, at most 4 each; stages of up to 8 whole rows in 16 KB."""
    assert stream_gemv.plan(6144, 4096) == (128, 1, 8)  # the 8B's qkv, o, gate_up: 2 KB rows
    assert stream_gemv.plan(4096, 14336) == (224, 2, 2)  # down: 7 KB rows
    assert stream_gemv.plan(1024, 2048) == (64, 1, 8)
    assert stream_gemv.plan(1024, 1024) is None  # 32 slices: fewer than 64 threads
    assert stream_gemv.plan(1023, 4096) is None  # odd N
    assert stream_gemv.plan(64, 4096 + 128) is None  # K not a multiple of 1024
    assert stream_gemv.supports(4096, 4096, 128) and not stream_gemv.supports(4096, 4096, 64)


def test_input_checks():
    q, s, z = layer(64, 2048, device="cpu")
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(x.half(), q, s, z)
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(torch.randn(2, 2048, dtype=torch.bfloat16), q, s, z)
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(torch.randn(1, 4096, dtype=torch.bfloat16), q, s, z)  # K does not match
    with pytest.raises(ValueError, match="group-major"):
        stream_gemv.stream_gemv(x, q, s.contiguous(), z)
    with pytest.raises(ValueError, match="group-major"):
        stream_gemv.stream_gemv(x, q, s, z.float())
    with pytest.raises(ValueError, match="residual must be"):
        stream_gemv.stream_gemv(x, q, s, z, residual=torch.zeros(1, 16, dtype=torch.bfloat16),
                                norm_weight=torch.ones(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm needs"):
        stream_gemv.stream_gemv(x, q, s, z, norm=(1e-5, torch.ones(1, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(x[0], q, s, z)
    with pytest.raises(ValueError, match="do not come together"):
        stream_gemv.stream_gemv(x, q, s, z, norm=(1e-5, torch.ones(1, 4)),
                                residual=torch.zeros(1, 64, dtype=torch.bfloat16),
                                norm_weight=torch.ones(64, dtype=torch.bfloat16))
    odd = torch.as_strided(torch.zeros(s.numel() + 1, dtype=torch.bfloat16)[1:], s.shape, (1, s.shape[0]))
    assert odd.data_ptr() % 4 == 2  # group-major scales at a 2-byte aligned address
    with pytest.raises(ValueError, match="4-byte aligned"):
        stream_gemv.stream_gemv(x, q, odd, None)
    for bad in (dict(stages=0), dict(pre=-1), dict(ctas=0), dict(rows=3), dict(rows=16)):
        with pytest.raises(ValueError, match="1\\+ stages"):
            stream_gemv.stream_gemv(x, q, s, z, **bad)
    assert not stream_gemv.aligned(odd) and stream_gemv.aligned(s, None, z)
    assert not stream_gemv.available(torch.device("cpu"))
    assert not quant_matmul._stream(1, 2048, 128, q, s)  # CPU tensors stay on the CPU paths


@gpu
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k", [(64, 2048), (272, 2048), (1030, 3072), (4096, 4096), (512, 14336), (96, 9216),
                                 (64, 28672)])  # 1-4 slices per thread
def test_matches_reference(symmetric, n, k):
    q, s, z = layer(n, k, symmetric)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x[0, ::97] *= 40  # slices with one large value: the others keep 2^-14 of it
    ref = reference(x, q, s, z)
    for ctas in (None, 7, n // 2):  # 2 CTAs per SM; uneven row ranges; one row pair per CTA
        for stages, pre, rows in ((None, None, None), (1, 0, 1), (2, 1, 2), (3, 3, 4), (6, 2, None)):
            y = stream_gemv.stream_gemv(x, q, s, z, ctas=ctas, stages=stages, pre=pre, rows=rows)
            assert y.shape == (1, n) and y.dtype == torch.bfloat16
            assert rel(y, ref) < 4e-3, (ctas, stages, pre, rows, rel(y, ref))  # the output's bf16 rounding


@gpu
def test_fused_forms_match_reference():
    """down (silu(gate) * up in; the residual add, h * the next norm's weight and the sums of squares out), then
    a gate_up reading that norm's input: against the separate torch ops, and against the Triton GEMV."""
    n, k = 2048, 2048  # (the second layer's K is n: 2048, the least K the kernel plans)
    q, s, z = layer(n, k, seed=1)
    q2, s2, z2 = layer(512, n, seed=2)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    h_ref = reference(silu_and_mul(gu), q, s, z) + h
    stream = h.clone()
    h_out, hw, ss = stream_gemv.stream_gemv(gu, q, s, z, silu_mul=True, residual=stream, norm_weight=nw, ctas=5)
    assert h_out.data_ptr() == stream.data_ptr() and rel(h_out, h_ref) < 4e-3
    assert rel(hw, h_ref.float() * nw.float()) < 6e-3
    assert ss.shape == (1, 5)
    assert torch.allclose(ss.sum(dim=1), (h_out.float() ** 2).sum(dim=1), rtol=1e-4)
    y = stream_gemv.stream_gemv(hw, q2, s2, z2, norm=(1e-5, ss))
    want = reference(F.rms_norm(h_out, (n,), nw, 1e-5), q2, s2, z2)
    assert rel(y, want) < 8e-3
    h2 = h.clone()
    t_out, t_hw, t_ss = quant_matmul.quant_linear_triton(gu, q, s, z, 128, silu_mul=True, residual=h2,
                                                         norm_weight=nw, tiles=(1, 32, 1024, 1, 4, 3))
    assert rel(t_out, h_out) < 2e-3 and torch.allclose(t_ss.sum(), ss.sum(), rtol=1e-3)


@gpu
def test_quant_linear_dispatch(monkeypatch):
    """quant_linear_triton sends one row of bf16 INT4 g128 x here (the fused forms and a bias too), and not two rows,
    fp16 x, other group sizes or STREAM_GEMV off."""
    calls = []
    real = stream_gemv.stream_gemv
    monkeypatch.setattr(stream_gemv, "stream_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, s, z = layer(512, 2048)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    y = quant_matmul.quant_linear_triton(x, q, s, z, 128, bias)
    assert len(calls) == 1 and rel(y, reference(x, q, s, z) + bias.float()) < 4e-3
    quant_matmul.quant_linear_triton(x[:, :2048].clone().repeat(2, 1), q, s, z, 128)
    quant_matmul.quant_linear_triton(x.half(), q, s.half(), z.half(), 128)
    monkeypatch.setattr(quant_matmul, "STREAM_GEMV", False)
    quant_matmul.quant_linear_triton(x, q, s, z, 128)
    assert len(calls) == 1
    q64, s64, z64 = (t.cuda() for t in quantize_groupwise(torch.randn(512, 2048, dtype=torch.bfloat16) * 0.02, 64))
    assert not quant_matmul._stream(1, 2048, 64, q64, quant_matmul.group_major(s64))


@gpu
@pytest.mark.parametrize("scale", [2.0 ** 6, 2.0 ** 11])
def test_outliers_as_close_as_the_triton_gemv(scale):
    """A few channels of x far above the rest (as LLMs' massive activations): x is quantized per 32-value slice here
    and per 8 values in the Triton GEMV; against the fp32 reference both stay within the output's rounding."""
    q, s, z = layer(1024, 4096, seed=3)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    x[0, torch.tensor([5, 700, 2049, 4000])] *= scale
    ref = reference(x, q, s, z)
    y = stream_gemv.stream_gemv(x, q, s, z)
    t = quant_matmul.quant_linear_triton(x, q, s, z, 128, tiles=(1, 32, 1024, 1, 4, 3))
    assert rel(y, ref) < 4e-3 and rel(t, ref) < 4e-3, (rel(y, ref), rel(t, ref))
    assert rel(y, ref) <= 2 * rel(t, ref) + 2e-3, (rel(y, ref), rel(t, ref))  # (the output's rounding: ~1.1e-3)


def int8_layer(n: int, k: int, seed: int = 0, device: str = "cuda"):
    """A random INT8 layer per output channel: int8 [N, K] in -127..127, bf16 scales [N]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) * 2e-3 + 1e-4).bfloat16()
    return q.to(device), s.to(device)


def test_int8_plan_and_checks():
    """INT8 rows are twice as long, its stages twice as large: 8 rows of 4096, 2 of 14336; per-channel scales [N], no
    offsets."""
    assert stream_gemv.plan(6144, 4096, 8) == (128, 1, 8) and stream_gemv.plan(4096, 14336, 8) == (224, 2, 2)
    assert stream_gemv.supports(4096, 4096, 0, 8) and not stream_gemv.supports(4096, 4096, 32, 8)
    assert not stream_gemv.supports(4096, 4096, 0, 4)
    q, s = int8_layer(64, 2048, device="cpu")
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scales \\[N\\] and no offsets"):
        stream_gemv.stream_gemv(x, q, s[None], None)
    with pytest.raises(ValueError, match="scales \\[N\\] and no offsets"):
        stream_gemv.stream_gemv(x, q, s, s)
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(x[:, :1024], q, s, None)
    assert not quant_matmul._stream(1, 2048, 0, q, s)  # CPU tensors stay on the CPU paths


@gpu
@pytest.mark.parametrize("n,k", [(64, 2048), (1030, 3072), (6144, 4096), (512, 14336), (64, 28672)])
def test_int8_matches_reference(n, k):
    q, s = int8_layer(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x[0, ::97] *= 40  # slices with one large value: the others keep 2^-14 of it
    ref = quant_matmul.int8_linear(x.float(), q, s.float())
    for ctas in (None, 7, n // 2):
        for stages, pre, rows in ((None, None, None), (1, 0, 1), (3, 3, 2), (6, 2, None)):
            y = stream_gemv.stream_gemv(x, q, s, None, ctas=ctas, stages=stages, pre=pre, rows=rows)
            assert y.shape == (1, n) and y.dtype == torch.bfloat16
            assert rel(y, ref) < 4e-3, (ctas, stages, pre, rows, rel(y, ref))


@gpu
def test_int8_fused_forms_and_dispatch(monkeypatch):
    """INT8's down (silu * mul in, residual add and the next norm's inputs out), then a layer reading that norm:
    through quant_linear_triton (which sends them here), against torch and against the Triton GEMV (the switch
    off)."""
    calls = []
    real = stream_gemv.stream_gemv
    monkeypatch.setattr(stream_gemv, "stream_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    n, k = 2048, 4096
    q, s = int8_layer(n, k, seed=1)
    q2, s2 = int8_layer(1024, n, seed=2)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    h_ref = quant_matmul.int8_linear(silu_and_mul(gu).float(), q, s.float()) + h.float()

    def run():
        stream = h.clone()
        h_out, hw, ss = quant_matmul.quant_linear_triton(gu, q, s, None, 0, silu_mul=True, residual=stream,
                                                         norm_weight=nw)
        y = quant_matmul.quant_linear_triton(hw, q2, s2, None, 0, norm=(1e-5, ss))
        return h_out, hw, ss, y
    h_out, hw, ss, y = run()
    assert len(calls) == 2
    assert rel(h_out, h_ref) < 4e-3 and rel(hw, h_ref * nw.float()) < 6e-3
    assert torch.allclose(ss.sum(), (h_out.float() ** 2).sum(), rtol=1e-4)
    want = quant_matmul.int8_linear(F.rms_norm(h_out, (n,), nw, 1e-5).float(), q2, s2.float())
    assert rel(y, want) < 8e-3
    monkeypatch.setattr(quant_matmul, "STREAM_GEMV_INT8", False)
    t_out, _, t_ss, t_y = run()
    assert len(calls) == 2  # the Triton GEMV
    assert rel(t_out, h_out) < 2e-3 and torch.allclose(t_ss.sum(), ss.sum(), rtol=1e-3) and rel(t_y, y) < 6e-3
