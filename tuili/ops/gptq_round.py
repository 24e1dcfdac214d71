"""GPTQ's sequential rounding of one lazy block of columns as a single Triton kernel (tuili/quant/gptq.py).

The torch loop (gptq._round_columns) spends ~10 small kernels on each column; on a GPU that is launch-bound
(seconds per large layer). Here each program keeps a tile of rows x the block's columns in registers and rounds
the columns one after another, moving each column's error onto the later ones, in one launch per block.
"""
from __future__ import annotations

import functools

import torch

# triton.language, bound when the kernel is first built (importing this module must not need Triton)
tl = None


def _round_block_kernel(w_ptr, s_ptr, o_ptr, hinv_ptr, q_ptr, err_ptr, n, cols, stride_w, stride_h,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # w, s, o, q, err: [n, cols] fp32 with row stride stride_w (the block's columns of the weight, each weight's
    # scale and offset; out: codes 0..15 and the scaled errors); hinv: [cols, cols] fp32 upper triangular (the
    # block of the Cholesky factor of H^-1), row stride stride_h. Program i: rows i * BLOCK_N ...
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    rmask = rows < n
    offs = rows[:, None].to(tl.int64) * stride_w + c[None, :]
    w = tl.load(w_ptr + offs, mask=rmask[:, None] & (c < cols)[None, :], other=0.0)
    row_offs = rows.to(tl.int64) * stride_w
    for i in range(cols):
        wi = tl.sum(tl.where((c == i)[None, :], w, 0.0), axis=1)
        si = tl.load(s_ptr + row_offs + i, mask=rmask, other=1.0)
        oi = tl.load(o_ptr + row_offs + i, mask=rmask, other=0.0)
        x = tl.math.div_rn(wi - oi, si)
        # + - 1.5 * 2^23 rounds fp32 to the nearest integer, ties to even, as torch.round (|x| < 2^22; larger
        # ones clamp to 0 or 15 all the same)
        code = tl.minimum(tl.maximum((x + 12582912.0) - 12582912.0, 0.0), 15.0)
        deq = code * si
        deq = deq + oi  # two roundings, as torch's code * s + o
        e = tl.math.div_rn(wi - deq, tl.load(hinv_ptr + i * stride_h + i))
        h = tl.load(hinv_ptr + i * stride_h + c, mask=(c >= i) & (c < cols), other=0.0)
        w = w - e[:, None] * h[None, :]
        tl.store(q_ptr + row_offs + i, code, mask=rmask)
        tl.store(err_ptr + row_offs + i, e, mask=rmask)


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_round_block_kernel)


def round_block_triton(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                       hinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w, scale, offset [N, C] fp32 (C <= 128 columns, in rounding order), hinv [C, C] fp32 upper triangular ->
    (codes [N, C] as floats 0..15, errors [N, C]: each column's rounding error divided by its hinv diagonal),
    as gptq._round_columns computes one lazy block."""
    import triton

    n, cols = w.shape
    if cols > 128 or hinv.shape != (cols, cols):
        raise ValueError(f"a block of at most 128 columns with a [{cols}, {cols}] hinv, got {tuple(hinv.shape)}")
    w, scale, offset, hinv = (t.float().contiguous() for t in (w, scale, offset, hinv))
    q, err = torch.empty_like(w), torch.empty_like(w)
    block_n = 16
    _kernel()[(triton.cdiv(n, block_n),)](w, scale, offset, hinv, q, err, n, cols, w.stride(0), hinv.stride(0),
                                          BLOCK_N=block_n, BLOCK_C=triton.next_power_of_2(max(cols, 16)))
    return q, err
