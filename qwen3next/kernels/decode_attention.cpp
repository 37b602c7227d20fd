// Attention of one new token per sequence over its paged K/V rows, for CPUs (decode steps).
//
//   out[b, h] = Σ_l softmax_l(scale · q[b, h] · K[rows[b, l], h / G]) · V[rows[b, l], h / G],  l < lens[b]
//
// with G = H / HKV query heads per key/value head (GQA). The K/V rows are read where they lie in the pools, by the
// row index of each key (the block table expanded): nothing is gathered into a copy first, and each K and V row is
// read once for the G query heads that share it. Work items are (sequence, key/value head); each walks its keys in
// blocks of 64: the block's scores for all G heads, then one rescale of the running output (online softmax: the
// running max, its sum of exponentials, and the output are rescaled when a block raises the max), then the weighted
// sum of the block's value rows.
//
// The pools hold fp32, bf16 or fp16 (`--kv-cache-dtype`): 16-bit rows are widened to fp32 as they are loaded (bf16 by
// a shift, fp16 by F16C's conversion), the arithmetic stays fp32. A 16-bit cache halves the bytes a step reads, which
// at long contexts is most of the attention's time.
//
// Twin: `decode_attention_reference` in qwen3next/kernels/__init__.py (gather + masked softmax in torch); the model's
// own path without the kernel is SDPA over the gathered rows with the mask (model/attention.py).
//
// Registered as torch custom op qwen3next::decode_attention (a fragment of the library the decode kernels define).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa.h"

namespace qk {
namespace {

constexpr int64_t kKeys = 64;  // keys per block

template <typename E>
struct AttnArgs {
  const float* q;
  const E *k, *v;
  const int64_t *rows, *lens;
  float* o;
  int64_t B, H, HKV, D, L, R;
  float scale;
};

template <typename E>
float dot_scalar(const float* a, const E* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}
template <typename E>
void axpy_scalar(float a, const E* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}
void scale_scalar(float a, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// One (sequence b, key/value head j): its G query heads over its keys. Scalar code (any D).
template <typename E>
void attend_scalar(const AttnArgs<E>& a, int64_t b, int64_t j, float* scores, float* acc) {
  const int64_t G = a.H / a.HKV, D = a.D, n = a.lens[b];
  const float* q = a.q + (b * a.H + j * G) * D;  // the G query heads of this group, [G, D]
  const int64_t* rows = a.rows + b * a.L;
  std::vector<float> m(G, -std::numeric_limits<float>::infinity()), sum(G, 0.f);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t l0 = 0; l0 < n; l0 += kKeys) {
    const int64_t nk = std::min(kKeys, n - l0);
    for (int64_t t = 0; t < nk; ++t) {
      const E* kr = a.k + (rows[l0 + t] * a.HKV + j) * D;
      for (int64_t g = 0; g < G; ++g) scores[g * kKeys + t] = dot_scalar(q + g * D, kr, D) * a.scale;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * kKeys;
      const float new_max = std::max(m[g], *std::max_element(s, s + nk));
      const float fix = std::exp(m[g] - new_max);  // 0 for the first block (m = -inf)
      sum[g] *= fix;
      scale_scalar(fix, acc + g * D, D);
      m[g] = new_max;
      for (int64_t t = 0; t < nk; ++t) {
        s[t] = std::exp(s[t] - new_max);
        sum[g] += s[t];
      }
    }
    for (int64_t t = 0; t < nk; ++t) {
      const E* vr = a.v + (rows[l0 + t] * a.HKV + j) * D;
      for (int64_t g = 0; g < G; ++g) axpy_scalar(scores[g * kKeys + t], vr, acc + g * D, D);
    }
  }
  float* o = a.o + (b * a.H + j * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[g * D + d] = acc[g * D + d] * inv;
  }
}

#if QK_X86
// exp of 8 floats <= 0 (Cephes' single-precision range reduction and polynomial; within 2 ulp of expf, inputs below
// -87.3 give exp(-87.3) ~ 1e-38 instead of a denormal or 0)
QK_AVX2 static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define QK_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

// 8 consecutive pool values as fp32
QK_AVX2_F16C static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
QK_AVX2_F16C static inline __m256 load8(const c10::BFloat16* p) {  // bf16 = the high half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
QK_AVX2_F16C static inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The sums of the 8 lanes of each of s[0..7], as one vector in that order: hadd pairs, twice ([0..3 lanes 0-3 | 0..3
// lanes 4-7] and the same for 4..7), then the halves added. The same tree for every position.
QK_AVX2_F16C static inline __m256 reduce8(const __m256* s) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// q · k for eight key rows at once (D % 8 == 0): eight independent accumulators (one dot product at a time would wait
// on the FMA latency and end in a horizontal sum per score), reduced together into one vector of the 8 scores.
template <typename E>
QK_AVX2_F16C static inline __m256 dot_8keys(const float* q, const E* const* k, int64_t D) {
  __m256 s[8];
  for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) s[i] = _mm256_fmadd_ps(qv, load8(k[i] + d), s[i]);
  }
  return reduce8(s);
}

// q · k for one key row (D % 8 == 0)
template <typename E>
QK_AVX2_F16C static inline float dot_1key(const float* q, const E* k, int64_t D) {
  __m256 s = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), s);
  return hsum8(s);
}

// The scaled scores of one block's keys for all G query heads (scores[g * kKeys + t]). HG = 2 or 4 heads share each
// key row's loads (and widening): 8 / HG keys x HG heads make the eight accumulators of one reduction; HG = 1 takes
// eight keys per head (`dot_8keys`). Each score's sum runs in the same order whatever HG.
template <int HG, typename E>
QK_AVX2_F16C static inline void key_scores(const float* q, int64_t G, int64_t D, const E* const* k, int64_t nk,
                                           float scale, float* scores) {
  constexpr int NK = 8 / HG;
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t g0 = 0; g0 < G; g0 += HG) {
    int64_t t = 0;
    for (; t + NK <= nk; t += NK) {
      if constexpr (HG == 1) {
        _mm256_storeu_ps(scores + g0 * kKeys + t, _mm256_mul_ps(dot_8keys(q + g0 * D, k + t, D), sc));
        continue;
      }
      __m256 s[8];
      for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        __m256 kv[NK];
        for (int j = 0; j < NK; ++j) kv[j] = load8(k[t + j] + d);
        for (int h = 0; h < HG; ++h) {
          const __m256 qv = _mm256_loadu_ps(q + (g0 + h) * D + d);
          for (int j = 0; j < NK; ++j) s[h * NK + j] = _mm256_fmadd_ps(qv, kv[j], s[h * NK + j]);
        }
      }
      alignas(32) float out[8];
      _mm256_store_ps(out, _mm256_mul_ps(reduce8(s), sc));
      for (int h = 0; h < HG; ++h)
        for (int j = 0; j < NK; ++j) scores[(g0 + h) * kKeys + t + j] = out[h * NK + j];
    }
    for (; t < nk; ++t)
      for (int h = 0; h < HG; ++h) scores[(g0 + h) * kKeys + t] = dot_1key(q + (g0 + h) * D, k[t], D) * scale;
  }
}

// For HG query heads h (their rows of acc D apart, their scores p kKeys apart):
//   acc[h][0 .. 8 W) = fix[h] · acc[h] + Σ_t p[h][t] · v[t][d0 .. d0 + 8 W)
// Each value row is loaded (and widened) once for the HG heads that share it; HG x W accumulators, independent chains
// (each element's sum runs over the keys in order, whatever HG).
template <int HG, int W, typename E>
QK_AVX2_F16C static inline void weighted_rows(float* acc, int64_t D, const float* fix, const float* p,
                                              const E* const* v, int64_t nk, int64_t d0) {
  __m256 r[HG][W];
  for (int h = 0; h < HG; ++h) {
    const __m256 f = _mm256_set1_ps(fix[h]);
    for (int i = 0; i < W; ++i) r[h][i] = _mm256_mul_ps(_mm256_loadu_ps(acc + h * D + 8 * i), f);
  }
  for (int64_t t = 0; t < nk; ++t) {
    __m256 x[W];
    for (int i = 0; i < W; ++i) x[i] = load8(v[t] + d0 + 8 * i);
    for (int h = 0; h < HG; ++h) {
      const __m256 w = _mm256_set1_ps(p[h * kKeys + t]);
      for (int i = 0; i < W; ++i) r[h][i] = _mm256_fmadd_ps(w, x[i], r[h][i]);
    }
  }
  for (int h = 0; h < HG; ++h)
    for (int i = 0; i < W; ++i) _mm256_storeu_ps(acc + h * D + 8 * i, r[h][i]);
}

// One block's weighted value rows for all G heads, HG heads per pass over the rows and 8 / HG registers of columns
// per head (eight accumulators per pass; a tail of 8 columns one register wide).
template <int HG, typename E>
QK_AVX2_F16C static inline void weighted_heads(float* acc, int64_t G, int64_t D, const float* fix, const float* scores,
                                               const E* const* v, int64_t nk) {
  constexpr int W = 8 / HG;
  for (int64_t g = 0; g < G; g += HG) {
    float* ag = acc + g * D;
    int64_t d = 0;
    for (; d + 8 * W <= D; d += 8 * W) weighted_rows<HG, W, E>(ag + d, D, fix + g, scores + g * kKeys, v, nk, d);
    for (; d < D; d += 8) weighted_rows<HG, 1, E>(ag + d, D, fix + g, scores + g * kKeys, v, nk, d);
  }
}

// Query heads per pass over a K/V head's rows: 4 when they divide its G heads, else 2 when they do, else 1.
static inline int heads_per_pass(int64_t G) { return G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1; }

// The same for D % 8 == 0, everything inlined: per block, the scores of the G heads, HG heads per pass over the key
// rows (`key_scores`), then per head the softmax update, then the running outputs rescaled and the block's value rows
// added, HG heads per pass over the rows (`weighted_heads`); HG = `heads_per_pass(G)`. Measured, 1 thread, one
// sequence of 4,096 keys in an fp16 cache, one head per pass -> HG heads per pass (value side, then key side too):
// the 80B's shape (16 query / 2 K/V heads of 256) 1.53-1.62 -> 1.33-1.46 -> 1.13-1.15 ms, `small`'s (8 / 2 of 64)
// 217-229 -> 197-199 -> 175-178 us, the demo's (4 / 2 of 64) 119-123 -> 112-114 us (key side only).
template <int HG, typename E>
QK_AVX2_F16C void attend_avx2(const AttnArgs<E>& a, int64_t b, int64_t j, float* scores, float* acc) {
  const int64_t G = a.H / a.HKV, D = a.D, n = a.lens[b];
  const float* q = a.q + (b * a.H + j * G) * D;
  const int64_t* rows = a.rows + b * a.L;
  std::vector<float> m(G, -std::numeric_limits<float>::infinity()), sum(G, 0.f), fix(G);
  std::fill(acc, acc + G * D, 0.f);
  const E* krow[kKeys];
  const E* vrow[kKeys];
  for (int64_t l0 = 0; l0 < n; l0 += kKeys) {
    const int64_t nk = std::min(kKeys, n - l0);
    for (int64_t t = 0; t < nk; ++t) {
      const int64_t r = rows[l0 + t] * a.HKV + j;
      krow[t] = a.k + r * D;
      vrow[t] = a.v + r * D;
    }
    key_scores<HG, E>(q, G, D, krow, nk, a.scale, scores);
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * kKeys;
      const float new_max = std::max(m[g], *std::max_element(s, s + nk));
      fix[g] = std::exp(m[g] - new_max);
      sum[g] *= fix[g];
      m[g] = new_max;
      const __m256 mx = _mm256_set1_ps(new_max);
      __m256 tot = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 8 <= nk; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mx));
        _mm256_storeu_ps(s + t, e);
        tot = _mm256_add_ps(tot, e);
      }
      sum[g] += hsum8(tot);
      for (; t < nk; ++t) {
        s[t] = std::exp(s[t] - new_max);
        sum[g] += s[t];
      }
    }
    weighted_heads<HG, E>(acc, G, D, fix.data(), scores, vrow, nk);
  }
  float* o = a.o + (b * a.H + j * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const __m256 inv = _mm256_set1_ps(sum[g] > 0.f ? 1.f / sum[g] : 0.f);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + g * D + d, _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + d), inv));
  }
}
#endif

bool has_f16c() {
#if QK_X86 && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

template <typename E>
void run_attention(const AttnArgs<E>& a, bool avx) {
  const int64_t G = a.H / a.HKV;
  at::parallel_for(0, a.B * a.HKV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(G * kKeys), acc(G * a.D);
    for (int64_t i = i0; i < i1; ++i) {
#if QK_X86
      if (avx) {
        const int64_t b = i / a.HKV, j = i % a.HKV;
        switch (heads_per_pass(G)) {
          case 4: attend_avx2<4, E>(a, b, j, scores.data(), acc.data()); break;
          case 2: attend_avx2<2, E>(a, b, j, scores.data(), acc.data()); break;
          default: attend_avx2<1, E>(a, b, j, scores.data(), acc.data());
        }
        continue;
      }
#endif
      attend_scalar<E>(a, i / a.HKV, i % a.HKV, scores.data(), acc.data());
    }
  });
}

}  // namespace

// q [B, H, D] fp32, k_pool / v_pool [R, HKV, D] (fp32, bf16 or fp16, both the same), rows [B, L] int64 (pool row of
// key l of sequence b; entries at l >= lens[b] are not read), lens [B] int64 (1 <= lens[b] <= L) -> out [B, H, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& rows, const at::Tensor& lens, double scale) {
  const char* what = "qwen3next::decode_attention";
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), what,
              ": expected q [B, H, D] and k_pool, v_pool [R, HKV, D] of one shape");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.device().is_cpu(), what, ": q must be float32 CPU");
  const at::ScalarType kv = k_pool.scalar_type();
  TORCH_CHECK((kv == at::kFloat || kv == at::kBFloat16 || kv == at::kHalf) && v_pool.scalar_type() == kv &&
                  k_pool.device().is_cpu() && v_pool.device().is_cpu(),
              what, ": the pools must be CPU float32, bfloat16 or float16, both the same; got ", k_pool.scalar_type(),
              " and ", v_pool.scalar_type());
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), what, ": the pools must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), HKV = k_pool.size(1), R = k_pool.size(0);
  TORCH_CHECK(k_pool.size(2) == D && HKV > 0 && H % HKV == 0, what, ": q has ", H, " heads of ", D,
              ", the pools ", HKV, " of ", k_pool.size(2), " (need a multiple)");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == B && rows.scalar_type() == at::kLong, what, ": rows must be int64 [B, L]");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B && lens.scalar_type() == at::kLong, what, ": lens must be int64 [B]");
  const at::Tensor qc = q.contiguous(), rc = rows.contiguous(), lc = lens.contiguous();
  const int64_t L = rc.size(1);
  const int64_t* rp = rc.const_data_ptr<int64_t>();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, what, ": lens[", b, "] = ", lp[b], " outside [1, ", L, "]");
    for (int64_t l = 0; l < lp[b]; ++l)
      TORCH_CHECK(rp[b * L + l] >= 0 && rp[b * L + l] < R, what, ": row ", rp[b * L + l], " outside the pools' ", R);
  }
  at::Tensor out = at::empty({B, H, D}, qc.options());
  if (B == 0 || H == 0) return out;
  const float* qp = qc.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  // F16C comes with every AVX2 CPU we know of; checked all the same for the fp16 pools
  const bool avx = use_avx2() && D % 8 == 0 && (kv != at::kHalf || has_f16c());
  if (kv == at::kBFloat16) {
    using E = c10::BFloat16;
    run_attention(AttnArgs<E>{qp, k_pool.const_data_ptr<E>(), v_pool.const_data_ptr<E>(), rp, lp, op, B, H, HKV, D, L,
                              R, float(scale)}, avx);
  } else if (kv == at::kHalf) {
    using E = c10::Half;
    run_attention(AttnArgs<E>{qp, k_pool.const_data_ptr<E>(), v_pool.const_data_ptr<E>(), rp, lp, op, B, H, HKV, D, L,
                              R, float(scale)}, avx);
  } else {
    run_attention(AttnArgs<float>{qp, k_pool.const_data_ptr<float>(), v_pool.const_data_ptr<float>(), rp, lp, op, B, H,
                                  HKV, D, L, R, float(scale)}, avx);
  }
  return out;
}

}  // namespace qk

TORCH_LIBRARY_FRAGMENT(qwen3next, m) {
  m.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor rows, Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen3next, CPU, m) { m.impl("decode_attention", &qk::decode_attention); }
