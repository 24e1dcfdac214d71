"""Batch-1 decode GEMV for INT4 g128 and INT8 per-channel layers on Hopper (sm_90+): the weights streamed by bulk
copies (TMA) into a shared-memory ring, their products in integers (DP2A). quant_matmul.quant_linear_triton calls
`stream_gemv` for one row of bf16 x where `supports` holds (CUDA C++ compiled at first use by NVRTC, as int4_mma).

Why: at batch 1 the Triton GEMV (quant_matmul._gemv_tile) holds the 8B's INT4 layer chain at ~46 us per layer on
the H200, against ~31.5 us for the weights streamed with nothing multiplied (this kernel with its products taken
out). The chain is not bound by the bytes but by what follows each kernel boundary: x is the previous kernel's
output, so every matmul reads and prepares x after PDL's wait and then works off the weights that arrived
meanwhile; the slower it multiplies, the longer the DRAM idles (x read and prepared after the wait: +5.5 us per
layer; the products: +5.5 us; both: +16.6, docs/benchmarks). A CTA here keeps up to STAGES x STAGE_BYTES of weights
in flight (PRE of them before the wait), multiplies 8 nibbles in 7 instructions (4 `dp2a` on x as 16-bit integers), and
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

import functools

import torch

from tuili.ops.int4_mma import _launch, _shared_limit, compile_kernel

SLICE = 32  # K values per thread slice (16 bytes of a weight row)
# per weight width (4: INT4 g128, 8: INT8 per channel):
STAGE_BYTES = {4: 16 << 10, 8: 32 << 10}  # bytes per stage (whole rows, at most 8)
# stages in the ring; INT4 (8B chain, H200, us per layer, all before the wait): 4 stages 48.2, 6: 44.6
STAGES = {4: 6, 8: 3}
# of them copied before PDL's wait; INT4 (chain probe, 6 stages: 0 before 47.5, 2: 44.9, 3: 43.6, 6: 44.6; engine
# with the attention's launch_early, tok/s: 3: 573.9-574.2, 4: 577.4-577.6, 5: 568.1-568.4, 6: 554.1-554.2). INT8
# (engine, 8B batch 1, H200, tok/s): 16 KB stages, 6 of them, 3 / 4 / 5 / 6 before the wait: 423.3 / 427.3 / 422.8
# / 413.5; 8 KB x 12 (8 before) 415.5, x 10 (6) 421.6; 32 KB x 3 (2 before) 433.9 (INT4 that way: 545.8 against 583.1)
PRE = {4: 4, 8: 2}
CTAS_PER_SM = 2  # (4 stages: 3 CTAs per SM 52.7 against 48.2; 1 CTA per SM with 12 stages 48.5)

_SOURCE = r"""typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define SL 32  // values per slice of K (a thread's 16 bytes of an INT4 weight row, 32 of an INT8 one)
#if BITS == 8
#define SB SL  // bytes of a slice
#define WPS (SL / 4)  // words of a slice
#define ROWB K
#define G 1  // (one scale per row)
#else
#define SB (SL / 2)
#define WPS (SL / 8)
#define ROWB (K / 2)
#define G (K / 128)
#endif
#define XW 16  // x words of a slice: 16-bit pairs, 2 per dp2a
#define STAGEB (R * ROWB)
#define W (T / 32)
#define NRED (2 * NST)  // row sums in flight: stage s + 2 NST is copied only after stage s is finished

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
// acc + sum over one word's 8 nibbles (k = 8w + j at bits 4j) of q_j xi_j (xi: pairs (0,2) (4,6) (1,3) (5,7))
__device__ __forceinline__ int dot_word(u32 w, const u32* p, int acc) {
  const u32 lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
  asm("dp2a.lo.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[0]), "r"(lo));
  asm("dp2a.hi.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[1]), "r"(lo));
  asm("dp2a.lo.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[2]), "r"(hi));
  asm("dp2a.hi.s32.u32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[3]), "r"(hi));
  return acc;
}
// acc + sum over one INT8 word's 4 bytes (k = 4w + j) of q_j x_j (x: pairs (0,1) (2,3))
__device__ __forceinline__ int dot_word8(u32 w, const u32* p, int acc) {
  asm("dp2a.lo.s32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[0]), "r"(w));
  asm("dp2a.hi.s32.s32 %0, %1, %2, %0;" : "+r"(acc) : "r"(p[1]), "r"(w));
  return acc;
}
// the R row sums of a warp: afterwards lane l holds row row_of(l) in a[0], complete in lanes l % (32 / R) == 0
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

extern "C" __global__ void __launch_bounds__(T + 32, MIN_CTAS) stream_gemv(
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
  u64* empty = full + NST;
  u64* sums = empty + NST;
  float* red = (float*)(sums + NRED);  // [NRED][W][R] the warps' row sums
  u16* scs = (u16*)(red + NRED * W * R);  // [G][sstride] (INT8: [rmax], one scale per row)
  u16* ofs = scs + G * sstride;
  u16* res = ofs + (HAS_OFFSET ? G * sstride : 0);  // [rmax] the residual rows (ADD)
  u16* nws = res + rmax;  // [rmax] the next norm's weights of those rows (ADD)

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
  // weights and scales do not depend on the kernels before: copied before PDL's wait
  if (tid == T) {  // PRE stages before the wait (the rest once x is read: x queues behind what is in flight)
    for (int s = 0; s < PRE && s < NST && s < nstages; ++s)
      copy_stage(ring + s * STAGEB, qw + (size_t)(r0 + s * R) * ROWB, min(R, rows - s * R) * ROWB, full + s);
  }
  for (int i = tid; i < G * (rows / 2); i += T + 32) {
    const int g = i / (rows / 2), p = i - g * (rows / 2);
    cp4(scs + g * sstride + 2 * p, sc + (size_t)g * N + r0 + 2 * p);  // (G 1: INT8's row scales)
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
  if (warp == W) {  // the producer: refills the ring, finishes each stage's rows
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
    if (lane == 0)
      for (int s = PRE; s < NST && s < nstages; ++s)
        copy_stage(ring + s * STAGEB, qw + (size_t)(r0 + s * R) * ROWB, min(R, rows - s * R) * ROWB, full + s);
    float sq = 0.0f;
    for (int st = 0; st < nstages; ++st) {
      const int buf = st % NST, slot = st % NRED, rh = min(R, rows - st * R);
      if (st + NST < nstages) {  // the compute warps have read stage st: its buffer takes stage st + NST
        wait_bar(empty + buf, (st / NST) & 1);
        const int s2 = st + NST;
        if (lane == 0)
          copy_stage(ring + buf * STAGEB, qw + (size_t)(r0 + s2 * R) * ROWB, min(R, rows - s2 * R) * ROWB, full + buf);
      }
      wait_bar(sums + slot, (st / NRED) & 1);
      if (lane < rh) {
        float y = 0.0f;
        _Pragma("unroll") for (int w = 0; w < W; ++w) y += red[(slot * W + w) * R + lane];
        const int lr = st * R + lane, row = r0 + lr;
#if BITS == 8
        y *= bf(scs[lr]);  // the row's scale (as the Triton GEMV: the sum, times the scale, times 1 / rms)
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
      __syncwarp();  // every lane's reads of red[slot] before lane 0's next copy (which lets it be written again)
    }
#if ADD
    _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) ss[blockIdx.x] = sq;  // the rows' sums of squares, in a fixed order
#endif
    return;
  }
  // x of this thread's slices as 16-bit integers times 2^(e - 13) (e: the exponent of the slice's largest |x|)
  u32 xp[NSL][XW];
  float xsum[NSL], p2e[NSL];
  _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
    const int k0 = (tid + i * T) * SL;
    float vals[SL], s = 0.0f, big = 0.0f;
    _Pragma("unroll") for (int c = 0; c < SL / 8; ++c) {
      const uint4 v = *(const uint4*)(x + k0 + 8 * c);
#if SILU_MUL
      const uint4 u = *(const uint4*)(x + K + k0 + 8 * c);
#endif
      _Pragma("unroll") for (int j = 0; j < 8; ++j) {
        const u32 word = ((const u32*)&v)[j / 2];
        float val = (j & 1) ? bf_hi(word) : bf(word);
#if SILU_MUL
        const u32 uw = ((const u32*)&u)[j / 2];
        val = silu_mul(val, (j & 1) ? bf_hi(uw) : bf(uw));
#endif
        vals[8 * c + j] = val;
        s += val;
        big = fmaxf(big, fabsf(val));
      }
    }
    const int eb = max((int)((__float_as_uint(big) >> 23) & 0xFF), 16);
    const float up = __uint_as_float((u32)(267 - eb) << 23);
    _Pragma("unroll") for (int h = 0; h < SL / 8; ++h) {
      int q[8];
      _Pragma("unroll") for (int j = 0; j < 8; ++j) q[j] = __float2int_rn(vals[8 * h + j] * up);
#if BITS == 8  // consecutive pairs: bytes 0-1 and 2-3 of a word
      _Pragma("unroll") for (int j = 0; j < 4; ++j)
        xp[i][4 * h + j] = (u32)(q[2 * j] & 0xFFFF) | ((u32)q[2 * j + 1] << 16);
#else
      xp[i][4 * h + 0] = (u32)(q[0] & 0xFFFF) | ((u32)q[2] << 16);
      xp[i][4 * h + 1] = (u32)(q[4] & 0xFFFF) | ((u32)q[6] << 16);
      xp[i][4 * h + 2] = (u32)(q[1] & 0xFFFF) | ((u32)q[3] << 16);
      xp[i][4 * h + 3] = (u32)(q[5] & 0xFFFF) | ((u32)q[7] << 16);
#endif
    }
    p2e[i] = __uint_as_float((u32)(eb - 13) << 23);
    xsum[i] = s;
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  const int my_row = row_of(lane);
  const bool writer = (lane & (32 / R - 1)) == 0;
  for (int st = 0; st < nstages; ++st) {
    const int buf = st % NST, slot = st % NRED, lr0 = st * R;
    wait_bar(full + buf, (st / NST) & 1);
    const unsigned char* sb = ring + buf * STAGEB;
    uint4 w[R][NSL][SB / 16];
    u32 s[R][NSL], m[R][NSL];
    _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i)
      _Pragma("unroll") for (int c = 0; c < SB / 16; ++c)
        w[r][i][c] = *(const uint4*)(sb + r * ROWB + (tid + i * T) * SB + 16 * c);
    // the stage is in registers: its buffer may take the next copy, once these generic-proxy reads are ordered
    // before the copy's async-proxy writes (without the fence, 1-16 rows of 2048 read the next stage's bytes when
    // that copy came from L2 at once: one stage, one row per stage)
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    if (lane == 0) arrive(empty + buf);
#if BITS == 4
    _Pragma("unroll") for (int r = 0; r < R; ++r) _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
      const int g = (tid + i * T) * SL / 128;
      s[r][i] = scs[g * sstride + lr0 + r];
      if (HAS_OFFSET) m[r][i] = ofs[g * sstride + lr0 + r];
    }
#endif
    float acc[R];
    _Pragma("unroll") for (int r = 0; r < R; ++r) {
      float a = 0.0f;
      _Pragma("unroll") for (int i = 0; i < NSL; ++i) {
        const u32* wv = (const u32*)&w[r][i][0];
        int d = 0;
#if BITS == 8  // |d| < 2^26: the float rounds it by at most 2^-24
        _Pragma("unroll") for (int h = 0; h < WPS; ++h) d = dot_word8(wv[h], xp[i] + 2 * h, d);
        a = fmaf(p2e[i], (float)d, a);  // 2^(e - 13) d (the row's scale comes in the epilogue)
#else
        _Pragma("unroll") for (int h = 0; h < WPS; ++h) d = dot_word(wv[h], xp[i] + 4 * h, d);
        const float sc_ = bf(s[r][i]), mo = HAS_OFFSET ? bf(m[r][i]) : -8.0f * sc_;
        a = fmaf(sc_ * p2e[i], (float)d, fmaf(mo, xsum[i], a));  // 2^(e - 13) s d + m sum x (|d| < 2^23: exact)
#endif
      }
      acc[r] = a;
    }
    reduce_rows(acc, lane);
    if (writer) red[(slot * W + warp) * R + my_row] = acc[0];
    __syncwarp();
    if (lane == 0) arrive(sums + slot);
  }
}
"""


def plan(n: int, k: int, bits: int = 4) -> tuple[int, int, int] | None:
    """(threads, slices per thread, rows per stage) for an [n, k] layer of `bits` (4: INT4 g128, 8: INT8 per
    channel), or None where the kernel does not fit it: 32-value slices spread evenly over 64-256 threads (a
    multiple of 32, at most 4 slices each), N even."""
    if k % (SLICE * 32) or n % 2 or n <= 0:
        return None
    slices = k // SLICE
    threads = next((t for t in range(256, 63, -32) if slices % t == 0), None)
    if threads is None or slices // threads > 4:
        return None
    rows = 1
    while rows < 8 and 2 * rows * (k * bits // 8) <= STAGE_BYTES[bits]:
        rows *= 2
    return threads, slices // threads, rows


def supports(n: int, k: int, group_size: int, bits: int = 4) -> bool:
    """INT4 with groups of 128 or INT8 per output channel (group_size 0), in a shape `plan` fits."""
    return group_size == (128 if bits == 4 else 0) and bits in (4, 8) and plan(n, k, bits) is not None


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether the tensors the kernel copies 4 bytes at a time into shared memory start 4-byte aligned."""
    return all(t is None or t.data_ptr() % 4 == 0 for t in tensors)


@functools.cache
def fits(n: int, k: int, has_offset: bool, device: torch.device, bits: int = 4) -> bool:
    """Whether the default grid's CTAs fit shared memory with 2 stages (the scales of their rows grow with N)."""
    threads, _, rows = plan(n, k, bits)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_bytes(k, threads, rows, 2, _grid(n, device)[1], has_offset, bits) <= _shared_limit(index)


def _grid(n: int, device: torch.device, ctas: int | None = None) -> tuple[int, int]:
    """(CTAs, rmax): CTAS_PER_SM per SM unless given, at most one per row pair; rmax the most rows a CTA takes,
    rounded up to a multiple of 4 (the scales' row stride rmax + 2: no bank conflicts)."""
    ctas = min(ctas or torch.cuda.get_device_properties(device).multi_processor_count * CTAS_PER_SM, n // 2)
    rmax = 2 * -(-(n // 2) // ctas)
    return ctas, rmax + -rmax % 4


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (CUDA, compute capability 9.0 or later: bulk copies; NVRTC)."""
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        _compiled(device.index if device.index is not None else torch.cuda.current_device(), 4096, 128, 1, 8, 2, 1,
                  True, False, False, False, 4)
    except Exception:  # no NVRTC in this install: the Triton GEMV
        return False
    return True


@functools.cache
def _compiled(index: int, k: int, threads: int, nsl: int, rows: int, stages: int, pre: int, has_offset: bool,
              silu_mul: bool, norm: bool, add: bool, bits: int):
    defines = dict(K=k, T=threads, NSL=nsl, R=rows, NST=stages, PRE=pre, BITS=bits, HAS_OFFSET=int(has_offset),
                   SILU_MUL=int(silu_mul), NORM=int(norm), ADD=int(add), PDL=1, MIN_CTAS=CTAS_PER_SM)
    return compile_kernel(index, _SOURCE, "stream_gemv", defines)


def shared_bytes(k: int, threads: int, rows: int, stages: int, rmax: int, has_offset: bool, bits: int = 4) -> int:
    """Shared memory of one CTA: the ring, its barriers and row sums, the scales (and offsets) of rmax rows (INT8:
    one per row), the residual rows and norm weights (ADD), and slack for the stale rows a partial stage reads."""
    groups = k // 128 if bits == 4 else 1
    return stages * rows * (k * bits // 8) + 8 * 4 * stages + 4 * 2 * stages * (threads // 32) * rows \
        + 2 * (groups * (rmax + 2) * (2 if has_offset else 1) + 2 * rmax) + 64


def stream_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                silu_mul: bool = False, norm: tuple | None = None, residual: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, ctas: int | None = None, stages: int | None = None,
                pre: int | None = None, rows: int | None = None):
    """One row of x [1, K] (bf16; [1, 2K] = [gate | up] with silu_mul) @ W^T for an INT4 g128 layer (qweight uint8
    [N, K/2], group-major bf16 scales and offsets [N, K/128]) or an INT8 one per output channel (qweight int8 [N, K],
    bf16 scales [N], no offsets); the fused forms as quant_matmul.quant_linear_triton's GEMV (norm=(eps, ss);
    residual + norm_weight -> (h, hw, ss)). ctas, stages, pre (stages copied before PDL's wait) and rows (per
    stage) override the defaults (sweeps, tests)."""
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError("stream_gemv takes one row of bf16 x and an INT4 or INT8 layer that `plan` fits")
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    n = qweight.shape[0]
    bits = 8 if qweight.dtype == torch.int8 else 4
    p = plan(n, k, bits)
    if x.dtype != torch.bfloat16 or x.shape[0] != 1 or p is None or qweight.dtype not in (torch.uint8, torch.int8) \
            or qweight.shape[1] * 8 // bits != k:
        raise ValueError("stream_gemv takes one row of bf16 x and an INT4 or INT8 layer that `plan` fits")
    if not x.is_contiguous() or x.data_ptr() % 16 or not qweight.is_contiguous() or qweight.data_ptr() % 16:
        raise ValueError("stream_gemv needs contiguous, 16-byte aligned x and qweight")
    if bits == 8 and (scales.dtype != torch.bfloat16 or scales.shape != (n,) or not scales.is_contiguous()
                      or offsets is not None):
        raise ValueError("stream_gemv needs bf16 scales [N] and no offsets for INT8 (per output channel)")
    if bits == 4 and (scales.dtype != torch.bfloat16 or scales.shape != (n, k // 128) or scales.stride() != (1, n)
                      or (offsets is not None and (offsets.shape != scales.shape or offsets.stride() != (1, n)
                                                   or offsets.dtype != scales.dtype))):
        raise ValueError("stream_gemv needs group-major bf16 scales and offsets [N, K/128] (group size 128)")
    if residual is not None and (residual.shape != (1, n) or residual.dtype != x.dtype or not residual.is_contiguous()
                                 or norm_weight is None or norm_weight.shape != (n,)
                                 or norm_weight.dtype != x.dtype or not norm_weight.is_contiguous()):
        raise ValueError(f"residual must be a bf16 [1, {n}] tensor with an {n}-value norm_weight")
    if norm is not None and (norm[1].dtype != torch.float32 or norm[1].dim() != 2 or norm[1].shape[0] != 1
                             or not norm[1].is_contiguous()):
        raise ValueError("norm needs fp32 sums of squares [1, tiles], contiguous")
    if norm is not None and residual is not None:
        raise ValueError("norm (reading sums of squares) and residual (writing them) do not come together")
    if not aligned(scales, offsets, norm_weight):  # 4-byte copies into shared memory
        raise ValueError("stream_gemv needs scales, offsets and norm_weight at 4-byte aligned addresses")
    tensors = [t for t in (qweight, scales, offsets, residual, norm_weight, norm[1] if norm else None) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("stream_gemv's tensors must all be on x's device")
    if stages is not None and stages < 1 or pre is not None and pre < 0 or ctas is not None and ctas < 1 \
            or rows not in (None, 1, 2, 4, 8):
        raise ValueError("stream_gemv needs 1+ stages, 0+ of them before the wait, 1+ CTAs and 1, 2, 4 or 8 rows per "
                         "stage")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    threads, nsl, stage_rows = p
    stage_rows = rows or stage_rows
    ctas, rmax = _grid(n, x.device, ctas)
    size = functools.partial(shared_bytes, k, threads, stage_rows, rmax=rmax, has_offset=offsets is not None,
                             bits=bits)
    if stages is None:  # CTAS_PER_SM CTAs fit an SM
        fit = (_shared_limit(index) + 1024) // CTAS_PER_SM - 1024
        stages = STAGES[bits]
        while stages > 2 and size(stages) > fit:
            stages -= 1
    shared = size(stages)
    if shared > _shared_limit(index):
        raise ValueError(f"stream_gemv's {stages} stages and the scales of {rmax} rows do not fit shared memory")
    pre = min(PRE[bits] if pre is None else pre, stages)
    kernel = _compiled(index, k, threads, nsl, stage_rows, stages, pre, offsets is not None, silu_mul,
                       norm is not None, residual is not None, bits)
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
