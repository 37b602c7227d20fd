// Weight-streaming CPU kernels for decode: skinny matmuls y[M, N] = x[M, K] · W[N, K]ᵀ with few rows M, for weights
// stored as fp32, bf16, int8 (one scale per output row) or int4 (a (scale, zero) per group of input columns), and the
// routed experts of an MoE layer in one call. Activations and accumulation are fp32, except for int4 weights, whose
// activations are quantized per weight group to int8 (as llama.cpp does for its k-quants), so that the dot products
// run as integer multiply-adds. The Python twins in qwen3next/kernels/__init__.py state the same math in torch.
//
// Registered as torch custom ops (namespace qwen3next) so that torch.compile treats them as opaque calls. The AVX2 +
// FMA code is selected at run time; every kernel has a portable scalar version (used without AVX2, or when asked for
// with `qwen3next::kernel_isa(0)`, which the parity tests do). Threads: at::parallel_for over blocks of output rows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "isa.h"

namespace qk {

enum Fmt : int64_t { I4 = 4, I8 = 8, BF16 = 16, F32 = 32 };

// int8 weights: activations are quantized to int8 per block of this many columns (llama.cpp's Q8_0 block) when K is a
// multiple of it, so that the products run as integer multiply-adds; other K keep fp32 activations.
constexpr int64_t I8_BLOCK = 32;

static int g_isa = -1;  // -1: not decided yet; 0: scalar; 1: AVX2 + FMA

bool use_avx2() {  // also used by delta_rule.cpp
  if (g_isa < 0) {
#if QK_X86
    g_isa = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
    g_isa = 0;
#endif
  }
  return g_isa == 1;
}

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
static inline float to_f32(int8_t v) { return float(v); }

// One weight matrix [N, K]. int4: `data` is uint8 [N, K/2], column 2j in the low nibble of byte j.
// int4 group parameters come in two forms: bf16 (scale, zero) pairs `aux` [K/G, N, 2], or coded ones `codes` uint8
// [K/G + 2, N, 2]: per group a scale code (uint8) and a zero code (int8), scale = code · fs[n], zero = code · fz[n],
// with bf16 row factors (fs, fz) stored byte-planar in the last two rows (low bytes, then high bytes), so that a
// slice of rows [:, a:b] is still a valid coded tensor.
struct Weights {
  int64_t fmt, N, K, G;
  const void* data;
  const uint16_t* aux;            // int8: bf16 scales [N]; int4: bf16 scale_zero [K/G, N, 2]; else null
  const uint8_t* codes = nullptr; // int4 with coded group parameters (then aux is null)

  // int4: the code (0..15) of column k of row `row`, and the scale and zero of group g of row n
  static int32_t code(const uint8_t* row, int64_t k) { return (k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 15); }
  float scale(int64_t g, int64_t n) const {
    return codes ? float(codes[(g * N + n) * 2]) * factor(n, 0) : bf16_to_f32(aux[(g * N + n) * 2]);
  }
  float zero(int64_t g, int64_t n) const {
    return codes ? float(int8_t(codes[(g * N + n) * 2 + 1])) * factor(n, 1) : bf16_to_f32(aux[(g * N + n) * 2 + 1]);
  }
  // coded: row n's factor p (0: scales, 1: zeros)
  float factor(int64_t n, int p) const {
    const int64_t ng = K / G;
    return bf16_to_f32(uint16_t(codes[(ng * N + n) * 2 + p] | (codes[((ng + 1) * N + n) * 2 + p] << 8)));
  }
};

// Activation rows [M, K] (fp32, contiguous) and, for int4 weights, their per-group int8 codes.
struct Acts {
  const float* x;
  int64_t M, K;
  bool permuted = false;   // codes stored per 64-column chunk as (even columns, odd columns): the AVX2 layout
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K/G]: code scale (amax / 127)
  std::vector<float> xsum; // [M, K/G]: Σ x over the group, exact fp32
  std::vector<float> dl;   // int4, G = 32 or 16, permuted: [M, K/64, 8]: each 64-column chunk's lane scales, the d of
                           // the group whose columns the lane's sums hold ([d(g) x4 | d(g + 1) x4] for G = 32)

  Acts(const float* x_, int64_t M_, int64_t K_) : x(x_), M(M_), K(K_) {}
};

#if QK_X86
// One group of G (% 8 == 0) activations -> codes in column order, its scale and its sum. Same arithmetic as the
// scalar code below (IEEE division, round half to even), vectorised; only the order of the sum's additions differs.
QK_AVX2 static void quantize_group_avx2(const float* x, int64_t G, int8_t* codes, float* d_out, float* sum_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs_mask));
    sum = _mm256_add_ps(sum, v);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.f;
  *d_out = d;
  *sum_out = hsum8(sum);
  if (d == 0.f) {
    std::memset(codes, 0, G);
    return;
  }
  const __m256 dv = _mm256_set1_ps(d);
  for (int64_t k = 0; k < G; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), dv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i32 = _mm256_cvtps_epi32(r);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k), _mm_packs_epi16(i16, i16));
  }
}
#endif

static void quantize_acts(Acts& a, int64_t G, bool permuted) {
  const int64_t M = a.M, K = a.K, ng = K / G;
  a.permuted = permuted;
  a.q.resize(M * K);
  a.d.resize(M * ng);
  a.xsum.resize(M * ng);
#if QK_X86
  if (use_avx2() && G % 8 == 0) {
    int8_t tmp[64];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        int8_t* out = a.q.data() + m * K + g * G;
        quantize_group_avx2(a.x + m * K + g * G, G, out, &a.d[m * ng + g], &a.xsum[m * ng + g]);
      }
    if (permuted)  // K % 64 == 0: each 64-column chunk as (even columns, odd columns), across group boundaries
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K; c += 64) {
          int8_t* out = a.q.data() + m * K + c;
          std::memcpy(tmp, out, 64);
          for (int j = 0; j < 64; ++j) out[(j & 1) * 32 + (j >> 1)] = tmp[j];
        }
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* x = a.x + m * a.K;
    for (int64_t g = 0; g < ng; ++g) {
      float amax = 0.f, s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        amax = std::max(amax, std::fabs(x[k]));
        s += x[k];
      }
      const float d = amax / 127.f;
      a.d[m * ng + g] = d;
      a.xsum[m * ng + g] = s;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        const int8_t c = d == 0.f ? 0 : int8_t(std::nearbyint(x[k] / d));
        int64_t pos = k;
        if (permuted) {  // within its 64-column chunk: even columns first, then odd ones
          const int64_t base = k & ~int64_t(63), j = k & 63;
          pos = base + (j & 1) * 32 + (j >> 1);
        }
        a.q[m * K + pos] = c;
      }
    }
  }
}

// ---- scalar kernels ------------------------------------------------------------------------------------------------
template <typename T>
static void rows_scalar(const T* w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                        int64_t ldy, const uint16_t* scales) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    const float s = scales ? bf16_to_f32(scales[n]) : 1.f;
    for (int64_t m = m0; m < m0 + M; ++m) {
      const float* x = a.x + m * a.K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += to_f32(wr[k]) * x[k];
      y[(m - m0) * ldy + n] = scales ? acc * s : acc;
    }
  }
}

// int8 weights against int8 activation codes (blocks of I8_BLOCK columns, each with its scale d):
// y[m, n] = s[n] · Σ_b d[m, b] · Σ_{k∈b} q[n, k] · c[m, k]
static void rows_i8q_scalar(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                            int64_t ldy) {
  const int64_t K = w.K, nb = K / I8_BLOCK;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = static_cast<const int8_t*>(w.data) + n * K;
    const float s = bf16_to_f32(w.aux[n]);
    for (int64_t m = m0; m < m0 + M; ++m) {
      const int8_t* q = a.q.data() + m * K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * I8_BLOCK; k < (b + 1) * I8_BLOCK; ++k) dot += int32_t(wr[k]) * int32_t(q[k]);
        acc += float(dot) * a.d[m * nb + b];
      }
      y[(m - m0) * ldy + n] = acc * s;
    }
  }
}

// Codes in the natural column order: prepare() permutes them only for the AVX2 path.
static void rows_i4_scalar(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                           int64_t ldy) {
  const int64_t K = w.K, G = w.G, ng = K / G;
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = base + n * (K / 2);
    for (int64_t m = m0; m < m0 + M; ++m) {
      const int8_t* q = a.q.data() + m * K;
      float acc = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        const float s = w.scale(g, n), z = w.zero(g, n);
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += Weights::code(wr, k) * int32_t(q[k]);
        acc += float(dot) * (s * a.d[m * ng + g]) + (z - 8.f * s) * a.xsum[m * ng + g];
      }
      y[(m - m0) * ldy + n] = acc;
    }
  }
}

// ---- AVX2 kernels --------------------------------------------------------------------------------------------------
#if QK_X86
QK_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
QK_AVX2 static inline __m256 load8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
QK_AVX2 static inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The hardware prefetcher falls behind on weights that stream from beyond L2 (several activation rows consume a weight
// row more slowly; a bf16 row of a few hundred columns is over in a few cache lines): every tile fetches 2 KB ahead in
// software. Measured, 1 thread, an Intel Xeon VM with 2 MiB of L2 per core, 64 MB of matrices in turn (from L3):
// fp32 768 x 256, 3 rows 38.3 -> 33.2 us, 8 rows 85.7 -> 59.8; one row, bf16 8256 x 256 503 -> 293 us, 3072 x 512
// 372 -> 237, 768 x 256 54 -> 40 (it had streamed at 7-8 GB/s, below fp32's 10-23), fp32 one row unchanged to 1.26x;
// the demo model's eager batch-1 decode with bf16-stored weights 1.10x (4 interleaved runs). The int8 tiles too
// (`quad_i8q` for one row: 8256 x 256 282 -> 162 us, 3072 x 512 208 -> 145). No change from L2.
constexpr int kMultiRowPrefetchBytes = 2048;
template <typename T>
QK_AVX2 static inline void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kMultiRowPrefetchBytes, _MM_HINT_T0);
}

// One weight row against MB activation rows, U independent accumulators per activation row. Rows are walked one
// after another: the weights stream through memory in order, which the hardware prefetcher follows (tiles of several
// rows side by side measured 2-3x slower on a 32000 x 512 weight: short interleaved streams it does not pick up).
template <typename T, int MB, int U>
QK_AVX2 static void dot_row(const T* w, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo, float scale) {
  __m256 acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    prefetch_ahead(w + k);
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8(w + k + 8 * u);
      for (int m = 0; m < MB; ++m) acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[m][u]);
    float v = hsum8(t);
    for (int64_t kk = k; kk < K; ++kk) v += to_f32(w[kk]) * x[m * ldx + kk];
    out[m * ldo] = v * scale;
  }
}

template <typename T>
QK_AVX2 static void rows_avx2(const T* w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                              int64_t ldy, const uint16_t* scales) {
  const int64_t K = a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    const float s = scales ? bf16_to_f32(scales[n]) : 1.f;
    for (int64_t m = m0; m < m0 + M;) {  // blocks of 4 activation rows share each converted weight vector
      const float* x = a.x + m * a.K;
      float* o = y + (m - m0) * ldy + n;
      const int64_t left = m0 + M - m;
      if (left >= 4) {
        dot_row<T, 4, 2>(wr, x, a.K, K, o, ldy, s);
        m += 4;
      } else if (left == 3) {
        dot_row<T, 3, 2>(wr, x, a.K, K, o, ldy, s);
        m += 3;
      } else if (left == 2) {
        dot_row<T, 2, 2>(wr, x, a.K, K, o, ldy, s);
        m += 2;
      } else {
        dot_row<T, 1, 4>(wr, x, a.K, K, o, ldy, s);
        m += 1;
      }
    }
  }
}

// Σ w·c over one block of 32 int8 weights and 32 activation codes, as 8 int32 partial sums: |w| · (c with w's sign)
// as unsigned x signed byte products (maddubs; |w| <= 128 and |c| <= 127 keep the pair sums in int16), pairs summed
// to int32.
QK_AVX2 static inline __m256i dot32_i8(__m256i wv, const int8_t* codes) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xq, wv)), _mm256_set1_epi16(1));
}

QK_AVX2 static inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// One int8 weight row against MB rows of int8 activation codes, per block of 32 columns (`dot32_i8`), each block's
// sums converted and scaled by its activation scale into U interleaved fp32 accumulators (U blocks in flight: one
// accumulator chain would wait on the FMA latency).
template <int MB, int U>
QK_AVX2 static inline void i8q_block(const int8_t* wr, int64_t K, const Acts& a, int64_t m, int64_t b, int64_t nb,
                                     __m256 (&acc)[MB][U], int u) {
  const __m256i wv = load32(wr + b * I8_BLOCK);
  for (int i = 0; i < MB; ++i) {
    const __m256i p = dot32_i8(wv, a.q.data() + (m + i) * K + b * I8_BLOCK);
    acc[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&a.d[(m + i) * nb + b]), acc[i][u]);
  }
}

template <int MB, int U>
QK_AVX2 static void tile_i8q(const Weights& w, int64_t n, const Acts& a, int64_t m, float* out, int64_t ldo) {
  const int64_t K = w.K, nb = K / I8_BLOCK;
  const int8_t* wr = static_cast<const int8_t*>(w.data) + n * K;
  __m256 acc[MB][U];
  for (int i = 0; i < MB; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= nb; b += U) {
    prefetch_ahead(wr + b * I8_BLOCK);
    for (int u = 0; u < U; ++u) i8q_block<MB, U>(wr, K, a, m, b + u, nb, acc, u);
  }
  for (; b < nb; ++b) i8q_block<MB, U>(wr, K, a, m, b, nb, acc, 0);
  const float s = bf16_to_f32(w.aux[n]);
  for (int i = 0; i < MB; ++i) {
    __m256 t = acc[i][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[i][u]);
    out[i * ldo] = hsum8(t) * s;
  }
}

QK_AVX2 static void tile_i8q_rows(const Weights& w, int64_t n, const Acts& a, int64_t m0, int64_t M, float* y,
                                  int64_t ldy) {
  for (int64_t m = m0; m < m0 + M;) {
    float* o = y + (m - m0) * ldy + n;
    const int64_t left = m0 + M - m;
    if (left >= 4) {
      tile_i8q<4, 1>(w, n, a, m, o, ldy);
      m += 4;
    } else if (left >= 2) {
      tile_i8q<2, 2>(w, n, a, m, o, ldy);
      m += 2;
    } else {
      tile_i8q<1, 4>(w, n, a, m, o, ldy);
      m += 1;
    }
  }
}

// One activation row against four weight rows, each walked to its end before the next (interleaved short streams
// defeat the hardware prefetcher on weights that stream from memory), two accumulators per row; the four sums are
// reduced together and scaled as one vector.
QK_AVX2 static void quad_i8q(const Weights& w, int64_t n, const Acts& a, int64_t m, float* out) {
  const int64_t K = w.K, nb = K / I8_BLOCK;
  const int8_t* q = a.q.data() + m * K;
  const float* d = a.d.data() + m * nb;
  __m256 sums[4];
  for (int r = 0; r < 4; ++r) {
    const int8_t* wr = static_cast<const int8_t*>(w.data) + (n + r) * K;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      prefetch_ahead(wr + b * I8_BLOCK);  // one 64-byte line per step (see prefetch_ahead)
      const __m256i p0 = dot32_i8(load32(wr + b * I8_BLOCK), q + b * I8_BLOCK);
      const __m256i p1 = dot32_i8(load32(wr + (b + 1) * I8_BLOCK), q + (b + 1) * I8_BLOCK);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(d + b), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(d + b + 1), acc1);
    }
    if (b < nb)
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(load32(wr + b * I8_BLOCK), q + b * I8_BLOCK)),
                             _mm256_broadcast_ss(d + b), acc0);
    sums[r] = _mm256_add_ps(acc0, acc1);
  }
  // [a0..a7], [b0..b7], [c..], [e..] -> (Σa, Σb, Σc, Σe)
  const __m256 ab = _mm256_hadd_ps(sums[0], sums[1]), ce = _mm256_hadd_ps(sums[2], sums[3]);
  const __m256 abce = _mm256_hadd_ps(ab, ce);  // per 128-bit lane: a, b, c, e partial sums
  const __m128 total = _mm_add_ps(_mm256_castps256_ps128(abce), _mm256_extractf128_ps(abce, 1));
  const __m128i sc = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.aux + n)));
  _mm_storeu_ps(out, _mm_mul_ps(total, _mm_castsi128_ps(_mm_slli_epi32(sc, 16))));
}

QK_AVX2 static void rows_i8q_avx2(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1,
                                  float* y, int64_t ldy) {
  int64_t n = n0;
  if (M == 1)
    for (; n + 4 <= n1; n += 4) quad_i8q(w, n, a, m0, y + n);
  // Several activation rows: one weight row at a time (two side by side measured no better with the weights
  // streaming from memory, 1 thread: 3 rows 1.2x faster at K = 512, 1.25x slower at K = 2048)
  for (; n < n1; ++n) tile_i8q_rows(w, n, a, m0, M, y, ldy);
}

// int4 weights, the vector code (G % 64 == 0, or G == 32 or 16 with K % 64 == 0). Rows are taken in blocks of 8
// (`Block8`): their scales and zeros, which lie side by side in scale_zero [K/G, N, 2] (or its codes), are turned
// into floats 8 at a time, and per activation row i the factors s·d[i, g] (G = 32 / 16: the lane scales, see
// `tile_i4_chunks`) and the constant part Σ_g (z - 8s)·Σx are computed as vectors over the 8 rows. The integer dot
// products then only need a convert and an FMA per 64 columns. A row's groups lie N * 4 (coded: N * 2) bytes apart:
// the next block's lines are fetched ahead (the hardware prefetcher does not follow that stride).
struct Block8 {
  std::vector<float> sd;    // G >= 64: [MB][K/64][8]: s[n + r, g] · d[m + i, g], g the group of each 64-column chunk
  std::vector<float> sl;    // G = 32 or 16: [K/64][8][8]: per row r, the chunk's lane scale vector (see tiles)
  std::vector<float> zsum;  // [MB][8]: Σ_g (z - 8 s)[n + r, g] · xsum[m + i, g]
};

// The lane factor vectors of one 64-column chunk for 8 rows, from its groups' factors v[j] (8 rows each): row r gets
// [v0[r] x4 | v1[r] x4] (G = 32) or [v0[r] x2 | v1[r] x2 | v2[r] x2 | v3[r] x2] (G = 16), as `tile_i4_chunks` wants.
QK_AVX2 static inline void chunk_lane_factors(const __m256* v, int per, float* out) {
  if (per == 2) {  // t0 = [v0 v1 rows 0, 1 | rows 4, 5], t1 = [rows 2, 3 | rows 6, 7]
    const __m256 t[2] = {_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1])};
    for (int r = 0; r < 8; ++r) {
      const int lane = (r & 4) + 2 * (r & 1);  // where row r's (v0, v1) pair sits in t[(r >> 1) & 1]
      const __m256i idx = _mm256_setr_epi32(lane, lane, lane, lane, lane + 1, lane + 1, lane + 1, lane + 1);
      _mm256_storeu_ps(out + r * 8, _mm256_permutevar8x32_ps(t[(r >> 1) & 1], idx));
    }
    return;
  }
  // per == 4: u[k] = [v0 v1 v2 v3 of row k | of row k + 4]
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                       _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
  const __m256i lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + r * 8, _mm256_permutevar8x32_ps(u[r & 3], r < 4 ? lo : hi));
}

// Rows n .. n + rows - 1 (rows <= 8; the missing ones get zero factors). The lane scales of G = 32 / 16 depend on
// the weights only: `lanes` false keeps those of the block's previous activation rows.
QK_AVX2 static void block8_factors(const Weights& w, int64_t n, int rows, const Acts& a, int64_t m, int64_t MB,
                                   bool lanes, Block8& f) {
  const int64_t ng = w.K / w.G;
  const bool small = w.G < 64;
  const int per = small ? int(64 / w.G) : 1;  // groups per 64-column chunk
  const int64_t nc = w.K / 64, cpg = small ? 0 : w.G / 64;  // G >= 64: chunks per group
  if (small)
    f.sl.resize(nc * 64);
  else
    f.sd.resize(MB * nc * 8);
  f.zsum.resize(MB * 8);
  __m256 zs[4], grp[4];
  for (int64_t i = 0; i < MB; ++i) zs[i] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
  __m256 fs = _mm256_setzero_ps(), fz = fs;
  if (w.codes) {  // the rows' bf16 factors: low bytes and high bytes of (fs, fz) pairs in the last two code rows
    const uint8_t* lo = w.codes + (ng * w.N + n) * 2;
    const uint8_t* hi = w.codes + ((ng + 1) * w.N + n) * 2;
    uint8_t lpart[16] = {0}, hpart[16] = {0};
    std::memcpy(lpart, lo, rows * 2);
    std::memcpy(hpart, hi, rows * 2);
    const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lpart));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hpart));
    const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h));  // 8 x (fs, fz) bf16
    fs = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    fz = _mm256_castsi256_ps(_mm256_and_si256(pairs, hi_mask));
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m256 sc, zc;
    if (w.codes) {  // 8 (scale code, zero code) byte pairs -> 8 int32 (code | zero code << 8) -> floats · factors
      const uint8_t* src = w.codes + (g * w.N + n) * 2;
      uint8_t part[16] = {0};
      if (rows < 8) std::memcpy(part, src, rows * 2);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows == 8 ? src : part));
      const __m256i v = _mm256_cvtepu16_epi32(b);
      sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(255))), fs);
      zc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24)), fz);
    } else {  // 8 (scale, zero) bf16 pairs = 8 int32: scale in the low half, zero in the high half
      const uint16_t* src = w.aux + (g * w.N + n) * 2;
      uint16_t part[16] = {0};
      if (rows < 8) std::memcpy(part, src, rows * 2 * sizeof(uint16_t));
      const __m256i sz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows == 8 ? src : part));
      sc = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
      zc = _mm256_castsi256_ps(_mm256_and_si256(sz, hi_mask));
    }
    const __m256 zp = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sc, zc);  // z - 8 s
    if (small && lanes) {
      grp[g % per] = sc;
      if (g % per == per - 1) chunk_lane_factors(grp, per, &f.sl[(g / per) * 64]);
    }
    for (int64_t i = 0; i < MB; ++i) {
      if (!small) {
        const __m256 sd = _mm256_mul_ps(sc, _mm256_set1_ps(a.d[(m + i) * ng + g]));
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) _mm256_storeu_ps(&f.sd[(i * nc + c) * 8], sd);
      }
      zs[i] = _mm256_fmadd_ps(zp, _mm256_set1_ps(a.xsum[(m + i) * ng + g]), zs[i]);
    }
  }
  for (int64_t i = 0; i < MB; ++i) _mm256_storeu_ps(&f.zsum[i * 8], zs[i]);
}

// A weight row walked alone is fetched this far ahead in software: measured, 1 thread, one activation row, 60
// matrices in turn: 512 x 2048 83 -> 61 us, 512 x 1024 54 -> 40 us, 3072 x 512 82 -> 72 us; the `small` int4
// compiled step 3.95 -> 3.64 ms, the demo's 0.91 -> 0.87 ms (same process, interleaved; 1 KB ahead about the same,
// 512 bytes less). The int8 row walk gains nothing from it (its lm_head already streams at ~25 GB/s).
constexpr int64_t kI4PrefetchBytes = 2048;
// Rows of at most this many columns take `tile4_i4_row` for one activation row. Measured, 1 thread, Xeon VM, G = 64,
// 8 matrices in turn (from L3), one row against the one-row tile: 8256 x 256 79 -> 69 us, 2048 x 512 39 -> 35,
// 3072 x 512 59-60 -> 51; 512 x 1024 the same; 512 x 2048 41-43 -> 44-46 and 2048 x 2048 137-140 -> 162-170 (four
// long rows side by side are four streams again); the demo model at int4, compiled, batch 1: 1.03-1.04x (3
// interleaved process pairs).
constexpr int64_t kI4ShortRow = 512;

// One chunk's products with the activation codes of its even (qe) and odd (qo) columns, as 8 int32 sums: lane j holds
// columns 8j .. 8j + 7 (maddubs pairs neighbouring bytes, madd neighbouring pairs).
QK_AVX2 static inline __m256i chunk_dot_i4(__m256i lo, __m256i hi, __m256i qe, __m256i qo) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// The factor vector of 64-column chunk c for activation row i and weight row r of a block (see `tile_i4_chunks`):
// LANES: the weight row's lane scales (Block8::sl, `fac`) times the activation row's (Acts::dl from `dl`); else the
// chunk's group's s·d broadcast (Block8::sd, G = 64k).
template <bool LANES>
QK_AVX2 static inline __m256 chunk_factor(const float* fac, const float* dl, int64_t nc, int i, int64_t c, int r) {
  if (LANES) return _mm256_mul_ps(_mm256_loadu_ps(fac + c * 64 + r * 8), _mm256_loadu_ps(dl + (i * nc + c) * 8));
  return _mm256_broadcast_ss(fac + (i * nc + c) * 8 + r);
}

// A chunk's packed weight bytes (32) as their low nibbles (even columns) and high nibbles (odd columns), as bytes.
QK_AVX2 static inline void unpack_i4(__m256i v, __m256i* lo, __m256i* hi) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(v, low);
  *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
}

// One chunk's products (`chunk_dot_i4`) from its packed weight bytes (32) and activation codes (64, permuted).
QK_AVX2 static inline __m256i packed_chunk_dot(__m256i v, const int8_t* q) {
  __m256i lo, hi;
  unpack_i4(v, &lo, &hi);
  return chunk_dot_i4(lo, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
}

// Weight rows n + r0 .. n + r0 + R - 1 of a block of 8 against MB activation rows, each 64-column chunk scaled by
// one factor vector (K % 64 == 0): G = 64k (the chunk lies in one group) or G = 32 / 16 (64 / G groups; its int32
// sums hold columns 8j .. 8j + 7 in lane j, so one vector scales them all: [f(g) x4 | f(g + 1) x4] for G = 32,
// [f(g) x2 | f(g + 1) x2 | f(g + 2) x2 | f(g + 3) x2] for G = 16, f = s·d: the weight row's lane scales, built per
// block of 8 rows, times the activation row's, built per call). The sums are converted and scaled straight into fp32
// accumulators. One row against one row takes two chunks per step into two accumulators (one chain waits on the FMA
// latency) and prefetches once per 64 bytes. Pointers are computed once: the compiler had reloaded and
// re-multiplied them per chunk, and kept the G = 64 code's integer group sums on the stack. Measured, 1 thread, one
// activation row: 2048 x 512 in cache 65.8 -> 48.3 us (G = 64), 73.2 -> 66.8 (G = 32 coded); from memory 70.9 ->
// 53.0, 86.9 -> 71.1; the `small` int4 step (same process, interleaved) 1.07x faster at batch 1, 1.26x at batch 8.
template <int R, int MB, bool LANES>
QK_AVX2 static void tile_i4_chunks(const Weights& w, int64_t n, int r0, const Acts& a, int64_t m, const Block8& f,
                                   float* out, int64_t ldo) {
  const int64_t K = w.K, nc = K / 64;
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + (n + r0) * (K / 2);
  const int8_t* q = a.q.data() + m * K;
  const float* fac = LANES ? f.sl.data() + r0 * 8 : f.sd.data() + r0;
  const float* dl = LANES ? a.dl.data() + m * nc * 8 : nullptr;
  if (R == 1 && MB == 1) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= nc; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + c * 32 + kI4PrefetchBytes), _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32 + 32));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(packed_chunk_dot(v0, q + c * 64)),
                             chunk_factor<LANES>(fac, dl, nc, 0, c, 0), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(packed_chunk_dot(v1, q + c * 64 + 64)),
                             chunk_factor<LANES>(fac, dl, nc, 0, c + 1, 0), acc1);
    }
    if (c < nc)
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(packed_chunk_dot(
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32)), q + c * 64)),
                             chunk_factor<LANES>(fac, dl, nc, 0, c, 0), acc0);
    out[r0] = hsum8(_mm256_add_ps(acc0, acc1)) + f.zsum[r0];
    return;
  }
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    if (R == 1) _mm_prefetch(reinterpret_cast<const char*>(wr + c * 32 + kI4PrefetchBytes), _MM_HINT_T0);
    __m256i lo[R], hi[R];  // each weight row's chunk unpacked once, used MB times
    for (int r = 0; r < R; ++r)
      unpack_i4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * (K / 2) + c * 32)), &lo[r], &hi[r]);
    for (int i = 0; i < MB; ++i) {
      const __m256i qe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * K + c * 64));
      const __m256i qo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * K + c * 64 + 32));
      for (int r = 0; r < R; ++r)
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_dot_i4(lo[r], hi[r], qe, qo)),
                                    chunk_factor<LANES>(fac, dl, nc, i, c, r), acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) out[i * ldo + r0 + r] = hsum8(acc[r][i]) + f.zsum[i * 8 + r0 + r];
}

// Four weight rows of a block against one activation row, for short rows: each chunk's activation codes loaded once
// for the four, and the four sums reduced together (three hadds and one lane add where four `hsum8`s would each wait
// on their own chain). The rows sit one after another in memory, so this still walks one stream.
template <bool LANES>
QK_AVX2 static void tile4_i4_row(const Weights& w, int64_t n, int r0, const Acts& a, int64_t m, const Block8& f,
                                 float* out) {
  const int64_t K = w.K, nc = K / 64, rb = K / 2;
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + (n + r0) * rb;
  const int8_t* q = a.q.data() + m * K;
  const float* fac = LANES ? f.sl.data() + r0 * 8 : f.sd.data() + r0;
  const float* dl = LANES ? a.dl.data() + m * nc * 8 : nullptr;
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const __m256i qe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * 64));
    const __m256i qo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * 64 + 32));
    for (int r = 0; r < 4; ++r) {
      const uint8_t* p = wr + r * rb + c * 32;
      if ((c & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + kI4PrefetchBytes), _MM_HINT_T0);
      __m256i lo, hi;
      unpack_i4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), &lo, &hi);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_dot_i4(lo, hi, qe, qo)),
                               chunk_factor<LANES>(fac, dl, nc, 0, c, r), acc[r]);
    }
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out + r0, _mm_add_ps(sums, _mm_loadu_ps(f.zsum.data() + r0)));
}

template <int MB>
QK_AVX2 static void block8_i4(const Weights& w, int64_t n, int rows, const Acts& a, int64_t m, bool lanes, Block8& f,
                              float* out, int64_t ldo) {
  block8_factors(w, n, rows, a, m, MB, lanes, f);
  int r = 0;
  // For two activation rows, two weight rows side by side (each 64-column chunk's codes loaded once for both: 10-20%
  // faster than one at a time). For one activation row, one weight row after another: the weights then stream in
  // order, which the hardware prefetcher follows (measured, 1 thread, 60 matrices in turn so that they come from
  // memory: 3072 x 512 132 -> 83 us, 512 x 1024 67 -> 47 us, 512 x 2048 143 -> 113 us against four rows side by
  // side, whose loads stalled).
  const bool short_rows = w.K <= kI4ShortRow;
  if (w.G < 64) {  // 32 or 16
    if (MB == 2)
      for (; r + 2 <= rows; r += 2) tile_i4_chunks<2, MB, true>(w, n, r, a, m, f, out, ldo);
    if (MB == 1 && short_rows)
      for (; r + 4 <= rows; r += 4) tile4_i4_row<true>(w, n, r, a, m, f, out);
    for (; r < rows; ++r) tile_i4_chunks<1, MB, true>(w, n, r, a, m, f, out, ldo);
    return;
  }
  if (MB == 2)
    for (; r + 2 <= rows; r += 2) tile_i4_chunks<2, MB, false>(w, n, r, a, m, f, out, ldo);
  if (MB == 1 && short_rows)
    for (; r + 4 <= rows; r += 4) tile4_i4_row<false>(w, n, r, a, m, f, out);
  for (; r < rows; ++r) tile_i4_chunks<1, MB, false>(w, n, r, a, m, f, out, ldo);
}

QK_AVX2 static void rows_i4_avx2(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1,
                                 float* y, int64_t ldy) {
  const int64_t ng = w.K / w.G;
  Block8 f;
  for (int64_t n = n0; n < n1; n += 8) {
    const int rows = int(std::min<int64_t>(8, n1 - n));
    if (n + 16 <= w.N)
      for (int64_t g = 0; g < ng; ++g)
        _mm_prefetch(w.codes ? reinterpret_cast<const char*>(w.codes + (g * w.N + n + 8) * 2)
                             : reinterpret_cast<const char*>(w.aux + (g * w.N + n + 8) * 2),
                     _MM_HINT_T0);
    for (int64_t m = m0; m < m0 + M;) {
      float* o = y + (m - m0) * ldy + n;
      const int64_t left = m0 + M - m;
      if (left >= 4) {
        block8_i4<4>(w, n, rows, a, m, m == m0, f, o, ldy);
        m += 4;
      } else if (left >= 2) {
        block8_i4<2>(w, n, rows, a, m, m == m0, f, o, ldy);
        m += 2;
      } else {
        block8_i4<1>(w, n, rows, a, m, m == m0, f, o, ldy);
        m += 1;
      }
    }
  }
}
#endif

static bool i4_vector_ok(const Weights& w) { return w.G % 64 == 0 || ((w.G == 32 || w.G == 16) && w.K % 64 == 0); }

// y[(m - m0) * ldy + n] for m in [m0, m0 + M), n in [n0, n1).
static void rows(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
#if QK_X86
  if (use_avx2()) {
    switch (w.fmt) {
      case F32: return rows_avx2(static_cast<const float*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
      case BF16: return rows_avx2(static_cast<const uint16_t*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
      case I8:
        if (!a.q.empty()) return rows_i8q_avx2(w, a, m0, M, n0, n1, y, ldy);
        return rows_avx2(static_cast<const int8_t*>(w.data), a, m0, M, n0, n1, y, ldy, w.aux);
      case I4:
        if (a.permuted) return rows_i4_avx2(w, a, m0, M, n0, n1, y, ldy);
        break;
    }
  }
#endif
  switch (w.fmt) {
    case F32: return rows_scalar(static_cast<const float*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
    case BF16: return rows_scalar(static_cast<const uint16_t*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
    case I8:
      if (!a.q.empty()) return rows_i8q_scalar(w, a, m0, M, n0, n1, y, ldy);
      return rows_scalar(static_cast<const int8_t*>(w.data), a, m0, M, n0, n1, y, ldy, w.aux);
    case I4: return rows_i4_scalar(w, a, m0, M, n0, n1, y, ldy);
  }
}

static void prepare(Acts& a, const Weights& w) {
  if (w.fmt == I4) quantize_acts(a, w.G, use_avx2() && i4_vector_ok(w));
  if (w.fmt == I4 && a.permuted && w.G < 64) {  // lane j of a chunk's sums holds columns 8j .. 8j + 7: group 8j / G
    const int64_t nc = a.K / 64, ng = a.K / w.G;
    a.dl.resize(a.M * nc * 8);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t c = 0; c < nc; ++c)
        for (int j = 0; j < 8; ++j) a.dl[(m * nc + c) * 8 + j] = a.d[m * ng + (c * 64 + 8 * j) / w.G];
  }
  if (w.fmt == I8 && w.K % I8_BLOCK == 0) quantize_acts(a, I8_BLOCK, false);
}

// ---- argument checks -----------------------------------------------------------------------------------------------
static int64_t packed_k(int64_t fmt, int64_t k_stored) { return fmt == I4 ? 2 * k_stored : k_stored; }

static void check_weight(const at::Tensor& w, const c10::optional<at::Tensor>& aux, int64_t fmt, int64_t G,
                         int64_t lead, const char* what) {
  TORCH_CHECK(w.dim() == 2 + lead, what, ": expected a ", 2 + lead, "-D weight, got ", w.dim(), "-D");
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), what, ": expected a contiguous CPU weight");
  const auto dt = w.scalar_type();
  switch (fmt) {
    case F32: TORCH_CHECK(dt == at::kFloat, what, ": fmt 32 needs a float32 weight"); break;
    case BF16: TORCH_CHECK(dt == at::kBFloat16, what, ": fmt 16 needs a bfloat16 weight"); break;
    case I8: TORCH_CHECK(dt == at::kChar, what, ": fmt 8 needs an int8 weight"); break;
    case I4: TORCH_CHECK(dt == at::kByte, what, ": fmt 4 needs a uint8 (packed int4) weight"); break;
    default: TORCH_CHECK(false, what, ": fmt must be 4, 8, 16 or 32, got ", fmt);
  }
  const int64_t N = w.size(lead), K = packed_k(fmt, w.size(lead + 1));
  if (fmt == I8) {
    TORCH_CHECK(aux.has_value(), what, ": int8 needs its scales");
    TORCH_CHECK(aux->scalar_type() == at::kBFloat16 && aux->is_contiguous() && aux->dim() == 1 + lead &&
                    aux->size(lead) == N,
                what, ": int8 scales: expected contiguous bfloat16 [..., N]");
  } else if (fmt == I4) {
    TORCH_CHECK(aux.has_value(), what, ": int4 needs its scale_zero");
    const bool coded = aux->scalar_type() == at::kByte;
    TORCH_CHECK((aux->scalar_type() == at::kBFloat16 || coded) && aux->is_contiguous() && aux->dim() == 3 + lead &&
                    aux->size(lead + 1) == N && aux->size(lead + 2) == 2,
                what, ": int4 scale_zero: expected contiguous bfloat16 [..., K/G, N, 2] or uint8 (coded) "
                "[..., K/G + 2, N, 2]");
    const int64_t groups = aux->size(lead) - (coded ? 2 : 0);
    TORCH_CHECK(groups >= 1 && K % groups == 0, what, ": int4 scale_zero has ", groups, " groups, which does not ",
                "divide K = ", K);
    const int64_t g = K / groups;  // the group size, from the parameters' shape
    TORCH_CHECK(G == 0 || G == g, what, ": group_size ", G, " but the scale_zero holds groups of ", g);
    TORCH_CHECK(g >= 2 && g % 2 == 0, what, ": group size ", g, " must be even");
  }
}

// int4: the group size of a checked weight, from its parameters' shape
static int64_t i4_group(int64_t K, const at::Tensor& aux, int64_t lead) {
  return K / (aux.size(lead) - (aux.scalar_type() == at::kByte ? 2 : 0));
}

static Weights view_of(const at::Tensor& w, const c10::optional<at::Tensor>& aux, int64_t fmt, int64_t G, int64_t e,
                       int64_t lead) {
  Weights v;
  v.fmt = fmt;
  v.N = w.size(lead);
  v.K = packed_k(fmt, w.size(lead + 1));
  v.G = fmt == I4 ? i4_group(v.K, *aux, lead) : G;
  const int64_t row_bytes = w.size(lead + 1) * w.element_size();
  v.data = static_cast<const char*>(w.const_data_ptr()) + e * v.N * row_bytes;
  v.aux = nullptr;
  if (fmt == I8) v.aux = static_cast<const uint16_t*>(aux->const_data_ptr()) + e * v.N;
  if (fmt == I4) {
    const int64_t per = aux->size(lead) * v.N * 2;  // elements per matrix
    if (aux->scalar_type() == at::kByte)
      v.codes = static_cast<const uint8_t*>(aux->const_data_ptr()) + e * per;
    else
      v.aux = static_cast<const uint16_t*>(aux->const_data_ptr()) + e * per;
  }
  return v;
}

// Rows per work item: big enough to amortise the scheduling, small enough to split over threads.
// A multiple of 8: the int4 code takes rows in blocks of 8.
static int64_t row_block(int64_t N) { return (std::max<int64_t>(16, std::min<int64_t>(256, N / 8)) + 7) / 8 * 8; }

// ---- ops -----------------------------------------------------------------------------------------------------------
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& aux, int64_t fmt,
                  int64_t group_size) {
  check_weight(w, aux, fmt, group_size, 0, "qwen3next::linear");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qwen3next::linear: x must be a 2-D float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  const Weights wv = view_of(w, aux, fmt, group_size, 0, 0);
  TORCH_CHECK(xc.size(1) == wv.K, "qwen3next::linear: x has ", xc.size(1), " columns, the weight ", wv.K);
  const int64_t M = xc.size(0), N = wv.N;
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  Acts a(xc.const_data_ptr<float>(), M, wv.K);
  prepare(a, wv);
  float* out = y.data_ptr<float>();
  const int64_t rb = row_block(N), blocks = (N + rb - 1) / rb;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows(wv, a, 0, M, b * rb, std::min(N, (b + 1) * rb), out, N);
  });
  return y;
}

// Routed experts: out[t] = Σ_j weights[t, j] · down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j], over stacked
// weights gate_up [E, 2I, D] (gate rows, then up rows) and down [E, D, I]. Pairs are grouped by expert so that the
// tokens of one expert share its weight reads.
at::Tensor moe(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& gate_up,
               const c10::optional<at::Tensor>& gate_up_aux, const at::Tensor& down,
               const c10::optional<at::Tensor>& down_aux, int64_t fmt, int64_t group_size) {
  check_weight(gate_up, gate_up_aux, fmt, group_size, 1, "qwen3next::moe gate_up");
  check_weight(down, down_aux, fmt, group_size, 1, "qwen3next::moe down");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qwen3next::moe: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong,
              "qwen3next::moe: ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat,
              "qwen3next::moe: weights must be float32 with the shape of ids");
  const int64_t E = gate_up.size(0), two_i = gate_up.size(1), D = packed_k(fmt, gate_up.size(2));
  const int64_t I = two_i / 2;
  TORCH_CHECK(two_i % 2 == 0 && down.size(0) == E && down.size(1) == D && packed_k(fmt, down.size(2)) == I,
              "qwen3next::moe: expected gate_up [E, 2I, D] and down [E, D, I]");
  TORCH_CHECK(x.size(1) == D, "qwen3next::moe: x has ", x.size(1), " columns, the experts ", D);
  const at::Tensor xc = x.contiguous(), idc = ids.contiguous(), wc = weights.contiguous();
  const int64_t T = xc.size(0), k = idc.size(1), P = T * k;
  at::Tensor out = at::zeros({T, D}, xc.options());
  if (P == 0) return out;
  const int64_t* id = idc.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(id[p] >= 0 && id[p] < E, "qwen3next::moe: expert id ", id[p], " out of range");

  // pairs sorted by expert (counting sort, stable)
  std::vector<int64_t> count(E + 1, 0), order(P);
  for (int64_t p = 0; p < P; ++p) ++count[id[p] + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  {
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t p = 0; p < P; ++p) order[next[id[p]]++] = p;
  }
  struct Group { int64_t e, start, rows; };
  std::vector<Group> groups;
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) groups.push_back({e, count[e], count[e + 1] - count[e]});

  std::vector<float> xg(P * D), h(P * I), yd(P * D), gu(P * two_i);
  const float* xp = xc.const_data_ptr<float>();
  for (int64_t r = 0; r < P; ++r) std::memcpy(&xg[r * D], xp + (order[r] / k) * D, D * sizeof(float));

  auto run = [&](const at::Tensor& wt, const c10::optional<at::Tensor>& aux, const float* in, int64_t K, float* o,
                 int64_t N) {
    Acts a(in, P, K);
    const Weights w0 = view_of(wt, aux, fmt, group_size, 0, 1);
    prepare(a, w0);
    const int64_t rb = row_block(N), per = (N + rb - 1) / rb;
    const int64_t items = int64_t(groups.size()) * per;
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Group& g = groups[i / per];
        const int64_t b = i % per;
        const Weights w = view_of(wt, aux, fmt, group_size, g.e, 1);
        rows(w, a, g.start, g.rows, b * rb, std::min(N, (b + 1) * rb), o + g.start * N, N);
      }
    });
  };
  run(gate_up, gate_up_aux, xg.data(), D, gu.data(), two_i);
  for (int64_t r = 0; r < P; ++r) {
    const float* g = &gu[r * two_i];
    for (int64_t i = 0; i < I; ++i) h[r * I + i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
  }
  run(down, down_aux, h.data(), I, yd.data(), D);
  float* o = out.data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  for (int64_t r = 0; r < P; ++r) {
    const int64_t p = order[r], t = p / k;
    const float s = wp[p];
    for (int64_t d = 0; d < D; ++d) o[t * D + d] += s * yd[r * D + d];
  }
  return out;
}

// The fp32 weight [N, K] of an int8 or int4 weight (for prefill-sized products: dequantize once, then a GEMM).
at::Tensor dequantize(const at::Tensor& w, const c10::optional<at::Tensor>& aux, int64_t fmt, int64_t group_size) {
  check_weight(w, aux, fmt, group_size, 0, "qwen3next::dequantize");
  TORCH_CHECK(fmt == I8 || fmt == I4, "qwen3next::dequantize: fmt must be 8 or 4, got ", fmt);
  const Weights wv = view_of(w, aux, fmt, group_size, 0, 0);
  const int64_t N = wv.N, K = wv.K;
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row = o + n * K;
      if (fmt == I8) {
        const int8_t* q = static_cast<const int8_t*>(wv.data) + n * K;
        const float s = bf16_to_f32(wv.aux[n]);
        for (int64_t k = 0; k < K; ++k) row[k] = float(q[k]) * s;
      } else {
        const uint8_t* q = static_cast<const uint8_t*>(wv.data) + n * (K / 2);
        for (int64_t g = 0; g < K / wv.G; ++g) {
          const float s = wv.scale(g, n), z = wv.zero(g, n);
          for (int64_t k = g * wv.G; k < (g + 1) * wv.G; ++k) row[k] = float(Weights::code(q, k) - 8) * s + z;
        }
      }
    }
  });
  return out;
}

// ---- int4 quantization: the (scale, zero) search of quant/linear.py `quantize_int4_search`, per group ---------------
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch converts
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int kI4SearchSteps = 20;  // INT4_SEARCH_STEPS

// Σ w·(ŵ - x)² with the codes of grid (s, z) re-rounded: clamp(round((x - z) / s), -8, 7)
static inline __attribute__((always_inline)) float group_error(const float* x, const float* wt, int64_t G, float s,
                                                               float z) {
  float e = 0.f;
  for (int64_t i = 0; i < G; ++i) {
    const float q = std::min(7.f, std::max(-8.f, std::nearbyint((x[i] - z) / s)));
    const float d = q * s + z - x[i];
    e += wt[i] * d * d;
  }
  return e;
}

#if QK_X86
// The two loops above, 8 lanes wide (G % 8 == 0); same arithmetic per element, sums in 8 partial sums.
QK_AVX2 static inline float group_error_avx2(const float* x, const float* wt, int64_t G, float s, float z) {
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z), lo = _mm256_set1_ps(-8.f), hi = _mm256_set1_ps(7.f);
  __m256 e = _mm256_setzero_ps();
  for (int64_t i = 0; i < G; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(xv, zv), sv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(hi, _mm256_max_ps(lo, q));
    const __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(q, sv), zv), xv);
    e = _mm256_add_ps(e, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(wt + i), d), d));
  }
  return hsum8(e);
}

QK_AVX2 static inline void candidate_sums_avx2(const float* x, const float* wt, int64_t G, float lo, float inv,
                                               float* swq, float* swqq, float* swqx) {
  const __m256 lov = _mm256_set1_ps(lo), iv = _mm256_set1_ps(inv), zero = _mm256_setzero_ps(),
               top = _mm256_set1_ps(15.f);
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps();
  for (int64_t i = 0; i < G; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(xv, lov), iv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(top, _mm256_max_ps(zero, q));
    const __m256 wq = _mm256_mul_ps(_mm256_loadu_ps(wt + i), q);
    a = _mm256_add_ps(a, wq);
    b = _mm256_add_ps(b, _mm256_mul_ps(wq, q));
    c = _mm256_add_ps(c, _mm256_mul_ps(wq, xv));
  }
  *swq = hsum8(a);
  *swqq = hsum8(b);
  *swqx = hsum8(c);
}
#endif

template <bool AVX2>
static inline __attribute__((always_inline)) void search_group(const float* x, int64_t G, float* wt, uint8_t* codes,
                                                              uint16_t* s_out, uint16_t* z_out) {
  float lo = x[0], hi = x[0], sq = 0.f;
  for (int64_t i = 0; i < G; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sq += x[i] * x[i];
  }
  const float rms = std::sqrt(sq / float(G)), rng = hi - lo;
  float sw = 0.f, swx = 0.f;
  for (int64_t i = 0; i < G; ++i) {
    wt[i] = rms + std::fabs(x[i]);
    sw += wt[i];
    swx += wt[i] * x[i];
  }
  // the min-max grid: zero rounded first, then the smallest bf16 step that spans [lo, hi]
  float best_z = bf16_round(lo + rng * float(8.0 / 15.0));
  const float need = std::max(std::max((best_z - lo) / 8.f, (hi - best_z) / 7.f), 1e-30f);
  uint16_t sb = f32_to_bf16(need);
  if (bf16_to_f32(sb) < need) ++sb;
  float best_s = bf16_to_f32(sb);
  auto error = [&](float sc, float zc) {
#if QK_X86
    if (AVX2 && G % 8 == 0) return group_error_avx2(x, wt, G, sc, zc);
#endif
    return group_error(x, wt, G, sc, zc);
  };
  float best = error(best_s, best_z);
  const float span = rng > 0.f ? rng : 1.f;
  for (int step = 0; step <= kI4SearchSteps && rng > 0.f; ++step) {
    const float inv = float(15.0 + (2.0 * step / kI4SearchSteps - 1.0)) / span;
    float swq = 0.f, swqq = 0.f, swqx = 0.f;
#if QK_X86
    if (AVX2 && G % 8 == 0) {
      candidate_sums_avx2(x, wt, G, lo, inv, &swq, &swqq, &swqx);
    } else
#endif
      for (int64_t i = 0; i < G; ++i) {
        const float q = std::min(15.f, std::max(0.f, std::nearbyint((x[i] - lo) * inv)));
        const float wq = wt[i] * q;
        swq += wq;
        swqq += wq * q;
        swqx += wq * x[i];
      }
    const float det = sw * swqq - swq * swq;
    if (!(det > 1e-12f * sw * swqq)) continue;
    const float a = (sw * swqx - swq * swx) / det;
    if (!(a > 0.f)) continue;
    const float b = (swx - a * swq) / sw;
    const float s = bf16_round(a), z = bf16_round(b + 8.f * a);
    if (!(s > 0.f)) continue;
    const float e = error(s, z);
    if (e < best) {
      best = e;
      best_s = s;
      best_z = z;
    }
  }
  for (int64_t i = 0; i < G; ++i)
    codes[i] = uint8_t(std::min(7.f, std::max(-8.f, std::nearbyint((x[i] - best_z) / best_s))) + 8.f);
  *s_out = f32_to_bf16(best_s);
  *z_out = f32_to_bf16(best_z);
}

// Rows n0 .. n1 - 1. Inlined into the two entry points below, so that the AVX2 one compiles it with AVX2 (rounding in
// one instruction, the candidates' sums and errors 8 lanes wide). The sums' order is the only difference between the
// two, and from the torch twin; no FMA contraction.
template <bool AVX2>
static inline __attribute__((always_inline)) void search_rows(const float* x, int64_t n0, int64_t n1, int64_t K,
                                                             int64_t G, uint8_t* pk, uint16_t* sp, uint16_t* zp) {
  std::vector<float> wt(G);
  std::vector<uint8_t> codes(K);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t g = 0; g < K / G; ++g)
      search_group<AVX2>(x + n * K + g * G, G, wt.data(), codes.data() + g * G, sp + n * (K / G) + g,
                         zp + n * (K / G) + g);
    for (int64_t j = 0; j < K / 2; ++j) pk[n * (K / 2) + j] = uint8_t(codes[2 * j] | (codes[2 * j + 1] << 4));
  }
}
static void search_rows_scalar(const float* x, int64_t n0, int64_t n1, int64_t K, int64_t G, uint8_t* pk,
                               uint16_t* sp, uint16_t* zp) {
  search_rows<false>(x, n0, n1, K, G, pk, sp, zp);
}
#if QK_X86
QK_AVX2 static void search_rows_avx2(const float* x, int64_t n0, int64_t n1, int64_t K, int64_t G, uint8_t* pk,
                                     uint16_t* sp, uint16_t* zp) {
  search_rows<true>(x, n0, n1, K, G, pk, sp, zp);
}
#endif

// w fp32 [N, K] -> (canonical packed uint8 [N, K/2], scale bf16 [N, K/G], zero bf16 [N, K/G])
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu(),
              "qwen3next::quantize_int4: expected a contiguous 2-D float32 CPU weight");
  const int64_t N = w.size(0), K = w.size(1), G = group_size;
  TORCH_CHECK(G >= 2 && G % 2 == 0 && K % G == 0, "qwen3next::quantize_int4: group_size ", G,
              " must be even and divide K = ", K);
  at::Tensor packed = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({N, K / G}, w.options().dtype(at::kBFloat16));
  at::Tensor zero = at::empty({N, K / G}, w.options().dtype(at::kBFloat16));
  const float* x = w.const_data_ptr<float>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr());
  uint16_t* zp = reinterpret_cast<uint16_t*>(zero.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if QK_X86
    if (use_avx2()) return search_rows_avx2(x, n0, n1, K, G, pk, sp, zp);
#endif
    search_rows_scalar(x, n0, n1, K, G, pk, sp, zp);
  });
  return {packed, scale, zero};
}

int64_t kernel_isa(int64_t isa) {
  const int64_t previous = use_avx2() ? 1 : 0;
  if (isa == 0) {
    g_isa = 0;
  } else if (isa == 1) {
    g_isa = -1;
    use_avx2();
  }
  return previous;
}

}  // namespace qk

TORCH_LIBRARY(qwen3next, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? aux, int fmt, int group_size) -> Tensor");
  m.def("moe(Tensor x, Tensor weights, Tensor ids, Tensor gate_up, Tensor? gate_up_aux, Tensor down, "
        "Tensor? down_aux, int fmt, int group_size) -> Tensor");
  m.def("dequantize(Tensor w, Tensor? aux, int fmt, int group_size) -> Tensor");
  m.def("quantize_int4(Tensor w, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_isa(int isa) -> int", &qk::kernel_isa);
}

TORCH_LIBRARY_IMPL(qwen3next, CPU, m) {
  m.impl("linear", &qk::linear);
  m.impl("moe", &qk::moe);
  m.impl("dequantize", &qk::dequantize);
  m.impl("quantize_int4", &qk::quantize_int4);
}
