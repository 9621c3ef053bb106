// Flash attention, AVX2+FMA path: the Ops of the tiled drivers in attention.h.
//
// GEMM micro-kernel: C (R x 8*NV) (+)= A (R x K) B (K x 8*NV), R <= 6 rows, NV = 2 vectors (16 columns),
// 12 fp32 accumulators in registers (BLIS-style 6x16, Van Zee & van de Geijn 2015). B rows are read as
// vectors (unit stride along the columns), A elements are broadcast; A's row and k strides are free, which
// lets one kernel compute K Qt, P^T V, P dO, V dO^T, dS Q and dS^T K without transposing any operand.
// exp2: Cody-Waite style split x = n + f, |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (relative
// error < 1e-8, below fp32 rounding), times 2^n built in the exponent bits; x <= -127 (and -inf) gives
// exactly 0, so masked scores contribute nothing.
#include <immintrin.h>

#include "attention.h"

namespace fastllm {
namespace {

inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);  // -inf -> -127 -> 2^-127 built as +0.0 below
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.6931471805599453f));  // f ln 2
  // e^g for |g| <= ln2/2, Horner
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // 2^n: n + 127 in the exponent field; n = -127 gives the bit pattern of +0.0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

template <int R, int NV>
inline void ukr(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks, float* C,
                int64_t ldc, bool acc) {
  __m256 c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  const float* ap[R];
  for (int r = 0; r < R; ++r) ap[r] = A + r * a_rs;
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * b_ks + 8 * v);
    const int64_t ak = k * a_ks;
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap[r] + ak);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(av, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

template <int NV>
inline void gemm_strip(int64_t M, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                       int64_t b_ks, float* C, int64_t ldc, bool acc) {
  int64_t m0 = 0;
  for (; m0 + 6 <= M; m0 += 6) ukr<6, NV>(K, A + m0 * a_rs, a_rs, a_ks, B, b_ks, C + m0 * ldc, ldc, acc);
  const float* a = A + m0 * a_rs;
  float* cc = C + m0 * ldc;
  switch (M - m0) {
    case 5: ukr<5, NV>(K, a, a_rs, a_ks, B, b_ks, cc, ldc, acc); break;
    case 4: ukr<4, NV>(K, a, a_rs, a_ks, B, b_ks, cc, ldc, acc); break;
    case 3: ukr<3, NV>(K, a, a_rs, a_ks, B, b_ks, cc, ldc, acc); break;
    case 2: ukr<2, NV>(K, a, a_rs, a_ks, B, b_ks, cc, ldc, acc); break;
    case 1: ukr<1, NV>(K, a, a_rs, a_ks, B, b_ks, cc, ldc, acc); break;
    default: break;
  }
}

struct Avx2Ops {
  // C (M x N) (+)= A B, A(r, k) = A[r * a_rs + k * a_ks], B(k, n) = B[k * b_ks + n]; N a multiple of 8.
  static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                   int64_t b_ks, float* C, int64_t ldc, bool acc) {
    int64_t n0 = 0;
    for (; n0 + 16 <= N; n0 += 16) gemm_strip<2>(M, K, A, a_rs, a_ks, B + n0, b_ks, C + n0, ldc, acc);
    if (n0 < N) gemm_strip<1>(M, K, A, a_rs, a_ks, B + n0, b_ks, C + n0, ldc, acc);
  }
  // Row-vector helpers; n is a multiple of 8.
  static void vmax(float* acc, const float* x, int64_t n) {
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_ps(acc + j, _mm256_max_ps(_mm256_loadu_ps(acc + j), _mm256_loadu_ps(x + j)));
  }
  static void vadd(float* acc, const float* x, int64_t n) {
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_loadu_ps(x + j)));
  }
  static void exp2_sub(float* x, const float* m, int64_t n) {  // x = exp2(x - m)
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_ps(x + j, exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(m + j))));
  }
  static void dsoftmax(float* dp, const float* p, const float* delta, int64_t n) {  // dp = p (dp - delta)
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(dp + j), _mm256_loadu_ps(delta + j));
      _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), d));
    }
  }
  static void scale(float* x, int64_t n, float s) {
    const __m256 sv = _mm256_set1_ps(s);
    for (int64_t j = 0; j < n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), sv));
  }
  static void axpby(float* y, const float* x, int64_t n, float a) {  // y = a y + x
    const __m256 av = _mm256_set1_ps(a);
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(y + j), _mm256_loadu_ps(x + j)));
  }
  static void axpy(float* y, const float* x, int64_t n, float w) {  // y += w x
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  }
  // D elements of storage type S -> fp32, zero-padded to Dp.
  template <class S>
  static void load_row(float* dst, const typename S::T* src, int64_t D, int64_t Dp) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 v;
      if constexpr (S::kCode == kF32) {
        v = _mm256_loadu_ps(reinterpret_cast<const float*>(src) + d);
      } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
        if constexpr (S::kCode == kBF16)
          v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        else
          v = _mm256_cvtph_ps(h);
      }
      _mm256_storeu_ps(dst + d, v);
    }
    for (; d < D; ++d) dst[d] = S::load(src + d);
    for (; d < Dp; ++d) dst[d] = 0.f;
  }
  template <class S>
  static void store_row(typename S::T* dst, const float* src, int64_t D) {
    int64_t d = 0;
    if constexpr (S::kCode == kF32) {
      for (; d + 8 <= D; d += 8) _mm256_storeu_ps(reinterpret_cast<float*>(dst) + d, _mm256_loadu_ps(src + d));
    } else if constexpr (S::kCode == kF16) {
      for (; d + 8 <= D; d += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; d < D; ++d) dst[d] = S::from(src[d]);
  }
};

template <class S>
void fwd(const AttnFwd& a) {
  attn_fwd_impl<Avx2Ops, S>(a);
}

template <class S>
void bwd(const AttnBwd& a) {
  attn_bwd_impl<Avx2Ops, S>(a);
}

}  // namespace

void attn_fwd_avx2(const AttnFwd& a) {
  switch (a.s.dtype) {
    case kBF16: return fwd<BF16s>(a);
    case kF16: return fwd<F16s>(a);
    default: return fwd<F32s>(a);
  }
}

void attn_bwd_avx2(const AttnBwd& a) {
  switch (a.s.dtype) {
    case kBF16: return bwd<BF16s>(a);
    case kF16: return bwd<F16s>(a);
    default: return bwd<F32s>(a);
  }
}

}  // namespace fastllm
