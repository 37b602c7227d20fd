// What the kernel sources share: the x86 intrinsics switch, the run-time ISA choice (decode_kernels.cpp defines
// use_avx2: AVX2 + FMA when the CPU has them, unless `qwen3next::kernel_isa(0)` forced the scalar code), and two
// AVX2 reductions.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_X86 1
#define QK_AVX2 __attribute__((target("avx2,fma")))
#else
#define QK_X86 0
#endif

namespace qk {
bool use_avx2();

#if QK_X86
// The sum of the 8 lanes of v.
QK_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x · y over n floats: two 8-lane accumulators over blocks of 16, then the rest one by one.
QK_AVX2 static inline float dot8(const float* x, const float* y, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
  }
  float r = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) r += x[i] * y[i];
  return r;
}
#endif
}  // namespace qk
