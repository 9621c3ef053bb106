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

namespace fastllm {

// Copy with non-temporal stores (no read-for-ownership of the destination): the copy bandwidth a
// streaming kernel can reach. dst and src 32-byte aligned, n a multiple of 8 floats.
void stream_copy_avx2(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {
    const __m256 a = _mm256_load_ps(src + i), b = _mm256_load_ps(src + i + 8);
    const __m256 c = _mm256_load_ps(src + i + 16), d = _mm256_load_ps(src + i + 24);
    _mm256_stream_ps(dst + i, a);
    _mm256_stream_ps(dst + i + 8, b);
    _mm256_stream_ps(dst + i + 16, c);
    _mm256_stream_ps(dst + i + 24, d);
  }
  _mm_sfence();
}

}  // namespace fastllm
