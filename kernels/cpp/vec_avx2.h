// AVX2+FMA+F16C vector helpers shared by the *_avx2.cpp TUs (included only there; everything has internal
// linkage, see common.h).
#pragma once

#include <immintrin.h>

#include "common.h"

namespace fastllm {
namespace {

// exp2: split x = n + f, |f| <= 1/2, 2^f by a degree-7 polynomial (about one ulp), times 2^n built in the
// exponent bits; x <= -127 (and -inf) gives exactly 0.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);  // -inf -> -127 -> 2^-127 built as +0.0 below
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  // 2^f on [-1/2, 1/2]: degree-7 least-squares fit on Chebyshev nodes with p(0) = 1 (about 1 ulp evaluated
  // in fp32; degree 6 reached 1.2 ulp); Horner with FMAs
  __m256 p = _mm256_set1_ps(1.5310080925701186e-5f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5467364573851228e-4f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333450770005584e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618035517632961e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410971045494e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650718688965e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // 2^n: n + 127 in the exponent field; n = -127 gives the bit pattern of +0.0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 elements of storage type S <-> fp32.
template <class S>
inline __m256 load8(const typename S::T* p) {
  if constexpr (S::kCode == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (S::kCode == kBF16)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

// fp32 -> storage, rounding to nearest even (bf16: NaN stays a quiet NaN, as f32_to_bf16 in common.h).
template <class S>
inline void store8(typename S::T* p, __m256 v) {
  if constexpr (S::kCode == kF32) {
    _mm256_storeu_ps(reinterpret_cast<float*>(p), v);
  } else if constexpr (S::kCode == kF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
}

}  // namespace
}  // namespace fastllm
