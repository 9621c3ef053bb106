// Per-row int8 quantization, AVX2 path (see int8.h): two passes over each row (max |x|, then
// x / scale rounded to nearest even with vroundps, clamped, packed to int8 with saturating packs).
#include <immintrin.h>

#include "int8.h"
#include "vec_avx2.h"

namespace fastllm {
namespace {

template <class S>
void rows(const Quant& a) {
  parallel_chunks(a.M, a.nthreads, 4, [&](int64_t r0, int64_t r1, int) {
    for (int64_t i = r0; i < r1; ++i) {
      const auto* x = static_cast<const typename S::T*>(a.x) + i * a.x_stride;
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 mx = _mm256_setzero_ps(), unord = _mm256_setzero_ps();  // unord: lanes that saw a NaN
      int64_t k = 0;
      for (; k + 8 <= a.K; k += 8) {
        const __m256 v = load8<S>(x + k);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));  // maxps returns the second operand on NaN: dropped
        unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      AbsMax m;
      m.nan = _mm256_movemask_ps(unord) != 0;
      for (int j = 0; j < 8; ++j) m.add(lanes[j]);
      for (int64_t t = k; t < a.K; ++t) m.add(S::load(x + t));
      const float scale = m.scale();
      if (!store_scale(a, i, scale)) continue;  // a NaN / inf row: q = 0
      int8_t* q = a.q + i * a.K;
      const __m256 sv = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
      k = 0;
      for (; k + 8 <= a.K; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(load8<S>(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
        const __m256i i32 = _mm256_cvtps_epi32(v);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
      }
      for (; k < a.K; ++k) q[k] = quantize_one(S::load(x + k), scale);
    }
  });
}

}  // namespace

void quantize_rows_avx2(const Quant& a) {
  with_float_dtype(a.dtype, [&](auto s) { rows<decltype(s)>(a); });
}

}  // namespace fastllm
