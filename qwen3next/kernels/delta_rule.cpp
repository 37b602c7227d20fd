// The gated delta rule over a whole prompt (prefill), token by token, for CPUs.
//
// Per value head j (q/k head j / (HV / H)), state S [K, V], for each token t:
//     S̄ = a S (a = exp g_t);  u = beta_t (v_t - S̄ᵀ k_t);  S = S̄ + k_t uᵀ;  o_t = Sᵀ q_t = a Sᵀq_t + (q_t·k_t) u
// Every value column evolves on its own (u's column c only reads S's column c), so the work splits into
// (batch row, value head, block of 32 value columns) items run in parallel, each with its S block (K x 32 floats)
// in L1 for the whole prompt. One pass over the block per token: it writes the new rows of S and, from the same
// registers, accumulates Sᵀk and Sᵀq for the NEXT token (3 multiply-adds and one store per element and token).
//
// The recurrence itself, no chunking: fewer operations than the chunked (WY) form, which pays O(chunk) extra work per
// token to turn the recurrence into matrix products. Twin: `recurrent_gated_delta_rule` in qwen3next/ops/gated_delta.py
// (same math in torch); the parity tests compare both against the literal recurrence in float64.
//
// Registered as torch custom ops qwen3next::gated_delta_rule and gated_delta_verify (the same walk keeping every
// token's state, for a speculative verification), a fragment of the library the decode kernels define.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"

namespace qk {
namespace {

constexpr int64_t kBlock = 32;  // value columns per work item (4 AVX2 vectors)

struct DeltaArgs {
  const float *q, *k, *v, *g, *beta, *s0;
  float *o, *s1;
  int64_t B, T, H, HV, K, V;
  int64_t qb, qt, qh;  // strides of q [B, T, H, K] (the last one is 1); k has the same
  int64_t kb, kt, kh;
  int64_t vb, vt, vh;  // v [B, T, HV, V]
  int64_t gb, gt, gh;  // g [B, T, HV]
  int64_t bb, bt, bh;  // beta [B, T, HV]
  // o [B, T, HV, V] and the states [B, HV, K, V] are contiguous
  float* all = nullptr;  // when set: every token's state, [B, T, HV, K, V] contiguous (a verification's), and no s1
};

// Scalar version of one item: batch row b, value head j, columns c0 .. c0 + nc - 1.
void item_scalar(const DeltaArgs& a, int64_t b, int64_t j, int64_t c0, int64_t nc) {
  const int64_t K = a.K, V = a.V, hk = j / (a.HV / a.H);
  std::vector<float> S(K * nc), sk(nc), sq(nc), u(nc);
  const float* s0 = a.s0 + ((b * a.HV + j) * K) * V + c0;
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < nc; ++c) S[r * nc + c] = s0[r * V + c];
  for (int64_t t = 0; t < a.T; ++t) {
    const float* kt = a.k + b * a.kb + t * a.kt + hk * a.kh;
    const float* qt = a.q + b * a.qb + t * a.qt + hk * a.qh;
    const float* vt = a.v + b * a.vb + t * a.vt + j * a.vh + c0;
    const float al = std::exp(a.g[b * a.gb + t * a.gt + j * a.gh]);
    const float be = a.beta[b * a.bb + t * a.bt + j * a.bh];
    float qk = 0.f;
    for (int64_t r = 0; r < K; ++r) qk += qt[r] * kt[r];
    std::fill(sk.begin(), sk.end(), 0.f);
    std::fill(sq.begin(), sq.end(), 0.f);
    for (int64_t r = 0; r < K; ++r)
      for (int64_t c = 0; c < nc; ++c) {
        sk[c] += kt[r] * S[r * nc + c];
        sq[c] += qt[r] * S[r * nc + c];
      }
    float* ot = a.o + ((b * a.T + t) * a.HV + j) * V + c0;
    for (int64_t c = 0; c < nc; ++c) {
      u[c] = be * (vt[c] - al * sk[c]);
      ot[c] = al * sq[c] + qk * u[c];
    }
    for (int64_t r = 0; r < K; ++r)
      for (int64_t c = 0; c < nc; ++c) S[r * nc + c] = al * S[r * nc + c] + kt[r] * u[c];
    if (a.all) {
      float* st = a.all + (((b * a.T + t) * a.HV + j) * K) * V + c0;
      for (int64_t r = 0; r < K; ++r)
        for (int64_t c = 0; c < nc; ++c) st[r * V + c] = S[r * nc + c];
    }
  }
  if (a.all) return;
  float* s1 = a.s1 + ((b * a.HV + j) * K) * V + c0;
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < nc; ++c) s1[r * V + c] = S[r * nc + c];
}

#if QK_X86
// AVX2 version for a block of NV * 8 columns. Per row of S: NV vectors updated and stored, 2 NV multiply-adds into the
// next token's Sᵀk and Sᵀq (2 NV independent chains: with NV = 4 the adds' latency hides behind the other work).
template <int NV>
QK_AVX2 void item_avx2(const DeltaArgs& a, int64_t b, int64_t j, int64_t c0) {
  constexpr int64_t W = NV * 8;
  const int64_t K = a.K, V = a.V, hk = j / (a.HV / a.H);
  std::vector<float> buf(K * W + 16);
  float* S = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  const float* s0 = a.s0 + ((b * a.HV + j) * K) * V + c0;
  for (int64_t r = 0; r < K; ++r)
    for (int n = 0; n < NV; ++n) _mm256_store_ps(S + r * W + 8 * n, _mm256_loadu_ps(s0 + r * V + 8 * n));
  auto key = [&](int64_t t) { return a.k + b * a.kb + t * a.kt + hk * a.kh; };
  auto query = [&](int64_t t) { return a.q + b * a.qb + t * a.qt + hk * a.qh; };
  __m256 sk[NV], sq[NV], u[NV];
  for (int n = 0; n < NV; ++n) sk[n] = sq[n] = _mm256_setzero_ps();
  if (a.T > 0) {  // Sᵀk and Sᵀq of the first token
    const float *k0 = key(0), *q0 = query(0);
    for (int64_t r = 0; r < K; ++r) {
      const __m256 kr = _mm256_set1_ps(k0[r]), qr = _mm256_set1_ps(q0[r]);
      for (int n = 0; n < NV; ++n) {
        const __m256 x = _mm256_load_ps(S + r * W + 8 * n);
        sk[n] = _mm256_fmadd_ps(kr, x, sk[n]);
        sq[n] = _mm256_fmadd_ps(qr, x, sq[n]);
      }
    }
  }
  for (int64_t t = 0; t < a.T; ++t) {
    const float *kt = key(t), *qt = query(t);
    const float* vt = a.v + b * a.vb + t * a.vt + j * a.vh + c0;
    const float al = std::exp(a.g[b * a.gb + t * a.gt + j * a.gh]);
    const float be = a.beta[b * a.bb + t * a.bt + j * a.bh];
    const __m256 alv = _mm256_set1_ps(al), bev = _mm256_set1_ps(be), qkv = _mm256_set1_ps(dot8(qt, kt, K));
    float* ot = a.o + ((b * a.T + t) * a.HV + j) * V + c0;
    for (int n = 0; n < NV; ++n) {  // u = beta (v - a Sᵀk);  o = a Sᵀq + (q·k) u
      u[n] = _mm256_mul_ps(bev, _mm256_fnmadd_ps(alv, sk[n], _mm256_loadu_ps(vt + 8 * n)));
      _mm256_storeu_ps(ot + 8 * n, _mm256_fmadd_ps(qkv, u[n], _mm256_mul_ps(alv, sq[n])));
      sk[n] = sq[n] = _mm256_setzero_ps();
    }
    // S = a S + k uᵀ, row by row; meanwhile Sᵀk and Sᵀq of the next token from the new rows
    const bool next = t + 1 < a.T;
    const float *kn = next ? key(t + 1) : kt, *qn = next ? query(t + 1) : qt;
    if (t + 2 < a.T) {  // the rows of token t + 2 (strided far apart: the hardware prefetcher misses them)
      const char *kp = reinterpret_cast<const char*>(key(t + 2)), *qp = reinterpret_cast<const char*>(query(t + 2));
      for (int64_t off = 0; off < K * 4; off += 64) {
        _mm_prefetch(kp + off, _MM_HINT_T0);
        _mm_prefetch(qp + off, _MM_HINT_T0);
      }
      _mm_prefetch(reinterpret_cast<const char*>(vt + 2 * a.vt), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a.g + b * a.gb + (t + 2) * a.gt + j * a.gh), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a.beta + b * a.bb + (t + 2) * a.bt + j * a.bh), _MM_HINT_T0);
    }
    float* st = a.all ? a.all + (((b * a.T + t) * a.HV + j) * K) * V + c0 : nullptr;
    for (int64_t r = 0; r < K; ++r) {
      const __m256 kr = _mm256_set1_ps(kt[r]), knr = _mm256_set1_ps(kn[r]), qnr = _mm256_set1_ps(qn[r]);
      for (int n = 0; n < NV; ++n) {
        const __m256 x = _mm256_fmadd_ps(kr, u[n], _mm256_mul_ps(alv, _mm256_load_ps(S + r * W + 8 * n)));
        _mm256_store_ps(S + r * W + 8 * n, x);
        if (st) _mm256_storeu_ps(st + r * V + 8 * n, x);
        sk[n] = _mm256_fmadd_ps(knr, x, sk[n]);
        sq[n] = _mm256_fmadd_ps(qnr, x, sq[n]);
      }
    }
  }
  if (a.all) return;
  float* s1 = a.s1 + ((b * a.HV + j) * K) * V + c0;
  for (int64_t r = 0; r < K; ++r)
    for (int n = 0; n < NV; ++n) _mm256_storeu_ps(s1 + r * V + 8 * n, _mm256_load_ps(S + r * W + 8 * n));
}
#endif

// ---- one decode token, in place in the pool (gated_delta_decode) ------------------------------------------------
struct DecodeArgs {
  const float *q, *k, *v, *g, *beta;
  float *pool, *o;
  const int64_t* slots;
  int64_t H, HV, K, V;
  int64_t qb, qh, kb, kh, vb, vh, gb, bb;  // strides (the last dims are contiguous)
};

// Scalar: sequence b, value head j, columns c0 .. c0 + nc - 1 of its state row in the pool.
void decode_scalar(const DecodeArgs& a, int64_t b, int64_t j, int64_t c0, int64_t nc) {
  const int64_t K = a.K, V = a.V, hk = j / (a.HV / a.H);
  float* S = a.pool + ((a.slots[b] * a.HV + j) * K) * V + c0;
  const float *kt = a.k + b * a.kb + hk * a.kh, *qt = a.q + b * a.qb + hk * a.qh, *vt = a.v + b * a.vb + j * a.vh + c0;
  const float al = std::exp(a.g[b * a.gb + j]), be = a.beta[b * a.bb + j];
  float qk = 0.f;
  for (int64_t r = 0; r < K; ++r) qk += qt[r] * kt[r];
  std::vector<float> sk(nc, 0.f), sq(nc, 0.f), u(nc);
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < nc; ++c) {
      sk[c] += kt[r] * S[r * V + c];
      sq[c] += qt[r] * S[r * V + c];
    }
  float* ot = a.o + (b * a.HV + j) * V + c0;
  for (int64_t c = 0; c < nc; ++c) {
    u[c] = be * (vt[c] - al * sk[c]);
    ot[c] = al * sq[c] + qk * u[c];
  }
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < nc; ++c) S[r * V + c] = al * S[r * V + c] + kt[r] * u[c];
}

#if QK_X86
// AVX2, NV * 8 columns: one pass over the block for Sᵀk and Sᵀq, one that rewrites it (the block, K x NV * 8 floats,
// is still in L1 for the second).
template <int NV>
QK_AVX2 void decode_avx2(const DecodeArgs& a, int64_t b, int64_t j, int64_t c0) {
  const int64_t K = a.K, V = a.V, hk = j / (a.HV / a.H);
  float* S = a.pool + ((a.slots[b] * a.HV + j) * K) * V + c0;
  const float *kt = a.k + b * a.kb + hk * a.kh, *qt = a.q + b * a.qb + hk * a.qh, *vt = a.v + b * a.vb + j * a.vh + c0;
  const float al = std::exp(a.g[b * a.gb + j]), be = a.beta[b * a.bb + j];
  __m256 sk[NV], sq[NV], u[NV];
  for (int n = 0; n < NV; ++n) sk[n] = sq[n] = _mm256_setzero_ps();
  for (int64_t r = 0; r < K; ++r) {
    const __m256 kr = _mm256_set1_ps(kt[r]), qr = _mm256_set1_ps(qt[r]);
    for (int n = 0; n < NV; ++n) {
      const __m256 x = _mm256_loadu_ps(S + r * V + 8 * n);
      sk[n] = _mm256_fmadd_ps(kr, x, sk[n]);
      sq[n] = _mm256_fmadd_ps(qr, x, sq[n]);
    }
  }
  const __m256 alv = _mm256_set1_ps(al), bev = _mm256_set1_ps(be), qkv = _mm256_set1_ps(dot8(qt, kt, K));
  float* ot = a.o + (b * a.HV + j) * V + c0;
  for (int n = 0; n < NV; ++n) {  // u = beta (v - a Sᵀk);  o = a Sᵀq + (q·k) u
    u[n] = _mm256_mul_ps(bev, _mm256_fnmadd_ps(alv, sk[n], _mm256_loadu_ps(vt + 8 * n)));
    _mm256_storeu_ps(ot + 8 * n, _mm256_fmadd_ps(qkv, u[n], _mm256_mul_ps(alv, sq[n])));
  }
  for (int64_t r = 0; r < K; ++r) {  // S = a S + k uᵀ
    const __m256 kr = _mm256_set1_ps(kt[r]);
    for (int n = 0; n < NV; ++n) {
      float* p = S + r * V + 8 * n;
      _mm256_storeu_ps(p, _mm256_fmadd_ps(kr, u[n], _mm256_mul_ps(alv, _mm256_loadu_ps(p))));
    }
  }
}
#endif

#if QK_X86
// Runs run(std::integral_constant<int, NV>{}) for a block of NV * 8 = 32, 16 or 8 columns and returns true; other
// widths return false (the caller runs the scalar code).
template <class F>
bool with_vectors(int64_t nc, F&& run) {
  switch (nc) {
    case 32: run(std::integral_constant<int, 4>{}); return true;
    case 16: run(std::integral_constant<int, 2>{}); return true;
    case 8: run(std::integral_constant<int, 1>{}); return true;
    default: return false;
  }
}
#endif

void check(const at::Tensor& x, const char* name, int64_t dim, const char* op = "gated_delta_rule") {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": ", name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must have ", dim, " dims, got ", x.dim());
}

}  // namespace

// q, k [B, T, H, K], v [B, T, HV, V] (last dims contiguous), g, beta [B, T, HV], state [B, HV, K, V] (read only).
// Returns o [B, T, HV, V] and the final state [B, HV, K, V] or, with `keep_all`, every token's state [B, T, HV, K, V]:
// new float32 tensors.
static std::tuple<at::Tensor, at::Tensor> run_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& g, const at::Tensor& beta,
                                                   const at::Tensor& state, bool keep_all) {
  const char* op = keep_all ? "gated_delta_verify" : "gated_delta_rule";
  check(q, "q", 4, op);
  check(k, "k", 4, op);
  check(v, "v", 4, op);
  check(g, "g", 3, op);
  check(beta, "beta", 3, op);
  check(state, "state", 4, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), HV = v.size(2), V = v.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape");
  TORCH_CHECK(H > 0 && K > 0, op, ": q and k need at least one head of at least one dimension");
  TORCH_CHECK(v.size(0) == B && v.size(1) == T && HV % H == 0, op, ": v must be [B, T, HV, V], HV % H == 0");
  TORCH_CHECK(g.size(0) == B && g.size(1) == T && g.size(2) == HV && beta.sizes() == g.sizes(),
              op, ": g and beta must be [B, T, HV]");
  TORCH_CHECK(state.size(0) == B && state.size(1) == HV && state.size(2) == K && state.size(3) == V,
              op, ": state must be [B, HV, K, V]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              op, ": q, k, v need a contiguous last dimension");
  const at::Tensor s0 = state.contiguous();
  at::Tensor o = at::empty({B, T, HV, V}, q.options());
  at::Tensor s1 = keep_all ? at::empty({B, T, HV, K, V}, q.options()) : at::empty({B, HV, K, V}, q.options());
  DeltaArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(),
              beta.data_ptr<float>(), s0.data_ptr<float>(), o.data_ptr<float>(), s1.data_ptr<float>(),
              B, T, H, HV, K, V,
              q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2),
              beta.stride(0), beta.stride(1), beta.stride(2), keep_all ? s1.data_ptr<float>() : nullptr};
  const int64_t blocks = (V + kBlock - 1) / kBlock, items = B * HV * blocks;
  const bool avx2 = use_avx2();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (HV * blocks), j = (i / blocks) % HV, c0 = (i % blocks) * kBlock;
      const int64_t nc = std::min(kBlock, V - c0);
#if QK_X86
      if (avx2 && with_vectors(nc, [&](auto nv) { item_avx2<decltype(nv)::value>(a, b, j, c0); })) continue;
#endif
      item_scalar(a, b, j, c0, nc);
    }
  });
  return {o, s1};
}

std::tuple<at::Tensor, at::Tensor> gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& g, const at::Tensor& beta,
                                                    const at::Tensor& state) {
  return run_rule(q, k, v, g, beta, state, false);
}

// A speculative verification's few tokens: gated_delta_rule keeping the state after every token, [B, T, HV, K, V]
// (the caller commits the one after the last accepted token). Functional (nothing updated in place), so a traced
// verification step can call it.
std::tuple<at::Tensor, at::Tensor> gated_delta_verify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& g, const at::Tensor& beta,
                                                      const at::Tensor& state) {
  return run_rule(q, k, v, g, beta, state, true);
}

// One decode token per sequence, the recurrent state updated IN PLACE in its row of the slot pool: q, k [B, H, K],
// v [B, HV, V], g, beta [B, HV] (last dims contiguous), pool [S, HV, K, V] contiguous, slots [B] int64 (distinct, in
// 0..S-1). Returns o [B, HV, V]. The state is read once and written once; nothing is gathered or copied back.
at::Tensor gated_delta_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                              const at::Tensor& beta, at::Tensor& pool, const at::Tensor& slots) {
  const char* op = "gated_delta_decode";
  check(q, "q", 3, op);
  check(k, "k", 3, op);
  check(v, "v", 3, op);
  check(g, "g", 2, op);
  check(beta, "beta", 2, op);
  check(pool, "pool", 4, op);
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), HV = v.size(1), V = v.size(2), S = pool.size(0);
  TORCH_CHECK(k.sizes() == q.sizes() && H > 0 && K > 0, "gated_delta_decode: k must have q's shape [B, H, K]");
  TORCH_CHECK(v.size(0) == B && HV % H == 0, "gated_delta_decode: v must be [B, HV, V] with HV % H == 0");
  TORCH_CHECK(g.size(0) == B && g.size(1) == HV && beta.sizes() == g.sizes(),
              "gated_delta_decode: g and beta must be [B, HV]");
  TORCH_CHECK(pool.is_contiguous() && pool.size(1) == HV && pool.size(2) == K && pool.size(3) == V,
              "gated_delta_decode: pool must be a contiguous [S, HV, K, V] = [S, ", HV, ", ", K, ", ", V, "]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && g.stride(1) == 1 && beta.stride(1) == 1,
              "gated_delta_decode: q, k, v, g, beta need a contiguous last dimension");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == B && slots.scalar_type() == at::kLong && slots.device().is_cpu(),
              "gated_delta_decode: slots must be int64 [B]");
  const at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.const_data_ptr<int64_t>();
  {
    std::vector<bool> seen(S, false);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "gated_delta_decode: slot ", sp[b], " outside the pool's ", S, " slots");
      TORCH_CHECK(!seen[sp[b]], "gated_delta_decode: slot ", sp[b], " appears twice");
      seen[sp[b]] = true;
    }
  }
  at::Tensor o = at::empty({B, HV, V}, q.options());
  DecodeArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(),
               beta.data_ptr<float>(), pool.data_ptr<float>(), o.data_ptr<float>(), sp, H, HV, K, V,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
               beta.stride(0)};
  const int64_t blocks = (V + kBlock - 1) / kBlock, items = B * HV * blocks;
  const bool avx2 = use_avx2();
  at::parallel_for(0, items, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (HV * blocks), j = (i / blocks) % HV, c0 = (i % blocks) * kBlock;
      const int64_t nc = std::min(kBlock, V - c0);
#if QK_X86
      if (avx2 && with_vectors(nc, [&](auto nv) { decode_avx2<decltype(nv)::value>(a, b, j, c0); })) continue;
#endif
      decode_scalar(a, b, j, c0, nc);
    }
  });
  return o;
}

}  // namespace qk

TORCH_LIBRARY_FRAGMENT(qwen3next, m) {
  m.def("gated_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
  m.def("gated_delta_verify(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
  m.def("gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) pool, Tensor slots) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(qwen3next, CPU, m) {
  m.impl("gated_delta_rule", &qk::gated_delta_rule);
  m.impl("gated_delta_verify", &qk::gated_delta_verify);
  m.impl("gated_delta_decode", &qk::gated_delta_decode);
}
