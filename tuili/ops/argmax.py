"""Greedy decoding's argmax over the vocabulary as one Triton kernel (CUDA). torch's reduction runs a row of a
128K vocabulary on few blocks (28 us on an H100); a two-pass torch version (the max of each chunk, then of the
chunks) took five kernels and ~17 us of a batch-1 step, one program per row 12 us. Here each row is split over
many programs and the last of them to finish picks the winner."""
from __future__ import annotations

import functools

import torch

from tuili.ops import pdl
from tuili.ops.quant_matmul import _split_counts

tl = None  # triton.language, bound when the kernel is first built (see ops/rmsnorm.py)


def _argmax_kernel(x_ptr, value_ptr, index_ptr, count_ptr, out_ptr, V, stride_x, CHUNK: tl.constexpr,
                   BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, chunks): program (r, c) finds the first largest value of row r's chunk c (CHUNK values), stores
    it and its index in value / index [rows, chunks] and counts itself in count[r]; the last program of a row
    picks the largest of the chunks' values (the first chunk among equals), stores its index in out[r] and sets
    count[r] back to 0. torch's argmax, ties to the first index (NaNs are skipped, where torch would return one)."""
    if PDL:  # launched early (ops/pdl.py): wait for the logits
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    tl.store(value_ptr + row * chunks + chunk, top)
    tl.store(index_ptr + row * chunks + chunk, tl.min(tl.where(x == top, cols, V), axis=0))
    tl.debug_barrier()  # every thread's stores issued before the count says so
    if tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu") == chunks - 1:
        offs = tl.arange(0, BLOCK_C)
        values = tl.load(value_ptr + row * chunks + offs, mask=offs < chunks, other=float("-inf"), cache_modifier=".cg")
        best = tl.max(values, axis=0)
        first = tl.min(tl.where(values == best, offs, BLOCK_C), axis=0)
        tl.store(out_ptr + row, tl.load(index_ptr + row * chunks + first, cache_modifier=".cg").to(tl.int64))
        tl.atomic_xchg(count_ptr + row, 0, sem="relaxed", scope="gpu")


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_argmax_kernel)


def argmax_triton(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """x.argmax(dim=-1) of [N, V] logits (any float dtype; last dim contiguous, else copied), as int64 [N]."""
    if x.dim() != 2:
        raise ValueError(f"argmax_triton takes [N, V] logits, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n, v = x.shape
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    if v == 0:
        raise ValueError("argmax of an empty vocabulary")
    chunk = min(chunk, 1 << max(v - 1, 0).bit_length())
    chunks = -(-v // chunk)
    counts = _split_counts(x.device)  # the GEMV's self-resetting counters, zero between kernels
    if counts is None or n > counts.numel():
        return x.argmax(dim=-1)
    values = torch.empty(n, chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(n, chunks, dtype=torch.int32, device=x.device)
    _kernel()[(n, chunks)](x, values, index, counts, out, v, x.stride(0), CHUNK=chunk,
                           BLOCK_C=1 << max(chunks - 1, 0).bit_length(), num_warps=4,
                           **pdl.launch_options(x.device))
    return out
