"""Matmuls that read packed weights (weight-only quantization): torch references, CPU paths, Triton kernels.

Formats (made by tuili/quant, or transcoded from GGUF blocks by tuili/quant/gguf_blocks.py):
- INT8, per output channel: qweight [N, K] int8, scales [N]: W[n, k] = scales[n] * qweight[n, k]; or per group
  of G inputs (GGUF Q8_0: G 32, Q6_K: G 16): scales [N, ceil(K / G)], W[n, k] = scales[n, k // G] * qweight[n, k].
- INT4, group-wise along K: qweight [N, K/2] uint8, byte j of row n holding k = 2j in its low nibble and k = 2j+1
  in its high nibble; scales, offsets [N, ceil(K / G)]: W[n, k] = scales[n, g] * q[n, k] + offsets[n, g] with
  g = k // G; offsets None means symmetric (offset -8 * scale). K must be even; the last group may be short.
  Layers keep scales and offsets group-major in memory (`group_major`): a kernel reading one group of many
  columns then reads contiguous bytes, where the row-major layout costs a 32-byte sector per column.
The kernels multiply x by the integers q exactly (in x's dtype on tensor cores, in fp32 on CUDA cores) and
apply each group's scale and offset to the partial sums: sum_k x_k W_k = s * sum_k x_k q_k + m * sum_k x_k.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tuili.ops import cpu_kernels, int4_mma, pdl, stream_gemv
from tuili.ops.activation import silu_and_mul_triton


def group_major(t: torch.Tensor) -> torch.Tensor:
    """The same [N, groups] values stored group by group (a transposed view of a [groups, N] tensor)."""
    return t.t().contiguous().t()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15 (low nibble first)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten(-2)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float [N, K] weight an INT4 layer stands for (computed in fp32, returned in `dtype`)."""
    q = unpack_int4(qweight).float()
    k = q.shape[1]
    offsets = -8.0 * scales.float() if offsets is None else offsets
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    return (q * expand(scales) + expand(offsets)).to(dtype)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int = 0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float [N, K] weight an INT8 layer stands for (computed in fp32, returned in `dtype`)."""
    if not group_size:
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    expand = scales.float().repeat_interleave(group_size, dim=1)[:, :qweight.shape[1]]
    return (qweight.float() * expand).to(dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """x: [T, K] (float), qweight: [N, K] int8, scales: [N] (or [N, groups]) in x's dtype -> [T, N]. Reference."""
    if group_size:
        return F.linear(x, dequantize_int8(qweight, scales, group_size, x.dtype), bias)
    out = F.linear(x, qweight.to(x.dtype)) * scales
    return out if bias is None else out + bias


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, K] -> [T, N] through the dequantized weight. Torch reference."""
    return F.linear(x, dequantize_int4(qweight, scales, offsets, group_size, x.dtype), bias)


def int8_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same on the CPU. Decode-sized batches go through a packed int8 kernel (1 byte read per weight, no
    dequantized copy): tuili's own (cpu_kernels) where it runs, else torch's; these are matrix-vector kernels, so
    prefill-sized batches (more than 16 rows) dequantize the weight once and use the float GEMM, many times
    faster there."""
    if x.shape[0] > 16:  # the weight in fp32 where the bf16 GEMM is slow (cpu_kernels.dense_linear)
        return cpu_kernels.dense_linear(x, dequantize_int8(qweight, scales), bias)
    if x.shape[1] % 32 == 0 and x.dtype in (torch.bfloat16, torch.float32) and cpu_kernels.available():
        out = cpu_kernels.int8_gemv(x.contiguous(), qweight, scales)
    else:
        out = torch._weight_int8pack_mm(x.contiguous(), qweight, scales)
    return out if bias is None else out + bias


# --- CPU INT4: torch's packed int4 kernel (tinygemm layout) -------------------------------------------------

def int4_cpu_pack(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Our INT4 layer in the layout of torch's CPU int4 kernel (None if this torch lacks it). That kernel
    computes (q - 8) * scale + its_offset, so its_offset = offset + 8 * scale; it needs K to be a multiple of the
    group size, so a short last group is padded (int4_linear_cpu pads x with zeros to match)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    q = unpack_int4(qweight).to(torch.int32)
    padded = scales.shape[1] * group_size
    q = F.pad(q, (0, padded - q.shape[1]), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    its_offsets = 8.0 * scales.float() + (-8.0 * scales.float() if offsets is None else offsets.float())
    return packed, torch.stack((scales.float(), its_offsets), dim=-1).transpose(0, 1).contiguous().to(scales.dtype)


def int4_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales_and_offsets: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    padded = scales_and_offsets.shape[0] * group_size
    x = F.pad(x, (0, padded - x.shape[1])) if x.shape[1] != padded else x.contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_offsets)
    return out if bias is None else out + bias


# --- Triton: one dequant-fused matmul for both formats ------------------------------------------------------
# A tensor-core kernel for batches of rows (BLOCK_M 16 for decode batches, 64/128 for prefill): the packed tile
# is loaded, converted to x's dtype (integers up to 255 are exact there), multiplied on the tensor cores, and
# scaled per output column per group afterwards; and a CUDA-core GEMV for 1-4 rows (batch-1 decode). Both
# can split K when the column tiles alone would not fill the GPU (the GEMV's last split adds the partials; the
# tensor-core kernel adds fp32 atomics into a zeroed output). INT4 g128 decode batches of 2-64 bf16 rows on sm_80+
# go to int4_mma's CUDA kernels instead (the rows of x in an mma operand: 16 rows cost ~3.4x one in its GEMV).
tl = None


def _group_scale_offset(s_ptr, o_ptr, offs, n_mask, HAS_OFFSET: tl.constexpr):
    """One group's scale and offset for a tile of columns (fp32); symmetric layers have offset -8 * scale."""
    s = tl.load(s_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        return s, tl.load(o_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)
    return s, -8.0 * s


def _paired(ptr, g0, col0, stride_g, G: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N, G] fp32: columns col0.. of groups g0.. of a group-major 16-bit [groups, N] tensor (N even), loaded
    as [G, BLOCK_N / 2] int32 words of two columns each (a 2-byte load per thread is too narrow for cp.async, which
    the pipeline needs: a plain load in the loop stalls every K tile on its latency)."""
    dtype = ptr.dtype.element_ty
    offs = (g0 + tl.arange(0, G))[:, None] * (stride_g // 2) + (col0 // 2 + tl.arange(0, BLOCK_N // 2))[None, :]
    w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + offs)
    lo = (w & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)  # column 2i
    hi = (w >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)  # column 2i + 1
    return tl.trans(tl.reshape(tl.join(lo, hi), [G, BLOCK_N]))


def _store_out(out_row, hw_row, ss_slot, rn, n_mask, acc, residual, nw, ADD: tl.constexpr):
    """Store a tile of sums (fp32) into a row of out. ADD: add it to the residual stream h (`residual`, loaded
    from out before the K loop; the sum rounded to out's dtype first, then the result, as `residual + y` is) and
    store h in out, h * nw (the next RMSNorm's weight) in hw, and the sum of squares of h at ss_slot: the next
    GEMV's normalised input, up to 1 / rms."""
    dtype = out_row.dtype.element_ty
    if ADD:
        h = (acc.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(out_row + rn, h, mask=n_mask)
        hf = h.to(tl.float32)
        tl.store(hw_row + rn, (hf * nw.to(tl.float32)).to(dtype), mask=n_mask)
        tl.store(ss_slot, tl.sum(tl.where(n_mask, hf * hf, 0.0), axis=0))
    else:
        tl.store(out_row + rn, acc.to(dtype), mask=n_mask)


def _silu_mul(gate, up):
    """silu(gate) * up in their dtype, rounded as silu_and_mul_triton rounds it (silu first, then the product)."""
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


def _columns(t, BLOCK_W: tl.constexpr, PER: tl.constexpr):
    """The PER columns of t [BLOCK_W, PER] (4 or 8), each [BLOCK_W]: loaded as one tile, split in registers."""
    if PER == 8:
        even, odd = tl.split(tl.reshape(t, [BLOCK_W, 4, 2]))
        e0, e1 = tl.split(tl.reshape(even, [BLOCK_W, 2, 2]))
        o0, o1 = tl.split(tl.reshape(odd, [BLOCK_W, 2, 2]))
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
        return c0, c1, c2, c3, c4, c5, c6, c7
    else:
        even, odd = tl.split(tl.reshape(t, [BLOCK_W, 2, 2]))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        return c0, c1, c2, c3


def _dp2a_terms(words, xf, BLOCK_W: tl.constexpr):
    """sum_j q_j x_j per INT4 word of a [BLOCK_N, BLOCK_W] tile (words whose 8 nibbles are k = 8w + j; x as
    xf [BLOCK_W, 8] fp32) in integers: each word's 8 x values as 16-bit integers times 2^E, E from their largest
    |x| (which lands in [2^13, 2^14); values under 2^-14 of it lose their low bits), the nibbles as the bytes of
    w & 0x0F0F0F0F and (w >> 4) & 0x0F0F0F0F, four `dp2a` (two 16 x 8-bit products each) per word: 7
    instructions for 8 products, where the floats take 16. Returns the sums (fp32)."""
    big = tl.max(tl.abs(xf), axis=1)
    ebits = tl.maximum((big.to(tl.int32, bitcast=True) >> 23) & 0xFF, 16)  # biased exponent of the largest
    xi = tl.extra.cuda.libdevice.rint(xf * ((267 - ebits) << 23).to(tl.float32, bitcast=True)[:, None])  # 2^(13-e)
    c0, c1, c2, c3, c4, c5, c6, c7 = _columns(xi.to(tl.int32), BLOCK_W, 8)
    p0 = (c0 & 0xFFFF) | (c2 << 16)  # the x pairs of nibbles (0, 2), (4, 6), (1, 3), (5, 7)
    p1 = (c4 & 0xFFFF) | (c6 << 16)
    p2 = (c1 & 0xFFFF) | (c3 << 16)
    p3 = (c5 & 0xFFFF) | (c7 << 16)
    sums = tl.inline_asm_elementwise(
        "{ .reg .b32 lo, hi, z;\n mov.b32 z, 0;\n and.b32 lo, $1, 0x0F0F0F0F;\n shr.u32 hi, $1, 4;\n"
        " and.b32 hi, hi, 0x0F0F0F0F;\n dp2a.lo.s32.u32 $0, $2, lo, z;\n dp2a.hi.s32.u32 $0, $3, lo, $0;\n"
        " dp2a.lo.s32.u32 $0, $4, hi, $0;\n dp2a.hi.s32.u32 $0, $5, hi, $0;\n }",
        "=r,r,r,r,r,r", [words, p0[None, :], p1[None, :], p2[None, :], p3[None, :]], dtype=tl.int32, is_pure=True,
        pack=1)
    return sums.to(tl.float32) * ((ebits - 13) << 23).to(tl.float32, bitcast=True)[None, :]  # |sums| < 2^21: exact


def _quant_matmul_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
                         stride_sg, stride_om, k_per_split,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits). Program (i, j, s): out[i-tile, j-tile] (+)= the part of
    x @ W^T over K range [s * k_per_split, (s + 1) * k_per_split). GROUP 0: per-channel scales [N] applied at
    the end; GROUP > 0: scales[n, k // GROUP] per K tile (BLOCK_K divides GROUP). ATOMIC: add into an fp32
    output (split-K)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_start = tl.program_id(2) * k_per_split
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):  # a last split may run past K
        if BITS == 8:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            q = tl.load(qw_ptr + rn[None, :].to(tl.int64) * stride_qn + rk[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0)
            part = tl.dot(x, q.to(dtype), input_precision=DOT_PRECISION)
        else:
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns: k = 2 * rb (low), 2 * rb + 1 (high)
            b_mask = 2 * rb < K
            b = tl.load(qw_ptr + rn[None, :].to(tl.int64) * stride_qn + rb[:, None],
                        mask=b_mask[:, None] & n_mask[None, :], other=0)
            x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :],
                           mask=m_mask[:, None] & b_mask[None, :], other=0.0)
            x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :] + 1,
                           mask=m_mask[:, None] & b_mask[None, :], other=0.0)
            part = tl.dot(x_lo, (b & 15).to(dtype), input_precision=DOT_PRECISION)
            part = tl.dot(x_hi, (b >> 4).to(dtype), acc=part, input_precision=DOT_PRECISION)
        if GROUP > 0 and BITS == 8:  # symmetric INT8 groups: no offsets
            s = tl.load(s_ptr + rn * stride_sn + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
        elif GROUP > 0:
            s, m = _group_scale_offset(s_ptr, o_ptr, rn * stride_sn + (k0 // GROUP) * stride_sg, n_mask, HAS_OFFSET)
            x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
            acc += part * s[None, :] + x_sum[:, None] * m[None, :]
        else:
            acc += part
    if GROUP == 0:
        acc *= tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _quant_gemv_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, part_ptr, count_ptr, ss_ptr, nw_ptr, hw_ptr, N, K,
                       stride_xm, stride_qn, stride_sn, stride_sg, stride_om, k_per_split, num_ss, eps,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, WORDS: tl.constexpr, BLOCK_W: tl.constexpr,
                       FIXUP: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr, SILU_MUL: tl.constexpr,
                       PAIRED: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr, BLOCK_SS: tl.constexpr,
                       PDL: tl.constexpr, DP2A: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK_N), splits): one row of x, one column tile, one K split per program (_gemv_tile)."""
    if PDL:  # launched early (ops/pdl.py): wait for the kernels before
        tl.extra.cuda.gdc_wait()
    _gemv_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(1),
               tl.num_programs(2), x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, part_ptr, count_ptr, ss_ptr, nw_ptr, hw_ptr,
               N, K, stride_xm, stride_qn, stride_sn, stride_sg, stride_om, k_per_split, num_ss, eps, BITS, GROUP,
               HAS_OFFSET, BLOCK_N, BLOCK_K, ATOMIC, WORDS, BLOCK_W, FIXUP, EVEN, STAGES, SILU_MUL, PAIRED, NORM, ADD,
               BLOCK_SS, PDL, DP2A)


def _gemv_tile(row, pid_n, split, rows, tiles_n, splits, x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, part_ptr, count_ptr,
               ss_ptr, nw_ptr, hw_ptr, N, K, stride_xm, stride_qn, stride_sn, stride_sg, stride_om, k_per_split,
               num_ss, eps, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, WORDS: tl.constexpr,
               BLOCK_W: tl.constexpr, FIXUP: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
               SILU_MUL: tl.constexpr, PAIRED: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr,
               BLOCK_SS: tl.constexpr, LAUNCH_NEXT: tl.constexpr, DP2A: tl.constexpr = False):
    """The same product for a few rows of x, on the CUDA cores (no tensor-core tile to pad a single row to 16): the
    program (row, pid_n, split) of a grid (rows, tiles_n, splits) = (M, cdiv(N, BLOCK_N), splits), one row of x each
    (the ids are arguments: a persistent kernel can run several tiles; LAUNCH_NEXT: PDL's trigger). The packed
    weights are read as int32 words where K allows (WORDS: 4 int8 or 8 int4 values each) and turned into floats
    without the int-to-float convert (a quarter-rate unit): a value masked in place and read as a float is the
    denormal q * 2^(pos - 149), exact, one AND per value (and one shift per word for the values above bit 20); x
    comes scaled by 2^(149 - pos - P) so that every product is q x 2^-P. FFMA takes denormals at full rate (Triton
    does not flush them). INT8 words hold q + 128 (the 128 comes off through the x sums, as INT4's offsets do).
    DP2A (INT4, 16-bit x, several groups per K tile, CUDA): the products in integers instead (_dp2a_terms: 7
    instructions for a word's 8, where the floats take 16; x rounded to 2^-14 of the largest of its 8 values, below
    the output's own rounding). The x tile is loaded as [words, values] and split into one vector per value position
    in registers. Products
    accumulate element-wise in a [BLOCK_N, BLOCK_W] tile (BLOCK_W: words, or bytes, per row of a K tile), scaled and
    offset per group element-wise, and are reduced across threads once, at the end (a reduction per tile cost as
    much as the products). STAGES > 1 keeps that many K tiles of weights, x and scales in flight (cp.async; a load
    it cannot take, such as 2-byte scales one per thread, stays a plain load that stalls every K tile: PAIRED reads
    16-bit group-major scales as int32 column pairs instead, -10% time on the 8B's INT4 shapes). Split K (FIXUP):
    each split stores its partial sums in part [splits, M, N] and counts itself in count [M, column tiles]; the last
    split of a column tile adds the partials in split order, stores the result and sets the count back to 0. No
    zeroed output, no cast afterwards: two small kernels fewer per matmul than atomics (ATOMIC), and the sum does
    not depend on the order the splits finish in.
    RMSNorm and the residual add of a decoder layer, fused (words only). ADD: out holds the residual stream h and
    out += x W^T in place (rounded as `residual + y` in out's dtype); the epilogue also stores hw = h * nw (nw: the
    next RMSNorm's weight) and the sums of squares of h per column tile in ss [M, column tiles]. NORM: x is such
    an hw and the sums (1 / rms from ss [M, num_ss], added in a fixed order) scale the result: rms_norm(h) W^T
    with the norm's roundings in another place, and no norm kernel, nor norm work per K tile, in between."""
    k_start = split * k_per_split
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc2 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    x_acc = tl.zeros([BLOCK_W], dtype=tl.float32)  # INT8 per channel: the x sums of all tiles
    w_rows = qw_ptr + rn[:, None].to(tl.int64) * stride_qn
    x_row = x_ptr + row * stride_xm
    # the epilogue's inputs, loaded before the K loop (loaded after it, their latency added to every call)
    residual = rn  # placeholders where unused
    nw = rn
    ss = rn
    if ADD:
        residual = tl.load(out_ptr + row * stride_om + rn, mask=n_mask, other=0.0)
        nw = tl.load(nw_ptr + rn, mask=n_mask, other=0.0)
    if NORM:
        offs_ss = tl.arange(0, BLOCK_SS)
        ss = tl.load(ss_ptr + row * num_ss + offs_ss, mask=offs_ss < num_ss, other=0.0)
    PER: tl.constexpr = 32 // BITS  # values per word
    P: tl.constexpr = 72  # words: the products come out as q x 2^-P (|x| in [2^-58, 2^51] keeps full precision)
    A: tl.constexpr = 4722366482869645213696.0 if WORDS else 1.0  # 2^P: sum q x = A terms + B xs
    B: tl.constexpr = -128.0 if WORDS and BITS == 8 else 0.0  # (INT8 words hold q + 128)
    LOW: tl.constexpr = 5 if BITS == 4 else 2  # values below bit 20 (the exponent starts at 23) stay in place;
    HIGH: tl.constexpr = 12 if BITS == 4 else 16  # the others move down: nibble 5 to bit 8, byte 2 to bit 0
    # a last split may run past K
    for k0 in tl.range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K, num_stages=STAGES):
        if WORDS:  # value j of word w is k = PER * w + j (INT8: byte j; INT4: nibble j)
            rw = tl.multiple_of(k0 // PER, BLOCK_W) + tl.arange(0, BLOCK_W)
            x_ptrs = x_row + PER * rw[:, None] + tl.arange(0, PER)[None, :]
            if EVEN:  # whole tiles: no masks (their predicates and zero fills cost ~10% of the loop)
                words = tl.load(w_rows + rw[None, :])
                xt = tl.load(x_ptrs)
                if SILU_MUL:
                    xt = _silu_mul(xt, tl.load(x_ptrs + K))
            else:
                w_mask = PER * rw < K
                words = tl.load(w_rows + rw[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
                xt = tl.load(x_ptrs, mask=w_mask[:, None], other=0.0)
                if SILU_MUL:
                    xt = _silu_mul(xt, tl.load(x_ptrs + K, mask=w_mask[:, None], other=0.0))
            xf = xt.to(tl.float32)
            xs = tl.sum(xf, axis=1)  # the sum of the x values each word column saw
            if DP2A:  # INT4: integer products, 8 per word in 7 instructions
                terms = _dp2a_terms(words, xf, BLOCK_W)
            else:
                # value j read in place as the denormal q 2^(pos - 149) (pos: its lowest bit); x scaled by
                # 2^(149 - pos - P), one multiply per element of the x tile before it is spread over the threads
                col = tl.arange(0, PER)
                pos = BITS * col - tl.where(col >= LOW, HIGH, 0)
                xj = _columns(xf * ((276 - P - pos) << 23).to(tl.float32, bitcast=True)[None, :], BLOCK_W, PER)
                if BITS == 8:
                    words = words ^ -2139062144  # q + 128 in each byte: unsigned
                high = (words.to(tl.uint32, bitcast=True) >> HIGH).to(tl.int32, bitcast=True)
                terms = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
                for j in tl.static_range(PER):
                    if j < LOW:  # INT4 nibbles 0-4, INT8 bytes 0-1: in place
                        f_j = (words & ((2 ** BITS - 1) << (BITS * j))).to(tl.float32, bitcast=True)
                    else:
                        f_j = (high & ((2 ** BITS - 1) << (BITS * j - HIGH))).to(tl.float32, bitcast=True)
                    terms += f_j * xj[j][None, :]  # q 2^(pos - 149) x 2^(149 - pos - P) = q x 2^-P
        elif BITS == 8:
            rk = k0 + tl.arange(0, BLOCK_W)
            k_mask = rk < K
            x = tl.load(x_row + rk, mask=k_mask, other=0.0).to(tl.float32)
            q = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            terms = q.to(tl.float32) * x[None, :]
            xs = tl.zeros([BLOCK_W], dtype=tl.float32)
        else:
            rb = k0 // 2 + tl.arange(0, BLOCK_W)
            b_mask = 2 * rb < K
            b = tl.load(w_rows + rb[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0)
            x_lo = tl.load(x_row + 2 * rb, mask=b_mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + 2 * rb + 1, mask=b_mask, other=0.0).to(tl.float32)
            terms = (b & 15).to(tl.float32) * x_lo[None, :] + (b >> 4).to(tl.float32) * x_hi[None, :]
            xs = x_lo + x_hi
        # scaled and offset per group element-wise: no reduction across threads per tile
        if GROUP > 0 and BLOCK_K > GROUP:  # several groups per K tile (whole tiles): each word column's own
            G: tl.constexpr = BLOCK_K // GROUP
            offs = rn[:, None] * stride_sn + (k0 // GROUP + tl.arange(0, G))[None, :] * stride_sg
            if PAIRED:  # 16-bit group-major scales read as int32 pairs of columns: cp.async can take those
                s = _paired(s_ptr, k0 // GROUP, pid_n * BLOCK_N, stride_sg, G, BLOCK_N)
                if HAS_OFFSET:
                    m = _paired(o_ptr, k0 // GROUP, pid_n * BLOCK_N, stride_sg, G, BLOCK_N)
                elif BITS == 8:
                    m = tl.zeros_like(s)
                else:
                    m = -8.0 * s
            elif BITS == 8:
                s = tl.load(s_ptr + offs).to(tl.float32)
                m = tl.zeros_like(s)
            else:
                s, m = _group_scale_offset(s_ptr, o_ptr, offs, n_mask[:, None], HAS_OFFSET)
            m = B * s + m
            if not DP2A:  # terms are q x 2^-P
                s = A * s
            s = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, G, BLOCK_W // G]), [BLOCK_N, BLOCK_W])
            m = tl.reshape(tl.broadcast_to(m[:, :, None], [BLOCK_N, G, BLOCK_W // G]), [BLOCK_N, BLOCK_W])
            acc2 += terms * s + m * xs[None, :]
        elif GROUP > 0 and BITS == 8:
            s = tl.load(s_ptr + rn * stride_sn + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            acc2 += terms * (A * s)[:, None] + (B * s)[:, None] * xs[None, :]
        elif GROUP > 0:
            s, m = _group_scale_offset(s_ptr, o_ptr, rn * stride_sn + (k0 // GROUP) * stride_sg, n_mask, HAS_OFFSET)
            acc2 += terms * (A * s)[:, None] + (B * s + m)[:, None] * xs[None, :]
        else:
            acc2 += terms
            x_acc += xs
    if LAUNCH_NEXT:  # PDL: earlier, the next kernel's waiting programs slow this loop (-5% per step, H100)
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.sum(acc2, axis=1)
    if GROUP == 0:
        if WORDS:
            acc = A * acc + B * tl.sum(x_acc, axis=0)
        acc *= tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if NORM:  # 1 / rms of the row, from the sums of squares of its column tiles (in a fixed order)
        acc *= tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if FIXUP:
        tl.store(part_ptr + (split * rows + row) * N + rn, acc, mask=n_mask)
        tl.debug_barrier()  # every thread's partials stored before the count says so
        count = count_ptr + row * tiles_n + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == splits - 1:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for sp in range(0, splits):  # from L2 (.cg): other SMs wrote them
                acc += tl.load(part_ptr + (sp * rows + row) * N + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
            _store_out(out_ptr + row * stride_om, hw_ptr + row * stride_om, ss_ptr + row * tiles_n + pid_n,
                       rn, n_mask, acc, residual, nw, ADD)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
    elif ATOMIC:
        tl.atomic_add(out_ptr + row * stride_om + rn, acc, mask=n_mask)
    else:
        _store_out(out_ptr + row * stride_om, hw_ptr + row * stride_om, ss_ptr + row * tiles_n + pid_n,
                   rn, n_mask, acc, residual, nw, ADD)


def _dequant_int4_kernel(qw_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_sg, stride_on,
                         GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = the float weight of an INT4 layer (q * scale + offset in fp32, stored in out's dtype).
    Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); BLOCK_K divides GROUP."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    n_mask = rn < N
    b = tl.load(qw_ptr + rn[:, None].to(tl.int64) * stride_qn + rb[None, :],
                mask=n_mask[:, None] & (2 * rb < K)[None, :], other=0)
    s, m = _group_scale_offset(s_ptr, o_ptr, rn * stride_sn + (k0 // GROUP) * stride_sg, n_mask, HAS_OFFSET)
    w = tl.interleave((b & 15).to(tl.float32) * s[:, None] + m[:, None],   # k = 2j, 2j + 1: low, high nibble
                      (b >> 4).to(tl.float32) * s[:, None] + m[:, None])
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (rk < K)[None, :])


def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_sg,
                      stride_om, k_per_split, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """x [M, K] @ W^T for an INT4 layer, the weight dequantized tile by tile in registers: each [BLOCK_N, BLOCK_K]
    tile of packed bytes becomes q * scale + offset in fp32, rounded to x's dtype (the very values
    _dequant_int4_kernel writes), and goes to the tensor cores against x's tile. Grid (cdiv(M, BLOCK_M),
    cdiv(N, BLOCK_N), splits), the row tiles of one column tile next to each other (they share its weights in L2).
    BLOCK_K divides GROUP or is two groups (K a multiple of BLOCK_K then). ATOMIC: split K, added into fp32 out.
    (Tried: nibbles read as 16-bit floats 128 + q by an OR, no conversions, two dots per tile on the even and odd
    k of x and the scales applied after them, as int4_mma does: 10-60% slower on the 8B's shapes, H100.)"""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_start = tl.program_id(2) * k_per_split
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 2)  # byte columns: k = 2 * rb (low nibble), 2 * rb + 1 (high)
    m_mask = rm < M
    n_mask = rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None] & (k0 + rk < K)[None, :],
                    other=0.0)
        b = tl.load(qw_ptr + rn[:, None].to(tl.int64) * stride_qn + (k0 // 2 + rb)[None, :],
                    mask=n_mask[:, None] & (k0 + 2 * rb < K)[None, :], other=0)
        s, m = _group_scale_offset(s_ptr, o_ptr, rn * stride_sn + (k0 // GROUP) * stride_sg, n_mask, HAS_OFFSET)
        s, m = s[:, None], m[:, None]
        if BLOCK_K > GROUP:  # the tile's second group: byte columns GROUP / 2 ..
            s1, m1 = _group_scale_offset(s_ptr, o_ptr, rn * stride_sn + (k0 // GROUP + 1) * stride_sg, n_mask,
                                         HAS_OFFSET)
            second = (rb >= GROUP // 2)[None, :]
            s, m = tl.where(second, s1[:, None], s), tl.where(second, m1[:, None], m)
        w = tl.interleave((b & 15).to(tl.float32) * s + m, (b >> 4).to(tl.float32) * s + m).to(dtype)
        if SWAP:  # out^T = W x^T: the weight tile is the mma's A operand, x's rows its N (no padding to 64 rows)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SWAP:
        acc = tl.trans(acc)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _kernels():
    global tl, _group_scale_offset, _columns, _silu_mul, _paired, _store_out, _gemv_tile, _dp2a_terms
    import triton
    import triton.language as tl

    _group_scale_offset = triton.jit(_group_scale_offset)
    _columns = triton.jit(_columns)
    _silu_mul = triton.jit(_silu_mul)
    _paired = triton.jit(_paired)
    _store_out = triton.jit(_store_out)
    _gemv_tile = triton.jit(_gemv_tile)
    _dp2a_terms = triton.jit(_dp2a_terms)
    return SimpleNamespace(gemm=triton.jit(_quant_matmul_kernel), gemv=triton.jit(_quant_gemv_kernel),
                           dequant_int4=triton.jit(_dequant_int4_kernel), int4_gemm=triton.jit(_int4_gemm_kernel))


_STAGES: dict = {}  # (kernel, x's dtype, device, launch options) -> the stages that fit the GPU's shared memory


def _launch_fitting(kernel, grid: tuple, x: torch.Tensor, *args, **options) -> None:
    """kernel[grid](x, *args, **options), with fewer pipeline stages where the tiles' stages do not fit the GPU's
    shared memory (tiles chosen for 16-bit x run on fp32 x, or on a GPU with less shared memory than an H100;
    Triton raises OutOfResources before anything runs). The stages that fit are kept for the next call."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, x.dtype, x.device, tuple(sorted(options.items())))
    stages = _STAGES.get(key, options["num_stages"])
    while True:
        try:
            return kernel[grid](x, *args, **{**options, "num_stages": stages})
        except OutOfResources:
            if stages <= 1:
                raise
            stages = _STAGES[key] = stages - 1


def dequantize_int4_triton(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_int4 as one Triton kernel: 2.5 bytes of traffic per weight."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_k = min(group_size, 128)
    has_offset = offsets is not None
    _kernels().dequant_int4[(-(-n // 32), -(-k // block_k))](
        qweight, scales, offsets if has_offset else scales, out, n, k, qweight.stride(0), scales.stride(0),
        scales.stride(1), out.stride(0), GROUP=group_size, HAS_OFFSET=has_offset, BLOCK_N=32, BLOCK_K=block_k,
        num_warps=4)
    return out


DP2A = True  # INT4 GEMV of 16-bit x on CUDA: integer products (_dp2a_terms; fp32 x, the interpreter and DP2A off:
# the denormal floats, whose products are exact)
GEMV_MAX_ROWS = 4  # INT4 with up to this many rows of x: the CUDA-core kernel, one row per program
MMA_MIN_ROWS = 3  # INT4 g128 bf16 with 3-16 rows on sm_80+: the tensor-core GEMV of int4_mma (2 rows: even)
DEQUANT_MIN_ROWS = 17  # INT4 with at least this many rows: dequantize, then cuBLAS (but see INT4_GEMM_MAX_ROWS)
GEMM_MMA = True  # INT4 g128 bf16 decode batches of GEMM_MIN_ROWS-64 rows on sm_80+: int4_mma's GEMM (`_gemm_mma`)
GEMM_MIN_ROWS = 2  # from here the GEMM, not the GEMVs above (8B INT4, H200, tok/s, GEMM against GEMVs: batch 2 929.6 vs
# 781.8 since the GEMM takes the weights as the mma's A, batch 4 1423.1 vs 1075.9, batch 16 5051.7 vs 1882.3, though
# the GEMVs have the norms inside; at 1 row the GEMVs stay faster: the Triton GEMV 43.9 against 51.4 us per layer,
# stream_gemv on Hopper faster still)
STREAM_GEMV = True  # one row of bf16 x, INT4 g128, sm_90+: stream_gemv (8B INT4 batch 1, H200: 564.9 tok/s against
# 549.0 through the Triton GEMV; off: the Triton GEMV, for A/B runs)
STREAM_GEMV_INT8 = True  # the same for INT8 per output channel (one scale per row)
INT4_GEMM_MAX_ROWS = 64  # INT4 on CUDA, DEQUANT_MIN_ROWS to this many rows, not the GEMM's: int4_gemm_triton (the
# 8B's four decoder matmuls at 17 / 32 / 64 rows, H100: 277 / 276 / 290 us per layer against 409-412; at 256 rows
# the first sweep's best tiles took 687 against 450)
# The GEMV's split-K counters, per device (int4_mma's and the argmax's too): zero between kernels (each kernel
# resets its own), allocated once and never moved (CUDA graphs keep their address); a call that needs more of them
# falls back to atomics.
COUNTS_SIZE = 1 << 16
_COUNTS: dict[torch.device, torch.Tensor] = {}


def _split_counts(device: torch.device) -> torch.Tensor | None:
    counts = _COUNTS.get(device)
    if counts is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        counts = _COUNTS[device] = torch.zeros(COUNTS_SIZE, dtype=torch.int32, device=device)
    return counts


def _tiles(m: int, n: int, k: int, group: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps, num_stages); BLOCK_M 1 means the GEMV kernel (its
    num_stages: how many K tiles are in flight). From runs of Llama-3.1-8B's decode shapes as the engine runs them
    (one CUDA graph over many layers' weights, scripts/bench_gemv_layers.py, H100). The GEMV wants long runs of
    each row per K tile (INT8 with 64-byte runs took 3x as long as with 512): INT4 through the GEMV with 32 x 1024
    tiles and 3 in flight, 16 rows where 32-row tiles would be fewer than the SMs (the 8B's o and down: 6.43 ->
    6.11 us), long K in 2048-value tiles, split 2 ways only where the tiles are still too few (down 15.18 -> 13.82
    us unsplit in 16 x 2048 tiles; the step +1.1%, H100; unsplit in 32 x 1024 tiles with 4 in flight, 128
    programs, had made it 2.5% slower); INT8 one row through the GEMV with 16 x 512
    tiles (16 x 1024 for long K; the LM head too); INT8 batches through the tensor-core kernel with 64 x 256
    tiles, split 4 ways for long K on few column tiles."""
    if group and m <= GEMV_MAX_ROWS:  # tiles of several groups, 3 in flight
        block_n = 32 if n >= 32 * num_sms else 16
        long_k = k >= 8192
        block_k = next((b for b in (2048, 1024, 512, 256) if k % b == 0 and b % group == 0 and (long_k or b < 2048)),
                       group)
        return 1, block_n, block_k, 2 if long_k and n // block_n < num_sms else 1, 4, 3
    if not group and m == 1:  # INT8 per channel, one row: the GEMV on words
        return 1, 16, 1024 if k >= 8192 else 512, 1, 4, 3
    block_k = 256 if not group else min(group, 256)
    if m <= 16:
        splits = 4 if -(-n // 64) < num_sms and k >= 8192 else 1
        return 16, 64, block_k, splits, 4, 4
    if not group and m <= 64 and (m <= 32 or n < 16384):  # INT8 per channel, decode batches: long runs of each
        # weight row per K tile (the 8B's four matmuls, H100, us per layer against 64-value K tiles: 17 rows 127.3
        # against 282.9 (bf16 cuBLAS 162.9), 32 rows 120.8 against 284.5, 64 rows 153.8 against 288.4 with gate/up
        # keeping the tiles below)
        return (32 if m <= 32 else 64), 64 if n >= 6144 else 32, block_k, 1, 4, 4
    return (64 if m <= 64 else 128), 128, min(block_k, 64), 1, 8, 3


def _on_words(block_m: int, k: int, qweight: torch.Tensor) -> bool:
    """Whether the GEMV (BLOCK_M 1) reads the packed weight as int32 words."""
    return block_m == 1 and k % 8 == 0 and qweight.is_contiguous()


def _mma(m: int, k: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor, fused: bool = False) -> bool:
    """Whether m rows of x (in scales' dtype) go through int4_mma's tensor-core GEMV: where the GEMM does not take
    them, or the call fuses a norm or residual add (`fused`), which only the GEMV has inside."""
    n = qweight.shape[0]
    return MMA_MIN_ROWS <= m <= int4_mma.MAX_ROWS and qweight.dtype == torch.uint8 and group_size == int4_mma.GROUP \
        and scales.dtype == torch.bfloat16 and qweight.is_cuda and int4_mma.supports(n, k) \
        and scales.stride() == (1, n) and int4_mma.available(qweight.device) \
        and (fused or not _gemm_mma(m, k, group_size, qweight, scales))


def _gemm_mma(m: int, k: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether m rows of x (in scales' dtype) go through int4_mma's tensor-core GEMM: decode batches of
    GEMM_MIN_ROWS-64 rows."""
    n = qweight.shape[0]
    return GEMM_MMA and GEMM_MIN_ROWS <= m <= int4_mma.GEMM_ROWS and qweight.dtype == torch.uint8 \
        and group_size == int4_mma.GROUP and scales.dtype == torch.bfloat16 and qweight.is_cuda \
        and int4_mma.gemm_supports(n, k) and scales.stride() == (1, n) and int4_mma.available(qweight.device)


def _stream(m: int, k: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor,
            offsets: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None) -> bool:
    """Whether m rows of x (in scales' dtype) go through stream_gemv: one row, bf16, INT4 g128 or INT8 per output
    channel, Hopper, the layouts and alignments it reads, shared memory enough for the scales of its rows."""
    n, bits = qweight.shape[0], 8 if qweight.dtype == torch.int8 else 4
    layout = scales.stride() == (1, n) if bits == 4 else \
        scales.dim() == 1 and scales.is_contiguous() and offsets is None
    return (STREAM_GEMV if bits == 4 else STREAM_GEMV_INT8) and m == 1 and scales.dtype == torch.bfloat16 \
        and qweight.dtype in (torch.uint8, torch.int8) and qweight.is_cuda \
        and stream_gemv.supports(n, k, group_size, bits) and qweight.is_contiguous() \
        and qweight.data_ptr() % 16 == 0 and layout \
        and (offsets is None or offsets.dtype == scales.dtype and offsets.stride() == scales.stride()) \
        and (norm_weight is None or norm_weight.dtype == scales.dtype and norm_weight.is_contiguous()) \
        and stream_gemv.aligned(scales, offsets, norm_weight) and stream_gemv.available(qweight.device) \
        and stream_gemv.fits(n, k, offsets is not None, qweight.device, bits)


def loads_before_wait(m: int, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                      group_size: int, norm_weight: torch.Tensor | None = None) -> bool:
    """Whether quant_linear_triton's kernel for m rows of x requests weights before PDL's wait (stream_gemv,
    int4_mma's GEMV and GEMM), so that launching it early lets its copies overlap the kernel before."""
    k = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
    return _stream(m, k, group_size, qweight, scales, offsets, norm_weight) or \
        _mma(m, k, group_size, qweight, scales, fused=norm_weight is not None) or \
        _gemm_mma(m, k, group_size, qweight, scales)


def fuses_norms(m: int, k: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether quant_linear_triton's path for m rows has norm= and residual= inside: the GEMV on words or int4_mma's
    GEMV, not int4_mma's GEMM (which takes GEMM_MIN_ROWS-64 rows where it fits, and is faster than the fused GEMVs
    with the norms as their own kernels). The SM count passed to `_tiles` only splits the tensor-core kernel's K."""
    return _mma(m, k, group_size, qweight, scales) or (
        _on_words(_tiles(m, qweight.shape[0], k, group_size, 132)[0], k, qweight)
        and not _gemm_mma(m, k, group_size, qweight, scales))


def quant_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None = None, group_size: int = 0,
                        bias: torch.Tensor | None = None, tiles: tuple | None = None,
                        silu_mul: bool = False, norm: tuple | None = None,
                        residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None):
    """x [M, K] @ W^T for an INT8 (qweight int8 [N, K]) or INT4 (qweight uint8 [N, K/2]) layer.
    INT4 g128 with one row of bf16 x on sm_90+: stream_gemv (the fused forms included); with GEMM_MIN_ROWS-64 rows
    on sm_80+: int4_mma's tensor-core GEMM (N % 128 == 0; the norms and residual adds below not inside), 3-16 rows
    of other layers: its GEMV (the fused forms included); other INT4 on CUDA with DEQUANT_MIN_ROWS to
    INT4_GEMM_MAX_ROWS rows: int4_gemm_triton (weight tiles dequantized in registers); with more (prefill): the
    weight dequantized, then cuBLAS. `tiles` overrides the choice of `_tiles` (tests, sweeps) and keeps the fused
    kernels. silu_mul: x is [M, 2K] = [gate | up] and the layer
    multiplies silu_and_mul(x) (a gated MLP's down projection): the GEMV computes it as it loads x, rounded as
    silu_and_mul_triton rounds it (one kernel fewer per layer); other paths run that kernel first.
    Where `fuses_norms` holds (the GEMV on words), a decoder layer's residual add and RMSNorm: residual (the
    stream h [M, N]) and norm_weight (the next norm's weight [N]): h += x W^T in place, and the call returns
    (h, h * norm_weight, ss) with ss [M, column tiles] the sums of squares of h per tile; norm=(eps, ss): x is
    such an h * weight and the result is rms_norm(h, weight, eps) W^T (the norm's roundings in another place)."""
    bits = 8 if qweight.dtype == torch.int8 else 4
    if x.dim() != 2 or x.stride(1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    n = qweight.shape[0]
    if (bits == 8 and qweight.shape[1] != k) or (bits == 4 and 2 * qweight.shape[1] != k):
        raise ValueError(f"x has {k} columns but the INT{bits} weight is {tuple(qweight.shape)}")
    if (residual is None) != (norm_weight is None) or (residual is not None and (norm is not None or bias is not None)):
        raise ValueError("residual comes with norm_weight, and not with norm or bias")
    if tiles is None and x.dtype == scales.dtype \
            and _mma(m, k, group_size, qweight, scales, fused=norm is not None or residual is not None):
        return _int4_mma(x, qweight, scales, offsets, bias, silu_mul, norm, residual, norm_weight)
    if tiles is None and x.dtype == scales.dtype and norm is None and residual is None \
            and _gemm_mma(m, k, group_size, qweight, scales):
        if silu_mul:
            x = silu_and_mul_triton(x)
        if x.stride(0) % 8 or x.data_ptr() % 16:  # the kernel reads x in 16-byte pieces
            x = x.clone(memory_format=torch.contiguous_format)
        counts = _split_counts(x.device)
        out = int4_mma.int4_gemm(x, qweight, scales, offsets, counts, splits=None if counts is not None else 1)
        return out if bias is None else out + bias
    if tiles is None and x.dtype == scales.dtype and _stream(m, k, group_size, qweight, scales, offsets, norm_weight):
        if x.data_ptr() % 16 or not x.is_contiguous():  # the kernel reads x in 16-byte pieces
            x = x.clone(memory_format=torch.contiguous_format)
        out = stream_gemv.stream_gemv(x, qweight, scales, offsets, silu_mul=silu_mul, norm=norm, residual=residual,
                                      norm_weight=norm_weight)
        return out if bias is None else out + bias
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    block_m, block_n, block_k, splits, num_warps, num_stages = tiles or _tiles(m, n, k, group_size, num_sms)
    words = _on_words(block_m, k, qweight)
    if (norm is not None or residual is not None) and not words:
        raise ValueError("norms and residuals fuse into the GEMV on words only (see fuses_norms)")
    if silu_mul and not words:
        x, silu_mul = silu_and_mul_triton(x), False
    if bits == 4 and tiles is None and x.is_cuda and DEQUANT_MIN_ROWS <= m <= INT4_GEMM_MAX_ROWS and group_size:
        out = int4_gemm_triton(x, qweight, scales, offsets, group_size)
        return out if bias is None else out + bias
    if bits == 4 and tiles is None and m >= DEQUANT_MIN_ROWS:
        # the weight in x's dtype, made and read once per call (2.5 + 2 bytes per weight): at prefill sizes
        # cuBLAS on it beats the dequant-fused GEMM (a 128-token prompt on the 8B: 116 -> 31 ms, H200)
        w = dequantize_int4_triton(qweight, scales, offsets, group_size, x.dtype)
        return F.linear(x, w, bias)
    if group_size and block_k > group_size and not (words and n % block_n == 0 and k % block_k == 0):
        block_k = group_size  # several groups per K tile: the GEMV on whole tiles of words only
    if group_size and group_size % block_k and block_k % group_size:
        raise ValueError(f"group size {group_size} and BLOCK_K {block_k} do not divide each other")
    k_per_split = -(-k // (splits * block_k)) * block_k
    splits = -(-k // k_per_split)
    counts = _split_counts(x.device) if block_m == 1 and splits > 1 else None
    fixup = counts is not None and m * -(-n // block_n) <= COUNTS_SIZE
    atomic = splits > 1 and not fixup
    if residual is not None and (atomic or residual.shape != (m, n) or residual.stride(1) != 1
                                 or residual.dtype != x.dtype):
        raise ValueError(f"residual must be a [{m}, {n}] {x.dtype} tensor (rows contiguous) and K splits counted")
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        residual if residual is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernels = _kernels()
    if offsets is not None and offsets.stride() != scales.stride():
        raise ValueError("scales and offsets must have the same layout")
    scale_strides = (scales.stride(0), scales.stride(1) if scales.dim() == 2 else 0)
    has_offset = offsets is not None
    offsets = offsets if has_offset else scales  # a placeholder pointer when HAS_OFFSET is off
    common = dict(BITS=bits, GROUP=group_size, HAS_OFFSET=has_offset, BLOCK_N=block_n, BLOCK_K=block_k,
                  ATOMIC=atomic, num_warps=num_warps, num_stages=num_stages)
    if block_m == 1:
        # 16-bit group-major scales (and offsets) of even N: read as int32 pairs of columns (see _paired)
        paired = scales.element_size() == 2 and scale_strides[0] == 1 and n % 2 == 0 and scale_strides[1] % 2 == 0 \
            and scales.data_ptr() % 4 == 0 and (not has_offset or offsets.data_ptr() % 4 == 0)
        qw = qweight.view(torch.int32) if words else qweight
        block_w = block_k // (32 // bits) if words else block_k * bits // 8
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if fixup else out
        tiles_n = -(-n // block_n)
        even = n % block_n == 0 and k % block_k == 0  # whole tiles
        hw = out
        if residual is not None:  # written
            if norm_weight.shape != (n,):
                raise ValueError(f"norm_weight must have {n} values")
            ss = torch.empty(m, tiles_n, dtype=torch.float32, device=x.device)
            hw = torch.empty_like(out)
        elif norm is not None:  # read
            ss = norm[1]
            if ss.shape[0] != m or not ss.is_contiguous() or ss.dtype != torch.float32:
                raise ValueError(f"norm needs fp32 sums of squares [{m}, tiles], contiguous")
        else:
            ss = out  # a placeholder pointer
        kernels.gemv[(m, tiles_n, splits)](
            x, qw, scales, offsets, out, part, counts if fixup else out, ss, out if residual is None else norm_weight,
            hw, n, k, x.stride(0), qw.stride(0), *scale_strides, out.stride(0), k_per_split, ss.shape[1],
            0.0 if norm is None else norm[0], WORDS=words, BLOCK_W=block_w, FIXUP=fixup,
            EVEN=even, STAGES=num_stages, SILU_MUL=silu_mul, PAIRED=paired, NORM=norm is not None,
            ADD=residual is not None, DP2A=DP2A and bits == 4 and words and x.is_cuda and x.dtype != torch.float32
            and group_size > 0 and block_k > group_size and even,
            BLOCK_SS=1 << max(ss.shape[1] - 1, 0).bit_length() if norm is not None else 1,
            **pdl.launch_options(x.device), **common)
        if residual is not None:
            return out, hw, ss
    else:
        grid = (-(-m // block_m), -(-n // block_n), splits)
        _launch_fitting(kernels.gemm, grid, x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0),
                        *scale_strides, out.stride(0), k_per_split, BLOCK_M=block_m,
                        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **common)
    out = out.to(x.dtype) if atomic else out
    return out if bias is None else out + bias


def _int4_gemm_tiles(m: int, n: int, k: int, group_size: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps, num_stages[, swap]) for int4_gemm_triton: the best of two
    sweeps of the 8B's shapes at 17, 32 and 64 rows (scripts/sweep_int4_gemm.py, H100), K tiles of two groups of
    128; swap (out^T = W x^T) for the widest layers (gate/up: 102 against 128 us at 17-32 rows)."""
    block_k = 2 * group_size if group_size <= 128 and k % (2 * group_size) == 0 else group_size
    if n >= 16384:
        return 32 if m <= 32 else 64, 64, block_k, 1, 4, 3, True
    if n >= 6144:
        return (32, 32, block_k, 1, 4, 4) if m <= 32 else (64, 64, block_k, 1, 8, 4)
    return 64, 32, block_k, 1, 4, 4


def int4_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                     group_size: int, tiles: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ W^T for an INT4 layer (qweight uint8 [N, K/2], scales and offsets [N, K / group_size], any
    strides) with the weight dequantized in registers (_int4_gemm_kernel): 0.5 byte per weight read, where
    dequantize_int4_triton then a matmul moves 4.5. The weight rounds to x's dtype as there."""
    m, k = x.shape
    n = qweight.shape[0]
    if 2 * qweight.shape[1] != k or group_size <= 0 or k % 2:
        raise ValueError(f"x has {k} columns but the INT4 weight is {tuple(qweight.shape)} (group {group_size})")
    block_m, block_n, block_k, splits, num_warps, num_stages, *swap = tiles or _int4_gemm_tiles(m, n, k, group_size)
    if (block_k > group_size and (block_k != 2 * group_size or k % block_k)) or \
            (block_k <= group_size and group_size % block_k):
        raise ValueError(f"BLOCK_K {block_k} must divide the group size {group_size} or be two groups of K {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    k_per_split = -(-k // (splits * block_k)) * block_k
    splits = -(-k // k_per_split)
    atomic = splits > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n, dtype=x.dtype, device=x.device)
    has_offset = offsets is not None
    if has_offset and offsets.stride() != scales.stride():
        raise ValueError("scales and offsets must have the same layout")
    _launch_fitting(
        _kernels().int4_gemm, (-(-m // block_m), -(-n // block_n), splits),
        x, qweight, scales, offsets if has_offset else scales, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), scales.stride(1), out.stride(0), k_per_split, GROUP=group_size, HAS_OFFSET=has_offset,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=atomic,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SWAP=bool(swap and swap[0]),
        num_warps=num_warps, num_stages=num_stages)
    return out.to(x.dtype) if atomic else out


def _int4_mma(x, qweight, scales, offsets, bias, silu_mul, norm, residual, norm_weight):
    """quant_linear_triton through int4_mma.int4_gemv (x: 3-16 rows, bf16)."""
    if x.stride(0) % 8 or x.data_ptr() % 16:  # the kernel reads x in 16-byte pieces
        x = x.clone(memory_format=torch.contiguous_format)
    counts = _split_counts(x.device)
    out = int4_mma.int4_gemv(x, qweight, scales, offsets, counts, silu_mul=silu_mul, norm=norm, residual=residual,
                             norm_weight=norm_weight, splits=None if counts is not None else 1)
    return out if bias is None else out + bias
