// Flash attention, AVX2+FMA path: the Ops of the tiled drivers in attention.h.
//
// GEMM micro-kernel: C (R x 8*NV) (+)= A (R x K) B (K x 8*NV), R <= 6 rows, NV = 2 vectors (16 columns),
// 12 fp32 accumulators in registers (BLIS-style 6x16, Van Zee & van de Geijn 2015). B rows are read as
// vectors (unit stride along the columns), A elements are broadcast; A's row and k strides are free, which
// lets one kernel compute K Qt, P^T V, P dO, V dO^T, dS Q and dS^T K without transposing any operand.
// exp2: vec_avx2.h (x <= -127 and -inf give exactly 0, so masked scores contribute nothing).
#include <immintrin.h>

#include "attention.h"
#include "ukr_rows.h"
#include "vec_avx2.h"

namespace fastllm {
namespace {

// Accumulators are named variables (an array of __m256 made GCC spill all 12 of them to the stack on every
// k step); `if constexpr` drops the rows and the second vector a variant does not have.
// A's layout picks the inner loop's addressing: kRowMajor (a_ks == 1: row r at A + r*a_rs, element k at
// [k]), kColMajor (a_rs == 1: the R elements of step k adjacent, one pointer bump per step) or kStrided.
enum ALayout { kRowMajor, kColMajor, kStrided };

// K is consumed in chunks of kKc: each chunk is summed in the registers from zero, then added to the total
// kept in C (blocked summation). A dot product over D = 256 summed in one sequential chain erred 1.7x more
// than MKL's and, where attention is peaked, pushed fp32 outputs past 2x eager's error.
constexpr int64_t kKc = 64;

template <int R, int NV, ALayout L>
inline void ukr(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks, float* C,
                int64_t ldc, bool acc, float* colmax) {
  const float* a0 = A;
  const float* a1 = A + a_rs;
  const float* a2 = A + 2 * a_rs;
  const float* a3 = A + 3 * a_rs;
  const float* a4 = A + 4 * a_rs;
  const float* a5 = A + 5 * a_rs;
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kKc) {
    const int64_t k1 = K < k0 + kKc ? K : k0 + kKc;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
// The per-row steps, applied to the tile's rows by FASTLLM_EACH_ROW6 (ukr_rows.h); FASTLLM_A(r) is the
// address of A(r, k) in the layout's form (defined around each use).
#define FASTLLM_ADDC(r, c0, c1)                                                    \
  if constexpr (R > r) {                                                           \
    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(C + r * ldc));                          \
    if constexpr (NV > 1) c1 = _mm256_add_ps(c1, _mm256_loadu_ps(C + r * ldc + 8)); \
  }
#define FASTLLM_STEP(r, c0, c1)                             \
  if constexpr (R > r) {                                    \
    const __m256 av = _mm256_broadcast_ss(FASTLLM_A(r));    \
    c0 = _mm256_fmadd_ps(av, b0, c0);                       \
    if constexpr (NV > 1) c1 = _mm256_fmadd_ps(av, b1, c1); \
  }
#define FASTLLM_STOREC(r, c0, c1)                                \
  if constexpr (R > r) {                                         \
    _mm256_storeu_ps(C + r * ldc, c0);                           \
    if constexpr (NV > 1) _mm256_storeu_ps(C + r * ldc + 8, c1); \
  }
#define FASTLLM_MAXC(r, c0, c1)                       \
  if constexpr (R > r) {                              \
    m0 = _mm256_max_ps(m0, c0);                       \
    if constexpr (NV > 1) m1 = _mm256_max_ps(m1, c1); \
  }
    for (int64_t k = k0; k < k1; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B);
      const __m256 b1 = NV > 1 ? _mm256_loadu_ps(B + 8) : b0;
      B += b_ks;
      if constexpr (L == kRowMajor) {
#define FASTLLM_A(r) a##r + k
        FASTLLM_EACH_ROW6(FASTLLM_STEP)
#undef FASTLLM_A
      } else if constexpr (L == kColMajor) {
#define FASTLLM_A(r) a0 + r
        FASTLLM_EACH_ROW6(FASTLLM_STEP)
#undef FASTLLM_A
        a0 += a_ks;
      } else {
        const int64_t o = k * a_ks;
#define FASTLLM_A(r) a##r + o
        FASTLLM_EACH_ROW6(FASTLLM_STEP)
#undef FASTLLM_A
      }
    }
    if (acc || k0 > 0) {  // add this chunk's sums to the running total in C
      FASTLLM_EACH_ROW6(FASTLLM_ADDC)
    }
    FASTLLM_EACH_ROW6(FASTLLM_STOREC)
    if (colmax != nullptr && k1 >= K) {  // epilogue: column maxima of the tile folded into colmax (row max)
      __m256 m0 = _mm256_loadu_ps(colmax), m1 = NV > 1 ? _mm256_loadu_ps(colmax + 8) : m0;
      FASTLLM_EACH_ROW6(FASTLLM_MAXC)
      _mm256_storeu_ps(colmax, m0);
      if constexpr (NV > 1) _mm256_storeu_ps(colmax + 8, m1);
    }
  }
#undef FASTLLM_ADDC
#undef FASTLLM_STEP
#undef FASTLLM_STOREC
#undef FASTLLM_MAXC
}

template <int NV, ALayout L>
inline void gemm_strip(int64_t M, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                       int64_t b_ks, float* C, int64_t ldc, bool acc, float* cm) {
  int64_t m0 = 0;
  for (; m0 + 6 <= M; m0 += 6) ukr<6, NV, L>(K, A + m0 * a_rs, a_rs, a_ks, B, b_ks, C + m0 * ldc, ldc, acc, cm);
  if (m0 < M)  // the last 1..5 rows
    with_rows<5>(static_cast<int>(M - m0), [&](auto rows) {
      ukr<decltype(rows)::value, NV, L>(K, A + m0 * a_rs, a_rs, a_ks, B, b_ks, C + m0 * ldc, ldc, acc, cm);
    });
}

template <ALayout L>
inline void gemm_l(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                   int64_t b_ks, float* C, int64_t ldc, bool acc, float* colmax) {
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16)
    gemm_strip<2, L>(M, K, A, a_rs, a_ks, B + n0, b_ks, C + n0, ldc, acc, colmax ? colmax + n0 : nullptr);
  if (n0 < N) gemm_strip<1, L>(M, K, A, a_rs, a_ks, B + n0, b_ks, C + n0, ldc, acc, colmax ? colmax + n0 : nullptr);
}

struct Avx2Ops {
  // C (M x N) (+)= A B, A(r, k) = A[r * a_rs + k * a_ks], B(k, n) = B[k * b_ks + n]; N a multiple of 8.
  // colmax (N floats) or null: colmax = max(colmax, max over the rows of C), computed from the registers.
  static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                   int64_t b_ks, float* C, int64_t ldc, bool acc, float* colmax = nullptr) {
    if (a_ks == 1)
      gemm_l<kRowMajor>(M, N, K, A, a_rs, a_ks, B, b_ks, C, ldc, acc, colmax);
    else if (a_rs == 1)
      gemm_l<kColMajor>(M, N, K, A, a_rs, a_ks, B, b_ks, C, ldc, acc, colmax);
    else
      gemm_l<kStrided>(M, N, K, A, a_rs, a_ks, B, b_ks, C, ldc, acc, colmax);
  }
  // Decode-shaped scores: St (n x 8, columns [0, M) rounded up to 4) = K (n x Dp rows, stride ldk) . Qr^T
  // (Qr: 8 x Dp rows, zero past the M real rows and past D). Dot-product form, 2 keys x 4 rows per step
  // (8 accumulators, each summing Dp/8 terms per lane, then a tree of hadds): the 8-wide broadcast GEMM would
  // spend half its FMAs on padding when a row block holds only Hg * Sn = 4 rows.
  static void qk_small(int64_t n, int64_t M, int64_t Dp, const float* K, int64_t ldk, const float* Qr, float* St,
                       float* colmax) {
    __m128 mx0 = _mm_loadu_ps(colmax), mx1 = _mm_loadu_ps(colmax + 4);
    for (int64_t j = 0; j < n; j += 2) {
      const float* k0 = K + j * ldk;
      const float* k1 = j + 1 < n ? k0 + ldk : k0;
      for (int64_t r = 0; r < M; r += 4) {  // M <= 8; rows past M are zero (their scores are unused)
        const float* q = Qr + r * Dp;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t d = 0; d < Dp; d += 8) {
          const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
          const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + Dp + d);
          const __m256 q2 = _mm256_loadu_ps(q + 2 * Dp + d), q3 = _mm256_loadu_ps(q + 3 * Dp + d);
          a0 = _mm256_fmadd_ps(x0, q0, a0);
          a1 = _mm256_fmadd_ps(x0, q1, a1);
          a2 = _mm256_fmadd_ps(x0, q2, a2);
          a3 = _mm256_fmadd_ps(x0, q3, a3);
          a4 = _mm256_fmadd_ps(x1, q0, a4);
          a5 = _mm256_fmadd_ps(x1, q1, a5);
          a6 = _mm256_fmadd_ps(x1, q2, a6);
          a7 = _mm256_fmadd_ps(x1, q3, a7);
        }
        const __m256 h01 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m256 h23 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        const __m256 sum =
            _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20), _mm256_permute2f128_ps(h01, h23, 0x31));
        const __m128 s0 = _mm256_castps256_ps128(sum), s1 = _mm256_extractf128_ps(sum, 1);
        __m128& mxr = r == 0 ? mx0 : mx1;
        _mm_storeu_ps(St + j * 8 + r, s0);
        mxr = _mm_max_ps(mxr, s0);
        if (j + 1 < n) {
          _mm_storeu_ps(St + (j + 1) * 8 + r, s1);
          mxr = _mm_max_ps(mxr, s1);
        }
      }
    }
    _mm_storeu_ps(colmax, mx0);
    _mm_storeu_ps(colmax + 4, mx1);
  }
  // St (n x ld, columns [0, w)) = exp2(St cb - m[col]) (one rounding: fma) (* post[col] when post is not
  // null); sum[col] = the column sums (when sum is not null). NaN in, NaN out (exp2_ps keeps NaN).
  static void exp2_block(float* St, int64_t n, int64_t ld, int64_t w, const float* m, float cb, const float* post,
                         float* sum) {
    const __m256 cv = _mm256_set1_ps(cb);
    for (int64_t c = 0; c < w; c += 8) {
      const __m256 mv = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(m + c));  // -m
      __m256 acc = _mm256_setzero_ps();
      float* p = St + c;
      if (post != nullptr) {
        const __m256 pv = _mm256_loadu_ps(post + c);
        for (int64_t j = 0; j < n; ++j, p += ld)
          _mm256_storeu_ps(p, _mm256_mul_ps(exp2_ps(_mm256_fmadd_ps(_mm256_loadu_ps(p), cv, mv)), pv));
        continue;
      }
      for (int64_t j = 0; j < n; ++j, p += ld) {
        const __m256 e = exp2_ps(_mm256_fmadd_ps(_mm256_loadu_ps(p), cv, mv));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
      }
      if (sum != nullptr) _mm256_storeu_ps(sum + c, acc);
    }
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
  static void dsoftmax(float* dp, const float* p, const float* delta, int64_t n) {  // dp = p (dp - delta)
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(dp + j), _mm256_loadu_ps(delta + j));
      _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), d));
    }
  }
  static void divide(float* x, int64_t n, float d) {
    const __m256 dv = _mm256_set1_ps(d);
    for (int64_t j = 0; j < n; j += 8) _mm256_storeu_ps(x + j, _mm256_div_ps(_mm256_loadu_ps(x + j), dv));
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
