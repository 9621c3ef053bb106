// AVX-512 FMA peak probe: 12 independent 16-wide FMA chains per thread (covers the FMA latency on two
// 512-bit pipes), the compute ceiling of the AVX-512 GEMM.
#include <immintrin.h>

#include "roofline.h"

namespace fastllm {

float fma_loop_avx512(int64_t iters) {
  return fma_chains<12, __m512>(iters, [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); });
}

}  // namespace fastllm
