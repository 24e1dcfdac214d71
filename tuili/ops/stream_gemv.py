"""Batch-1 decode GEMV for INT4 g128 layers on Hopper (sm_90+): the weights streamed by bulk copies (TMA) into a
shared-memory ring, their products in integers (DP2A). quant_matmul.quant_linear_triton calls `stream_gemv` for
one row of bf16 x where `supports` holds (CUDA C++ compiled at first use by NVRTC, as int4_mma).

Why: at batch 1 the Triton GEMV (quant_matmul._gemv_tile) holds the 8B's INT4 layer chain at ~46 us per layer on
the H200, against ~31.5 us for the weights streamed with nothing multiplied (this kernel with its products taken
out). The chain is not bound by the bytes but by what follows each kernel boundary: x is the previous kernel's
output, so every matmul reads and prepares x after PDL's wait and then works off the weights that arrived
meanwhile; the slower it multiplies, the longer the DRAM idles (x read and prepared after the wait: +5.5 us per
layer; the products: +5.5 us; both: +16.6, docs/benchmarks). A CTA here keeps up to STAGES x 16 KB of weights in flight
(PRE of them before the wait), multiplies 8 nibbles in 7 instructions (4 `dp2a` on x as 16-bit integers), and
hands each stage's buffer back to the copies as soon as it is in registers. Chain of the 8B's 32 layers, H200:
46.0 -> 43.6 us per layer; engine batch 1 INT4: 549.0 -> 564.9 tok/s.

How: each CTA (2 per SM) owns a contiguous range of weight rows; a stage is R whole rows (one bulk copy, an
mbarrier per stage); thread t owns 32-value slices t, t + T, ... of K (NSL of them), its x in registers as
16-bit integer pairs times 2^(e - 13), e the exponent of the slice's largest |x| (values under 2^-14 of it lose
their low bits, below the output's bf16 rounding; the Triton GEMV does the same per 8 values). Per (row, slice):
the 4 words' nibbles masked into bytes (w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F), 16 `dp2a` into one int32 (|d| <
2^23: exact as a float), then s 2^(e - 13) d + m sum x (m: the group's offset, -8 s when symmetric). A producer
warp refills the ring (a buffer as soon as every compute warp has read it: `empty`), sums each stage's rows over
the warps in a fixed order (deterministic) and runs the epilogue. Fused as the Triton GEMV: silu(gate) * up of
x, the input's RMSNorm (x = h * w and the sums of squares ss) and the residual add with the next norm's inputs
(out, hw and one sum of squares per CTA).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from tuili.ops.int4_mma import _launch, _shared_limit, compile_kernel

SLICE = 32  # K values per thread slice (16 bytes of a weight row)
STAGE_BYTES = 16 << 10  # bytes per stage (whole rows, at most 8)
STAGES = 6  # stages in the ring (8B chain, H200, us per layer, all before the wait: 4 stages 48.2, 6: 44.6)
PRE = 3  # of them copied before PDL's wait (6 stages: 0 before 47.5, 2: 44.9, 3: 43.6, 6: 44.6)
MAX_PHASES = 4  # layers in one launch (stream_chain)
CTAS_PER_SM = 2  # (4 stages: 3 CTAs per SM 52.7 against 48.2; 1 CTA per SM with 12 stages 48.5)

_SOURCE = r"""typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define SL 32  // values per slice of K (a thread's 16 bytes of a weight row)
#define SB (SL / 2)
#define WPS (SL / 8)
#define W (T / 32)
#define NRED (2 * NST)  // row sums in flight: stage s + 2 NST is copied only after stage s is finished
#define RS 8  // row-sum slots per warp and stage (the most rows a stage holds)

struct Phase {  // one matmul of the chain (the host's _Phase)
  const u16* x; const unsigned char* qw; const u16* sc; const u16* of; u16* out; float* ss; const u16* nw; u16* hw;
  int n; int num_ss; int rmax; float eps;
};
struct Plan {  // the producer's view of every phase's weight rows in this CTA
  const unsigned char* q[NPH]; int r0[NPH], rows[NPH], r[NPH], rowb[NPH], nst[NPH];
};
struct Cursor { int p, s, issued, total; };  // the next copy: phase p's stage s, the issued-th of total

__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ float bf(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ u16 to_bf(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float round_bf(float f) { return bf(to_bf(f)); }
__device__ __forceinline__ float silu_mul(float g, float u) {  // rounded where silu_and_mul_triton rounds
  return round_bf(round_bf(g / (1.0f + __expf(-g))) * u);
}
__device__ __forceinline__ void copy_stage(unsigned char* dst, const unsigned char* src, u32 bytes, u64* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(saddr(bar)), "r"(bytes) : "memory");
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
__device__ __forceinline__ void arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(saddr(bar)) : "memory");
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(saddr(dst)), "l"(src) : "memory");
}
// until every CTA has counted itself done with a phase (its outputs released before: see produce_phase)
__device__ __forceinline__ void wait_count(const int* c) {
  int v;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
  } while (v < (int)gridDim.x);
}
__device__ __forceinline__ void bar_compute() { asm volatile("bar.sync 1, %0;" :: "n"(T) : "memory"); }
__device__ __forceinline__ void launch_dependents() {
#if PDL
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// this CTA's rows of an n-row phase: whole row pairs, contiguous, spread evenly over the grid
__device__ __forceinline__ void rows_of(int n, int& r0, int& rows) {
  const int units = n / 2, u0 = (int)((long long)blockIdx.x * units / gridDim.x);
  r0 = 2 * u0;
  rows = 2 * ((int)((long long)(blockIdx.x + 1) * units / gridDim.x) - u0);
}
// acc + sum over one word's 8 nibbles (k = 8w + j at bits 4j) of q_j xi_j (xi: pairs (0,2) (4,6) (1,3) (5,7))
__device__ __forceinline__ int dot_word(u32 w, const u32* p, int acc) {
  const u32 lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
  asm("dp2a.lo.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[0]), "r"(lo));
  asm("dp2a.hi.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[1]), "r"(lo));
  asm("dp2a.lo.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[2]), "r"(hi));
  asm("dp2a.hi.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[3]), "r"(hi));
  return acc;
}
// the R row sums of a warp: afterwards lane l holds row row_of(l) in a[0], complete in lanes l % (32 / R) == 0
template <int R> __device__ __forceinline__ void reduce_rows(float (&a)[R], int lane) {
  _Pragma("unroll") for (int n = R, off = 16; n > 1; n >>= 1, off >>= 1) {
    const bool up = lane & off;
    _Pragma("unroll") for (int i = 0; i < n / 2; ++i) {
      const float send = up ? a[i] : a[i + n / 2], keep = up ? a[i + n / 2] : a[i];
      a[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  _Pragma("unroll") for (int off = 16 / R; off > 0; off >>= 1) a[0] += __shfl_xor_sync(0xffffffffu, a[0], off);
}
template <int R> __device__ __forceinline__ int row_of(int lane) {
  int r = 0;
  _Pragma("unroll") for (int n = R, off = 16; n > 1; n >>= 1, off >>= 1) r += (lane & off) ? n / 2 : 0;
  return r;
}
// a phase's scales (and offsets) of this CTA's rows into shared memory [G][rmax + 2], by the compute threads
template <int K, int HO> __device__ __forceinline__ void load_scales(const Phase& a, u16* buf, int tid) {
  constexpr int G = K / 128;
  int r0, rows;
  rows_of(a.n, r0, rows);
  const int sstride = a.rmax + 2;  // (rmax % 4 == 0: no bank conflicts)
  for (int i = tid; i < G * (rows / 2); i += T) {
    const int g = i / (rows / 2), p = i - g * (rows / 2);
    cp4(buf + g * sstride + 2 * p, a.sc + (size_t)g * a.n + r0 + 2 * p);
    if (HO) cp4(buf + (G + g) * sstride + 2 * p, a.of + (size_t)g * a.n + r0 + 2 * p);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}
// the producer: one copy into the ring, the cursor moved on
__device__ __forceinline__ void issue(Cursor& c, const Plan& pl, unsigned char* ring, u64* full, int lane) {
  const int p = c.p, buf = c.issued % NST;
  if (lane == 0)
    copy_stage(ring + buf * STAGEB, pl.q[p] + (size_t)(pl.r0[p] + c.s * pl.r[p]) * pl.rowb[p],
               min(pl.r[p], pl.rows[p] - c.s * pl.r[p]) * pl.rowb[p], full + buf);
  ++c.issued;
  if (++c.s == pl.nst[p]) { c.s = 0; ++c.p; }
}

// The compute warps' part of phase P (x [1, K], or [1, 2K] = [gate | up] with SILU): stage g onwards of the ring.
template <int P, int K, int NSL, int R, int HO, int SILU>
__device__ __forceinline__ void compute_phase(const Phase& a, int& g, unsigned char* ring, u64* full, u64* empty,
                                              u64* sums, float* red, const u16* scbuf, const int* cnt, int tid,
                                              int lane, int warp) {
  constexpr int ROWB = K / 2, G = K / 128, SLICES = K / SL;
  int r0, rows;
  rows_of(a.n, r0, rows);
  const int nstages = (rows + R - 1) / R, sstride = a.rmax + 2;
  const u16* scs = scbuf + (P & 1) * SCW;
  const u16* ofs = scs + G * sstride;
  if (P > 0) {  // x is the phase before's output, from every CTA
    wait_count(cnt + P - 1);
    if (P == NPH - 1) launch_dependents();  // every CTA is resident: the next kernel may take what is left
  }
  // x of this thread's slices as 16-bit integers times 2^(e - 13) (e: the exponent of the slice's largest |x|);
  // slices past K (K / 32 not a multiple of T) are zeros
  u32 xp[NSL][4 * WPS];
  float xsum[NSL], p2e[NSL];
  _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
    const int k0 = (tid + i * T) * SL;
    float vals[SL], s = 0.0f, big = 0.0f;
    _Pragma("unroll") for (int c = 0; c < SL / 8; ++c) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k0 < K) v = __ldcg((const uint4*)(a.x + k0 + 8 * c));  // (L2: written by other CTAs in this kernel)
#if ANY_SILU
      uint4 u = make_uint4(0, 0, 0, 0);
      if (SILU && k0 < K) u = __ldcg((const uint4*)(a.x + K + k0 + 8 * c));
#endif
      _Pragma("unroll") for (int j = 0; j < 8; ++j) {
        const u32 word = ((const u32*)&v)[j / 2];
        float val = (j & 1) ? bf_hi(word) : bf(word);
#if ANY_SILU
        if (SILU) {
          const u32 uw = ((const u32*)&u)[j / 2];
          val = silu_mul(val, (j & 1) ? bf_hi(uw) : bf(uw));
        }
#endif
        vals[8 * c + j] = val;
        s += val;
        big = fmaxf(big, fabsf(val));
      }
    }
    const int eb = max((int)((__float_as_uint(big) >> 23) & 0xFF), 16);
    const float up = __uint_as_float((u32)(267 - eb) << 23);
    _Pragma("unroll") for (int h = 0; h < WPS; ++h) {
      int q[8];
      _Pragma("unroll") for (int j = 0; j < 8; ++j) q[j] = __float2int_rn(vals[8 * h + j] * up);
      xp[i][4 * h + 0] = (u32)(q[0] & 0xFFFF) | ((u32)q[2] << 16);
      xp[i][4 * h + 1] = (u32)(q[4] & 0xFFFF) | ((u32)q[6] << 16);
      xp[i][4 * h + 2] = (u32)(q[1] & 0xFFFF) | ((u32)q[3] << 16);
      xp[i][4 * h + 3] = (u32)(q[5] & 0xFFFF) | ((u32)q[7] << 16);
    }
    p2e[i] = __uint_as_float((u32)(eb - 13) << 23);
    xsum[i] = s;
  }
  // this phase's scales (the next phase's may still be in flight) in shared memory for every compute thread
  if (P + 1 < NPH) asm volatile("cp.async.wait_group 1;" ::: "memory");
  else asm volatile("cp.async.wait_group 0;" ::: "memory");
  if (P == 0) __syncthreads();  // (with the producer: x is read, the rest of the ring may be copied)
  else bar_compute();
  const int my_row = row_of<R>(lane);
  const bool writer = (lane & (32 / R - 1)) == 0;
  for (int st = 0; st < nstages; ++st, ++g) {
    const int buf = g % NST, slot = g % NRED, lr0 = st * R;
    wait_bar(full + buf, (g / NST) & 1);
    const unsigned char* sb = ring + buf * STAGEB;
    uint4 w[R][NSL];
    u32 s[R][NSL], m[R][NSL];
    _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i)
      if ((tid + i * T) < SLICES) w[r][i] = *(const uint4*)(sb + r * ROWB + (tid + i * T) * SB);
    // the stage is in registers: its buffer may take the next copy, once these generic-proxy reads are ordered
    // before the copy's async-proxy writes (without the fence, 1-16 rows of 2048 read the next stage's bytes when
    // that copy came from L2 at once: one stage, one row per stage)
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    if (lane == 0) arrive(empty + buf);
    float acc[R];
    _Pragma("unroll") for (int r = 0; r < R; ++r) {
      float acc_r = 0.0f;
      _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
        if ((tid + i * T) >= SLICES) continue;
        const int grp = (tid + i * T) * SL / 128;
        s[r][i] = scs[grp * sstride + lr0 + r];
        if (HO) m[r][i] = ofs[grp * sstride + lr0 + r];
        const u32* wv = (const u32*)&w[r][i];
        int d = 0;
        _Pragma("unroll") for (int h = 0; h < WPS; ++h) d = dot_word(wv[h], xp[i] + 4 * h, d);
        const float sc_ = bf(s[r][i]), mo = HO ? bf(m[r][i]) : -8.0f * sc_;
        acc_r = fmaf(sc_ * p2e[i], (float)d, fmaf(mo, xsum[i], acc_r));  // 2^(e - 13) s d + m sum x (exact d)
      }
      acc[r] = acc_r;
    }
    reduce_rows<R>(acc, lane);
    if (writer) red[(slot * W + warp) * RS + my_row] = acc[0];
    __syncwarp();
    if (lane == 0) arrive(sums + slot);
  }
}

// The producer warp's part of phase P: refills the ring (the cursor runs ahead across phases), finishes each stage's
// rows (the warps' sums in a fixed order: deterministic) and runs the epilogue: the input's RMSNorm (NORM: x = h *
// w, ss its sums of squares per CTA of the phase before), the residual add and the next norm's inputs (ADD).
template <int P, int K, int R, int NORM, int ADD>
__device__ __forceinline__ void produce_phase(const Phase& a, int& g, Cursor& c, const Plan& pl, unsigned char* ring,
                                              u64* full, u64* empty, u64* sums, const float* red, u16* res, u16* nws,
                                              int* cnt, int lane) {
  int r0, rows;
  rows_of(a.n, r0, rows);
  const int nstages = (rows + R - 1) / R;
  float rnorm = 1.0f, sq = 0.0f;
  for (int st = 0; st < nstages; ++st, ++g) {
    const int buf = g % NST, slot = g % NRED, rh = min(R, rows - st * R);
    if (c.issued < c.total) {  // the compute warps have read stage g: its buffer takes copy g + NST
      wait_bar(empty + buf, (g / NST) & 1);
      issue(c, pl, ring, full, lane);
    }
    wait_bar(sums + slot, (g / NRED) & 1);
    if (st == 0) {  // the compute warps are past this phase's dependency: its inputs are final
      if (P > 0) {
        wait_count(cnt + P - 1);
        if (P == NPH - 1) launch_dependents();
      }
      if (NORM) {
        float s = 0.0f;
        for (int i = lane; i < a.num_ss; i += 32) s += __ldcg(a.ss + i);
        _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        rnorm = rsqrtf(s / K + a.eps);
      }
      if (ADD) {
        for (int i = lane; i < rows; i += 32) {
          res[i] = __ldcg(a.out + r0 + i);
          nws[i] = a.nw[r0 + i];
        }
        __syncwarp();
      }
    }
    if (lane < rh) {
      float y = 0.0f;
      _Pragma("unroll") for (int w = 0; w < W; ++w) y += red[(slot * W + w) * RS + lane];
      const int lr = st * R + lane, row = r0 + lr;
      y *= rnorm;
      if (ADD) {
        const float h = round_bf(round_bf(y) + bf(res[lr]));
        a.out[row] = to_bf(h);
        a.hw[row] = to_bf(h * bf(nws[lr]));
        sq += h * h;
      } else {
        a.out[row] = to_bf(y);
      }
    }
    __syncwarp();  // every lane's reads of red[slot] before lane 0's next copy (which lets it be written again)
  }
  if (ADD) {
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) a.ss[blockIdx.x] = sq;  // the rows' sums of squares, in a fixed order
  }
  if (P + 1 < NPH) {  // this CTA's outputs of the phase released, then counted
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(cnt + P, 1);
  }
}

#define COMPUTE(i) compute_phase<i, P##i##_K, P##i##_NSL, P##i##_R, P##i##_HO, P##i##_SILU>( \
    a##i, g, ring, full, empty, sums, red, scbuf, cnt, tid, lane, warp)
#define PRODUCE(i) produce_phase<i, P##i##_K, P##i##_R, P##i##_NORM, P##i##_ADD>( \
    a##i, g, c, pl, ring, full, empty, sums, red, res, nws, cnt, lane)
#define PLAN(i) { \
    rows_of(a##i.n, pl.r0[i], pl.rows[i]); \
    pl.q[i] = a##i.qw; pl.r[i] = P##i##_R; pl.rowb[i] = P##i##_K / 2; \
    pl.nst[i] = (pl.rows[i] + P##i##_R - 1) / P##i##_R; \
    c.total += pl.nst[i]; }
#define NEXT_SCALES(i) { bar_compute(); load_scales<P##i##_K, P##i##_HO>(a##i, scbuf + ((i) & 1) * SCW, tid); }

// NPH matmuls in one launch, each taking the one before's output (x of phase 0 from the kernel before, PDL). Each
// CTA (MIN_CTAS per SM, all resident) owns a contiguous range of every phase's rows; a stage is R whole rows (one
// bulk copy, an mbarrier per stage) in a ring the producer keeps full across phases: the weights stream on while
// the compute warps wait for a phase's input (every CTA's outputs of the phase before: counters in cnt, reset by
// the last CTA to finish).
extern "C" __global__ void __launch_bounds__(T + 32, MIN_CTAS) stream_gemv(Phase a0, Phase a1, Phase a2, Phase a3,
                                                                           int* cnt) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned char* ring = smem;
  u64* full = (u64*)(ring + NST * STAGEB);
  u64* empty = full + NST;
  u64* sums = empty + NST;
  float* red = (float*)(sums + NRED);  // [NRED][W][RS] the warps' row sums
  u16* scbuf = (u16*)(red + NRED * W * RS);  // [NPH > 1 ? 2 : 1][SCW] the scales (and offsets) of a phase
  u16* res = scbuf + (NPH > 1 ? 2 : 1) * SCW;  // [RM] the residual rows (ADD)
  u16* nws = res + RM;  // [RM] the next norm's weights of those rows (ADD)
  int g = 0;  // the ring's stage (over all phases)

  if (tid == 0) {
    _Pragma("unroll") for (int s = 0; s < NST; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(saddr(full + s)));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(saddr(empty + s)), "r"(W));
    }
    _Pragma("unroll") for (int s = 0; s < NRED; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(saddr(sums + s)), "r"(W));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == W) {  // the producer
    Plan pl;
    Cursor c = {0, 0, 0, 0};
    PLAN(0)
#if NPH > 1
    PLAN(1)
#endif
#if NPH > 2
    PLAN(2)
#endif
#if NPH > 3
    PLAN(3)
#endif
    // weights do not depend on the kernels before: PRE stages copied before PDL's wait, the rest once x is read
    // (x queues behind what is in flight)
    while (c.issued < PRE && c.issued < NST && c.issued < c.total) issue(c, pl, ring, full, lane);
#if PDL
    if (NPH == 1) launch_dependents();
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    __syncthreads();
    while (c.issued < NST && c.issued < c.total) issue(c, pl, ring, full, lane);
    PRODUCE(0);
#if NPH > 1
    PRODUCE(1);
#endif
#if NPH > 2
    PRODUCE(2);
#endif
#if NPH > 3
    PRODUCE(3);
#endif
#if NPH > 1
    if (lane == 0) {  // the last CTA done resets the counters (every CTA is past its waits)
      __threadfence();
      if (atomicAdd(cnt + NPH - 1, 1) == (int)gridDim.x - 1)
        for (int i = 0; i < NPH; ++i) cnt[i] = 0;
    }
#endif
    return;
  }
  load_scales<P0_K, P0_HO>(a0, scbuf, tid);
#if NPH > 1
  load_scales<P1_K, P1_HO>(a1, scbuf + SCW, tid);
#endif
#if PDL
  if (NPH == 1) launch_dependents();
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  COMPUTE(0);
#if NPH > 1
#if NPH > 2
  NEXT_SCALES(2)
#endif
  COMPUTE(1);
#endif
#if NPH > 2
#if NPH > 3
  NEXT_SCALES(3)
#endif
  COMPUTE(2);
#endif
#if NPH > 3
  COMPUTE(3);
#endif
}
"""


def plan(n: int, k: int) -> tuple[int, int, int] | None:
    """(threads, slices per thread, rows per stage) for an [n, k] layer, or None where the kernel does not fit it:
    32-value slices spread evenly over 64-256 threads (a multiple of 32, at most 4 slices each), N even."""
    if k % (SLICE * 32) or n % 2 or n <= 0:
        return None
    slices = k // SLICE
    threads = next((t for t in range(256, 63, -32) if slices % t == 0), None)
    if threads is None or slices // threads > 4:
        return None
    rows = 1
    while rows < 8 and 2 * rows * (k // 2) <= STAGE_BYTES:
        rows *= 2
    return threads, slices // threads, rows


def chain_plan(shapes: list[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]] | None:
    """(compute threads, [(slices per thread, rows per stage)]) for [n, k] layers in one launch, or None: the
    threads are the fewest any of them plans alone; a layer of more slices takes up to 4 per thread (the last
    ones partial: whole warps idle)."""
    plans = [plan(n, k) for n, k in shapes]
    if not plans or len(plans) > MAX_PHASES or any(p is None for p in plans):
        return None
    threads = min(p[0] for p in plans)
    nsl = [-(-(k // SLICE) // threads) for _, k in shapes]
    return (threads, [(s, p[2]) for s, p in zip(nsl, plans)]) if max(nsl) <= 4 else None


def supports(n: int, k: int, group_size: int) -> bool:
    return group_size == 128 and plan(n, k) is not None


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether the tensors the kernel copies 4 bytes at a time into shared memory start 4-byte aligned."""
    return all(t is None or t.data_ptr() % 4 == 0 for t in tensors)


def _rmax(n: int, ctas: int) -> int:
    """The most rows a CTA takes of an n-row layer, rounded up to a multiple of 4 (the scales' row stride rmax + 2:
    no bank conflicts)."""
    rmax = 2 * -(-(n // 2) // ctas)
    return rmax + -rmax % 4


def _ctas(ns: list[int], device: torch.device, ctas: int | None = None) -> int:
    """CTAS_PER_SM per SM unless given, at most one per row pair of the narrowest layer."""
    return min(ctas or torch.cuda.get_device_properties(device).multi_processor_count * CTAS_PER_SM,
               *(n // 2 for n in ns))


def shared_bytes(layers: list[tuple[int, int, bool, bool]], threads: int, rows: list[int], stages: int,
                 ctas: int) -> int:
    """Shared memory of one CTA for layers (n, k, has_offset, adds) with `rows` per stage: the ring (stages of the
    largest stage), its barriers and row sums, the scales (and offsets) of a layer's rows (two buffers in a chain:
    the next layer's arrive during this one), the residual rows and norm weights of the adding layers, and slack
    for the stale rows a partial stage reads."""
    stage = max(r * k // 2 for (_, k, _, _), r in zip(layers, rows))
    scales = max((k // 128) * (_rmax(n, ctas) + 2) * (2 if ho else 1) for n, k, ho, _ in layers)
    res = max([_rmax(n, ctas) for n, _, _, add in layers if add], default=0)
    return stages * stage + 8 * 4 * stages + 4 * 2 * stages * (threads // 32) * 8 \
        + 2 * ((2 if len(layers) > 1 else 1) * scales + 2 * res) + 64


@functools.cache
def fits(n: int, k: int, has_offset: bool, device: torch.device) -> bool:
    """Whether the default grid's CTAs fit shared memory with 2 stages (the scales of their rows grow with N)."""
    threads, _, rows = plan(n, k)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_bytes([(n, k, has_offset, False)], threads, [rows], 2, _ctas([n], device)) <= _shared_limit(index)


@functools.cache
def chain_fits(layers: tuple[tuple[int, int, bool, bool], ...], device: torch.device) -> bool:
    """Whether layers (n, k, has_offset, adds) run as one stream_chain on `device`: planned, and CTAS_PER_SM CTAs
    per SM in shared memory with 2 stages (every CTA of a chain must be resident)."""
    p = chain_plan([(n, k) for n, k, _, _ in layers])
    if p is None or not available(device):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_bytes(list(layers), p[0], [r for _, r in p[1]], 2, _ctas([n for n, *_ in layers], device)) \
        <= (_shared_limit(index) + 1024) // CTAS_PER_SM - 1024


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (CUDA, compute capability 9.0 or later: bulk copies; NVRTC)."""
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        _compiled(device.index if device.index is not None else torch.cuda.current_device(), 128, 2, 1,
                  ((4096, 1, 8, True, False, False, False),))
    except Exception:  # no NVRTC in this install: the Triton GEMV
        return False
    return True


@functools.cache
def _compiled(index: int, threads: int, stages: int, pre: int, phases: tuple, ctas: int = 1, scale_words: int = 0,
              res_rows: int = 0):
    """phases: (k, slices per thread, rows per stage, has_offset, silu_mul, norm, add) each."""
    defines = dict(T=threads, NST=stages, PRE=pre, NPH=len(phases), PDL=1, MIN_CTAS=CTAS_PER_SM,
                   STAGEB=max(k * r // 2 for k, _, r, *_ in phases), SCW=scale_words, RM=res_rows,
                   ANY_SILU=int(any(p[4] for p in phases)))
    for i, (k, nsl, rows, ho, silu, norm, add) in enumerate(phases):
        defines.update({f"P{i}_K": k, f"P{i}_NSL": nsl, f"P{i}_R": rows, f"P{i}_HO": int(ho), f"P{i}_SILU": int(silu),
                        f"P{i}_NORM": int(norm), f"P{i}_ADD": int(add)})
    return compile_kernel(index, _SOURCE, "stream_gemv", defines)


class _Phase(ctypes.Structure):  # the kernel's Phase
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "qw", "sc", "of", "out", "ss", "nw", "hw")] + \
        [("n", ctypes.c_int), ("num_ss", ctypes.c_int), ("rmax", ctypes.c_int), ("eps", ctypes.c_float)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_layer(name: str, n: int, k: int, qweight: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                 device: torch.device) -> None:
    if plan(n, k) is None or qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"{name} takes one row of bf16 x and an INT4 layer that `plan` fits")
    if not qweight.is_contiguous() or qweight.data_ptr() % 16:
        raise ValueError(f"{name} needs contiguous, 16-byte aligned x and qweight")
    if scales.dtype != torch.bfloat16 or scales.shape != (n, k // 128) or scales.stride() != (1, n) \
            or (offsets is not None and (offsets.shape != scales.shape or offsets.stride() != (1, n)
                                         or offsets.dtype != scales.dtype)):
        raise ValueError(f"{name} needs group-major bf16 scales and offsets [N, K/128] (group size 128)")
    if residual is not None and (residual.shape != (1, n) or residual.dtype != torch.bfloat16
                                 or not residual.is_contiguous() or norm_weight is None
                                 or norm_weight.shape != (n,) or norm_weight.dtype != torch.bfloat16
                                 or not norm_weight.is_contiguous()):
        raise ValueError(f"residual must be a bf16 [1, {n}] tensor with an {n}-value norm_weight")
    if not aligned(scales, offsets, norm_weight):  # 4-byte copies into shared memory
        raise ValueError(f"{name} needs scales, offsets and norm_weight at 4-byte aligned addresses")
    if any(t is not None and t.device != device for t in (qweight, scales, offsets, residual, norm_weight)):
        raise ValueError(f"{name}'s tensors must all be on x's device")


def _run(x: torch.Tensor, layers: list[dict], counters: torch.Tensor | None, ctas: int | None, stages: int | None,
         pre: int | None, rows: int | None) -> list[tuple]:
    """Launches the kernel over checked layers (dicts: qweight, scales, offsets, silu_mul, norm (eps, ss) or None,
    residual, norm_weight), each after the first taking the one before's output (h * w where it adds, whose ss
    its norm reads). Returns each layer's outputs: (out,) or (h, hw, ss)."""
    if stages is not None and stages < 1 or pre is not None and pre < 0 or ctas is not None and ctas < 1 \
            or rows not in (None, 1, 2, 4, 8):
        raise ValueError("stream_gemv needs 1+ stages, 0+ of them before the wait, 1+ CTAs and 1, 2, 4 or 8 rows per "
                         "stage")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    shapes = [(L["qweight"].shape[0], L["qweight"].shape[1] * 2) for L in layers]
    threads, per_layer = chain_plan(shapes)
    stage_rows = [rows or r for _, r in per_layer]
    ctas = _ctas([n for n, _ in shapes], x.device, ctas)
    geometry = [(n, k, L["offsets"] is not None, L["residual"] is not None) for (n, k), L in zip(shapes, layers)]
    size = functools.partial(shared_bytes, geometry, threads, stage_rows, ctas=ctas)
    if stages is None:  # CTAS_PER_SM CTAs fit an SM
        fit = (_shared_limit(index) + 1024) // CTAS_PER_SM - 1024
        stages = STAGES
        while stages > 2 and size(stages) > fit:
            stages -= 1
    shared = size(stages)
    if shared > _shared_limit(index):
        raise ValueError(f"stream_gemv's {stages} stages and the scales of its rows do not fit shared memory")
    if len(layers) > 1 and shared > (_shared_limit(index) + 1024) // CTAS_PER_SM - 1024:
        raise ValueError(f"a chain's CTAs must all be resident: {CTAS_PER_SM} per SM do not fit shared memory")
    pre = min(PRE if pre is None else pre, stages)
    phases, args, outs, prev = [], [], [], None
    for (n, k), (nsl, _), r, L in zip(shapes, per_layer, stage_rows, layers):
        add, norm = L["residual"] is not None, L["norm"]
        if add:
            out, hw = L["residual"], torch.empty_like(L["residual"])
            ss = torch.empty(1, ctas, dtype=torch.float32, device=x.device)
            outs.append((out, hw, ss))
        else:
            out = hw = torch.empty(1, n, dtype=torch.bfloat16, device=x.device)
            ss = None if norm is None else norm[1] if norm[1] is not None else outs[-1][2]  # (a chain's: the layer
            outs.append((out,))  # before's)
        xin = x if prev is None else prev
        prev = hw
        phases.append((k, nsl, r, L["offsets"] is not None, L["silu_mul"], norm is not None, add))
        args.append(_Phase(_ptr(xin), _ptr(L["qweight"]), _ptr(L["scales"]), _ptr(L["offsets"]), _ptr(out),
                           _ptr(ss), _ptr(L["norm_weight"]), _ptr(hw), n, ss.shape[1] if norm is not None else 0,
                           _rmax(n, ctas), float(norm[0]) if norm is not None else 0.0))
    scale_words = max((k // 128) * (_rmax(n, ctas) + 2) * (2 if ho else 1) for n, k, ho, _ in geometry)
    res_rows = max([_rmax(n, ctas) for n, _, _, add in geometry if add], default=0)
    kernel = _compiled(index, threads, stages, pre, tuple(phases), 1, scale_words, res_rows)
    args += [_Phase() for _ in range(MAX_PHASES - len(args))]
    _launch(kernel, True, index, (ctas, 1, 1), shared, [*args, counters if counters is not None else x],
            threads=threads + 32)
    return outs


def _layer(qweight, scales, offsets, silu_mul=False, norm=None, residual=None, norm_weight=None) -> dict:
    return dict(qweight=qweight, scales=scales, offsets=offsets, silu_mul=silu_mul, norm=norm, residual=residual,
                norm_weight=norm_weight)


def _check_x(name: str, x: torch.Tensor, k: int, silu_mul: bool) -> None:
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.shape != (1, 2 * k if silu_mul else k):
        raise ValueError(f"{name} takes one row of bf16 x and an INT4 layer that `plan` fits")
    if not x.is_contiguous() or x.data_ptr() % 16:
        raise ValueError(f"{name} needs contiguous, 16-byte aligned x and qweight")


def stream_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                silu_mul: bool = False, norm: tuple | None = None, residual: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, ctas: int | None = None, stages: int | None = None,
                pre: int | None = None, rows: int | None = None):
    """One row of x [1, K] (bf16; [1, 2K] = [gate | up] with silu_mul) @ W^T for an INT4 g128 layer (qweight uint8
    [N, K/2], group-major bf16 scales and offsets [N, K/128]); the fused forms as quant_matmul.quant_linear_triton's
    GEMV (norm=(eps, ss); residual + norm_weight -> (h, hw, ss)). ctas, stages, pre (stages copied before PDL's
    wait) and rows (per stage) override the defaults (sweeps, tests)."""
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError("stream_gemv takes one row of bf16 x and an INT4 layer that `plan` fits")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check_x("stream_gemv", x, k, silu_mul)
    _check_layer("stream_gemv", n, k, qweight, scales, offsets, residual, norm_weight, x.device)
    if norm is not None and (norm[1].dtype != torch.float32 or norm[1].dim() != 2 or norm[1].shape[0] != 1
                             or not norm[1].is_contiguous() or norm[1].device != x.device):
        raise ValueError("norm needs fp32 sums of squares [1, tiles], contiguous")
    if norm is not None and residual is not None:
        raise ValueError("norm (reading sums of squares) and residual (writing them) do not come together")
    out = _run(x, [_layer(qweight, scales, offsets, silu_mul, norm, residual, norm_weight)], None, ctas, stages, pre,
               rows)[0]
    return out if residual is not None else out[0]


def stream_chain(x: torch.Tensor, layers: list[dict], counters: torch.Tensor, ctas: int | None = None,
                 stages: int | None = None, pre: int | None = None):
    """Up to MAX_PHASES INT4 g128 layers in one launch, each taking the output of the one before: a decoder layer's
    o (adding into the residual h, with the next norm's inputs out), gate_up (that norm in), down (silu * mul in,
    adding into h) and the next layer's qkv (its norm in). layers: dicts of qweight, scales, offsets and optionally
    silu_mul, norm_eps (x is the layer before's h * w: rms_norm with its sums of squares), residual with
    norm_weight (h += x W^T, out (h, h * norm_weight, ss)). counters: int32 zeros, one per layer, left zero (not
    shared with a chain that may run at the same time). Returns the last layer's outputs (out, or (h, hw, ss))."""
    if not 1 <= len(layers) <= MAX_PHASES:
        raise ValueError(f"stream_chain takes 1 to {MAX_PHASES} layers")
    if counters.dtype != torch.int32 or counters.numel() < len(layers) or counters.device != x.device \
            or not counters.is_contiguous():
        raise ValueError(f"a chain of {len(layers)} layers needs int32 zeros for {len(layers)} counters on x's device")
    resolved, prev_n, prev_adds = [], None, False
    for i, L in enumerate(layers):
        unknown = set(L) - {"qweight", "scales", "offsets", "silu_mul", "norm_eps", "residual", "norm_weight"}
        if unknown:
            raise ValueError(f"stream_chain's layers take no {sorted(unknown)}")
        q, silu = L["qweight"], L.get("silu_mul", False)
        if q.dim() != 2:
            raise ValueError("stream_chain takes one row of bf16 x and INT4 layers that `plan` fits")
        n, k = q.shape[0], q.shape[1] * 2
        if i == 0:
            _check_x("stream_chain", x, k, silu)
        elif (2 * k if silu else k) != prev_n:
            raise ValueError(f"layer {i} takes {2 * k if silu else k} values, the layer before gives {prev_n}")
        _check_layer("stream_chain", n, k, q, L["scales"], L.get("offsets"), L.get("residual"), L.get("norm_weight"),
                     x.device)
        eps = L.get("norm_eps")
        if eps is not None and not prev_adds:
            raise ValueError("a layer's norm reads the sums of squares of the layer before, which must add")
        if eps is not None and L.get("residual") is not None:
            raise ValueError("norm (reading sums of squares) and residual (writing them) do not come together")
        resolved.append(_layer(q, L["scales"], L.get("offsets"), silu, None if eps is None else (eps, None),
                               L.get("residual"), L.get("norm_weight")))
        prev_n, prev_adds = n, L.get("residual") is not None
    outs = _run(x, resolved, counters, ctas, stages, pre, None)
    return outs[-1] if layers[-1].get("residual") is not None else outs[-1][0]
