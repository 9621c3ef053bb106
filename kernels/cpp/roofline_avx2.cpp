// AVX2 FMA peak probe: 10 independent 8-wide FMA chains per thread, enough to cover the FMA latency
// (4-5 cycles) on two FMA pipes, so the loop runs at the core's FMA throughput.
#include <immintrin.h>

#include "roofline.h"

namespace fastllm {

float fma_loop_avx2(int64_t iters) {
  return fma_chains<10, __m256>(iters, [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); });
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
