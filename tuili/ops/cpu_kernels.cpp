// tuili's CPU kernels: matrix-vector products over packed weights (decode-sized batches) and one sequence's whole
// decode step, built on first use by tuili/ops/cpu_kernels.py with the machine's own instruction set
// (-march=native) and registered as torch ops (torch.ops.tuili.*).
//
// Why: on a small model a CPU decode step is memory traffic plus per-op overhead. The weights are read with a
// nibble turned into bf16 in two integer instructions and multiplied by `vdpbf16ps` (32 exact products per
// instruction, summed in fp32), so the loops keep up with the memory; and the step's ~45 small torch ops per
// layer become plain loops in one call (decode_step, at the end).
//
// int4_gemv: x [M, K] bf16; w [N, K/2] uint8 in the "paired" layout (cpu_kernels.pack_int4): each 64 inputs of a
// row are 32 bytes, byte j holding input j in its low nibble and input 32 + j in its high nibble; scales and
// offsets [N, K/group] bf16, row-major: W[n, k] = s[n, g] * q[n, k] + o[n, g], g = k / group.
// A nibble q becomes the bf16 number 128 + q by OR-ing it into 0x4300 (bf16 128, whose last mantissa bit is 1),
// so a 32-input sub-block gives dot = sum (128 + q) x, and
//   y = sum_g s_g * dot_g + (o_g - 128 s_g) * sum_{k in g} x_k.
// With x, scales and offsets in fp32 (an fp32 model) and y fp32, the nibbles become fp32 and are multiplied by FMA
// (AVX2, in both builds): y = sum_g s_g * dot_g + o_g * sum_{k in g} x_k, every product exact.
// int8_gemv: x [M, K] bf16 or fp32; w [N, K] int8; s [N]: y = s[n] * sum_k w[n, k] x[k], or s [N, K / G] (groups
// of G = 16 or 32 inputs: GGUF Q6_K, Q8_0): y = sum_k s[n, k / G] w[n, k] x[k] (weights to fp32, FMA; on AVX2 with
// bf16 x, in integers as below). int8_dequant: such a weight in fp32, for a float GEMM (prefill).
// int4_dequant: the fp32 weight of an int4_gemv layer, for a float GEMM where x has many rows (prefill).
// bf16_gemv: x [M, K] bf16, w [N, K] bf16 (a float model's layer): y = bf16(sum_k w[n, k] x[k]), the weights to
// fp32 by a shift and FMA-accumulated in fp32 (as torch's bf16 linear: every product exact, one rounding at the end).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

// Two instruction sets: AVX-512 with BF16 (Zen 4, Sapphire Rapids and later: vdpbf16ps, as described above) and
// AVX2 + FMA (nearly every x86-64 CPU since 2013), where bf16 x becomes 16-bit integers per 32 inputs (x16_prepare)
// and `vpmaddwd` multiplies them by the nibbles or bytes, 16 exact products per instruction. -march=native picks.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define TUILI_AVX512BF16 1
#elif defined(__AVX2__) && defined(__FMA__)
#define TUILI_AVX512BF16 0
#else
#error "tuili's CPU kernels need x86-64 with AVX2 and FMA; without them tuili uses torch's packed kernels"
#endif

namespace {

constexpr int64_t kMaxGroups = 512;  // K / group (group 32: K up to 16384)
constexpr int64_t kAhead = 1024;      // bytes a weight stream is prefetched ahead of its loads
constexpr int64_t kAheadBf16 = 4096;  // the same for bf16 weights (30 layers' GEMVs of the default model in bf16, cold,
// medians of 15 alternated: 1 KB 19.4 ms, 2 KB 17.6, 4 KB 17.0; 49152 x 576: 4.8, 4.2, 4.3)

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) { return c10::BFloat16(f).x; }

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(_mm_hadd_ps(a, a));
}

// 8 bf16 values as fp32
inline __m256 load8_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// four groups of 8 nibbles (bytes j..j+7 of a 64-input chunk: inputs j.. low, 32 + j.. high) as fp32
inline void nibbles8(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_to_float(v); }
inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) { *y = float_to_bf16(v); }

// the R weight rows' scales from n as fp32, and the offsets' part of y for each x row: sum_g o_g sum_{k in g} x_k
template <int M, int R, typename S>
void scales_and_bias(const S* s, const S* o, int64_t groups, const float* sx, int64_t ldsx, int64_t n,
                     float (&scale)[R][kMaxGroups], float (&bias)[M][R]) {
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      scale[r][g] = as_float(s[(n + r) * groups + g]);
      const float off = as_float(o[(n + r) * groups + g]);
      for (int m = 0; m < M; ++m) bias[m][r] += off * sx[m * ldsx + g];
    }
}

// y[m, n + r] for the x rows m < M and R weight rows from n, x in fp32, the nibbles converted to fp32 and
// multiplied by FMA (exact products): y = sum_g s_g * dot_g + o_g * sum_{k in g} x_k. S: the scales' and offsets'
// storage (fp32, or bf16 bits); Y: y's. sx: [M, groups padded to ldsx], the sums of x per group.
template <int M, int R, typename S, typename Y>
void int4_rows_fma(const float* xf, int64_t K, const uint8_t* w, const S* s, const S* o, int64_t groups, int shift,
                   const float* sx, int64_t ldsx, int64_t n, Y* y, int64_t ldy) {
  float scale[R][kMaxGroups], bias[M][R] = {};
  scales_and_bias<M, R>(s, o, groups, sx, ldsx, n, scale, bias);
  __m256 acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* wc = w + (n + r) * (K / 2) + 32 * c;
      __m256 d[M][2];
      for (int m = 0; m < M; ++m) d[m][0] = d[m][1] = _mm256_setzero_ps();
      for (int j = 0; j < 32; j += 8) {
        __m256 lo, hi;
        nibbles8(wc + j, lo, hi);
        for (int m = 0; m < M; ++m) {
          const float* xm = xf + m * K + 64 * c + j;
          d[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), d[m][0]);
          d[m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 32), d[m][1]);
        }
      }
      const __m256 s0 = _mm256_set1_ps(scale[r][(2 * c) >> shift]);
      const __m256 s1 = _mm256_set1_ps(scale[r][(2 * c + 1) >> shift]);
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = _mm256_fmadd_ps(d[m][0], s0, acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(d[m][1], s1, acc[m][r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      store(y + m * ldy + n + r, hsum8(_mm256_add_ps(acc[m][r][0], acc[m][r][1])) + bias[m][r]);
}

#if TUILI_AVX512BF16
constexpr const char* kIsa = "avx512_bf16";

// 16 bf16 values (the lanes of `mask`, zero elsewhere) as fp32
inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// y[m, n + r] for the x rows m < M and R weight rows from n (independent FMA chains). sx: [M, groups padded to 16]
template <int M, int R>
void int4_rows(const uint16_t* x, const int16_t*, const float*, int64_t K, const uint8_t* w, const uint16_t* s,
               const uint16_t* o, int64_t groups, int shift, const float* sx, int64_t ldsx, int64_t n, uint16_t* y,
               int64_t ldy) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300);
  alignas(64) float scale[R][kMaxGroups + 16];  // the rows' scales in fp32
  __m512 acc[M][R][2];
  for (int r = 0; r < R; ++r) {  // scales to fp32; the offsets' part of y: sum_g (o_g - 128 s_g) sum_g x
    for (int m = 0; m < M; ++m) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mask = groups - g >= 16 ? 0xFFFF : __mmask16((1u << (groups - g)) - 1);
      const __m512 sv = load_bf16(s + (n + r) * groups + g, mask), ov = load_bf16(o + (n + r) * groups + g, mask);
      _mm512_store_ps(scale[r] + g, sv);
      const __m512 cv = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), sv, ov);
      for (int m = 0; m < M; ++m) acc[m][r][1] = _mm512_fmadd_ps(cv, _mm512_loadu_ps(sx + m * ldsx + g), acc[m][r][1]);
    }
  }
  for (int64_t c = 0; c < K / 64; ++c) {
    for (int r = 0; r < R; ++r) {
      const __m512i bytes = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * (K / 2) + 32 * c)));
      const __m512i lo = _mm512_ternarylogic_epi32(bytes, low4, bf16_128, 0xEA);  // (a & b) | c
      const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), bf16_128);
      const __m512 s0 = _mm512_set1_ps(scale[r][(2 * c) >> shift]);
      const __m512 s1 = _mm512_set1_ps(scale[r][(2 * c + 1) >> shift]);
      for (int m = 0; m < M; ++m) {
        const uint16_t* xm = x + m * K + 64 * c;
        const __m512 d0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                           (__m512bh)_mm512_loadu_si512(xm));
        const __m512 d1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)hi,
                                           (__m512bh)_mm512_loadu_si512(xm + 32));
        acc[m][r][0] = _mm512_fmadd_ps(d0, s0, acc[m][r][0]);
        acc[m][r][1] = _mm512_fmadd_ps(d1, s1, acc[m][r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + n + r] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1])));
}

#else  // AVX2 + FMA
constexpr const char* kIsa = "avx2";

// as above, the products in integers: x as 16-bit integers xq per 32-input sub-block (times xfac, a power of two
// from the sub-block's largest |x|: x16_prepare), each 64-input chunk's 32 bytes read as 16 words whose nibbles,
// low to high, are inputs 2i, 32 + 2i, 2i + 1, 33 + 2i (xq holds the chunk as the runs 2i, 2i + 1, 32 + 2i,
// 33 + 2i), `vpmaddwd` against them (16 exact products per instruction), one int-to-float per sub-block:
// y = sum_g s_g xfac dot_g + o_g sum_{k in g} x_k. About half the instructions per weight of the nibbles to fp32
// (int4_rows_fma): a 3072 x 576 layer in cache, one core, 145 against 238 us.
template <int M, int R>
void int4_rows(const uint16_t*, const int16_t* xq, const float* xfac, int64_t K, const uint8_t* w,
               const uint16_t* s, const uint16_t* o, int64_t groups, int shift, const float* sx, int64_t ldsx,
               int64_t n, uint16_t* y, int64_t ldy) {
  // the offsets' part, sum_g o_g sum_{k in g} x_k, 8 groups at a time (the scales are read as the loop needs them:
  // each is used once per x row, so converting them all first cost ~30% of the time)
  float bias[M][R];
  for (int r = 0; r < R; ++r) {
    const uint16_t* orow = o + (n + r) * groups;
    prefetch(reinterpret_cast<const char*>(orow) + kAhead / 4);
    prefetch(reinterpret_cast<const char*>(s + (n + r) * groups) + kAhead / 4);
    __m256 b[M];
    for (int m = 0; m < M; ++m) b[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 off = load8_bf16(orow + g);
      for (int m = 0; m < M; ++m) b[m] = _mm256_fmadd_ps(off, _mm256_loadu_ps(sx + m * ldsx + g), b[m]);
    }
    for (int m = 0; m < M; ++m) {
      bias[m][r] = hsum8(b[m]);
      for (int64_t t = g; t < groups; ++t) bias[m][r] += bf16_to_float(orow[t]) * sx[m * ldsx + t];
    }
  }
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  const int64_t subs = K / 32;
  __m256 acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 64; ++c) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* wc = w + (n + r) * (K / 2) + 32 * c;
      prefetch(wc + kAhead);
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc));
      const __m256i a = _mm256_and_si256(words, low4);                         // inputs 2i
      const __m256i b = _mm256_and_si256(_mm256_srli_epi16(words, 8), low4);   // 2i + 1
      const __m256i h = _mm256_and_si256(_mm256_srli_epi16(words, 4), low4);   // 32 + 2i
      const __m256i d = _mm256_srli_epi16(words, 12);                          // 33 + 2i
      const uint16_t* srow = s + (n + r) * groups;
      const float s0 = bf16_to_float(srow[(2 * c) >> shift]), s1 = bf16_to_float(srow[(2 * c + 1) >> shift]);
      for (int m = 0; m < M; ++m) {
        const __m256i* xm = reinterpret_cast<const __m256i*>(xq + m * K + 64 * c);
        const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(xm)),
                                            _mm256_madd_epi16(b, _mm256_loadu_si256(xm + 1)));
        const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(h, _mm256_loadu_si256(xm + 2)),
                                            _mm256_madd_epi16(d, _mm256_loadu_si256(xm + 3)));
        const float* f = xfac + m * subs + 2 * c;
        acc[m][r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(s0 * f[0]), acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(s1 * f[1]), acc[m][r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * ldy + n + r] = float_to_bf16(hsum8(_mm256_add_ps(acc[m][r][0], acc[m][r][1])) + bias[m][r]);
}

#endif

// rows.template operator()<B, R>(m0, n) (y for the B <= 4 rows of x from m0 and the R <= 2 weight rows from n) over
// all of y, in parallel: 16 weight rows at a time, for every block of four x rows (16 accumulators): more than four
// rows of x read the weights from memory once, then from cache
template <typename Rows>
void int4_parallel(int64_t M, int64_t N, const Rows& rows) {
  at::parallel_for(0, (N + 1) / 2, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 2 * begin; c0 < std::min(N, 2 * end); c0 += 16) {
      const int64_t c1 = std::min({N, 2 * end, c0 + 16});
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        auto block = [&]<int B>() {
          int64_t n = c0;
          for (; n + 2 <= c1; n += 2) rows.template operator()<B, 2>(m0, n);
          if (n < c1) rows.template operator()<B, 1>(m0, n);
        };
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: block.template operator()<1>(); break;
          case 2: block.template operator()<2>(); break;
          case 3: block.template operator()<3>(); break;
          default: block.template operator()<4>(); break;
        }
      }
    }
  });
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "tuili CPU kernel: ", what); }

inline int group_shift(int64_t group) { return group == 32 ? 0 : group == 64 ? 1 : 2; }  // sub-block of 32 -> group

// x [M, K] bf16 as 16-bit integers for the AVX2 kernels: per sub-block of 32 inputs, xq = round(x * 2^e) with
// 2^e putting the largest |x| in [2^13, 2^14) (values under 2^-6 of it lose their low bits, below the bf16
// output's own rounding), xfac = 2^-e. `pairs`: each 64 inputs in the order the INT4 kernel's words hold them,
// four runs of 16: x[2i], x[2i + 1], x[32 + 2i], x[33 + 2i] for i < 16; else as they are.
#if !TUILI_AVX512BF16
void x16_prepare(const uint16_t* xp, int64_t M, int64_t K, bool pairs, int16_t* xq, float* xfac) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  alignas(32) int32_t q[32];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t sb = 0; sb < K / 32; ++sb) {
      const uint16_t* x = xp + m * K + 32 * sb;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j] = load8_bf16(x + 8 * j)));
      __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a = _mm_max_ps(a, _mm_movehl_ps(a, a));
      const float largest = _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
      uint32_t bits;
      std::memcpy(&bits, &largest, 4);
      const int biased = int(bits >> 23);  // |largest|'s biased exponent: largest in [2^(biased - 127), twice that)
      const int e = biased ? std::clamp(140 - biased, -100, 100) : 0;  // 13 - (biased - 127); 0 (or subnormal): 0
      const uint32_t up_bits = uint32_t(127 + e) << 23, fac_bits = uint32_t(127 - e) << 23;  // 2^e, 2^-e
      float up_f, fac_f;
      std::memcpy(&up_f, &up_bits, 4);
      std::memcpy(&fac_f, &fac_bits, 4);
      const __m256 up = _mm256_set1_ps(up_f);
      xfac[m * (K / 32) + sb] = fac_f;
      for (int j = 0; j < 4; ++j)  // rounded to nearest (even), as the FPU rounds by default
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * j), _mm256_cvtps_epi32(_mm256_mul_ps(v[j], up)));
      int16_t* out = xq + m * K + 32 * sb;
      for (int i = 0; i < 32; ++i)  // (pairs: the chunk's sub-block 2c fills its runs 0-1, 2c + 1 runs 2-3)
        out[pairs ? (i % 2) * 16 + i / 2 : i] = static_cast<int16_t>(q[i]);
    }
}
#endif

// y [M, N] bf16 = x [M, K] bf16 times an INT4 weight (w [N, K/2] paired, so [2, N, K/group] bf16)
void int4_run(const uint16_t* xp, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp, int64_t N,
              int64_t group, uint16_t* yp) {
  const int64_t groups = K / group;
  const int64_t ldsx = (groups + 15) / 16 * 16;
  std::vector<float> sx(M * ldsx, 0.f);  // sum of x over each group (zero-padded to 16)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sx[m * ldsx + k / group] += bf16_to_float(xp[m * K + k]);
  std::vector<int16_t> xq(TUILI_AVX512BF16 ? 0 : M * K);  // the AVX2 path multiplies in integers
  std::vector<float> xfac(TUILI_AVX512BF16 ? 0 : M * (K / 32));
#if !TUILI_AVX512BF16
  x16_prepare(xp, M, K, true, xq.data(), xfac.data());
#endif
  const uint16_t* op = sp + N * groups;
  const int shift = group_shift(group);
  int4_parallel(M, N, [&]<int B, int R>(int64_t m0, int64_t n) {
    int4_rows<B, R>(xp + m0 * K, xq.data() + (TUILI_AVX512BF16 ? 0 : m0 * K),
                    xfac.data() + (TUILI_AVX512BF16 ? 0 : m0 * (K / 32)), K, wp, sp, op, groups, shift,
                    sx.data() + m0 * ldsx, ldsx, n, yp + m0 * N, N);
  });
}

// the same in fp32 (so [2, N, K/group] fp32)
void int4_run_f32(const float* xp, int64_t M, int64_t K, const uint8_t* wp, const float* sp, int64_t N,
                  int64_t group, float* yp) {
  const int64_t groups = K / group;
  std::vector<float> sx(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sx[m * groups + k / group] += xp[m * K + k];
  const float* op = sp + N * groups;
  const int shift = group_shift(group);
  int4_parallel(M, N, [&]<int B, int R>(int64_t m0, int64_t n) {
    int4_rows_fma<B, R>(xp + m0 * K, K, wp, sp, op, groups, shift, sx.data() + m0 * groups, groups, n, yp + m0 * N, N);
  });
}

void check_int4(const at::Tensor& w, const at::Tensor& so, int64_t K, int64_t group, at::ScalarType dtype) {
  check(K % 64 == 0 && (group == 32 || group == 64 || group == 128) && K % group == 0,
        "K must be a multiple of 64 and of the group (32, 64 or 128)");
  check(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) == K / 2,
        "w must be contiguous uint8 [N, K/2]");
  const int64_t groups = K / group;
  check(groups <= kMaxGroups, "too many groups");
  check(so.scalar_type() == dtype && so.is_contiguous() && so.dim() == 3 && so.size(0) == 2 &&
            so.size(1) == w.size(0) && so.size(2) == groups,
        "scales and offsets must be contiguous [2, N, K/group] in x's dtype");
}

inline const uint16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* bf16_ptr(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& so, int64_t group) {
  const bool f32 = x.scalar_type() == at::kFloat;
  check(x.dim() == 2 && (f32 || x.scalar_type() == at::kBFloat16) && x.is_contiguous(),
        "x must be contiguous bf16 or fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_int4(w, so, K, group, x.scalar_type());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (f32)
    int4_run_f32(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), so.data_ptr<float>(), N, group, y.data_ptr<float>());
  else
    int4_run(bf16_ptr(x), M, K, w.data_ptr<uint8_t>(), bf16_ptr(so), N, group, bf16_ptr(y));
  return y;
}

// bf16_gemv's rows: y for the B <= 4 rows of x (fp32) from m0 and the R <= 2 weight rows from n; two accumulators
// per pair (FMA latency)
template <int M, int R>
void bf16_rows(const float* xf, int64_t K, const uint16_t* w, int64_t n, uint16_t* out, int64_t ldo) {
  __m256 acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    for (int r = 0; r < R; ++r) {
      const uint16_t* wr = w + (n + r) * K + k;
      prefetch(reinterpret_cast<const char*>(wr) + kAheadBf16);
      const __m256 w0 = load8_bf16(wr), w1 = load8_bf16(wr + 8);
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), acc[m][r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * ldo + n + r] = float_to_bf16(hsum8(_mm256_add_ps(acc[m][r][0], acc[m][r][1])));
}

void bf16_run(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* y) {
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(x[i]);
  int4_parallel(M, N, [&]<int B, int R>(int64_t m0, int64_t n) {  // (its blocks of rows suit any GEMV here)
    bf16_rows<B, R>(xf.data() + m0 * K, K, w, n, y + m0 * N, N);
  });
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  check(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x must be contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(K % 16 == 0, "K must be a multiple of 16");
  check(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
        "w must be contiguous bf16 [N, K]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) bf16_run(bf16_ptr(x), M, K, bf16_ptr(w), N, bf16_ptr(y));
  return y;
}

// W [N, K] fp32 = s q + o from the paired INT4 layout (scales and offsets bf16 or fp32): the weight for a float
// GEMM where x has many rows (prefill), which there runs several times faster than any INT4 product here
at::Tensor int4_dequant(const at::Tensor& w, const at::Tensor& so, int64_t group) {
  check(w.dim() == 2, "w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = 2 * w.size(1), groups = K / std::max<int64_t>(group, 1);
  const bool f32 = so.scalar_type() == at::kFloat;
  check_int4(w, so, K, group, f32 ? at::kFloat : at::kBFloat16);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const float* sf = f32 ? so.data_ptr<float>() : nullptr;
  const uint16_t* sb = f32 ? nullptr : bf16_ptr(so);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t c = 0; c < K / 64; ++c)
        for (int64_t j = 0; j < 32; j += 8) {
          const int64_t g_lo = (64 * c + j) / group, g_hi = (64 * c + 32 + j) / group;
          auto param = [&](int64_t part, int64_t g) {  // scale (part 0) or offset (1) of row n, group g
            const int64_t i = (part * N + n) * groups + g;
            return f32 ? sf[i] : bf16_to_float(sb[i]);
          };
          __m256 lo, hi;
          nibbles8(wp + n * (K / 2) + 32 * c + j, lo, hi);
          _mm256_storeu_ps(op + n * K + 64 * c + j,
                           _mm256_fmadd_ps(lo, _mm256_set1_ps(param(0, g_lo)), _mm256_set1_ps(param(1, g_lo))));
          _mm256_storeu_ps(op + n * K + 64 * c + 32 + j,
                           _mm256_fmadd_ps(hi, _mm256_set1_ps(param(0, g_hi)), _mm256_set1_ps(param(1, g_hi))));
        }
  });
  return out;
}

// INT8 weights, scaled per output row (s [N] fp32, G = 0) or per group of G = 16 or 32 inputs (gs [N, K / G]
// row-major, in x's dtype: GGUF Q6_K and Q8_0 blocks): out[m, n] = sum_k scale(n, k) w[n, k] x[m, k], written in
// the output's dtype (bf16 or fp32). The group's scale multiplies the weights converted to fp32 (exact for bf16
// scales: 8 by 8 significant bits).
template <int G, typename S>
inline float group_scale(const S* gs, int64_t K, int64_t n, int64_t k) { return as_float(gs[n * (K / G) + k / G]); }

template <int M, int R, int G, typename S, typename T>
void int8_rows(const float* x, int64_t K, const int8_t* w, const float* s, const S* gs, int64_t n, T* out,
               int64_t ldo) {
#if TUILI_AVX512BF16
  using V = __m512;
  constexpr int L = 16;
  auto zero = [] { return _mm512_setzero_ps(); };
  auto weights = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  auto scaled = [](V a, float f) { return _mm512_mul_ps(a, _mm512_set1_ps(f)); };
  auto fma = [](V a, const float* b, V c) { return _mm512_fmadd_ps(a, _mm512_loadu_ps(b), c); };
  auto total = [](V a, V b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); };
#else
  using V = __m256;
  constexpr int L = 8;
  auto zero = [] { return _mm256_setzero_ps(); };
  auto weights = [](const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  };
  auto scaled = [](V a, float f) { return _mm256_mul_ps(a, _mm256_set1_ps(f)); };
  auto fma = [](V a, const float* b, V c) { return _mm256_fmadd_ps(a, _mm256_loadu_ps(b), c); };
  auto total = [](V a, V b) { return hsum8(_mm256_add_ps(a, b)); };
#endif
  V acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = zero();
  for (int64_t k = 0; k < K; k += 2 * L) {
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n + r) * K + k;
      V w0 = weights(wr), w1 = weights(wr + L);
      if constexpr (G > 0) {
        w0 = scaled(w0, group_scale<G>(gs, K, n + r, k));
        w1 = scaled(w1, group_scale<G>(gs, K, n + r, k + L));
      }
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = fma(w0, x + m * K + k, acc[m][r][0]);
        acc[m][r][1] = fma(w1, x + m * K + k + L, acc[m][r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      out[m * ldo + n + r] = T((G > 0 ? 1.f : s[n + r]) * total(acc[m][r][0], acc[m][r][1]));
}

// rows.template operator()<G>() for the group size (0, 16 or 32)
template <typename F>
void with_group(int64_t group, const F& f) {
  if (group == 16)
    f.template operator()<16>();
  else if (group == 32)
    f.template operator()<32>();
  else
    f.template operator()<0>();
}

template <typename S, typename T>
void int8_all(const float* xp, int64_t M, int64_t K, const int8_t* wp, const float* sp, const S* gs, int64_t group,
              int64_t N, T* yp) {
  with_group(group, [&]<int G>() {
    int4_parallel(M, N, [&]<int B, int R>(int64_t m0, int64_t n) {  // (its blocks of rows suit any GEMV here)
      int8_rows<B, R, G>(xp + m0 * K, K, wp, sp, gs, n, yp + m0 * N, N);
    });
  });
}

#if !TUILI_AVX512BF16
// the AVX2 form for bf16 x: y = sum_b scale xfac_b sum_{k in b} w[n, k] xq[k] over sub-blocks b of 32 inputs (xq,
// xfac: x16_prepare), the weights sign-extended to 16 bits and `vpmaddwd` against xq (16 exact products per
// instruction), one int-to-float per sub-block (per 16 inputs for groups of 16)
template <int M, int R, int G>
void int8_rows_i16(const int16_t* xq, const float* xfac, int64_t K, const int8_t* w, const float* s,
                   const uint16_t* gs, int64_t n, uint16_t* out, int64_t ldo) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n + r) * K + 32 * b;
      prefetch(wr + kAhead);
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16)));
      const float s0 = G > 0 ? group_scale<G ? G : 32>(gs, K, n + r, 32 * b) : 1.f;
      const float s1 = G == 16 ? group_scale<16>(gs, K, n + r, 32 * b + 16) : s0;
      for (int m = 0; m < M; ++m) {
        const __m256i* xm = reinterpret_cast<const __m256i*>(xq + m * K + 32 * b);
        const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(xm));
        const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(xm + 1));
        const float f = xfac[m * (K / 32) + b];
        if constexpr (G == 16) {
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(f * s0), acc[m][r]);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(f * s1), acc[m][r]);
        } else {
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), _mm256_set1_ps(f * s0),
                                      acc[m][r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      out[m * ldo + n + r] = float_to_bf16((G > 0 ? 1.f : s[n + r]) * hsum8(acc[m][r]));
}
#endif

// y [M, N] bf16 = x [M, K] bf16 times an INT8 weight (w [N, K] int8; s [N] bf16 for group 0, else [N, K / group])
void int8_run_bf16(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* s, int64_t group,
                   int64_t N, uint16_t* y) {
  std::vector<float> sf(group ? 0 : N);
  for (int64_t i = 0; i < int64_t(sf.size()); ++i) sf[i] = bf16_to_float(s[i]);
#if TUILI_AVX512BF16
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(x[i]);
  int8_all(xf.data(), M, K, w, sf.data(), s, group, N, reinterpret_cast<c10::BFloat16*>(y));
#else
  std::vector<int16_t> xq(M * K);
  std::vector<float> xfac(M * (K / 32));
  x16_prepare(x, M, K, false, xq.data(), xfac.data());
  with_group(group, [&]<int G>() {
    int4_parallel(M, N, [&]<int B, int R>(int64_t m0, int64_t n) {
      int8_rows_i16<B, R, G>(xq.data() + m0 * K, xfac.data() + m0 * (K / 32), K, w, sf.data(), s, n, y + m0 * N, N);
    });
  });
#endif
}

// the group size of INT8 scales s for w [N, K]: 0 for s [N], else K / s.size(1) (16 or 32)
int64_t int8_group(const at::Tensor& w, const at::Tensor& s, at::ScalarType dtype) {
  const int64_t N = w.size(0), K = w.size(1);
  check(w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 2 && K % 32 == 0,
        "w must be contiguous int8 [N, K], K a multiple of 32");
  check(s.scalar_type() == dtype && s.is_contiguous() && s.size(0) == N && s.dim() <= 2 &&
            (s.dim() == 1 || (s.size(1) * 16 == K || s.size(1) * 32 == K)),
        "scales must be contiguous [N] or [N, K / group] (group 16 or 32) in x's dtype");
  return s.dim() == 1 ? 0 : K / s.size(1);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  check(x.dim() == 2 && x.is_contiguous() && (bf16 || x.scalar_type() == at::kFloat),
        "x must be contiguous bf16 or fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(w.dim() == 2 && w.size(1) == K, "w must be [N, K]");
  const int64_t group = int8_group(w, s, x.scalar_type());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (bf16)
    int8_run_bf16(bf16_ptr(x), M, K, w.data_ptr<int8_t>(), bf16_ptr(s), group, N, bf16_ptr(y));
  else  // fp32: x and the scales as they are
    int8_all(x.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), s.data_ptr<float>(), group, N,
             y.data_ptr<float>());
  return y;
}

// W [N, K] fp32 = scale * w from an INT8 layer (s [N] or [N, K / group], bf16 or fp32): the weight for a float GEMM
// where x has many rows (prefill)
at::Tensor int8_dequant(const at::Tensor& w, const at::Tensor& s) {
  check(s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kFloat, "scales must be bf16 or fp32");
  const int64_t group = int8_group(w, s, s.scalar_type()), N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const uint16_t* sb = s.scalar_type() == at::kBFloat16 ? bf16_ptr(s) : nullptr;
  const float* sf = sb ? nullptr : s.data_ptr<float>();
  const int64_t per = group ? K / group : 1, span = group ? group : K;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < per; ++g) {
        const float f = sb ? bf16_to_float(sb[n * per + g]) : sf[n * per + g];
        for (int64_t k = g * span; k < (g + 1) * span; ++k) op[n * K + k] = f * float(wp[n * K + k]);
      }
  });
  return out;
}

// --- Decode attention: one sequence's new token against its cached keys, for the query heads of one kv head ---
// A kv head's keys and values are read once for all of its query heads (GQA), a few rows ahead of use (the rows
// of one kv head are 2 D bytes in 2 kv_heads D, too sparse for the hardware prefetcher: without it the loads
// waited on memory most of the time); the heads' scores, exponentials and outputs in fp32.

constexpr int64_t kKeysAhead = 8;  // rows prefetched ahead

// exp(x) for x <= 0 in fp32 (Cephes' expf: 2^n times a degree-6 polynomial on |r| <= ln2 / 2; about 1 ulp),
// 0 below -87
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline void prefetch_row(const uint16_t* row, int64_t D) {
  for (int64_t b = 0; b < 2 * D; b += 64) prefetch(reinterpret_cast<const char*>(row) + b);
}

// scores[h][p - p0] = scale * q_h . k_p for the H query heads q (fp32 [H, D]) and keys p0 <= p < p1 (rows at
// k + off[p]); D a multiple of 8
template <int H>
void qk_tile(const float* q, int64_t D, const uint16_t* k, const int64_t* off, int64_t p0, int64_t p1, float scale,
             float* scores, int64_t ld) {
  for (int64_t p = p0; p < p1; ++p) {
    if (p + kKeysAhead < p1) prefetch_row(k + off[p + kKeysAhead], D);
    const uint16_t* row = k + off[p];
    __m256 acc[H];
    for (int h = 0; h < H; ++h) acc[h] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 kv = load8_bf16(row + i);
      for (int h = 0; h < H; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + i), kv, acc[h]);
    }
    for (int h = 0; h < H; ++h) scores[h * ld + p - p0] = hsum8(acc[h]) * scale;
  }
}

// o_h[0, D) = sum_p w[h][p - p0] v_p for H heads, 16 lanes of D at a time (2 H accumulators in registers)
template <int H>
void pv_tile(const float* w, int64_t ld, int64_t D, const uint16_t* v, const int64_t* off, int64_t p0, int64_t p1,
             float* o) {
  for (int64_t d = 0; d < D; d += 16) {
    __m256 acc[H][2];
    for (int h = 0; h < H; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      if (p + kKeysAhead < p1) prefetch(v + off[p + kKeysAhead] + d);
      const uint16_t* row = v + off[p] + d;
      const __m256 v0 = load8_bf16(row), v1 = load8_bf16(row + 8);
      for (int h = 0; h < H; ++h) {
        const __m256 wh = _mm256_broadcast_ss(w + h * ld + p - p0);
        acc[h][0] = _mm256_fmadd_ps(wh, v0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(wh, v1, acc[h][1]);
      }
    }
    for (int h = 0; h < H; ++h) {
      _mm256_storeu_ps(o + h * D + d, acc[h][0]);
      _mm256_storeu_ps(o + h * D + d + 8, acc[h][1]);
    }
  }
}

template <typename F>
void head_tiles(int64_t G, const F& f) {  // f.template operator()<H>(g0) over G heads in tiles of up to 4
  for (int64_t g0 = 0; g0 < G; g0 += 4) switch (std::min<int64_t>(4, G - g0)) {
      case 1: f.template operator()<1>(g0); break;
      case 2: f.template operator()<2>(g0); break;
      case 3: f.template operator()<3>(g0); break;
      default: f.template operator()<4>(g0); break;
    }
}

// G query heads q (fp32 [G, D]) against keys p0 <= p < p1 of one kv head (k, v: that head's rows at off[p]):
// per head the largest score m, sum s of exp(score - m) and o = sum_p exp(score_p - m) v_p (not yet divided).
// scores: scratch [G, p1 - p0].
void attend(const float* q, int64_t G, int64_t D, const uint16_t* k, const uint16_t* v, const int64_t* off,
            int64_t p0, int64_t p1, float scale, float* scores, float* m, float* s, float* o) {
  const int64_t n = p1 - p0;
  head_tiles(G, [&]<int H>(int64_t g0) { qk_tile<H>(q + g0 * D, D, k, off, p0, p1, scale, scores + g0 * n, n); });
  for (int64_t h = 0; h < G; ++h) {
    float* row = scores + h * n;
    float mx = -INFINITY;
    for (int64_t p = 0; p < n; ++p) mx = std::max(mx, row[p]);
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= n; p += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + p), mv));
      _mm256_storeu_ps(row + p, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    if (p < n) {
      alignas(32) float tail[8];
      for (int64_t i = 0; i < 8; ++i) tail[i] = p + i < n ? row[p + i] - mx : -INFINITY;
      _mm256_store_ps(tail, exp8(_mm256_load_ps(tail)));
      for (; p < n; ++p) total += (row[p] = tail[p % 8]);
    }
    m[h] = mx;
    s[h] = total;
  }
  head_tiles(G, [&]<int H>(int64_t g0) { pv_tile<H>(scores + g0 * n, n, D, v, off, p0, p1, o + g0 * D); });
}

// --- A decode step through every layer (Llama: RMSNorm, RoPE, GQA attention over the paged cache, gated SiLU
// MLP) in bf16 for B sequences, one new token each: the scripted step's computation (tuili/runner/cpu_step.py)
// op for op, with its bf16 roundings, as one call instead of ~45 torch ops per layer.

inline float bf(float v) { return bf16_to_float(float_to_bf16(v)); }  // a bf16 op's rounding

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)), rows of x [T, H]
void rms_norm_rows(const uint16_t* x, const uint16_t* weight, int64_t T, int64_t H, double eps, uint16_t* out) {
  for (int64_t t = 0; t < T; ++t) {
    const uint16_t* xr = x + t * H;
    float sum = 0.f;
    for (int64_t i = 0; i < H; ++i) sum += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
    const float r = 1.f / std::sqrt(sum / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i)
      out[t * H + i] = float_to_bf16(bf16_to_float(weight[i]) * bf(bf16_to_float(xr[i]) * r));
  }
}

void add_rows(const uint16_t* a, uint16_t* b, int64_t n) {  // b = bf16(a + b)
  for (int64_t i = 0; i < n; ++i) b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

void linear(int64_t kind, const at::Tensor& w, const at::Tensor& s, int64_t group, const uint16_t* x, int64_t T,
            int64_t K, uint16_t* y) {
  if (kind == 3)
    int4_run(x, T, K, w.data_ptr<uint8_t>(), bf16_ptr(s), w.size(0), group, y);
  else if (kind == 4)
    int8_run_bf16(x, T, K, w.data_ptr<int8_t>(), bf16_ptr(s), group, w.size(0), y);
  else
    bf16_run(x, T, K, bf16_ptr(w), w.size(0), y);
}

inline int64_t index_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kInt ? t.data_ptr<int32_t>()[i] : t.data_ptr<int64_t>()[i];
}

at::Tensor decode_step(const at::Tensor& x, const at::Tensor& cos2, const at::Tensor& sin2, const at::Tensor& slots,
                       const at::Tensor& block_tables, at::IntArrayRef lengths, at::TensorList tensors,
                       at::IntArrayRef kinds,
                       at::IntArrayRef groups, const at::Tensor& final_norm, double eps, int64_t num_heads,
                       int64_t num_kv_heads, double scale) {
  constexpr int64_t kPerLayer = 12;  // in norm, qkv w, s, o w, s, post norm, gate_up w, s, down w, s, k, v cache
  const int64_t T = x.size(0), H = x.size(1), layers = int64_t(tensors.size()) / kPerLayer;
  check(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && T >= 1 && int64_t(lengths.size()) == T,
        "x: bf16 [B, hidden], one new token for each of the B sequences of lengths");
  check(int64_t(tensors.size()) == layers * kPerLayer && int64_t(kinds.size()) == 4 * layers &&
            int64_t(groups.size()) == 4 * layers && layers > 0,
        "12 tensors, 4 kinds and 4 groups per layer");
  const at::Tensor& cache0 = tensors[10];
  const int64_t bs = cache0.size(1), D = cache0.size(3), half = D / 2;
  check(D % 16 == 0 && cache0.size(2) == num_kv_heads && num_heads % num_kv_heads == 0, "head size, kv heads");
  check(cos2.is_contiguous() && sin2.is_contiguous() && cos2.scalar_type() == at::kBFloat16 &&
            sin2.scalar_type() == at::kBFloat16 && cos2.numel() == T * D && sin2.numel() == T * D,
        "cos2, sin2: bf16 [T, 1, head size]");
  check(slots.numel() == T && slots.is_contiguous() && (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
        "slots: [T] int");
  check(block_tables.is_contiguous() && block_tables.dim() == 2 && block_tables.size(0) == T &&
            (block_tables.scalar_type() == at::kLong || block_tables.scalar_type() == at::kInt),
        "block tables: [B, blocks] int");
  const int64_t width = block_tables.size(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < T; ++b) {
    check(lengths[b] >= 1 && lengths[b] <= width * bs, "lengths: at least 1, within the block table");
    longest = std::max(longest, lengths[b]);
  }
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D, qkv_n = q_size + 2 * kv_size;
  const int64_t inter2 = tensors[6].size(0), inter = inter2 / 2;
  const int64_t slots_total = cache0.size(0) * bs;
  for (int64_t i = 0; i < T; ++i) check(index_at(slots, i) >= 0 && index_at(slots, i) < slots_total, "slot range");
  std::vector<int64_t> block_ids(T * width);  // the tables' entries in use, checked, as int64
  for (int64_t b = 0; b < T; ++b)
    for (int64_t i = 0; i < (lengths[b] + bs - 1) / bs; ++i) {
      const int64_t block = block_ids[b * width + i] = index_at(block_tables, b * width + i);
      check(block >= 0 && block < cache0.size(0), "block table entries");
    }
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* t = &tensors[l * kPerLayer];
    for (int j : {0, 5})
      check(t[j].scalar_type() == at::kBFloat16 && t[j].is_contiguous() && t[j].numel() == H,
            "norm weights: contiguous bf16 [hidden]");
    for (int j : {10, 11})
      check(t[j].scalar_type() == at::kBFloat16 && t[j].is_contiguous() && t[j].sizes() == cache0.sizes(),
            "KV caches: bf16 [blocks, block size, kv heads, head size]");
    const int64_t in[4] = {H, q_size, H, inter}, out[4] = {qkv_n, H, inter2, H};  // qkv, o, gate_up, down
    for (int j = 0; j < 4; ++j) {
      const at::Tensor &w = t[1 + 2 * j + (j >= 2)], &sc = t[2 + 2 * j + (j >= 2)];
      const int64_t kind = kinds[4 * l + j];
      check(kind == 3 || kind == 4 || kind == 5, "linears: kind 3 (INT4), 4 (INT8) or 5 (bf16)");
      check(w.dim() == 2 && w.size(0) == out[j] && w.size(1) * (kind == 3 ? 2 : 1) == in[j],
            "linear shapes: [qkv, hidden], [hidden, heads x head size], [2 x inter, hidden], [hidden, inter]");
      if (kind == 3) {
        check_int4(w, sc, in[j], groups[4 * l + j], at::kBFloat16);
      } else if (kind == 5) {
        check(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) % 16 == 0,
              "bf16 linears: contiguous bf16 [N, K], K a multiple of 16");
      } else {
        check(int8_group(w, sc, at::kBFloat16) == groups[4 * l + j],
              "INT8 linears: int8 [N, K], bf16 scales [N] (group 0) or [N, K / group] (group 16 or 32)");
      }
    }
  }
  check(final_norm.scalar_type() == at::kBFloat16 && final_norm.is_contiguous() && final_norm.numel() == H,
        "final norm: contiguous bf16 [hidden]");
  std::vector<uint16_t> cur(x.numel()), resid(T * H), h(T * H), qkv(T * qkv_n), att(T * q_size), gu(T * inter2),
      act(T * inter);
  std::memcpy(cur.data(), x.data_ptr(), cur.size() * 2);
  const uint16_t *c2 = bf16_ptr(cos2), *s2 = bf16_ptr(sin2);
  const int64_t group_heads = num_heads / num_kv_heads;
  std::vector<float> rot(D);
  // each sequence's key rows: element offsets in a layer's cache (kv head 0); the attention's splits of the keys,
  // enough jobs for the threads where the keys are many (at least 128 per split), and their partial results
  std::vector<int64_t> key_off(T * longest);
  for (int64_t tok = 0; tok < T; ++tok)
    for (int64_t p = 0; p < lengths[tok]; ++p)
      key_off[tok * longest + p] = (block_ids[tok * width + p / bs] * bs + p % bs) * kv_size;
  const int64_t threads = at::get_num_threads(), jobs = T * num_kv_heads;
  const int64_t splits = std::max<int64_t>(1, std::min((2 * threads + jobs - 1) / jobs, longest / 128));
  std::vector<float> part_m(T * num_heads * splits), part_s(T * num_heads * splits),
      part_o(T * num_heads * splits * D), merged(D);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* t = &tensors[l * kPerLayer];
    const int64_t* kind = kinds.data() + 4 * l;
    const int64_t* grp = groups.data() + 4 * l;
    if (l == 0) resid = cur; else add_rows(cur.data(), resid.data(), T * H);
    rms_norm_rows(resid.data(), bf16_ptr(t[0]), T, H, eps, h.data());
    linear(kind[0], t[1], t[2], grp[0], h.data(), T, H, qkv.data());
    // RoPE on q and k heads: x * cos2 + cat(x2, x1) * sin2, each op rounded to bf16
    for (int64_t tok = 0; tok < T; ++tok)
      for (int64_t hd = 0; hd < num_heads + num_kv_heads; ++hd) {
        uint16_t* v = qkv.data() + tok * qkv_n + hd * D;
        for (int64_t i = 0; i < D; ++i) {
          const float other = bf16_to_float(v[i < half ? i + half : i - half]);
          rot[i] = bf(bf(bf16_to_float(v[i]) * bf16_to_float(c2[tok * D + i])) + bf(other * bf16_to_float(s2[tok * D + i])));
        }
        for (int64_t i = 0; i < D; ++i) v[i] = float_to_bf16(rot[i]);
      }
    uint16_t *kc = bf16_ptr(const_cast<at::Tensor&>(t[10])), *vc = bf16_ptr(const_cast<at::Tensor&>(t[11]));
    for (int64_t tok = 0; tok < T; ++tok) {
      const int64_t slot = index_at(slots, tok);
      std::memcpy(kc + slot * kv_size, qkv.data() + tok * qkv_n + q_size, kv_size * 2);
      std::memcpy(vc + slot * kv_size, qkv.data() + tok * qkv_n + q_size + kv_size, kv_size * 2);
    }
    // attention in fp32: sequence tok's new token (its last position) sees its keys 0..lengths[tok] - 1; a job is
    // (sequence, kv head, split of the keys), its query heads together
    at::parallel_for(0, T * num_kv_heads * splits, 1, [&](int64_t b, int64_t e) {
      std::vector<float> q(group_heads * D), scores(group_heads * ((longest + splits - 1) / splits)),
          o(group_heads * D), mh(group_heads), sh(group_heads);
      for (int64_t job = b; job < e; ++job) {
        const int64_t tok = job / (num_kv_heads * splits), kvh = job / splits % num_kv_heads, sp = job % splits;
        const int64_t seen = lengths[tok], per = (seen + splits - 1) / splits;
        const int64_t p0 = std::min(seen, sp * per), p1 = std::min(seen, p0 + per);
        const int64_t head0 = kvh * group_heads, part = (tok * num_heads + head0) * splits + sp;
        float *m = part_m.data() + part, *sum = part_s.data() + part;  // (stride splits per head)
        for (int64_t i = 0; i < group_heads * D; ++i) q[i] = bf16_to_float(qkv[tok * qkv_n + head0 * D + i]);
        if (p0 < p1) {
          attend(q.data(), group_heads, D, kc + kvh * D, vc + kvh * D, key_off.data() + tok * longest, p0, p1,
                 float(scale), scores.data(), mh.data(), sh.data(), o.data());
        } else {
          std::fill(mh.begin(), mh.end(), -INFINITY);
        }
        for (int64_t h = 0; h < group_heads; ++h) {
          m[h * splits] = mh[h];
          sum[h * splits] = sh[h];
          std::memcpy(part_o.data() + (part + h * splits) * D, o.data() + h * D, D * 4);
        }
      }
    });
    for (int64_t th = 0; th < T * num_heads; ++th) {  // the splits merged: o = sum_s e^(m_s - m) o_s / same for s
      const float* m = part_m.data() + th * splits;
      const float mx = *std::max_element(m, m + splits);
      float total = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        if (m[sp] == -INFINITY) continue;
        const float f = splits == 1 ? 1.f : std::exp(m[sp] - mx);
        total += f * part_s[th * splits + sp];
        for (int64_t i = 0; i < D; ++i) merged[i] += f * part_o[(th * splits + sp) * D + i];
      }
      for (int64_t i = 0; i < D; ++i) att[th * D + i] = float_to_bf16(merged[i] / total);
    }
    linear(kind[1], t[3], t[4], grp[1], att.data(), T, q_size, cur.data());
    add_rows(cur.data(), resid.data(), T * H);
    rms_norm_rows(resid.data(), bf16_ptr(t[5]), T, H, eps, h.data());
    linear(kind[2], t[6], t[7], grp[2], h.data(), T, H, gu.data());
    for (int64_t tok = 0; tok < T; ++tok)
      for (int64_t i = 0; i < inter; ++i) {
        const float g = bf16_to_float(gu[tok * inter2 + i]);
        act[tok * inter + i] = float_to_bf16(bf(g / (1.f + std::exp(-g))) * bf16_to_float(gu[tok * inter2 + inter + i]));
      }
    linear(kind[3], t[8], t[9], grp[3], act.data(), T, inter, cur.data());
  }
  add_rows(cur.data(), resid.data(), T * H);
  at::Tensor out = at::empty({T, H}, x.options());
  rms_norm_rows(resid.data(), bf16_ptr(final_norm), T, H, eps, bf16_ptr(out));
  return out;
}

std::string kernel_isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(tuili, m) {
  m.def("int4_gemv(Tensor x, Tensor w, Tensor so, int group) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("int4_dequant(Tensor w, Tensor so, int group) -> Tensor");
  m.def("int8_dequant(Tensor w, Tensor s) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("kernel_isa() -> str", &kernel_isa);  // which of the two instruction sets this build uses
  m.def("decode_step(Tensor x, Tensor cos2, Tensor sin2, Tensor slots, Tensor block_tables, int[] lengths, "
        "Tensor[] tensors, int[] kinds, int[] groups, Tensor final_norm, float eps, int num_heads, "
        "int num_kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tuili, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("decode_step", &decode_step);
}
