// What both kernel sources share: the x86 intrinsics switch and the run-time ISA choice (decode_kernels.cpp defines
// use_avx2: AVX2 + FMA when the CPU has them, unless `qwen3next::kernel_isa(0)` forced the scalar code).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_X86 1
#define QK_AVX2 __attribute__((target("avx2,fma")))
#else
#define QK_X86 0
#endif

namespace qk {
bool use_avx2();
}  // namespace qk
