// AVX-512 FMA peak probe: 12 independent 16-wide FMA chains per thread (covers the FMA latency on two
// 512-bit pipes), the compute ceiling of the AVX-512 GEMM.
#include <immintrin.h>

#include "common.h"

namespace fastllm {

float fma_loop_avx512(int64_t iters) {
  __m512 a[12];
  for (int k = 0; k < 12; ++k) a[k] = _mm512_set1_ps(1.f + 0.1f * static_cast<float>(k));
  const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < 12; ++k) a[k] = _mm512_fmadd_ps(a[k], m, c);
  }
  __m512 s = a[0];
  for (int k = 1; k < 12; ++k) s = _mm512_add_ps(s, a[k]);
  return _mm512_reduce_add_ps(s);
}

}  // namespace fastllm
