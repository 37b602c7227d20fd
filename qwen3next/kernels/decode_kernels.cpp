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
#include <vector>

#include "isa.h"

namespace qk {

enum Fmt : int64_t { I4 = 4, I8 = 8, BF16 = 16, F32 = 32 };

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
struct Weights {
  int64_t fmt, N, K, G;
  const void* data;
  const uint16_t* aux;  // int8: bf16 scales [N]; int4: bf16 scale_zero [K/G, N, 2]; else null

  // int4: the code (0..15) of column k of row `row`, and the scale and zero of group g of row n
  static int32_t code(const uint8_t* row, int64_t k) { return (k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 15); }
  float scale(int64_t g, int64_t n) const { return bf16_to_f32(aux[(g * N + n) * 2]); }
  float zero(int64_t g, int64_t n) const { return bf16_to_f32(aux[(g * N + n) * 2 + 1]); }
};

// Activation rows [M, K] (fp32, contiguous) and, for int4 weights, their per-group int8 codes.
struct Acts {
  const float* x;
  int64_t M, K;
  bool permuted = false;   // codes stored per 64-column chunk as (even columns, odd columns): the AVX2 layout
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K/G]: code scale (amax / 127)
  std::vector<float> xsum; // [M, K/G]: Σ x over the group, exact fp32

  Acts(const float* x_, int64_t M_, int64_t K_) : x(x_), M(M_), K(K_) {}
};

static void quantize_acts(Acts& a, int64_t G, bool permuted) {
  const int64_t M = a.M, K = a.K, ng = K / G;
  a.permuted = permuted;
  a.q.assign(M * K, 0);
  a.d.assign(M * ng, 0.f);
  a.xsum.assign(M * ng, 0.f);
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

// int4 weight rows n .. n + R - 1 (G % 64 == 0) against MB rows of per-group int8 activation codes (permuted
// layout): each 64-column chunk of a weight row is unpacked once and used MB times.
template <int R, int MB>
QK_AVX2 static void tile_i4(const Weights& w, int64_t n, const Acts& a, int64_t m, float* out, int64_t ldo) {
  const int64_t K = w.K, G = w.G, ng = K / G;
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + n * (K / 2);
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][MB];
  float zpart[R][MB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) {
      acc[r][i] = _mm256_setzero_ps();
      zpart[r][i] = 0.f;
    }
  for (int64_t g = 0; g < ng; ++g) {
    __m256i isum[R][MB];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MB; ++i) isum[r][i] = _mm256_setzero_si256();
    for (int64_t c = g * G; c < (g + 1) * G; c += 64) {
      __m256i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * (K / 2) + c / 2));
        lo[r] = _mm256_and_si256(v, low);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int i = 0; i < MB; ++i) {
        const int8_t* q = a.q.data() + (m + i) * K + c;
        const __m256i qe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i qo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
        for (int r = 0; r < R; ++r) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], qe), _mm256_maddubs_epi16(hi[r], qo));
          isum[r][i] = _mm256_add_epi32(isum[r][i], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = w.scale(g, n + r), z = w.zero(g, n + r);
      for (int i = 0; i < MB; ++i) {
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][i]), _mm256_set1_ps(s * a.d[(m + i) * ng + g]),
                                    acc[r][i]);
        zpart[r][i] += (z - 8.f * s) * a.xsum[(m + i) * ng + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) out[i * ldo + r] = hsum8(acc[r][i]) + zpart[r][i];
}

template <int R>
QK_AVX2 static void tile_i4_rows(const Weights& w, int64_t n, const Acts& a, int64_t m0, int64_t M, float* y,
                                 int64_t ldy) {
  constexpr int MB_MAX = R >= 2 ? 2 : 4;  // registers: R * MB integer and float accumulators
  for (int64_t m = m0; m < m0 + M;) {
    float* o = y + (m - m0) * ldy + n;
    const int64_t left = m0 + M - m;
    if (left >= MB_MAX) {
      tile_i4<R, MB_MAX>(w, n, a, m, o, ldy);
      m += MB_MAX;
    } else if (left >= 2) {
      tile_i4<R, 2>(w, n, a, m, o, ldy);
      m += 2;
    } else {
      tile_i4<R, 1>(w, n, a, m, o, ldy);
      m += 1;
    }
  }
}

QK_AVX2 static void rows_i4_avx2(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1,
                                 float* y, int64_t ldy) {
  const int64_t ng = w.K / w.G;
  int64_t fetched = -1;
  // scale_zero is [K/G, N, 2]: a row's groups lie N * 4 bytes apart, one cache line per group serves 16 rows.
  // Fetch the next 16 rows' lines ahead (the hardware prefetcher does not follow this stride).
  auto prefetch = [&](int64_t n) {
    const int64_t block = (n >> 4) + 1;
    if (block != fetched && block * 16 < w.N) {
      fetched = block;
      for (int64_t g = 0; g < ng; ++g)
        _mm_prefetch(reinterpret_cast<const char*>(w.aux + (g * w.N + block * 16) * 2), _MM_HINT_T0);
    }
  };
  int64_t n = n0;
  if (M <= 2)  // two rows side by side: measured 10-20% faster than one at a time for one or two activation rows
    for (; n + 2 <= n1; n += 2) {
      prefetch(n);
      tile_i4_rows<2>(w, n, a, m0, M, y, ldy);
    }
  for (; n < n1; ++n) {
    prefetch(n);
    tile_i4_rows<1>(w, n, a, m0, M, y, ldy);
  }
}
#endif

static bool i4_vector_ok(const Weights& w) { return w.G % 64 == 0; }

// y[(m - m0) * ldy + n] for m in [m0, m0 + M), n in [n0, n1).
static void rows(const Weights& w, const Acts& a, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
#if QK_X86
  if (use_avx2()) {
    switch (w.fmt) {
      case F32: return rows_avx2(static_cast<const float*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
      case BF16: return rows_avx2(static_cast<const uint16_t*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
      case I8: return rows_avx2(static_cast<const int8_t*>(w.data), a, m0, M, n0, n1, y, ldy, w.aux);
      case I4:
        if (a.permuted) return rows_i4_avx2(w, a, m0, M, n0, n1, y, ldy);
        break;
    }
  }
#endif
  switch (w.fmt) {
    case F32: return rows_scalar(static_cast<const float*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
    case BF16: return rows_scalar(static_cast<const uint16_t*>(w.data), a, m0, M, n0, n1, y, ldy, nullptr);
    case I8: return rows_scalar(static_cast<const int8_t*>(w.data), a, m0, M, n0, n1, y, ldy, w.aux);
    case I4: return rows_i4_scalar(w, a, m0, M, n0, n1, y, ldy);
  }
}

static void prepare(Acts& a, const Weights& w) {
  if (w.fmt == I4) quantize_acts(a, w.G, use_avx2() && i4_vector_ok(w));
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
    TORCH_CHECK(G >= 2 && G % 2 == 0 && K % G == 0, what, ": group_size ", G, " must be even and divide K = ", K);
    TORCH_CHECK(aux->scalar_type() == at::kBFloat16 && aux->is_contiguous() && aux->dim() == 3 + lead &&
                    aux->size(lead) == K / G && aux->size(lead + 1) == N && aux->size(lead + 2) == 2,
                what, ": int4 scale_zero: expected contiguous bfloat16 [..., K/G, N, 2]");
  }
}

static Weights view_of(const at::Tensor& w, const c10::optional<at::Tensor>& aux, int64_t fmt, int64_t G, int64_t e,
                       int64_t lead) {
  Weights v;
  v.fmt = fmt;
  v.N = w.size(lead);
  v.K = packed_k(fmt, w.size(lead + 1));
  v.G = G;
  const int64_t row_bytes = w.size(lead + 1) * w.element_size();
  v.data = static_cast<const char*>(w.const_data_ptr()) + e * v.N * row_bytes;
  v.aux = nullptr;
  if (fmt == I8 || fmt == I4) {
    const int64_t per = fmt == I8 ? v.N : (v.K / G) * v.N * 2;
    v.aux = static_cast<const uint16_t*>(aux->const_data_ptr()) + e * per;
  }
  return v;
}

// Rows per work item: big enough to amortise the scheduling, small enough to split over threads.
static int64_t row_block(int64_t N) { return std::max<int64_t>(16, std::min<int64_t>(256, N / 8)); }

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
  m.def("kernel_isa(int isa) -> int", &qk::kernel_isa);
}

TORCH_LIBRARY_IMPL(qwen3next, CPU, m) {
  m.impl("linear", &qk::linear);
  m.impl("moe", &qk::moe);
  m.impl("dequantize", &qk::dequantize);
}
