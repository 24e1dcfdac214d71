"""Greedy decoding's argmax over the vocabulary as one Triton kernel (CUDA): torch's reduction runs a row of a
128K vocabulary on few blocks (28 us on an H100), and a two-pass torch version (the max of each chunk, then of
the chunks) still took five kernels and ~17 us of a batch-1 step."""
from __future__ import annotations

import functools

import torch

from tuili.ops import pdl

tl = None  # triton.language, bound when the kernel is first built (see ops/rmsnorm.py)


def _argmax_kernel(x_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row: each lane keeps the first of its largest values over the row's tiles (strictly
    greater replaces), then the lowest index among the lanes that hold the row's maximum: torch's argmax, ties
    to the first index (NaNs are skipped, where torch would return one)."""
    if PDL:  # launched early (ops/pdl.py): wait for the logits
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    index = tl.zeros([BLOCK], tl.int32)
    for start in tl.range(0, V, BLOCK, num_stages=3):
        x = tl.load(x_ptr + row * stride_x + start + lanes, mask=start + lanes < V, other=float("-inf"))
        x = x.to(tl.float32)
        better = x > best
        best = tl.where(better, x, best)
        index = tl.where(better, start + lanes, index)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, index, V), axis=0).to(tl.int64))


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_argmax_kernel)


def argmax_triton(x: torch.Tensor) -> torch.Tensor:
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
    block = min(4096, 1 << max(v - 1, 0).bit_length())
    _kernel()[(n,)](x, out, v, x.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4,
                    **pdl.launch_options(x.device))
    return out
