"""The streamed batch-1 GEMV (tuili/ops/stream_gemv.py, CUDA C++ through NVRTC, Hopper): INT4 g128 and INT8 per
channel against the torch reference on the GPU (plain and fused forms, several grid sizes, stage sizes and ring
depths), its dispatch from quant_linear_triton, and the shape plan and input checks (these run everywhere)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuili.ops import quant_matmul, stream_gemv
from tuili.ops.activation import silu_and_mul
from tuili.quant import quantize_groupwise, quantize_per_channel

CUDA = torch.cuda.is_available() and stream_gemv.available(torch.device("cuda"))
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 9.0+ and NVRTC")


def layer(bits: int, n: int, k: int, symmetric: bool = False, device: str = "cuda", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    if bits == 8:
        q, s = quantize_per_channel(w)
        return q.to(device), s.to(device), None
    q, s, z = quantize_groupwise(w, 128, symmetric=symmetric)
    gm = quant_matmul.group_major
    return q.to(device), gm(s).to(device), None if z is None else gm(z).to(device)


def reference(x: torch.Tensor, q, s, z) -> torch.Tensor:
    if q.dtype == torch.int8:
        return quant_matmul.int8_linear(x.float(), q, s.float())
    return quant_matmul.int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_plan():
    """16-value slices spread evenly over 64-256 threads, stages of up to 8 whole rows in ~16 KB."""
    assert stream_gemv.plan(4, 6144, 4096) == (256, 1, 8)
    assert stream_gemv.plan(4, 4096, 14336) == (224, 4, 2)
    assert stream_gemv.plan(8, 4096, 4096) == (256, 1, 4)
    assert stream_gemv.plan(8, 4096, 14336) == (224, 4, 1)
    assert stream_gemv.plan(4, 256, 1024) == (64, 1, 8)
    assert stream_gemv.plan(4, 576, 576) is None  # 36 slices: no multiple of 32 threads
    assert stream_gemv.plan(4, 255, 1024) is None  # odd N
    assert stream_gemv.supports(4, 6144, 4096, 128) and not stream_gemv.supports(4, 6144, 4096, 64)
    assert stream_gemv.supports(8, 6144, 4096, 0) and not stream_gemv.supports(8, 6144, 4096, 32)


def test_input_checks():
    q, s, z = layer(4, 64, 1024, device="cpu")
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(torch.randn(1, 1024, dtype=torch.float16), q, s, z)
    with pytest.raises(ValueError, match="one row of bf16"):
        stream_gemv.stream_gemv(torch.randn(2, 1024, dtype=torch.bfloat16), q, s, z)
    with pytest.raises(ValueError, match="group-major"):
        stream_gemv.stream_gemv(torch.randn(1, 1024, dtype=torch.bfloat16), q, s.contiguous(), z)
    with pytest.raises(ValueError, match="residual must be"):
        stream_gemv.stream_gemv(torch.randn(1, 1024, dtype=torch.bfloat16), q, s, z,
                                residual=torch.zeros(1, 16, dtype=torch.bfloat16),
                                norm_weight=torch.ones(64, dtype=torch.bfloat16))
    assert not stream_gemv.available(torch.device("cpu"))
    assert not quant_matmul._stream(1, 1024, 128, q, s)  # CPU tensors stay on the CPU paths


@gpu
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
@pytest.mark.parametrize("n,k", [(64, 1024), (272, 2048), (1030, 3584), (4096, 4096)])
def test_matches_reference(bits, symmetric, n, k):
    q, s, z = layer(bits, n, k, symmetric)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = reference(x, q, s, z)
    for mma in ((None, False) if bits == 4 else (None,)):  # INT4: tensor cores where K and N allow, CUDA cores
        for ctas in (None, 7, n // 2):  # one CTA per SM; uneven row ranges; one row block per CTA
            for stages, rows in ((None, None), (2, 1), (3, 2)):  # ring depth, rows per stage (a partial stage)
                y = stream_gemv.stream_gemv(x, q, s, z, ctas=ctas, stages=stages, rows=rows, mma=mma)
                assert y.shape == (1, n) and y.dtype == torch.bfloat16
                assert rel(y, ref) < 4e-3, (mma, ctas, stages, rows, rel(y, ref))  # the output's bf16 rounding


@gpu
@pytest.mark.parametrize("bits,mma", [(4, None), (4, False), (8, None)])
def test_fused_forms_match_reference(bits, mma):
    """down (silu(gate) * up in; the residual add, h * the next norm's weight and the sums of squares out), then
    a gate_up reading that norm's input: against the separate torch ops."""
    n, k = 1024, 2048
    q, s, z = layer(bits, n, k, seed=1)
    q2, s2, z2 = layer(bits, 512, n, seed=2)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    h_ref = reference(silu_and_mul(gu), q, s, z) + h
    stream = h.clone()
    h_out, hw, ss = stream_gemv.stream_gemv(gu, q, s, z, silu_mul=True, residual=stream, norm_weight=nw, ctas=5,
                                            mma=mma)
    assert h_out.data_ptr() == stream.data_ptr() and rel(h_out, h_ref) < 4e-3
    assert rel(hw, h_ref.float() * nw.float()) < 6e-3
    assert ss.shape == (1, 5)
    assert torch.allclose(ss.sum(dim=1), (h_out.float() ** 2).sum(dim=1), rtol=1e-4)
    y = stream_gemv.stream_gemv(hw, q2, s2, z2, norm=(1e-5, ss), mma=mma)
    want = reference(F.rms_norm(h_out, (n,), nw, 1e-5), q2, s2, z2)
    assert rel(y, want) < 8e-3
    # the same through the Triton GEMV: the two kernels round alike
    h2 = h.clone()
    quant_matmul.STREAM = False
    try:
        t_out, t_hw, t_ss = quant_matmul.quant_linear_triton(gu, q, s, z, 128 if bits == 4 else 0, silu_mul=True,
                                                             residual=h2, norm_weight=nw)
    finally:
        quant_matmul.STREAM = True
    assert rel(t_out, h_out) < 2e-3 and torch.allclose(t_ss.sum(), ss.sum(), rtol=1e-3)


@gpu
def test_quant_linear_dispatch(monkeypatch):
    """One row of bf16 x through quant_linear_triton takes the streamed GEMV (with the fused forms); more rows,
    fp16 x, other group sizes and STREAM off keep the other kernels."""
    calls = []
    real = stream_gemv.stream_gemv
    monkeypatch.setattr(stream_gemv, "stream_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for bits in (4, 8):
        q, s, z = layer(bits, 256, 1024)
        group = 128 if bits == 4 else 0
        for m in (1, 2):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            assert rel(quant_matmul.quant_linear_triton(x, q, s, z, group), reference(x, q, s, z)) < 4e-3
        assert quant_matmul.fuses_norms(1, 1024, group, q, s)
        x = torch.randn(1, 1025, device="cuda", dtype=torch.bfloat16)[:, 1:]  # not 16-byte aligned: copied
        assert rel(quant_matmul.quant_linear_triton(x, q, s, z, group), reference(x, q, s, z)) < 4e-3
    assert calls == [1, 1, 1, 1]
    calls.clear()
    q, s, z = layer(4, 256, 1024)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    quant_matmul.quant_linear_triton(x, q, s.half(), z.half(), 128)
    monkeypatch.setattr(quant_matmul, "STREAM", False)
    quant_matmul.quant_linear_triton(x.bfloat16(), q, s, z, 128)
    assert calls == []
