// AVX2 FMA peak probe: 10 independent 8-wide FMA chains per thread, enough to cover the FMA latency
// (4-5 cycles) on two FMA pipes, so the loop runs at the core's FMA throughput.
#include <immintrin.h>

#include "common.h"

namespace fastllm {

float fma_loop_avx2(int64_t iters) {
  __m256 a[10];
  for (int k = 0; k < 10; ++k) a[k] = _mm256_set1_ps(1.f + 0.1f * static_cast<float>(k));
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < 10; ++k) a[k] = _mm256_fmadd_ps(a[k], m, c);
  }
  __m256 s = a[0];
  for (int k = 1; k < 10; ++k) s = _mm256_add_ps(s, a[k]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0] + out[7];
}

}  // namespace fastllm
