// The GEMM engine's vectorized epilogue and activations (AVX2+FMA), shared by the AVX2 and AVX-512 TUs
// (included only by *_avx2.cpp / *_avx512.cpp; internal linkage, see common.h).
//
// Activations (fp32, vectorized):
//   sigmoid(x) = 1 / (1 + 2^(-x log2 e)) with exp2_ps (vec_avx2.h)
//   gelu(x) = x Phi(x), Phi(x) = (1 + erf(t)) / 2, t = x / sqrt 2:
//     |t| <= 1: erf(t) = t P(t^2), P of degree 6 (least squares on Chebyshev nodes, 3 ulp in fp32)
//     |t| >  1: erfc(|t|) = exp(-t^2) S(1/|t|) / |t|, S of degree 10 on u = 1/|t| in [0.1, 1] (5 ulp), so
//              Phi(x) = erfc/2 for x < 0 keeps its relative accuracy in the tail (no 1 + erf cancellation)
//   gelu'(x) = Phi(x) + x exp(-x^2/2) / sqrt(2 pi)
//   gelu_tanh(x) = x (1 + tanh z) / 2 = x sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
#pragma once

#include <immintrin.h>

#include "gemm.h"
#include "vec_avx2.h"

namespace fastllm {
namespace {

inline __m256 splat(float v) { return _mm256_set1_ps(v); }

inline __m256 sigmoid_ps(__m256 x) {
  const __m256 e = exp2_ps(_mm256_mul_ps(x, splat(-1.4426950408889634f)));
  return _mm256_div_ps(splat(1.f), _mm256_add_ps(splat(1.f), e));
}

// Phi(x); *gauss = exp(-x^2 / 2)
inline __m256 phi_ps(__m256 x, __m256* gauss) {
  const __m256 t = _mm256_mul_ps(x, splat(0.70710678118654752f));
  const __m256 at = _mm256_andnot_ps(splat(-0.f), t);
  const __m256 s = _mm256_mul_ps(t, t);
  __m256 p = splat(7.933486079906981e-05f);
  p = _mm256_fmadd_ps(p, s, splat(-0.0008034844004678138f));
  p = _mm256_fmadd_ps(p, s, splat(0.005191218029399263f));
  p = _mm256_fmadd_ps(p, s, splat(-0.026855399229439494f));
  p = _mm256_fmadd_ps(p, s, splat(0.11283625718024475f));
  p = _mm256_fmadd_ps(p, s, splat(-0.37612629876684467f));
  p = _mm256_fmadd_ps(p, s, splat(1.1283791665927294f));
  const __m256 small = _mm256_fmadd_ps(splat(0.5f), _mm256_mul_ps(t, p), splat(0.5f));
  const __m256 e = exp2_ps(_mm256_mul_ps(s, splat(-1.4426950408889634f)));
  const __m256 u = _mm256_div_ps(splat(1.f), at);
  __m256 q = splat(-0.04841774490191934f);
  q = _mm256_fmadd_ps(q, u, splat(0.23665880408724022f));
  q = _mm256_fmadd_ps(q, u, splat(-0.4065380637271109f));
  q = _mm256_fmadd_ps(q, u, splat(0.10438059870758402f));
  q = _mm256_fmadd_ps(q, u, splat(0.6741221349515999f));
  q = _mm256_fmadd_ps(q, u, splat(-1.1634845351732015f));
  q = _mm256_fmadd_ps(q, u, splat(0.8207785523406063f));
  q = _mm256_fmadd_ps(q, u, splat(-0.08133351588359679f));
  q = _mm256_fmadd_ps(q, u, splat(-0.27211911066349487f));
  q = _mm256_fmadd_ps(q, u, splat(-0.0006721213550964138f));
  q = _mm256_fmadd_ps(q, u, splat(0.5642085640412493f));
  const __m256 half_erfc = _mm256_mul_ps(splat(0.5f), _mm256_mul_ps(e, _mm256_mul_ps(q, u)));
  const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
  const __m256 large = _mm256_blendv_ps(half_erfc, _mm256_sub_ps(splat(1.f), half_erfc), pos);
  *gauss = e;
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(at, splat(1.f), _CMP_LE_OQ));
}

// x * sigmoid(k x) is NaN at x = -inf in torch (x / (1 + exp(-k x)) = -inf / inf); exp2_ps saturates instead, so
// without this the product would be -inf. NaN inputs stay NaN through the arithmetic.
inline __m256 neg_inf_to_nan(__m256 x, __m256 r) {
  return _mm256_blendv_ps(r, splat(__builtin_nanf("")), _mm256_cmp_ps(x, splat(-__builtin_inff()), _CMP_EQ_OQ));
}

inline __m256 act_ps(int act, __m256 x) {
  switch (act) {
    case kActGelu: {
      __m256 e;
      return _mm256_mul_ps(x, phi_ps(x, &e));
    }
    case kActGeluTanh: {
      const __m256 x2 = _mm256_mul_ps(x, x);
      const __m256 z2 = _mm256_mul_ps(x, _mm256_fmadd_ps(splat(0.0713548162726f), x2, splat(1.5957691216057308f)));
      return neg_inf_to_nan(x, _mm256_mul_ps(x, sigmoid_ps(z2)));
    }
    case kActQuickGelu: return neg_inf_to_nan(x, _mm256_mul_ps(x, sigmoid_ps(_mm256_mul_ps(x, splat(1.702f)))));
    case kActRelu: return _mm256_max_ps(_mm256_setzero_ps(), x);  // NaN stays NaN (second operand)
    case kActSilu: return neg_inf_to_nan(x, _mm256_mul_ps(x, sigmoid_ps(x)));
    default: return x;
  }
}

inline __m256 dact_ps(int act, __m256 x) {
  const __m256 one = splat(1.f);
  switch (act) {
    case kActGelu: {
      __m256 e;
      const __m256 cdf = phi_ps(x, &e);
      return _mm256_fmadd_ps(_mm256_mul_ps(x, e), splat(0.3989422804014327f), cdf);
    }
    case kActGeluTanh: {
      const __m256 x2 = _mm256_mul_ps(x, x);
      const __m256 z2 = _mm256_mul_ps(x, _mm256_fmadd_ps(splat(0.0713548162726f), x2, splat(1.5957691216057308f)));
      const __m256 s = sigmoid_ps(z2);
      const __m256 dz = _mm256_fmadd_ps(splat(0.2140644488178f), x2, splat(1.5957691216057308f));
      return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_sub_ps(one, s)), dz, s);
    }
    case kActQuickGelu: {
      const __m256 y = _mm256_mul_ps(x, splat(1.702f));
      const __m256 s = sigmoid_ps(y);
      return _mm256_fmadd_ps(_mm256_mul_ps(y, s), _mm256_sub_ps(one, s), s);
    }
    case kActRelu: return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ), one);
    case kActSilu: {
      const __m256 s = sigmoid_ps(x);
      return _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
    }
    default: return one;
  }
}

// The epilogue of 8 accumulator columns (acc) at output row m, output columns [n, n + 8).
template <class S>
inline void epi8(const Gemm& g, const float* acc, int64_t m, int64_t n) {
  using T = typename S::T;
  if (g.mode == kEpiInt8 || g.mode == kEpiScale) {
    __m256 v;
    if (g.mode == kEpiInt8) {  // the tile holds exact int32 sums
      __m256i iv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
      if (g.b_colsum)
        iv = _mm256_sub_epi32(iv, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.b_colsum + n)), 7));
      v = _mm256_mul_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(g.a_scale[m]));
    } else {
      v = _mm256_loadu_ps(acc);
    }
    v = _mm256_mul_ps(v, _mm256_loadu_ps(g.b_scale + n));
    if (g.bias) v = _mm256_add_ps(v, load8<S>(static_cast<const T*>(g.bias) + n));
    store8<S>(static_cast<T*>(g.c) + m * g.ldc + n, v);
    return;
  }
  const __m256 v = _mm256_loadu_ps(acc);
  switch (g.mode) {
    case kEpiGated: {
      __m256 gv = v, uv = _mm256_loadu_ps(acc + 8);
      if (g.bias) gv = _mm256_add_ps(gv, load8<S>(static_cast<const T*>(g.bias) + n));
      if (g.bias2) uv = _mm256_add_ps(uv, load8<S>(static_cast<const T*>(g.bias2) + n));
      if (g.pre) {
        store8<S>(static_cast<T*>(g.pre) + m * g.ld_pre + n, gv);
        store8<S>(static_cast<T*>(g.pre2) + m * g.ld_pre + n, uv);
      }
      store8<S>(static_cast<T*>(g.c) + m * g.ldc + n, _mm256_mul_ps(act_ps(g.act, gv), uv));
      return;
    }
    case kEpiDact: {
      const __m256 x = load8<S>(static_cast<const T*>(g.aux) + m * g.ld_aux + n);
      store8<S>(static_cast<T*>(g.c) + m * g.ldc + n, _mm256_mul_ps(v, dact_ps(g.act, x)));
      return;
    }
    case kEpiDgated: {
      const __m256 gv = load8<S>(static_cast<const T*>(g.aux) + m * g.ld_aux + n);
      const __m256 uv = load8<S>(static_cast<const T*>(g.aux2) + m * g.ld_aux + n);
      store8<S>(static_cast<T*>(g.c) + m * g.ldc + n, _mm256_mul_ps(_mm256_mul_ps(v, uv), dact_ps(g.act, gv)));
      store8<S>(static_cast<T*>(g.c2) + m * g.ldc + n, _mm256_mul_ps(v, act_ps(g.act, gv)));
      return;
    }
    default: {
      __m256 pre = v;
      if (g.bias) pre = _mm256_add_ps(pre, load8<S>(static_cast<const T*>(g.bias) + n));
      if (g.pre) store8<S>(static_cast<T*>(g.pre) + m * g.ld_pre + n, pre);
      __m256 y = act_ps(g.act, pre);
      if (g.res) y = _mm256_add_ps(y, load8<S>(static_cast<const T*>(g.res) + m * g.ld_res + n));
      store8<S>(static_cast<T*>(g.c) + m * g.ldc + n, y);
    }
  }
}

// The vectorized Run of the heads store (epilogue_heads, gemm.h): 8 columns at a time, the tail per element.
struct HeadsRunVec {
  template <class S>
  static void run(typename S::T* dst, const float* acc, const typename S::T* bias, int64_t len) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 v = _mm256_loadu_ps(acc + i);
      if (bias) v = _mm256_add_ps(v, load8<S>(bias + i));
      store8<S>(dst + i, v);
    }
    HeadsRunScalar::run<S>(dst + i, acc + i, bias ? bias + i : nullptr, len - i);
  }
};

template <class S>
inline void epilogue_t(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
  if (g.heads_S > 0) return epilogue_heads<S, HeadsRunVec>(g, tile, ldt, m, rows, p);
  const int64_t w = panel_out_cols(g, p);
  const int64_t n0 = p * (g.mode == kEpiGated ? 8 : kNR);
  for (int r = 0; r < rows; ++r) {
    const float* acc = tile + r * ldt;
    int64_t j = 0;
    for (; j + 8 <= w; j += 8) epi8<S>(g, acc + j, m + r, n0 + j);
    if (j < w) epilogue_cols_scalar<S>(g, acc, m + r, p, j, w);
  }
}

// The Ops::epilogue of the AVX2 and AVX-512 paths (an Ops derives from it): dispatch on the epilogue dtype.
struct VecEpilogue {
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    with_float_dtype(g.c_dt, [&](auto s) { epilogue_t<decltype(s)>(g, tile, ldt, m, rows, p); });
  }
};

}  // namespace
}  // namespace fastllm
