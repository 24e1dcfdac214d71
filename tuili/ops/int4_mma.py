"""INT4 g128 matmuls for decode batches of 2-64 rows on the tensor cores (CUDA C++ compiled at first use by NVRTC,
sm_80 and later; quant_matmul.quant_linear_triton calls int4_gemm for 2-64 rows of bf16 x, int4_gemv for 3-16 rows
of layers int4_gemm does not fit).

Why: the Triton GEMV (quant_matmul._gemv_tile) runs one row of x per program, so 4 rows cost 2.6x one (8B
gate_up on the H100: 67.7 vs 25.8 us), and the Triton tensor-core kernel that takes 5-16 rows pads them to 16 and
runs 4-5x slower still (118.5 us at 5 rows). Here the rows of x are the rows of an mma operand. For one row the
Triton GEMV stays faster, and on Hopper stream_gemv faster still (docs/benchmarks).

int4_gemv (`int4_gemv_mma`): `mma.sync.m16n8k16` (bf16 in, fp32 accumulate) with the weights as the B operand (8
weight rows x 16 K values) and the rows of x in A (rows of A beyond M are never stored). A lane holds one int32
word (8 nibbles of one weight row) per mma pair; one LOP3 per two nibbles turns them into bf16 pairs 128 + q
(0x4300 | q: exact), without a conversion instruction, and the A fragment holds the x values of the same nibble
positions (each CTA permutes its K range of x into that order once, in shared memory, with the sums of x per
group). The mma gives P = sum (128 + q) x per group; the group's scale s and offset m make it s P + (m - 128 s)
sum x. Each warp streams 16 weight rows (two 8-row strips) over its K range, UNROLL groups per batch, the next
batch's words and scales loaded while the current one is multiplied (registers). Split K: each split stores its
partials and counts itself; the last split of a 16-row tile adds them in split order (deterministic, as the
Triton GEMV). Fused as in the Triton GEMV: silu(gate) * up of x ([gate | up] input), the RMSNorm of the input
(norm: x = h * w and the sums of squares of h per column tile) and the residual add with the next norm's inputs
(residual, norm_weight). PDL on Hopper: the first batch of weights is loaded before the wait for the previous
kernel; the next kernel may launch after the main loop.

int4_gemm (`int4_gemm_mma`): the same mma, laid out as a GEMM whose every byte moves by cp.async. A CTA (8 warps,
128 weight rows) walks its K range in chunks of UNROLL groups; weights, scales, offsets and x (as it lies in
memory, XOR-swizzled) come through `gemm_stages` shared-memory slots. A warp takes 32 weight rows and one group of
each chunk (so each 16-byte word of x it reads from shared memory serves 32 weight rows: 4 rows per warp had
made the GEMM wait on shared memory) and multiplies each weight pair against all of x's rows (up to 4 mma A
tiles of 16, their quads made from x's words by PRMTs). For 2+ row tiles each pair is dequantized once to bf16
(LOP3, then two bf16x2 FMAs, rounded once as dequantize_int4_triton rounds); for one tile (up to 16 rows) the mma
takes 128 + q as the GEMV does and the scales and offsets follow per group (the sums of x by an mma against ones):
a LOP3 per pair instead of three instructions. Up to SWAP_MAX_ROWS rows the operands swap: 16 weight rows are the
mma's A and x's rows B (8 per n tile), so one mma covers twice the weights, rows of x are not padded to 16, and a
lane reads one word of x per mma pair instead of two (8B's four shapes, H200, us per layer, c66a070 in one call ->
this in a later one: 3 rows 65.0 -> 51.7, 8 rows 67.2 -> 54.2; int4_gemm_mma{3,4}_sweep_h200.json). The two warps of
a row range add their sums at the end; split K as in the GEMV, counted per 32-row warp tile. PDL as in the GEMV. The
loads' addresses are fixed per thread but for the chunk (computed once: 4-5% of the kernel's time at 3-32 rows).
"""
from __future__ import annotations

import ctypes
import functools

import torch

GROUP = 128  # the group size the kernels take (16 int32 words of a weight row per group)
TILE_ROWS = 16  # weight rows per warp tile (two mma strips of 8)
MAX_ROWS = 16  # rows of x (A rows 0..15)
UNROLL = 2  # groups per batch (4 lost on most of the 8B's shapes); int4_gemm_mma: groups per chunk
GEMM_ROWS = 64  # int4_gemm_mma: rows of x (up to 4 mma A tiles of 16)
GEMM_TILE = 128  # int4_gemm_mma: weight rows per CTA (4 row ranges of 32 x 2 groups per chunk)
SWAP_MAX_ROWS = 8  # int4_gemm_mma: weights as the mma's A, x's rows as B (n tiles of 8) up to this many rows (two
# n tiles, 16 rows, lost in the engine: 8B INT4 batch 16 on the H200 5035.5 against 5192.2 tok/s)
POST_SCALE_MAX_TILES = 1  # int4_gemm_mma: scales after the mma up to this many A tiles of 16 rows (H200, 8B's four
# shapes, us per layer, dequantized pairs -> scales after: 3 rows 65.5 -> 65.0, 8: 68.1 -> 67.2, 16: 72.2 -> 71.0, 32:
# 98.9 -> 120.2, where the scales after spill registers; docs/benchmarks/int4_gemm_mma3_sweep_h200.json)

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define U UNROLL

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d;
}
__device__ __forceinline__ float bf(u32 v) { return __uint_as_float(v << 16); }  // low bf16 of v
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ u32 to_bf(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float round_bf(float f) { return bf(to_bf(f)); }
// C (+)= A B for one m16n8k16 tile: A the lane's quad (rows g: a.x, a.z; rows g + 8: a.y, a.w), B two bf16 pairs
__device__ __forceinline__ void mma(float* c, uint4 a, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma0(float* c, uint4 a, u32 b0, u32 b1) {  // C = A B
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3]) : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1),
        "f"(0.0f));
}
__device__ __forceinline__ float silu_mul(float g, float u) {  // rounded as silu_and_mul_triton rounds it
  return round_bf(round_bf(g / (1.0f + __expf(-g))) * u);
}

struct Batch {  // one batch of a warp: U groups of two 8-row strips (words, scales, offsets) per lane
  uint4 w[2][U];
  u32 s[2][U], o[2][U];
};

__device__ __forceinline__ void load_batch(Batch& B, const uint4* __restrict__ qw, const u32* __restrict__ sc,
                                           const u32* __restrict__ of, int tile, int group, int wpr, int hn,
                                           int lane) {
  const int g = lane >> 2, t = lane & 3;
  const uint4* wp = qw + (size_t)(tile * 16 + g) * wpr + group * 4 + t;  // words 4t .. 4t + 3 of the group
  const size_t so = (size_t)group * hn + tile * 8 + t;  // u32 pairs of rows tile * 16 + 2t, + 1 (strip 1: + 4)
  _Pragma("unroll") for (int u = 0; u < U; ++u) {
    B.w[0][u] = wp[u * 4];
    B.w[1][u] = wp[(size_t)8 * wpr + u * 4];
    B.s[0][u] = sc[so + (size_t)u * hn];
    B.s[1][u] = sc[so + (size_t)u * hn + 4];
    if (HAS_OFFSET) {
      B.o[0][u] = of[so + (size_t)u * hn];
      B.o[1][u] = of[so + (size_t)u * hn + 4];
    }
  }
}

// acc[r][2q + h]: x row g + 8q, weight row tile * 16 + r * 8 + 2t + h (x rows >= M: ignored)
__device__ __forceinline__ void multiply(const Batch& B, float (&acc)[2][4], const uint4* xrow, const float* glo,
                                         const float* ghi) {
  _Pragma("unroll") for (int u = 0; u < U; ++u) {
    uint4 xq[8];  // per word: the A quads of its two mmas
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {
      xq[2 * i] = xrow[u * 32 + i * 8];
      xq[2 * i + 1] = xrow[u * 32 + i * 8 + 1];
    }
    const float xlo = glo[u], xhi = HI ? ghi[u] : 0.0f;
    _Pragma("unroll") for (int r = 0; r < 2; ++r) {
      float c[4];
      const u32 w4[4] = {B.w[r][u].x, B.w[r][u].y, B.w[r][u].z, B.w[r][u].w};
      _Pragma("unroll") for (int i = 0; i < 4; ++i) {
        const u32 w = w4[i];
        const u32 b0 = lop3_and_or(w, 0x000F000Fu, 0x43004300u), b1 = lop3_and_or(w >> 4, 0x000F000Fu, 0x43004300u);
        if (i == 0) mma0(c, xq[0], b0, b1); else mma(c, xq[2 * i], b0, b1);
        mma(c, xq[2 * i + 1], lop3_and_or(w >> 8, 0x000F000Fu, 0x43004300u),
            lop3_and_or(w >> 12, 0x000F000Fu, 0x43004300u));
      }
      const float s0 = bf(B.s[r][u]), s1 = bf_hi(B.s[r][u]);
      const float m0 = (HAS_OFFSET ? bf(B.o[r][u]) : -8.0f * s0) - 128.0f * s0;
      const float m1 = (HAS_OFFSET ? bf_hi(B.o[r][u]) : -8.0f * s1) - 128.0f * s1;
      acc[r][0] += s0 * c[0] + m0 * xlo;
      acc[r][1] += s1 * c[1] + m1 * xlo;
      if (HI) {
        acc[r][2] += s0 * c[2] + m0 * xhi;
        acc[r][3] += s1 * c[3] + m1 * xhi;
      }
    }
  }
}

// split K, once a warp's partials are stored: count this split in; whether it is the last one of its tile to finish
__device__ __forceinline__ bool last_split(int* counts, int tile, int lane, int splits) {
  __syncwarp();
  __threadfence();
  int prev = 0;
  if (lane == 0) prev = atomicAdd(counts + tile, 1);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev != splits - 1) return false;
  __threadfence();
  return true;
}

__device__ __noinline__ void epilogue(float (&acc)[2][4], int tile, int lane, int M, int N, int so, int split,
                                      int splits, u16* out, float* part, int* counts, float* ss,
                                      const u32* __restrict__ nw, u16* hw, const float* rnorm) {
  const int g = lane >> 2, t = lane & 3, n0 = tile * 16 + 2 * t;
  if (splits > 1) {
    _Pragma("unroll") for (int q = 0; q < (HI ? 2 : 1); ++q) {
      if (g + 8 * q < M) {
        _Pragma("unroll") for (int r = 0; r < 2; ++r)
          *(float2*)(part + ((size_t)split * M + g + 8 * q) * N + n0 + r * 8) =
              make_float2(acc[r][2 * q], acc[r][2 * q + 1]);
      }
    }
    if (!last_split(counts, tile, lane, splits)) return;  // the last split to finish adds the partials, in order
    _Pragma("unroll") for (int q = 0; q < (HI ? 2 : 1); ++q) {
      if (g + 8 * q < M) {
        _Pragma("unroll") for (int r = 0; r < 2; ++r) { acc[r][2 * q] = 0.f; acc[r][2 * q + 1] = 0.f; }
        for (int sp = 0; sp < splits; ++sp) {
          _Pragma("unroll") for (int r = 0; r < 2; ++r) {
            const float2 p = __ldcg((const float2*)(part + ((size_t)sp * M + g + 8 * q) * N + n0 + r * 8));
            acc[r][2 * q] += p.x; acc[r][2 * q + 1] += p.y;
          }
        }
      }
    }
    if (lane == 0) atomicExch(counts + tile, 0);
  }
  _Pragma("unroll") for (int q = 0; q < (HI ? 2 : 1); ++q) {
    const int m = g + 8 * q;
    float sq = 0.0f;
    if (m < M) {
      _Pragma("unroll") for (int r = 0; r < 2; ++r) {
        float y0 = acc[r][2 * q], y1 = acc[r][2 * q + 1];
#if NORM
        y0 *= rnorm[m]; y1 *= rnorm[m];
#endif
        u32* o = (u32*)(out + (size_t)m * so + n0 + r * 8);
#if ADD
        const u32 res = *o;
        const float h0 = round_bf(round_bf(y0) + bf(res)), h1 = round_bf(round_bf(y1) + bf_hi(res));
        *o = to_bf(h0) | (to_bf(h1) << 16);
        const u32 w = nw[(n0 + r * 8) / 2];
        *(u32*)(hw + (size_t)m * so + n0 + r * 8) = to_bf(h0 * bf(w)) | (to_bf(h1 * bf_hi(w)) << 16);
        sq += h0 * h0 + h1 * h1;
#else
        *o = to_bf(y0) | (to_bf(y1) << 16);
#endif
      }
    }
#if ADD
    sq += __shfl_xor_sync(0xffffffffu, sq, 1);
    sq += __shfl_xor_sync(0xffffffffu, sq, 2);
    if (m < M && t == 0) ss[m * (N / 16) + tile] = sq;
#endif
  }
}

extern "C" __global__ void __launch_bounds__(128) int4_gemv_mma(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const u32* __restrict__ sc, const u32* __restrict__ of,
    u16* out, float* part, int* counts, float* ss, const u32* __restrict__ nw, u16* hw,
    int N, int K, int M, int sx, int so, int gps, int num_ss, float eps) {
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  const int G = K / 128, split = blockIdx.y, splits = gridDim.y, g0 = split * gps;
  const int gcount = min(gps, G - g0), cw = gcount * 16, n_tiles = N / 16, wpr = K / 32, hn = N / 2;
  const int slots = min(M, 8);  // x rows m and m + 8 share a slot (A rows g and g + 8)
  uint4* xs = smem;  // [slots, gps * 16 words, 2 quads] x permuted into the mma's A quads
  float* gsum = (float*)(xs + slots * gps * 32);  // [M, gps] sums of x per group
  float* rnorm = gsum + M * gps;  // [M] 1 / rms (NORM)

  const int tile0 = blockIdx.x * 4 + warp, tstep = gridDim.x * 4;
  const int nb = gcount / U;  // batches per tile (gps and the last split's groups are multiples of U)
  const int steps = tile0 < n_tiles ? ((n_tiles - 1 - tile0) / tstep + 1) * nb : 0;
  Batch A, B;
  // weights and scales do not depend on earlier kernels: the first batch is loaded before PDL's wait
  if (steps) load_batch(A, qw, sc, of, tile0, g0, wpr, hn, lane);
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  // x of this split's K range: with X0..X3 the pairs (x0, x4), (x1, x5), (x2, x6), (x3, x7) of word c of row m,
  // the quads (X0, X0', X1, X1') and (X2, X2', X3, X3') (' : row m + 8), word c of a group at slot
  // (c % 4) * 4 + c / 4 (the 4 lanes t of one word position read adjacent quads); sums of x per group
  for (int base = 0; base < M * cw; base += 128) {
    const int idx = base + threadIdx.x;
    float sum = 0.0f;
    if (idx < M * cw) {
      const int m = idx / cw, c = idx - m * cw;
      const u16* xp = x + (size_t)m * sx + 8 * (g0 * 16 + c);
      uint4 v = *(const uint4*)xp;
#if SILU_MUL
      const uint4 up = *(const uint4*)(xp + K);
      u32* vv = (u32*)&v; const u32* uu = (const u32*)&up;
      _Pragma("unroll") for (int i = 0; i < 4; ++i)
        vv[i] = to_bf(silu_mul(bf(vv[i]), bf(uu[i]))) | (to_bf(silu_mul(bf_hi(vv[i]), bf_hi(uu[i]))) << 16);
#endif
      sum = bf(v.x) + bf_hi(v.x) + bf(v.y) + bf_hi(v.y) + bf(v.z) + bf_hi(v.z) + bf(v.w) + bf_hi(v.w);
      u32* q = (u32*)(xs + ((m & 7) * gps * 16 + (c & ~15) + (c & 3) * 4 + ((c & 15) >> 2)) * 2) + (m >> 3);
      q[0] = prmt(v.x, v.z, 0x5410); q[2] = prmt(v.x, v.z, 0x7632);
      q[4] = prmt(v.y, v.w, 0x5410); q[6] = prmt(v.y, v.w, 0x7632);
    }
    _Pragma("unroll") for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (idx < M * cw && (idx & 15) == 0) { const int m = idx / cw; gsum[m * gps + (idx - m * cw) / 16] = sum; }
  }
#if NORM
  if (threadIdx.x < M) {
    float s = 0.0f;
    for (int i = 0; i < num_ss; ++i) s += ss[threadIdx.x * num_ss + i];
    rnorm[threadIdx.x] = rsqrtf(s / K + eps);
  }
#endif
  __syncthreads();
  if (!steps) return;

  const uint4* xrow = xs + (min(g, slots - 1) * gps * 16 + t) * 2;  // lanes of rows >= M store nothing
  const float* glo = gsum + min(g, M - 1) * gps;
  const float* ghi = gsum + min(g + 8, M - 1) * gps;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  int tile = tile0, b = 0;
  // two batches in registers, the next one loaded while the current one is multiplied (no copies between them)
#define STEP(CUR, NXT, S)                                                                           \
  {                                                                                                 \
    const int b2 = b + 1 == nb ? 0 : b + 1, tile2 = b + 1 == nb ? tile + tstep : tile;              \
    if ((S) + 1 < steps) load_batch(NXT, qw, sc, of, tile2, g0 + b2 * U, wpr, hn, lane);            \
    multiply(CUR, acc, xrow + b * U * 32, glo + b * U, ghi + b * U);                                \
    if (b + 1 == nb) {                                                                              \
      if (PDL && (S) + 1 == steps) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  \
      epilogue(acc, tile, lane, M, N, so, split, splits, out, part, counts, ss, nw, hw, rnorm);     \
      _Pragma("unroll") for (int r = 0; r < 2; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f; \
    }                                                                                               \
    b = b2; tile = tile2;                                                                           \
  }
  for (int s = 0; s < steps; s += 2) {
    STEP(A, B, s)
    if (s + 1 == steps) break;
    STEP(B, A, s + 1)
  }
}
// ---- int4_gemm_mma: decode batches of 1-64 rows ----
// CTA: 8 warps over 128 weight rows and the split's K range in chunks of U groups: warp w takes rows (w % 4) * 32
// .. + 31 (four 8-row strips) and group w / 4 of every chunk (the two warps of a row range add their sums at the
// end), all M rows of x as MT mma A tiles of 16 (SW: the weights as A, x's rows as NT B tiles of 8). Weights,
// scales, offsets and x stream through STAGES shared-memory slots by cp.async (x as it lies in memory, 16-byte words
// of 8 values, XOR-swizzled). Without PS or SW each weight pair is dequantized once to bf16 (LOP3 to 128 + q, two
// bf16x2 FMAs: q, then s q + m, rounded once; dequantize_int4_triton rounds s q + m to fp32 first, so the two can
// rarely be 1 ulp apart) and feeds the mmas of all MT row tiles; with PS or SW the mma takes 128 + q and the scales
// and offsets follow per group. A lane turns its words of x into mma quads with PRMTs.
#ifndef MT
#define MT 1
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef PS
#define PS 0  // the scales after the mma (per group) rather than on the dequantized weights
#endif
#ifndef SW
#define SW 0  // up to 16 rows: the weights as the mma's A (16 rows), x's rows as B (NT tiles of 8), scales after
#endif
#ifndef NT
#define NT 1
#endif
#define NA (SW ? NT * 8 : MT * 16)  // accumulators per lane
static_assert(!SW || (MT == 1 && NT <= 2), "int4_gemm_mma: the swapped layout takes up to 16 rows of x");
#define CW (U * 16)  // words (8 values) of x per row per chunk
static_assert(U == 2, "int4_gemm_mma: a chunk is 2 groups (one per half of the CTA's warps)");
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory"); }
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {  // bf16x2 a * b + c, rounded once
  u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}

// word c (8 values) of x row m in a chunk buffer: the low 3 bits of c XOR (c / 8 % 2) * 2 + m % 2, so that the 8
// lanes of a quarter-warp (rows g = 2j, 2j + 1; words 4t + i) read distinct banks
__device__ __forceinline__ int xpos(int m, int c) { return m * CW + (c ^ (((c >> 3) & 1) << 1) ^ (m & 1)); }

extern "C" __global__ void __launch_bounds__(256, MT <= 2 ? 2 : 1) int4_gemm_mma(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const u16* __restrict__ sc, const u16* __restrict__ of,
    u16* out, float* part, int* counts, int N, int K, int M, int sx, int so, int cps) {
  extern __shared__ uint4 smem[];
  uint4* ws = smem;                          // [STAGES][128 rows][8 pieces]
  uint4* ss = ws + STAGES * 1024;            // [STAGES][U][16]: 128 bf16 scales per group
  uint4* os = ss + STAGES * U * 16;          // offsets, likewise
  uint4* xs = os + STAGES * U * 16;          // [STAGES][M][CW words]
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3, warp = tid >> 5, rq = warp & 3,
            u = warp >> 2;
  const int n0 = blockIdx.x * 128, wpr = K / 32, chunks = K / (128 * U), c0 = blockIdx.y * cps;
  const int nb = min(cps, chunks - c0), split = blockIdx.y, splits = gridDim.y;
  // a chunk's loads, their addresses fixed but for the chunk: thread tid copies 16-byte piece tid % 8 of weight rows
  // tid / 8 + 32 j (piece p of row r stored at p ^ 4 (r & 1), so that the 8 lanes of a quarter-warp, rows 2j and
  // 2j + 1, read distinct banks); threads 0-31 the chunk's scales, 32-63 its offsets (group-major, 128 per group)
  const uint4* wsrc = qw + (size_t)(n0 + (tid >> 3)) * wpr + c0 * U * 4 + (tid & 7);
  const size_t w32 = (size_t)32 * wpr;
  const int wdst = (tid >> 3) * 8 + ((tid & 7) ^ (((tid >> 3) & 1) << 2));
  const bool sload = tid < U * 16 || (HAS_OFFSET && tid < 2 * U * 16);
  const uint4* ssrc = (const uint4*)((tid < U * 16 ? sc : of) + (size_t)(c0 * U + ((tid & 31) >> 4)) * N + n0) +
                      (tid & 15);
  uint4* sdst = (tid < U * 16 ? ss : os) + (tid & 31);
  auto load = [&](int c, int sl) {  // chunk c's weights, scales and offsets into slot sl
    const size_t co = (size_t)c * U * 4;
    _Pragma("unroll") for (int j = 0; j < 4; ++j) cp_async16(ws + sl * 1024 + wdst + j * 256, wsrc + co + j * w32);
    if (sload) cp_async16(sdst + sl * U * 16, ssrc + (size_t)c * U * N / 8);
  };
  auto load_x = [&](int c, int sl) {  // x of chunk c (M rows x CW words) into slot sl, swizzled as xpos says
    for (int i = tid; i < M * CW; i += 256)
      cp_async16(xs + sl * M * CW + xpos(i / CW, i % CW),
                 x + (size_t)(i / CW) * sx + (c0 + c) * U * 128 + (i % CW) * 8);
  };
  // weights do not depend on earlier kernels: the first chunks' are requested before PDL's wait, then x's (the
  // first commit group holds them all and chunk 0's x, group s chunk s's x)
  for (int s = 0; s < STAGES - 1 && s < nb; ++s) load(s, s);
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nb) load_x(s, s);
    cp_commit();
  }
  // acc[b][r][2q + h]: x row b * 16 + g + 8q, weight row n0 + rq * 32 + r * 8 + 2t + h; SW: acc[nt][T][2q + h]: x
  // row nt * 8 + 2t + h, weight row n0 + rq * 32 + T * 16 + g + 8q
  float acc[SW ? NT : MT][SW ? 2 : 4][4];
  float* const accf = &acc[0][0][0];
  _Pragma("unroll") for (int e = 0; e < NA; ++e) accf[e] = 0.f;
  // the words of x this lane reads: word u * 16 + 4t + i of rows b * 16 + g (+ 8) (SW: rows nt * 8 + g) (rows >= M:
  // row M - 1, unused) at xo + (i ^ xw) (xpos with the XOR of the low bits apart)
  int xo[MT][2], xw[MT][2];
  _Pragma("unroll") for (int b = 0; b < MT; ++b)
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {
      const int m = min(SW ? h * 8 + g : b * 16 + g + 8 * h, M - 1);
      xo[b][h] = m * CW + u * 16 + 4 * t;
      xw[b][h] = ((t >> 1) << 1) ^ (m & 1);
    }
  int sl = 0, nsl = STAGES - 1;  // the slots of chunks c and c + STAGES - 1
  for (int c = 0; c < nb; ++c) {
    cp_wait();
    __syncthreads();  // chunk c's weights and x are in; every warp is done with chunk c - 1's slots
    if (c + STAGES - 1 < nb) {
      load(c + STAGES - 1, nsl);
      load_x(c + STAGES - 1, nsl);
    }
    cp_commit();
    nsl = nsl + 1 == STAGES ? 0 : nsl + 1;
    const uint4* xsb = xs + sl * M * CW;
    uint4 wv[4];
    _Pragma("unroll") for (int r = 0; r < 4; ++r) {
      const int row = rq * 32 + r * 8 + g;
      wv[r] = ws[sl * 1024 + row * 8 + ((u * 4 + t) ^ ((row & 1) << 2))];
    }
#if SW
    // the mma's A: weight rows g, g + 8 of each 16-row half T of the warp's 32 (words wv[2T], wv[2T + 1]) as 128 + q;
    // B: x rows nt * 8 + g. P = sum (128 + q) x per group, the sums of x by an mma with ones as A; then s P + (m -
    // 128 s) sum x (symmetric: m = -8 s): per word pair (rows g, g + 8) 8 LOP3s and two mmas per n tile
    float cr[2][NT][4], xsum[NT][4];
    const u32 one = 0x3F803F80u;  // bf16 1, 1
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {
      u32 xb[NT][4];  // word 4t + i of x row nt * 8 + g: (x0 x4), (x1 x5), (x2 x6), (x3 x7)
      _Pragma("unroll") for (int nt = 0; nt < NT; ++nt) {
        const uint4 v = xsb[xo[0][nt] + (i ^ xw[0][nt])];
        xb[nt][0] = prmt(v.x, v.z, 0x5410); xb[nt][1] = prmt(v.x, v.z, 0x7632);
        xb[nt][2] = prmt(v.y, v.w, 0x5410); xb[nt][3] = prmt(v.y, v.w, 0x7632);
        if (i == 0) mma0(xsum[nt], make_uint4(one, one, one, one), xb[nt][0], xb[nt][1]);
        else mma(xsum[nt], make_uint4(one, one, one, one), xb[nt][0], xb[nt][1]);
        mma(xsum[nt], make_uint4(one, one, one, one), xb[nt][2], xb[nt][3]);
      }
      _Pragma("unroll") for (int T = 0; T < 2; ++T) {
        const u32 w0 = i == 0 ? wv[2 * T].x : i == 1 ? wv[2 * T].y : i == 2 ? wv[2 * T].z : wv[2 * T].w;
        const u32 w1 = i == 0 ? wv[2 * T + 1].x : i == 1 ? wv[2 * T + 1].y : i == 2 ? wv[2 * T + 1].z : wv[2 * T + 1].w;
        u32 p[4], q[4];  // nibbles j, j + 4 of rows g, g + 8
        _Pragma("unroll") for (int j = 0; j < 4; ++j) {
          p[j] = lop3_and_or(w0 >> (4 * j), 0x000F000Fu, 0x43004300u);
          q[j] = lop3_and_or(w1 >> (4 * j), 0x000F000Fu, 0x43004300u);
        }
        _Pragma("unroll") for (int nt = 0; nt < NT; ++nt) {
          if (i == 0) mma0(cr[T][nt], make_uint4(p[0], q[0], p[1], q[1]), xb[nt][0], xb[nt][1]);
          else mma(cr[T][nt], make_uint4(p[0], q[0], p[1], q[1]), xb[nt][0], xb[nt][1]);
          mma(cr[T][nt], make_uint4(p[2], q[2], p[3], q[3]), xb[nt][2], xb[nt][3]);
        }
      }
    }
    {
      const u16* ssl = (const u16*)(ss + sl * U * 16) + u * 128 + rq * 32 + g;  // weight rows r * 8 + g
      const u16* osl = (const u16*)(os + sl * U * 16) + u * 128 + rq * 32 + g;
      _Pragma("unroll") for (int r = 0; r < 4; ++r) {
        const float sr = bf(ssl[r * 8]), mr = (HAS_OFFSET ? bf(osl[r * 8]) : -8.0f * sr) - 128.0f * sr;
        _Pragma("unroll") for (int nt = 0; nt < NT; ++nt)
          _Pragma("unroll") for (int h = 0; h < 2; ++h)
            acc[nt][r >> 1][2 * (r & 1) + h] += sr * cr[r >> 1][nt][2 * (r & 1) + h] + mr * xsum[nt][h];
      }
    }
#else
#if PS
    // P = sum (128 + q) x per group and weight row, the sums of x per group by an mma against ones; then s P + (m -
    // 128 s) sum x (symmetric: m = -8 s). Per weight pair: a LOP3 (and a shift) besides the mma.
    float cr[4][MT][4], xsum[MT][4];
#else
    // each weight pair dequantized once to bf16: 128 + q, then q (or q - 8), then s q + m
    u32 s2[4], m2[4];
    {
      const u16* ssl = (const u16*)(ss + sl * U * 16) + u * 128 + rq * 32 + g;
      const u16* osl = (const u16*)(os + sl * U * 16) + u * 128 + rq * 32 + g;
      _Pragma("unroll") for (int r = 0; r < 4; ++r) {
        s2[r] = (u32)ssl[r * 8] * 0x10001u;
        m2[r] = HAS_OFFSET ? (u32)osl[r * 8] * 0x10001u : 0x80008000u;  // symmetric: -0, q - 8 below
      }
    }
#endif
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {
      uint4 xa[MT][2];  // the A quads of word 4t + i: (x0 x4, x1 x5) and (x2 x6, x3 x7) of rows g, g + 8
      _Pragma("unroll") for (int b = 0; b < MT; ++b) {
        const uint4 v = xsb[xo[b][0] + (i ^ xw[b][0])], w = xsb[xo[b][1] + (i ^ xw[b][1])];
        xa[b][0] = make_uint4(prmt(v.x, v.z, 0x5410), prmt(w.x, w.z, 0x5410), prmt(v.x, v.z, 0x7632),
                              prmt(w.x, w.z, 0x7632));
        xa[b][1] = make_uint4(prmt(v.y, v.w, 0x5410), prmt(w.y, w.w, 0x5410), prmt(v.y, v.w, 0x7632),
                              prmt(w.y, w.w, 0x7632));
#if PS
        const u32 one = 0x3F803F80u;  // bf16 1, 1
        if (i == 0) mma0(xsum[b], xa[b][0], one, one); else mma(xsum[b], xa[b][0], one, one);
        mma(xsum[b], xa[b][1], one, one);
#endif
      }
      _Pragma("unroll") for (int r = 0; r < 4; ++r) {
        const u32 wd = i == 0 ? wv[r].x : i == 1 ? wv[r].y : i == 2 ? wv[r].z : wv[r].w;
        u32 bq[4];  // nibbles j, j + 4 of the word
        _Pragma("unroll") for (int j = 0; j < 4; ++j) {
          bq[j] = lop3_and_or(wd >> (4 * j), 0x000F000Fu, 0x43004300u);  // bf16 128 + q
#if !PS
          bq[j] = fma2(fma2(bq[j], 0x3F803F80u, HAS_OFFSET ? 0xC300C300u : 0xC308C308u), s2[r], m2[r]);
#endif
        }
        _Pragma("unroll") for (int b = 0; b < MT; ++b) {
#if PS
          if (i == 0) mma0(cr[r][b], xa[b][0], bq[0], bq[1]); else mma(cr[r][b], xa[b][0], bq[0], bq[1]);
          mma(cr[r][b], xa[b][1], bq[2], bq[3]);
#else
          mma(acc[b][r], xa[b][0], bq[0], bq[1]);
          mma(acc[b][r], xa[b][1], bq[2], bq[3]);
#endif
        }
      }
    }
#if PS
    {
      const u32* sp = (const u32*)(ss + sl * U * 16) + u * 64 + rq * 16 + t;  // weight rows r * 8 + 2t, + 1
      const u32* op = (const u32*)(os + sl * U * 16) + u * 64 + rq * 16 + t;
      _Pragma("unroll") for (int r = 0; r < 4; ++r) {
        const u32 s = sp[r * 4];
        const float s0 = bf(s), s1 = bf_hi(s);
        float m0 = -136.0f * s0, m1 = -136.0f * s1;
        if (HAS_OFFSET) {
          const u32 o = op[r * 4];
          m0 = bf(o) - 128.0f * s0;
          m1 = bf_hi(o) - 128.0f * s1;
        }
        _Pragma("unroll") for (int b = 0; b < MT; ++b) {
          acc[b][r][0] += s0 * cr[r][b][0] + m0 * xsum[b][0];
          acc[b][r][1] += s1 * cr[r][b][1] + m1 * xsum[b][1];
          acc[b][r][2] += s0 * cr[r][b][2] + m0 * xsum[b][2];
          acc[b][r][3] += s1 * cr[r][b][3] + m1 * xsum[b][3];
        }
      }
    }
#endif
#endif  // SW
    sl = sl + 1 == STAGES ? 0 : sl + 1;
  }
#if PDL
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();  // the weight slots are free: the second group's warps hand their sums over
  float* red = (float*)smem;  // [4 row ranges][NA values][32 lanes]
  if (u == 1) {
    _Pragma("unroll") for (int e = 0; e < NA; ++e) red[(rq * NA + e) * 32 + lane] = accf[e];
  }
  __syncthreads();
  if (u == 1) return;
  _Pragma("unroll") for (int e = 0; e < NA; ++e) accf[e] += red[(rq * NA + e) * 32 + lane];
#if SW
  // accumulator e: x row em(e), weight row nn + en(e) (as acc's layout says)
  const int tile = blockIdx.x * 4 + rq, nn = n0 + rq * 32;
  auto em = [&](int e) { return (e >> 3) * 8 + 2 * t + (e & 1); };
  auto en = [&](int e) { return ((e >> 2) & 1) * 16 + g + ((e >> 1) & 1) * 8; };
  if (splits > 1) {
    _Pragma("unroll") for (int e = 0; e < NA; ++e)
      if (em(e) < M) part[((size_t)split * M + em(e)) * N + nn + en(e)] = accf[e];
    if (!last_split(counts, tile, lane, splits)) return;  // the last split to finish adds the partials, in order
    _Pragma("unroll") for (int e = 0; e < NA; ++e) accf[e] = 0.f;
    for (int sp = 0; sp < splits; ++sp) {  // all of a split's loads at once (one after another took 2-3 us a call)
      const float* ps = part + (size_t)sp * M * N + nn;
      _Pragma("unroll") for (int e = 0; e < NA; ++e)
        if (em(e) < M) accf[e] += __ldcg(ps + (size_t)em(e) * N + en(e));
    }
    if (lane == 0) atomicExch(counts + tile, 0);
  }
  _Pragma("unroll") for (int e = 0; e < NA; ++e)
    if (em(e) < M) out[(size_t)em(e) * so + nn + en(e)] = to_bf(accf[e]);
#else
  const int tile = blockIdx.x * 4 + rq, nn = n0 + rq * 32 + 2 * t;
  if (splits > 1) {
    _Pragma("unroll") for (int b = 0; b < MT; ++b)
      _Pragma("unroll") for (int q = 0; q < 2; ++q) {
        const int m = b * 16 + g + 8 * q;
        if (m < M) {
          _Pragma("unroll") for (int r = 0; r < 4; ++r)
            *(float2*)(part + ((size_t)split * M + m) * N + nn + r * 8) =
                make_float2(acc[b][r][2 * q], acc[b][r][2 * q + 1]);
        }
      }
    if (!last_split(counts, tile, lane, splits)) return;  // the last split to finish adds the partials, in order
    _Pragma("unroll") for (int b = 0; b < MT; ++b)
      _Pragma("unroll") for (int q = 0; q < 2; ++q) {
        const int m = b * 16 + g + 8 * q;
        _Pragma("unroll") for (int r = 0; r < 4; ++r) { acc[b][r][2 * q] = 0.f; acc[b][r][2 * q + 1] = 0.f; }
        if (m < M) {
          for (int sp = 0; sp < splits; ++sp) {
            _Pragma("unroll") for (int r = 0; r < 4; ++r) {
              const float2 p = __ldcg((const float2*)(part + ((size_t)sp * M + m) * N + nn + r * 8));
              acc[b][r][2 * q] += p.x; acc[b][r][2 * q + 1] += p.y;
            }
          }
        }
      }
    if (lane == 0) atomicExch(counts + tile, 0);
  }
  _Pragma("unroll") for (int b = 0; b < MT; ++b)
    _Pragma("unroll") for (int q = 0; q < 2; ++q) {
      const int m = b * 16 + g + 8 * q;
      if (m < M) {
        _Pragma("unroll") for (int r = 0; r < 4; ++r)
          *(u32*)(out + (size_t)m * so + nn + r * 8) = to_bf(acc[b][r][2 * q]) | (to_bf(acc[b][r][2 * q + 1]) << 16);
      }
    }
#endif
}
"""


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, then a 64-byte union (8-byte aligned)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int), ("rest", ctypes.c_ubyte * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (CUDA, compute capability 8.0 or later, NVRTC loadable)."""
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        _kernel(device.index if device.index is not None else torch.cuda.current_device(), False, False, False, True,
                False)
    except Exception:  # no NVRTC in this install: the Triton GEMV
        return False
    return True


@functools.cache
def _kernel(index: int, silu_mul: bool, norm: bool, add: bool, has_offset: bool, hi: bool, name: str = "int4_gemv_mma",
            mt: int = 1, stages: int = 4, ps: bool = False, nt: int = 0):
    """(kernel, pdl) for one variant on device `index` (hi: more than 8 rows of x; int4_gemm_mma: mt row tiles, ps
    the scales after the mma, nt > 0 the swapped layout with nt n tiles of 8 rows)."""
    pdl = torch.cuda.get_device_capability(index)[0] >= 9
    defines = dict(UNROLL=UNROLL, SILU_MUL=int(silu_mul), NORM=int(norm), ADD=int(add), HAS_OFFSET=int(has_offset),
                   PDL=int(pdl), HI=int(hi), MT=mt, STAGES=stages, PS=int(ps), SW=int(nt > 0), NT=max(nt, 1))
    return compile_kernel(index, _SOURCE, name, defines), pdl


def compile_kernel(index: int, source: str, name: str, defines: dict):
    """The kernel `name` of CUDA C++ `source` with `defines` (#define lines) prepended, compiled by NVRTC for
    device `index` and loaded there."""
    from torch.cuda import _utils
    major, minor = torch.cuda.get_device_capability(index)
    source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + source
    with torch.cuda.device(index):
        binary, mangled = _utils._nvrtc_compile(source, name, f"{major}{minor}")
        return _utils._cuda_load_module(binary, [mangled])[mangled]


def _launch(kernel, pdl: bool, index: int, grid: tuple, shared_mem: int, args: list, threads: int = 128) -> None:
    """cuLaunchKernelEx on device `index`'s current stream, with PDL's attribute where `pdl`."""
    if index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return _launch(kernel, pdl, index, grid, shared_mem, args, threads)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    if shared_mem >= 48 * 1024 and getattr(kernel, "_tuili_smem", 0) < shared_mem:
        err = lib.cuFuncSetAttribute(kernel.func, _MAX_DYNAMIC_SHARED_SIZE_BYTES, ctypes.c_int(shared_mem))
        if err:
            raise RuntimeError(f"{shared_mem} bytes of shared memory: CUDA error {err}")
        kernel._tuili_smem = shared_mem
    cargs = []
    for a in args:
        if isinstance(a, torch.Tensor):
            cargs.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, float):
            cargs.append(ctypes.c_float(a))
        else:
            cargs.append(ctypes.c_int(a))
    params = (ctypes.c_void_p * len(cargs))(*[ctypes.cast(ctypes.byref(c), ctypes.c_void_p) for c in cargs])
    attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)  # programmaticStreamSerializationAllowed
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(threads, 1, 1),
                           shared_mem=shared_mem, stream=torch.cuda.current_stream().cuda_stream,
                           attrs=ctypes.pointer(attr) if pdl else None, num_attrs=1 if pdl else 0)
    err = lib.cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


def splits_for(n: int, k: int, m: int, num_sms: int) -> int:
    """K splits (a power of two, whole batches per split): about 3 CTAs per SM, and at most 160 / 72 / 36 KB
    of weights per CTA for 1-3 / 4-7 / 8-16 rows of x (more rows: a longer x prologue per CTA, more splits
    pay). From the 8B's decode shapes on the H100 (scripts/probe_int4_mma.py, int4_mma_h100.json)."""
    ctas, groups = -(-n // (TILE_ROWS * 4)), k // GROUP
    cap = (160 if m <= 3 else 72 if m < 8 else 36) << 10
    splits = 1
    while groups // (2 * splits) >= UNROLL and (4 * ctas * splits < 11 * num_sms or n * k // 2 > cap * ctas * splits):
        splits *= 2
    return splits


def supports(n: int, k: int) -> bool:
    """Whether a layer of this shape (INT4, group 128) fits the kernel."""
    return k % (GROUP * UNROLL) == 0 and n % TILE_ROWS == 0


def _check_scales(name: str, n: int, k: int, scales: torch.Tensor, offsets: torch.Tensor | None,
                  counts: torch.Tensor | None) -> None:
    if any(t is not None and (t.shape != (n, k // GROUP) or t.dtype != torch.bfloat16) for t in (scales, offsets)) \
            or (counts is not None and counts.dtype != torch.int32):
        raise ValueError(f"{name} needs bf16 scales and offsets of shape [{n}, {k // GROUP}] and int32 counts")


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              counts: torch.Tensor, silu_mul: bool = False, norm: tuple | None = None,
              residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
              splits: int | None = None):
    """x [M, K] (bf16, M <= 16) @ W^T for an INT4 g128 layer (qweight uint8 [N, K/2], scales/offsets group-major
    bf16 [N, K/128]); the fused forms as quant_matmul.quant_linear_triton's GEMV (silu_mul, norm, residual +
    norm_weight -> (h, hw, ss)). counts: int32 zeros, at least N / 16 (self-resetting)."""
    m, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    n = qweight.shape[0]
    if x.dtype != torch.bfloat16 or not 1 <= m <= MAX_ROWS or not supports(n, k) or 2 * qweight.shape[1] != k:
        raise ValueError(f"int4_gemv takes bf16 x of at most {MAX_ROWS} rows, K % {GROUP * UNROLL} == 0, "
                         f"N % {TILE_ROWS} == 0")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16 or not qweight.is_contiguous() \
            or scales.stride() != (1, n) or (offsets is not None and offsets.stride() != (1, n)):
        raise ValueError("int4_gemv needs contiguous rows of x and qweight, group-major scales and offsets")
    _check_scales("int4_gemv", n, k, scales, offsets, counts)
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1
                                 or residual.stride(0) % 2 or norm_weight is None or norm_weight.shape != (n,)
                                 or norm_weight.dtype != x.dtype or not norm_weight.is_contiguous()):
        raise ValueError(f"residual must be a bf16 [{m}, {n}] tensor with an {n}-value norm_weight")
    if norm is not None and (norm[1].dtype != torch.float32 or norm[1].shape[0] != m or not norm[1].is_contiguous()):
        raise ValueError(f"norm needs fp32 sums of squares [{m}, tiles], contiguous")
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = splits or splits_for(n, k, m, num_sms)
    groups = k // GROUP
    while True:
        gps = -(-groups // (splits * UNROLL)) * UNROLL  # whole batches in every split
        shared = min(m, 8) * gps * 16 * 32 + m * gps * 4 + m * 4  # x's A quads, group sums, 1 / rms
        if shared <= 96 << 10 or gps == UNROLL:
            break
        splits *= 2
    splits = -(-groups // gps)
    tiles = n // TILE_ROWS
    if splits > 1 and counts.numel() < tiles:
        raise ValueError(f"split K needs {tiles} counters")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    kernel, pdl = _kernel(index, silu_mul, norm is not None, residual is not None, offsets is not None, m > 8)
    if residual is not None:
        out = residual
        hw = torch.empty_like(out)
        ss = torch.empty(m, tiles, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        hw = out
        ss = norm[1] if norm is not None else out
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (-(-tiles // 4), splits, 1)
    _launch(kernel, pdl, index, grid, shared,
            [x, qweight, scales, offsets if offsets is not None else scales, out, part, counts, ss,
             norm_weight if norm_weight is not None else out, hw, n, k, m, x.stride(0), out.stride(0), gps,
             ss.shape[1] if norm is not None else 0, float(norm[0]) if norm is not None else 0.0])
    return (out, hw, ss) if residual is not None else out


def gemm_supports(n: int, k: int) -> bool:
    """Whether a layer of this shape (INT4, group 128) fits int4_gemm_mma."""
    return k % (GROUP * UNROLL) == 0 and n % GEMM_TILE == 0


def gemm_splits(n: int, k: int, m: int, num_sms: int) -> int:
    """K splits for int4_gemm_mma: doubled while the CTAs stay within what the SMs hold at once (two per SM for up
    to 32 rows: 128 registers a thread; one past that) and each split keeps 4+ chunks (2+ up to 16 rows). From the
    8B's decode shapes (scripts/sweep_int4_gemm.py --mma, H200, int4_gemm_mma2_sweep_h200.json): qkv 4 splits, o 8
    up to 16 rows (8.2-9.7 us against 9.4-10.3 in 4) and 4 at 17-32, down 8, gate_up 1."""
    ctas, chunks, splits = n // GEMM_TILE, k // (GROUP * UNROLL), 1
    resident = 2 if m <= 32 else 1
    least = 2 if m <= 16 else 4
    while 2 * ctas * splits <= resident * num_sms and chunks >= 2 * least * splits:
        splits *= 2
    return splits


def gemm_shared(m: int, stages: int) -> int:
    """int4_gemm_mma's shared memory (bytes) for m rows of x: per slot 128 weight rows x 2 groups, their scales and
    offsets, x's rows (the split sums' hand-over at the end reuses the slots)."""
    return stages * (GEMM_TILE * GROUP * UNROLL // 2 + 2 * UNROLL * GEMM_TILE * 2 + m * GROUP * UNROLL * 2)


def gemm_stages(m: int, limit: int) -> int:
    """Chunks int4_gemm_mma keeps in shared memory for m rows of x: 3 (the 8B's four decode shapes, H200, us per
    layer in 3 against 4 slots: 16 rows 76.3 / 79.2, 32 rows 103.2 / 112.0, 48 rows 133.6 / 135.5, 64 rows 172.7 /
    174.1; int4_gemm_mma2_sweep_h200.json), 2 where a block may not have that much shared memory (`limit` bytes: 64
    rows in 3 slots take 147 KB, more than an sm_86/89 GPU gives)."""
    stages = 3
    while stages > 2 and gemm_shared(m, stages) > limit:
        stages -= 1
    return stages


@functools.cache
def _shared_limit(index: int) -> int:
    """The shared memory a block may opt into on device `index` (bytes): the SM's less the 1 KB it reserves."""
    props = torch.cuda.get_device_properties(index)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    return per_sm - 1024 if per_sm else {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448}.get(
        (props.major, props.minor), 101376)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              counts: torch.Tensor | None, splits: int | None = None, stages: int | None = None,
              post_scale: bool | None = None, swap: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16, M <= 64) @ W^T for an INT4 g128 layer (qweight uint8 [N, K/2], scales/offsets group-major bf16
    [N, K/128]) through int4_gemm_mma: the weights streamed through shared memory by cp.async, x staged per chunk
    of 256 K values, every weight pair multiplied against all of x's rows. counts: int32 zeros, at least N / 16
    (self-resetting; None with splits=1). stages: chunks in shared memory (default `gemm_stages`). post_scale: the
    scales after the mma (default up to POST_SCALE_MAX_TILES row tiles of 16); swap: the weights as the mma's A
    (default up to SWAP_MAX_ROWS rows; never past 16; it scales after the mma whatever post_scale says)."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.dtype != torch.bfloat16 or not 1 <= m <= GEMM_ROWS or not gemm_supports(n, k) or 2 * qweight.shape[1] != k:
        raise ValueError(f"int4_gemm takes bf16 x of at most {GEMM_ROWS} rows, K % {GROUP * UNROLL} == 0, "
                         f"N % {GEMM_TILE} == 0")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16 or not qweight.is_contiguous() \
            or qweight.data_ptr() % 16 or scales.stride() != (1, n) or scales.data_ptr() % 16 \
            or (offsets is not None and (offsets.stride() != (1, n) or offsets.data_ptr() % 16)):
        raise ValueError("int4_gemm needs 16-byte aligned contiguous rows of x and qweight, group-major scales and "
                         "offsets")
    _check_scales("int4_gemm", n, k, scales, offsets, counts)
    if stages is not None and stages < 2:
        raise ValueError("int4_gemm needs 2+ stages (one chunk multiplied while the next arrives)")
    chunks = k // (GROUP * UNROLL)
    splits = min(splits or gemm_splits(n, k, m, torch.cuda.get_device_properties(x.device).multi_processor_count),
                 chunks)
    per_split = -(-chunks // splits)
    splits = -(-chunks // per_split)
    tiles = n // 16
    if splits > 1 and (counts is None or counts.numel() < tiles):
        raise ValueError(f"split K needs {tiles} counters")
    mt = -(-m // 16)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    stages = stages or gemm_stages(m, _shared_limit(index))
    ps = mt <= POST_SCALE_MAX_TILES if post_scale is None else post_scale
    nt = -(-m // 8) if (m <= SWAP_MAX_ROWS if swap is None else swap) and m <= 16 else 0
    kernel, pdl = _kernel(index, False, False, False, offsets is not None, True, "int4_gemm_mma", mt, stages,
                          ps and not nt, nt)  # the swapped layout always scales after the mma
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    _launch(kernel, pdl, index, (n // GEMM_TILE, splits, 1), gemm_shared(m, stages),
            [x, qweight, scales, offsets if offsets is not None else scales, out, part,
             counts if counts is not None else out, n, k, m, x.stride(0), out.stride(0), per_split], threads=256)
    return out
