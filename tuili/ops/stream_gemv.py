"""Batch-1 decode GEMV for INT4 g128 and INT8 per-channel weights on Hopper: weights streamed into shared memory by
bulk copies (TMA, one per stage), the first stages copied before PDL's wait (CUDA C++ compiled at first use by
NVRTC; quant_matmul.quant_linear_triton calls it for one row of bf16 x on sm_90+).

Why: the Triton GEMV (quant_matmul._gemv_tile) streams each layer's weights at ~2.74 TB/s but pays ~3 us per call
that no tile choice removed (filling the pipeline after the previous kernel ends, the tail of the last wave), and
the DRAM sits idle while the decode attention runs (~7 us per layer): at batch 1 the 8B INT4 step spends ~0.6 of
its 2.36 ms there (docs/benchmarks). Weights do not depend on the kernels before, only x does. Here each kernel
runs one CTA per SM over a contiguous range of weight rows and lets the next kernel launch at its start (PDL); the
next kernel's CTAs are placed beside it, issue their first stages (up to ~64 KB per SM) and their scales, and
only then wait: the bytes of the next matmul are on their way while the current one (or the attention) ends.

How: thread t owns 16-value slices t, t + T, ... of K (x for them in registers, pre-scaled); a stage is R
consecutive weight rows (one bulk copy into a ring of NST stages, an mbarrier each). Values are read in place as
denormal floats (one AND per value, as the Triton GEMV: a nibble or byte masked in place and read as a float is
q * 2^(pos - 149), exact; x is scaled by 2^(77 - pos) so every product is q x 2^-72), INT4 scaled per slice by
its group's scale and offset, INT8 (stored q + 128 after an XOR) by the row's scale at the end. Each stage's R
row sums are reduced across the CTA in a fixed order (deterministic). Fused as in the Triton GEMV: silu(gate) *
up of x, the input's RMSNorm (x = h * w and the sums of squares ss) and the residual add with the next norm's
inputs (out, hw and one sum of squares per CTA).
"""
from __future__ import annotations

import functools

import torch

from tuili.ops.int4_mma import _kernel_from_source, _launch

SLICE = 16  # values per thread slice
STAGE_BYTES = 16 << 10  # target bytes per stage (whole rows)
STAGES = 4  # stages in the ring
PREFETCH = 0  # stages prefetched into L2 beyond the ring (8-24 measured slower)

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define SB (16 * BITS / 8)  // bytes per slice
#define ROWB (K * BITS / 8)  // bytes per weight row
#define STAGEB (R * ROWB)
#define G (K / 128)
#define W (T / 32)

__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ float bf(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ u16 to_bf(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float round_bf(float f) { return bf(to_bf(f)); }
__device__ __forceinline__ float silu_mul(float g, float u) {  // rounded as silu_and_mul_triton rounds it
  return round_bf(round_bf(g / (1.0f + __expf(-g))) * u);
}
__device__ __forceinline__ float p2(int e) { return __int_as_float((127 + e) << 23); }
__device__ __forceinline__ float f(u32 v) { return __uint_as_float(v); }

__device__ __forceinline__ void copy_stage(unsigned char* dst, const unsigned char* src, u32 bytes, u64* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(saddr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(saddr(dst)), "l"(src), "r"(bytes), "r"(saddr(bar)) : "memory");
}
__device__ __forceinline__ void wait_stage(u64* bar, u32 parity) {
  u32 done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(saddr(bar)), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* src, u32 bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"(bytes) : "memory");
}

#if BITS == 4
// sum over one word's 8 nibbles (k = 8w + j at bits 4j) of q_j x_j 2^-72 (xs: x pre-scaled by 2^(77 - pos_j))
__device__ __forceinline__ float dot_word(u32 w, const float* xs) {
  const u32 h = w >> 12;  // nibbles 5-7 at bits 8, 12, 16 (bit 20 and up would reach the exponent)
  float d = f(w & 0xFu) * xs[0];
  d = fmaf(f(w & 0xF0u), xs[1], d);
  d = fmaf(f(w & 0xF00u), xs[2], d);
  d = fmaf(f(w & 0xF000u), xs[3], d);
  d = fmaf(f(w & 0xF0000u), xs[4], d);
  d = fmaf(f(h & 0xF00u), xs[5], d);
  d = fmaf(f(h & 0xF000u), xs[6], d);
  return fmaf(f(h & 0xF0000u), xs[7], d);
}
#define POS(j) ((j) < 5 ? 4 * (j) : 4 * (j) - 12)
#else
// four bytes q + 128 (after the XOR): bytes 0, 1 in place, 2, 3 shifted down by 16
__device__ __forceinline__ float dot_word(u32 w, const float* xs) {
  w ^= 0x80808080u;
  const u32 h = w >> 16;
  float d = f(w & 0xFFu) * xs[0];
  d = fmaf(f(w & 0xFF00u), xs[1], d);
  d = fmaf(f(h & 0xFFu), xs[2], d);
  return fmaf(f(h & 0xFF00u), xs[3], d);
}
#define POS(j) (((j) & 1) * 8)
#endif

// the R row sums of a warp: afterwards lane l holds row ((l >> 4) & 1) * R/2 + ((l >> 3) & 1) * R/4 + ... in a[0],
// complete in lanes l % (32 / R) == 0
__device__ __forceinline__ void reduce_rows(float (&a)[R], int lane) {
  _Pragma("unroll") for (int n = R, off = 16; n > 1; n >>= 1, off >>= 1) {
    const bool up = lane & off;
    _Pragma("unroll") for (int i = 0; i < n / 2; ++i) {
      const float send = up ? a[i] : a[i + n / 2], keep = up ? a[i + n / 2] : a[i];
      a[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  _Pragma("unroll") for (int off = 16 / R; off > 0; off >>= 1) a[0] += __shfl_xor_sync(0xffffffffu, a[0], off);
}
__device__ __forceinline__ int row_of(int lane) {
  int r = 0;
  _Pragma("unroll") for (int n = R, off = 16; n > 1; n >>= 1, off >>= 1) r += (lane & off) ? n / 2 : 0;
  return r;
}

// this thread's parts of the R rows of a stage (lr0: the stage's first row within the CTA's range); rows past the
// CTA's last in a partial stage read stale shared memory, and their sums are never used
__device__ __forceinline__ void stage_sums(float (&acc)[R], const unsigned char* sb, int lr0,
                                           const float (&xp)[NSL][16], const float (&xsum)[NSL], int tid,
                                           const u16* scs, const u16* ofs, int sstride) {
#if BITS == 4
  uint2 w[R][NSL];
  u32 s[R][NSL], m[R][NSL];
  _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i)
    w[r][i] = *(const uint2*)(sb + r * ROWB + (tid + i * T) * SB);
  _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
    const int g = (tid + i * T) >> 3;
    s[r][i] = scs[g * sstride + lr0 + r];
    if (HAS_OFFSET) m[r][i] = ofs[g * sstride + lr0 + r];
  }
  _Pragma("unroll") for (int r = 0; r < R; ++r) {
    float a = 0.0f;
    _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
      const float d = dot_word(w[r][i].x, xp[i]) + dot_word(w[r][i].y, xp[i] + 8);
      const float sc = bf(s[r][i]), mo = HAS_OFFSET ? bf(m[r][i]) : -8.0f * sc;
      a = fmaf(sc * 4722366482869645213696.0f, d, fmaf(mo, xsum[i], a));  // 2^72 s d + m sum x
    }
    acc[r] = a;
  }
#else
  uint4 w[R][NSL];
  _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i)
    w[r][i] = *(const uint4*)(sb + r * ROWB + (tid + i * T) * SB);
  _Pragma("unroll") for (int r = 0; r < R; ++r) {
    float a = 0.0f;
    _Pragma("unroll") for (int i = 0; i < NSL; ++i)
      a += (dot_word(w[r][i].x, xp[i]) + dot_word(w[r][i].y, xp[i] + 4)) +
           (dot_word(w[r][i].z, xp[i] + 8) + dot_word(w[r][i].w, xp[i] + 12));
    acc[r] = a;
  }
#endif
}

// T compute threads (warps 0 .. W - 1) and one producer warp (W): the producer issues each stage's bulk copy
// once every compute warp has read the stage before in that buffer and added up its sums (done[buf]), and
// finishes those rows (the sums of the W warps in a fixed order, the epilogue); the compute warps wait only for
// their data (full[buf]): no CTA-wide barrier in the loop
extern "C" __global__ void __launch_bounds__(T + 32, 1) stream_gemv(
    const u16* __restrict__ x, const unsigned char* __restrict__ qw, const u16* __restrict__ sc,
    const u16* __restrict__ of, u16* out, float* ss, const u16* __restrict__ nw, u16* hw, int N, int num_ss,
    float eps, int rmax) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int units = N / 2, u0 = (int)((long long)blockIdx.x * units / gridDim.x);
  const int r0 = 2 * u0, rows = 2 * ((int)((long long)(blockIdx.x + 1) * units / gridDim.x) - u0);
  const int nstages = (rows + R - 1) / R;
  const int sstride = rmax + 2;  // scales per group in shared memory (rmax % 4 == 0: no bank conflicts)
  unsigned char* ring = smem;
  u64* full = (u64*)(ring + NST * STAGEB);
  u64* done = full + NST;
  float* red = (float*)(done + NST);  // [NST][W][R] the warps' row sums
  float* misc = red + NST * W * R;  // [0]: 1 / rms, [1 ..]: per-warp sums of x (INT8)
  u16* scs = (u16*)(misc + 4 + W);  // [G][sstride] (INT8: [rmax])
  u16* ofs = scs + (BITS == 4 ? G : 1) * sstride;
  u16* res = ofs + (HAS_OFFSET ? G * sstride : 0);  // [rmax] the residual rows (ADD)
  u16* nws = res + rmax;  // [rmax] the next norm's weights of those rows (ADD)

  if (tid == 0) {
    _Pragma("unroll") for (int s = 0; s < NST; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(saddr(full + s)));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(saddr(done + s)), "r"(W));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // weights and scales do not depend on the kernels before: copied before PDL's wait
  if (tid == T) {
    for (int s = 0; s < NST && s < nstages; ++s)
      copy_stage(ring + s * STAGEB, qw + (size_t)(r0 + s * R) * ROWB, min(R, rows - s * R) * ROWB, full + s);
    for (int s = NST; s < NST + PF && s < nstages; ++s)  // deeper than the ring: into L2
      prefetch_l2(qw + (size_t)(r0 + s * R) * ROWB, min(R, rows - s * R) * ROWB);
  }
#if BITS == 4
  for (int i = tid; i < G * (rows / 2); i += T + 32) {
    const int g = i / (rows / 2), p = i - g * (rows / 2);
    cp4(scs + g * sstride + 2 * p, sc + (size_t)g * N + r0 + 2 * p);
    if (HAS_OFFSET) cp4(ofs + g * sstride + 2 * p, of + (size_t)g * N + r0 + 2 * p);
  }
#else
  for (int i = tid; i < rows / 2; i += T + 32) cp4(scs + 2 * i, sc + r0 + 2 * i);
#endif
#if ADD
  for (int i = tid; i < rows / 2; i += T + 32) cp4(nws + 2 * i, nw + r0 + 2 * i);
#endif
  asm volatile("cp.async.commit_group;" ::: "memory");
#if PDL
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if ADD
  for (int i = tid; i < rows; i += T + 32) res[i] = out[r0 + i];
#endif
  if (warp == W) {  // the producer
#if NORM
    float s = 0.0f;
    for (int i = lane; i < num_ss; i += 32) s += ss[i];
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float rnorm = rsqrtf(s / K + eps);
#else
    const float rnorm = 1.0f;
#endif
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
#if BITS == 8
    float xtot = 0.0f;
    _Pragma("unroll") for (int w = 0; w < W; ++w) xtot += misc[1 + w];
#endif
    float sq = 0.0f;
    for (int st = 0; st < nstages; ++st) {
      const int buf = st % NST, rh = min(R, rows - st * R);
      wait_stage(done + buf, (st / NST) & 1);
      if (lane < rh) {
        float y = 0.0f;
        _Pragma("unroll") for (int w = 0; w < W; ++w) y += red[(buf * W + w) * R + lane];
        const int lr = st * R + lane, row = r0 + lr;
#if BITS == 8
        y = (4722366482869645213696.0f * y - 128.0f * xtot) * bf(scs[lr]);
#endif
        y *= rnorm;
#if ADD
        const float h = round_bf(round_bf(y) + bf(res[lr]));
        out[row] = to_bf(h);
        hw[row] = to_bf(h * bf(nws[lr]));
        sq += h * h;
#else
        out[row] = to_bf(y);
#endif
      }
      __syncwarp();  // red[buf] read before the next copy into buf lets the compute warps write it again
      if (lane == 0 && st + NST < nstages) {
        const int s2 = st + NST, s3 = s2 + PF;
        copy_stage(ring + buf * STAGEB, qw + (size_t)(r0 + s2 * R) * ROWB, min(R, rows - s2 * R) * ROWB, full + buf);
        if (PF && s3 < nstages) prefetch_l2(qw + (size_t)(r0 + s3 * R) * ROWB, min(R, rows - s3 * R) * ROWB);
      }
    }
#if ADD
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) ss[blockIdx.x] = sq;  // the rows' sums of squares, in a fixed order
#endif
    return;
  }
  // x of this thread's slices, pre-scaled; their sums
  float xp[NSL][16], xsum[NSL];
  float xtot = 0.0f;
  _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
    const int k0 = (tid + i * T) * 16;
    uint4 v[2] = {*(const uint4*)(x + k0), *(const uint4*)(x + k0 + 8)};
#if SILU_MUL
    const uint4 u[2] = {*(const uint4*)(x + K + k0), *(const uint4*)(x + K + k0 + 8)};
#endif
    float s = 0.0f;
    _Pragma("unroll") for (int j = 0; j < 16; ++j) {
      const u32 word = ((const u32*)v)[j / 2];
      float val = (j & 1) ? bf_hi(word) : bf(word);
#if SILU_MUL
      const u32 uw = ((const u32*)u)[j / 2];
      val = silu_mul(val, (j & 1) ? bf_hi(uw) : bf(uw));
#endif
      s += val;
      xp[i][j] = val * p2(77 - POS(j % (32 / BITS)));
    }
    xsum[i] = s;
    xtot += s;
  }
#if BITS == 8
  _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) xtot += __shfl_xor_sync(0xffffffffu, xtot, off);
  if (lane == 0) misc[1 + warp] = xtot;
#endif
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  const int my_row = row_of(lane);
  const bool writer = (lane & (32 / R - 1)) == 0;
  for (int st = 0; st < nstages; ++st) {
    const int buf = st % NST;
    wait_stage(full + buf, (st / NST) & 1);
    float acc[R];
    stage_sums(acc, ring + buf * STAGEB, st * R, xp, xsum, tid, scs, ofs, sstride);
    reduce_rows(acc, lane);
    if (writer) red[(buf * W + warp) * R + my_row] = acc[0];
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(saddr(done + buf)) : "memory");
  }
}
"""


# INT4 g128 on the tensor cores: the same ring, producer warp and epilogue; a stage is 8 weight rows x KC values
# (one bulk copy per row into rows padded by 64 bytes: the 8 rows of an mma tile fall in different banks), and
# warp w multiplies groups w * GW .. w * GW + GW - 1 of the chunk: mma.sync m16n8k16 with the weight words as B (a
# lane holds 4 words of row g; one LOP3 per two nibbles makes bf16 pairs 128 + q) and x in row 0 of A (the quads of
# int4_mma, stored once per kernel in shared memory; the other 15 rows zero). Per group: s P + (m - 128 s) sum x.
_MMA_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define W 8
#define T 256
#define R 8
#define G (K / 128)
#define NCH (K / KC)
#define GW (KC / 1024)
#define ROWC (KC / 2)
#define RSTR (ROWC + 64)
#define STAGEB (R * RSTR)

__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ float bf(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ u16 to_bf(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float round_bf(float f) { return bf(to_bf(f)); }
__device__ __forceinline__ float silu_mul(float g, float u) {  // rounded as silu_and_mul_triton rounds it
  return round_bf(round_bf(g / (1.0f + __expf(-g))) * u);
}
__device__ __forceinline__ u32 pair(u32 a) {  // nibbles 0 and 4 of a as the bf16 pair (128 + q0, 128 + q4)
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(0x000F000Fu), "r"(0x43004300u)); return d;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
  u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d;
}
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a2, u32 b0, u32 b1) {  // rows g + 8 of A: zero
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void expect(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(saddr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk(unsigned char* dst, const unsigned char* src, u32 bytes, u64* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(saddr(dst)), "l"(src), "r"(bytes), "r"(saddr(bar)) : "memory");
}
__device__ __forceinline__ void wait_bar(u64* bar, u32 parity) {
  u32 done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(saddr(bar)), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* src, u32 bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"(bytes) : "memory");
}
// stage s of a CTA: rows r0 + 8 (s / NCH) .., chunk s % NCH (one bulk copy per row)
__device__ __forceinline__ void copy_stage(unsigned char* dst, const unsigned char* qw, int r0, int s, u64* bar) {
  const unsigned char* src = qw + (size_t)(r0 + 8 * (s / NCH)) * (K / 2) + (s % NCH) * ROWC;
  expect(bar, R * ROWC);
  _Pragma("unroll") for (int r = 0; r < R; ++r) bulk(dst + r * RSTR, src + (size_t)r * (K / 2), ROWC, bar);
}
__device__ __forceinline__ void prefetch_stage(const unsigned char* qw, int r0, int s) {  // into L2
  const unsigned char* src = qw + (size_t)(r0 + 8 * (s / NCH)) * (K / 2) + (s % NCH) * ROWC;
  if (NCH == 1) prefetch_l2(src, R * ROWC);
  else _Pragma("unroll") for (int r = 0; r < R; ++r) prefetch_l2(src + (size_t)r * (K / 2), ROWC);
}

extern "C" __global__ void __launch_bounds__(T + 32, 1) stream_gemv_mma(
    const u16* __restrict__ x, const unsigned char* __restrict__ qw, const u16* __restrict__ sc,
    const u16* __restrict__ of, u16* out, float* ss, const u16* __restrict__ nw, u16* hw, int N, int num_ss,
    float eps, int rmax) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int units = N / 8, u0 = (int)((long long)blockIdx.x * units / gridDim.x);
  const int r0 = 8 * u0, rows = 8 * ((int)((long long)(blockIdx.x + 1) * units / gridDim.x) - u0);
  const int nstages = rows / 8 * NCH;
  const int sstride = rmax + 2;  // scales per group in shared memory (rmax % 4 == 0: no bank conflicts)
  unsigned char* ring = smem;
  u64* full = (u64*)(ring + NST * STAGEB);
  u64* done = full + NST;
  float* red = (float*)(done + NST);  // [NST][W][R] the warps' row sums
  uint4* xa = (uint4*)(red + NST * W * R);  // [G][4 t][4 i] x as the A quads of word 4t + i of each group
  float* xg = (float*)(xa + G * 16);  // [G] sums of x per group
  u16* scs = (u16*)(xg + G);  // [G][sstride]
  u16* ofs = scs + G * sstride;
  u16* res = ofs + (HAS_OFFSET ? G * sstride : 0);  // [rmax] the residual rows (ADD)
  u16* nws = res + rmax;  // [rmax] the next norm's weights of those rows (ADD)

  if (tid == 0) {
    _Pragma("unroll") for (int s = 0; s < NST; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(saddr(full + s)));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(saddr(done + s)), "r"(W));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // weights and scales do not depend on the kernels before: copied before PDL's wait
  if (tid == T) {
    for (int s = 0; s < NST && s < nstages; ++s) copy_stage(ring + s * STAGEB, qw, r0, s, full + s);
    for (int s = NST; s < NST + PF && s < nstages; ++s) prefetch_stage(qw, r0, s);  // deeper than the ring
  }
  for (int i = tid; i < G * (rows / 2); i += T + 32) {
    const int g = i / (rows / 2), p = i - g * (rows / 2);
    cp4(scs + g * sstride + 2 * p, sc + (size_t)g * N + r0 + 2 * p);
    if (HAS_OFFSET) cp4(ofs + g * sstride + 2 * p, of + (size_t)g * N + r0 + 2 * p);
  }
#if ADD
  for (int i = tid; i < rows / 2; i += T + 32) cp4(nws + 2 * i, nw + r0 + 2 * i);
#endif
  asm volatile("cp.async.commit_group;" ::: "memory");
#if PDL
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if ADD
  for (int i = tid; i < rows; i += T + 32) res[i] = out[r0 + i];
#endif
  if (warp == W) {  // the producer: finishes each row block, refills the ring
#if NORM
    float s = 0.0f;
    for (int i = lane; i < num_ss; i += 32) s += ss[i];
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float rnorm = rsqrtf(s / K + eps);
#else
    const float rnorm = 1.0f;
#endif
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    float sq = 0.0f;
    for (int st = 0; st < nstages; ++st) {
      const int buf = st % NST;
      wait_bar(done + buf, (st / NST) & 1);
      if (st % NCH == NCH - 1 && lane < R) {
        float y = 0.0f;
        _Pragma("unroll") for (int w = 0; w < W; ++w) y += red[(buf * W + w) * R + lane];
        const int lr = 8 * (st / NCH) + lane, row = r0 + lr;
        y *= rnorm;
#if ADD
        const float h = round_bf(round_bf(y) + bf(res[lr]));
        out[row] = to_bf(h);
        hw[row] = to_bf(h * bf(nws[lr]));
        sq += h * h;
#else
        out[row] = to_bf(y);
#endif
      }
      __syncwarp();  // red[buf] read before the next copy into buf lets the compute warps write it again
      if (lane == 0 && st + NST < nstages) {
        copy_stage(ring + buf * STAGEB, qw, r0, st + NST, full + buf);
        if (PF && st + NST + PF < nstages) prefetch_stage(qw, r0, st + NST + PF);
      }
    }
#if ADD
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) ss[blockIdx.x] = sq;  // the rows' sums of squares, in a fixed order
#endif
    return;
  }
  // x as A quads: word w = 4t + i of group gr (k = 128 gr + 8 w + j) -> xa[(gr * 4 + t) * 4 + i] =
  // {(x0, x4), (x1, x5), (x2, x6), (x3, x7)}; 16 consecutive threads hold one group (its sum: shuffles)
  for (int e = tid; e < K / 8; e += T) {
    uint4 v = *(const uint4*)(x + 8 * e);
#if SILU_MUL
    const uint4 up = *(const uint4*)(x + K + 8 * e);
    u32* vv = (u32*)&v; const u32* uu = (const u32*)&up;
    _Pragma("unroll") for (int i = 0; i < 4; ++i)
      vv[i] = to_bf(silu_mul(bf(vv[i]), bf(uu[i]))) | ((u32)to_bf(silu_mul(bf_hi(vv[i]), bf_hi(uu[i]))) << 16);
#endif
    float sum = bf(v.x) + bf_hi(v.x) + bf(v.y) + bf_hi(v.y) + bf(v.z) + bf_hi(v.z) + bf(v.w) + bf_hi(v.w);
    const int gr = e >> 4, w = e & 15;
    xa[(gr * 4 + (w >> 2)) * 4 + (w & 3)] =
        make_uint4(prmt(v.x, v.z, 0x5410), prmt(v.x, v.z, 0x7632), prmt(v.y, v.w, 0x5410), prmt(v.y, v.w, 0x7632));
    _Pragma("unroll") for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (w == 0) xg[gr] = sum;
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  float acc0 = 0.0f, acc1 = 0.0f;  // rows 2t, 2t + 1 of the block (lanes 0-3)
  for (int st = 0; st < nstages; ++st) {
    const int buf = st % NST, ch = st % NCH, blk = st / NCH;
    wait_bar(full + buf, (st / NST) & 1);
    const unsigned char* sb = ring + buf * STAGEB + g * RSTR + t * 16;
    uint4 wq[GW];
    _Pragma("unroll") for (int j = 0; j < GW; ++j) wq[j] = *(const uint4*)(sb + (warp * GW + j) * 64);
    _Pragma("unroll") for (int j = 0; j < GW; ++j) {
      const int gr = ch * (KC / 128) + warp * GW + j;
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const u32 w4[4] = {wq[j].x, wq[j].y, wq[j].z, wq[j].w};
      _Pragma("unroll") for (int i = 0; i < 4; ++i) {
        uint4 a = make_uint4(0u, 0u, 0u, 0u);
        if (g == 0) a = xa[(gr * 4 + t) * 4 + i];
        const u32 w = w4[i];
        mma(c, a.x, a.y, pair(w), pair(w >> 4));
        mma(c, a.z, a.w, pair(w >> 8), pair(w >> 12));
      }
      const u32 s2 = *(const u32*)(scs + gr * sstride + 8 * blk + 2 * t);
      const float s0 = bf(s2), s1 = bf_hi(s2), xs = xg[gr];
#if HAS_OFFSET
      const u32 m2 = *(const u32*)(ofs + gr * sstride + 8 * blk + 2 * t);
      const float m0 = bf(m2) - 128.0f * s0, m1 = bf_hi(m2) - 128.0f * s1;
#else
      const float m0 = -136.0f * s0, m1 = -136.0f * s1;
#endif
      acc0 = fmaf(s0, c[0], fmaf(m0, xs, acc0));
      acc1 = fmaf(s1, c[1], fmaf(m1, xs, acc1));
    }
    if (ch == NCH - 1) {
      if (g == 0) {
        red[(buf * W + warp) * R + 2 * t] = acc0;
        red[(buf * W + warp) * R + 2 * t + 1] = acc1;
      }
      acc0 = acc1 = 0.0f;
    }
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(saddr(done + buf)) : "memory");
  }
}
"""


def plan(bits: int, n: int, k: int) -> tuple[int, int, int] | None:
    """(threads, slices per thread, rows per stage) for an [n, k] layer, or None where the kernel does not fit it:
    16-value slices spread evenly over 64-256 threads (a multiple of 32), N even, a stage of whole rows."""
    if k % (SLICE * 32) or n % 2 or (bits == 4 and k % 128):
        return None
    slices = k // SLICE
    threads = next((t for t in range(256, 63, -32) if slices % t == 0), None)
    if threads is None or slices // threads > 4:
        return None
    row_bytes = k * bits // 8
    rows = 1
    while rows < 8 and 2 * rows * row_bytes <= STAGE_BYTES:
        rows *= 2
    return threads, slices // threads, rows


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (CUDA, compute capability 9.0 or later: bulk copies; NVRTC)."""
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        _compiled(device.index if device.index is not None else torch.cuda.current_device(), 4, 4096, 256, 1, 8,
                  STAGES, True, False, False, False)
    except Exception:  # no NVRTC in this install: the Triton GEMV
        return False
    return True


@functools.cache
def _compiled(index: int, bits: int, k: int, threads: int, nsl: int, rows: int, stages: int, has_offset: bool,
              silu_mul: bool, norm: bool, add: bool, prefetch: int = PREFETCH):
    defines = dict(BITS=bits, K=k, T=threads, NSL=nsl, R=rows, NST=stages, HAS_OFFSET=int(has_offset),
                   SILU_MUL=int(silu_mul), NORM=int(norm), ADD=int(add), PDL=1, PF=prefetch)
    return _kernel_from_source(index, "".join(f"#define {a} {b}\n" for a, b in defines.items()) + _SOURCE,
                               "stream_gemv")


def chunk(k: int) -> int | None:
    """K values per stage of the tensor-core kernel (8 warps x whole groups), or None."""
    return next((c for c in (4096, 2048, 1024) if k % c == 0), None)


@functools.cache
def _compiled_mma(index: int, k: int, stages: int, has_offset: bool, silu_mul: bool, norm: bool, add: bool,
                  prefetch: int = PREFETCH):
    defines = dict(K=k, KC=chunk(k), NST=stages, HAS_OFFSET=int(has_offset), SILU_MUL=int(silu_mul),
                   NORM=int(norm), ADD=int(add), PDL=1, PF=prefetch)
    return _kernel_from_source(index, "".join(f"#define {a} {b}\n" for a, b in defines.items()) + _MMA_SOURCE,
                               "stream_gemv_mma")


def supports(bits: int, n: int, k: int, group_size: int) -> bool:
    return (bits == 8 and group_size == 0 or bits == 4 and group_size == 128) and plan(bits, n, k) is not None


def stream_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                silu_mul: bool = False, norm: tuple | None = None, residual: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, ctas: int | None = None, stages: int | None = None,
                rows: int | None = None, mma: bool | None = None, prefetch: int = PREFETCH):
    """One row of x [1, K] (bf16) @ W^T for an INT4 g128 (qweight uint8 [N, K/2], group-major bf16 scales and
    offsets [N, K/128]) or INT8 per-channel (qweight int8 [N, K], bf16 scales [N]) layer; the fused forms as
    quant_matmul.quant_linear_triton's GEMV (silu_mul; norm=(eps, ss); residual + norm_weight -> (h, hw, ss)).
    ctas (one per SM), stages and rows (per stage) override the defaults (sweeps)."""
    bits = 8 if qweight.dtype == torch.int8 else 4
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    n = qweight.shape[0]
    p = plan(bits, n, k)
    if x.dtype != torch.bfloat16 or x.shape[0] != 1 or p is None or qweight.shape[1] * (2 if bits == 4 else 1) != k:
        raise ValueError("stream_gemv takes one row of bf16 x and a layer that `plan` fits")
    if not x.is_contiguous() or x.data_ptr() % 16 or not qweight.is_contiguous() or qweight.data_ptr() % 16:
        raise ValueError("stream_gemv needs contiguous, 16-byte aligned x and qweight")
    if scales.dtype != torch.bfloat16 or (bits == 4 and (scales.stride() != (1, n) or scales.shape[1] != k // 128)) \
            or (bits == 8 and scales.shape != (n,)) or (offsets is not None and (bits == 8 or offsets.stride() != (1, n)
                                                                                or offsets.dtype != scales.dtype)):
        raise ValueError("stream_gemv needs bf16 scales: group-major (INT4 g128) or per channel (INT8)")
    if residual is not None and (residual.shape != (1, n) or residual.dtype != x.dtype or not residual.is_contiguous()
                                 or norm_weight is None or norm_weight.shape != (n,)
                                 or norm_weight.dtype != x.dtype or not norm_weight.is_contiguous()):
        raise ValueError(f"residual must be a bf16 [1, {n}] tensor with an {n}-value norm_weight")
    if norm is not None and (norm[1].dtype != torch.float32 or norm[1].shape[0] != 1 or not norm[1].is_contiguous()):
        raise ValueError("norm needs fp32 sums of squares [1, tiles], contiguous")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if mma is None:  # the tensor-core kernel measured slower (scripts/probe_stream_gemv.py)
        mma = False
    if mma:
        return _mma_call(index, x, qweight, scales, offsets, silu_mul, norm, residual, norm_weight, ctas, stages,
                         prefetch)
    threads, nsl, stage_rows = p
    stage_rows = rows or stage_rows
    ctas = min(ctas or torch.cuda.get_device_properties(x.device).multi_processor_count * (2 if bits == 4 else 1),
               n // 2)
    rmax = 2 * -(-(n // 2) // ctas)
    rmax += -rmax % 4
    stages = stages or (STAGES if bits == 4 else 6)
    kernel = _compiled(index, bits, k, threads, nsl, stage_rows, stages, offsets is not None, silu_mul,
                       norm is not None, residual is not None, prefetch)
    groups = k // 128 if bits == 4 else 1
    shared = stages * (stage_rows * k * bits // 8 + 16 + 4 * (threads // 32) * stage_rows) + 4 * (4 + threads // 32) \
        + 2 * (groups * (rmax + 2) * (2 if offsets is not None else 1) + 2 * rmax) + 32  # + slack: partial stages
    if residual is not None:
        out, hw = residual, torch.empty_like(residual)
        ss = torch.empty(1, ctas, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        hw = out
        ss = norm[1] if norm is not None else out
    _launch(kernel, True, index, (ctas, 1, 1), shared,
            [x, qweight, scales, offsets if offsets is not None else scales, out, ss,
             norm_weight if norm_weight is not None else out, hw, n, ss.shape[1] if norm is not None else 0,
             float(norm[0]) if norm is not None else 0.0, rmax], threads=threads + 32)
    return (out, hw, ss) if residual is not None else out


def _outputs(x, n, ctas, norm, residual):
    if residual is not None:
        return residual, torch.empty_like(residual), torch.empty(1, ctas, dtype=torch.float32, device=x.device)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    return out, out, norm[1] if norm is not None else out


def _mma_call(index, x, qweight, scales, offsets, silu_mul, norm, residual, norm_weight, ctas, stages, prefetch):
    k, n = 2 * qweight.shape[1], qweight.shape[0]
    kc = chunk(k)
    stage_bytes = 8 * (kc // 2 + 64)
    stages = stages or max(2, (72 << 10) // stage_bytes)
    ctas = min(ctas or torch.cuda.get_device_properties(x.device).multi_processor_count, n // 8)
    rmax = 8 * -(-(n // 8) // ctas)
    groups = k // 128
    shared = stages * (stage_bytes + 16 + 4 * 8 * 8) + groups * (256 + 4) \
        + 2 * (groups * (rmax + 2) * (2 if offsets is not None else 1) + 2 * rmax) + 32
    kernel = _compiled_mma(index, k, stages, offsets is not None, silu_mul, norm is not None, residual is not None,
                           prefetch)
    out, hw, ss = _outputs(x, n, ctas, norm, residual)
    _launch(kernel, True, index, (ctas, 1, 1), shared,
            [x, qweight, scales, offsets if offsets is not None else scales, out, ss,
             norm_weight if norm_weight is not None else out, hw, n, ss.shape[1] if norm is not None else 0,
             float(norm[0]) if norm is not None else 0.0, rmax], threads=288)
    return (out, hw, ss) if residual is not None else out
