"""The tensor-core INT4 GEMV and GEMM (tuili/ops/int4_mma.py, CUDA C++ through NVRTC): against the torch reference
on the GPU (plain and fused forms, 1-16 rows, forced K splits; the GEMM 1-64 rows), their dispatch from
quant_linear_triton, and their input checks (these run everywhere)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuili.ops import int4_mma, quant_matmul
from tuili.ops.activation import silu_and_mul
from tuili.quant import quantize_groupwise

CUDA = torch.cuda.is_available() and int4_mma.available(torch.device("cuda"))
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 8.0+ and NVRTC")


def layer(n: int, k: int, symmetric: bool = False, device: str = "cuda", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    q, s, z = quantize_groupwise(w, 128, symmetric=symmetric)
    gm = quant_matmul.group_major
    return q.to(device), gm(s).to(device), None if z is None else gm(z).to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def shared_input_checks(kernel, x, q, s, z, counts):
    """The input checks int4_gemv and int4_gemm share (x: bf16 rows the kernel takes)."""
    with pytest.raises(ValueError, match="bf16"):
        kernel(x.half(), q, s, z, counts)
    with pytest.raises(ValueError, match="group-major"):
        kernel(x, q, s.contiguous(), z, counts)
    with pytest.raises(ValueError, match="bf16 scales and offsets of shape"):
        kernel(x, q, s, z.half(), counts)
    with pytest.raises(ValueError, match="int32 counts"):
        kernel(x, q, s, z, counts.long())


def test_input_checks():
    q, s, z = layer(32, 512, device="cpu")
    counts = torch.zeros(64, dtype=torch.int32)
    shared_input_checks(int4_mma.int4_gemv, torch.randn(2, 512, dtype=torch.bfloat16), q, s, z, counts)
    with pytest.raises(ValueError, match="at most 16 rows"):
        int4_mma.int4_gemv(torch.randn(17, 512, dtype=torch.bfloat16), q, s, z, counts)
    q2, s2, z2 = layer(32, 384, device="cpu")  # K not a multiple of 256
    with pytest.raises(ValueError, match="K % 256"):
        int4_mma.int4_gemv(torch.randn(2, 384, dtype=torch.bfloat16), q2, s2, z2, counts)
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual must be"):
        int4_mma.int4_gemv(x, q, s, z, counts, residual=torch.zeros(2, 16, dtype=torch.bfloat16),
                           norm_weight=torch.ones(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm needs"):
        int4_mma.int4_gemv(x, q, s, z, counts, norm=(1e-5, torch.zeros(2, 2, dtype=torch.bfloat16)))
    assert not int4_mma.available(torch.device("cpu"))
    assert not quant_matmul._mma(4, 512, 128, q, s)  # CPU tensors stay on the CPU paths


def test_gemm_input_checks():
    q, s, z = layer(128, 512, device="cpu")
    counts = torch.zeros(64, dtype=torch.int32)
    x = torch.randn(20, 512, dtype=torch.bfloat16)
    shared_input_checks(int4_mma.int4_gemm, x, q, s, z, counts)
    with pytest.raises(ValueError, match="at most 64 rows"):
        int4_mma.int4_gemm(torch.randn(65, 512, dtype=torch.bfloat16), q, s, z, counts)
    q2, s2, z2 = layer(48, 512, device="cpu")  # N not a multiple of 128
    with pytest.raises(ValueError, match="N % 128"):
        int4_mma.int4_gemm(x, q2, s2, z2, counts)
    with pytest.raises(ValueError, match="2\\+ stages"):
        int4_mma.int4_gemm(x, q, s, z, counts, stages=1)
    with pytest.raises(ValueError, match="counters"):
        int4_mma.int4_gemm(x, q, s, z, None, splits=2)
    # the slots fit the shared memory a block may have: H100/H200, A100, sm_86/89
    assert [int4_mma.gemm_stages(m, 232448) for m in (1, 32, 33, 64)] == [3, 3, 3, 3]
    assert int4_mma.gemm_stages(64, 166912) == 3 and int4_mma.gemm_stages(64, 101376) == 2
    assert all(int4_mma.gemm_shared(m, int4_mma.gemm_stages(m, limit)) <= limit
               for m in range(1, 65) for limit in (101376, 166912, 232448))
    assert int4_mma.gemm_supports(28672, 4096) and not int4_mma.gemm_supports(4096, 4224)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128, 256)):
        for m in (17, 32, 48):
            splits = int4_mma.gemm_splits(n, k, m, 132)
            assert splits & (splits - 1) == 0 and (splits == 1 or k // 256 >= 4 * splits)
        splits = int4_mma.gemm_splits(n, k, 8, 132)
        assert splits & (splits - 1) == 0 and (splits == 1 or k // 256 >= 2 * splits)
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # the 8B's qkv, o, gate_up, down
    assert [int4_mma.gemm_splits(n, k, 32, 132) for n, k in shapes] == [4, 4, 1, 8]
    assert [int4_mma.gemm_splits(n, k, 8, 132) for n, k in shapes] == [4, 8, 1, 8]
    assert [int4_mma.gemm_splits(n, k, 48, 132) for n, k in shapes] == [2, 4, 1, 4]


def test_splits_are_powers_of_two_with_whole_batches():
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (48, 512)):
        for m in (1, 3, 5, 8, 16):
            splits = int4_mma.splits_for(n, k, m, 132)
            assert splits & (splits - 1) == 0 and k // 128 // splits >= int4_mma.UNROLL


@gpu
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,splits", [(48, 512, 1), (272, 1024, 2), (64, 2304, 3), (4096, 4096, None)])
def test_matches_reference(n, k, splits, symmetric):
    q, s, z = layer(n, k, symmetric)
    counts = quant_matmul._split_counts(torch.device("cuda"))
    for m in (1, 3, 8, 9, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul.int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)
        for _ in range(2):  # the split counters reset themselves
            y = int4_mma.int4_gemv(x, q, s, z, counts, splits=splits)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert rel(y, ref) < 4e-3, (m, rel(y, ref))  # the output's bf16 rounding


@gpu
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,splits", [(128, 256, 1), (384, 1024, 2), (256, 2304, 3), (4096, 4096, None)])
def test_gemm_matches_reference(n, k, splits, symmetric):
    """int4_gemm_mma (decode batches of 2-64 rows) against the torch reference: 1-4 mma row tiles, partial ones,
    K splits (the counters back at zero after each call), 2-4 slots, pipelines longer than the split's chunks."""
    q, s, z = layer(n, k, symmetric)
    counts = quant_matmul._split_counts(torch.device("cuda"))
    for m in (1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 32, 33, 48, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul.int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)
        # None: gemm_stages (3 up to 32 rows), the scales after the mma up to POST_SCALE_MAX_TILES row tiles, the
        # weights as the mma's A up to SWAP_MAX_ROWS rows (16 at most)
        for stages, post_scale, swap in ((None, None, None), (4, None, None), (2, None, None), (None, False, False),
                                         (None, True, False), (None, None, True), (2, None, True)):
            y = int4_mma.int4_gemm(x, q, s, z, counts, splits=splits, stages=stages, post_scale=post_scale, swap=swap)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert rel(y, ref) < 4e-3, (m, stages, post_scale, swap, rel(y, ref))  # the output's bf16 rounding
            assert not counts.any()
    x = torch.randn(20, k + 8, device="cuda", dtype=torch.bfloat16)[:, 8:]  # rows with a stride: 16-byte aligned
    ref = quant_matmul.int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)
    assert rel(int4_mma.int4_gemm(x, q, s, z, counts, splits=splits), ref) < 4e-3


@gpu
@pytest.mark.parametrize("m", [1, 4, 9, 16])
def test_fused_forms_match_reference(m):
    """down (silu(gate) * up in; the residual add, h * the next norm's weight and the sums of squares out), then
    a gate_up reading that norm's input: against the separate torch ops."""
    n, k = 256, 1024
    q, s, z = layer(n, k, seed=1)
    q2, s2, z2 = layer(512, n, seed=2)
    counts = quant_matmul._split_counts(torch.device("cuda"))
    gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    h_ref = quant_matmul.int4_linear(silu_and_mul(gu), q, s, z, 128) + h
    stream = h.clone()
    h_out, hw, ss = int4_mma.int4_gemv(gu, q, s, z, counts, silu_mul=True, residual=stream, norm_weight=nw, splits=2)
    assert h_out.data_ptr() == stream.data_ptr() and rel(h_out, h_ref) < 4e-3
    assert rel(hw, h_ref.float() * nw.float()) < 6e-3
    assert ss.shape == (m, n // 16)
    assert torch.allclose(ss.sum(dim=1), (h_out.float() ** 2).sum(dim=1), rtol=1e-4)
    y = int4_mma.int4_gemv(hw, q2, s2, z2, counts, norm=(1e-5, ss))
    want = quant_matmul.int4_linear(F.rms_norm(h_out, (n,), nw, 1e-5), q2, s2, z2, 128)
    assert rel(y, want) < 8e-3


@gpu
def test_quant_linear_dispatch(monkeypatch):
    """bf16 x of 2-64 rows through quant_linear_triton takes the tensor-core GEMM (from GEMM_MIN_ROWS, 2 by
    default), fewer the GEMV (with the fused forms); 1 row, fp16 x, other group sizes and layers the GEMM does not
    fit (N % 128) keep the other kernels."""
    q, s, z = layer(256, 1024)
    calls, gemm_calls = [], []
    real, real_gemm = int4_mma.int4_gemv, int4_mma.int4_gemm
    monkeypatch.setattr(int4_mma, "int4_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.setattr(int4_mma, "int4_gemm", lambda *a, **kw: gemm_calls.append(a[0].shape[0]) or real_gemm(*a, **kw))
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)  # the default GEMM_MIN_ROWS: 2 rows
    ref = quant_matmul.int4_linear(x.float(), q, s.float(), z.float(), 128)
    assert rel(quant_matmul.quant_linear_triton(x, q, s, z, 128), ref) < 4e-3 and gemm_calls == [2]
    assert not quant_matmul.fuses_norms(2, 1024, 128, q, s) and quant_matmul.fuses_norms(1, 1024, 128, q, s)
    gemm_calls.clear()
    monkeypatch.setattr(quant_matmul, "GEMM_MIN_ROWS", 3)
    for m in (4, 20):  # a down projection's [gate | up] (at 4 rows the GEMV on words would take it inside)
        gu = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul.int4_linear(silu_and_mul(gu).float(), q, s.float(), z.float(), 128)
        assert rel(quant_matmul.quant_linear_triton(gu, q, s, z, 128, silu_mul=True), ref) < 4e-3
    assert gemm_calls == [4, 20] and not quant_matmul.fuses_norms(4, 1024, 128, q, s)
    h = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)  # asked for the fused forms: the GEMV has them
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    h_ref = quant_matmul.int4_linear(x.float(), q, s.float(), z.float(), 128) + h.float()
    out = quant_matmul.quant_linear_triton(x, q, s, z, 128, residual=h, norm_weight=torch.ones_like(h[0]))
    assert rel(out[0], h_ref) < 4e-3 and calls == [4] and gemm_calls == [4, 20]
    calls.clear(), gemm_calls.clear()
    monkeypatch.setattr(quant_matmul, "GEMM_MIN_ROWS", 5)
    for m in (1, 2, 3, 5, 16, 17, 40, 64):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul.int4_linear(x.float(), q, s.float(), z.float(), 128)
        assert rel(quant_matmul.quant_linear_triton(x, q, s, z, 128), ref) < 4e-3
        assert quant_matmul.fuses_norms(m, 1024, 128, q, s) == (m < 5)
    assert calls == [3] and gemm_calls == [5, 16, 17, 40, 64]
    x = torch.randn(5, 1025, device="cuda", dtype=torch.bfloat16)[:, 1:]  # rows neither 16-byte aligned nor padded
    ref = quant_matmul.int4_linear(x.float(), q, s.float(), z.float(), 128)
    assert rel(quant_matmul.quant_linear_triton(x, q, s, z, 128), ref) < 4e-3 and gemm_calls[-1] == 5
    calls.clear(), gemm_calls.clear()
    x = torch.randn(5, 1024, device="cuda", dtype=torch.float16)
    quant_matmul.quant_linear_triton(x, q, s.half(), z.half(), 128)
    assert calls == gemm_calls == [] and not quant_matmul.fuses_norms(5, 1024, 128, q, s.half())
    narrow = layer(48, 1024)  # N % 128: the GEMV up to 16 rows, then int4_gemm_triton
    for m in (5, 17):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul.int4_linear(x.float(), narrow[0], narrow[1].float(), narrow[2].float(), 128)
        assert rel(quant_matmul.quant_linear_triton(x, *narrow, 128), ref) < 4e-3
    assert calls == [5] and gemm_calls == []
