// Ceiling probes for the benchmark harness: a multi-threaded large copy (memory bandwidth) and an FMA
// loop (compute peak). They measure the machine, not an op; benchmarks report "% of ceiling" against them.
#include <omp.h>

#include <cstring>

#include "roofline.h"

namespace fastllm {

// Each thread copies one contiguous chunk: with non-temporal stores when `stream` (AVX2 path; buffers
// 128-byte aligned, nbytes a multiple of 128 per chunk, else memcpy), else with memcpy.
void copy_bytes(void* dst, const void* src, int64_t nbytes, int nthreads, bool stream) {
  stream = kBuiltAvx2 && stream && active_isa() >= Isa::kAvx2 && (reinterpret_cast<uintptr_t>(dst) & 127) == 0 &&
           (reinterpret_cast<uintptr_t>(src) & 127) == 0;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = nbytes * t / T / 128 * 128, hi = (t + 1 == T) ? nbytes : nbytes * (t + 1) / T / 128 * 128;
    char* d = static_cast<char*>(dst) + lo;
    const char* s = static_cast<const char*>(src) + lo;
    int64_t body = 0;
    if constexpr (kBuiltAvx2) {
      if (stream) {
        body = (hi - lo) / 128 * 128;
        stream_copy_avx2(reinterpret_cast<float*>(d), reinterpret_cast<const float*>(s), body / 4);
      }
    }
    std::memcpy(d + body, s + body, static_cast<size_t>(hi - lo - body));
  }
}

// Portable FMA loop: 8 independent accumulator chains (2 flops per step each).
static float fma_loop_scalar(int64_t iters) {
  float a[8] = {1.f, 1.1f, 1.2f, 1.3f, 1.4f, 1.5f, 1.6f, 1.7f};
  const float m = 0.9999999f, c = 1e-7f;
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < 8; ++k) a[k] = a[k] * m + c;
  return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

// The AVX-512 FMA loop (12 chains of 16 lanes) on nthreads threads; returns flops per thread per iteration,
// 0 when this build has no AVX-512 code (the caller checks avx512_available() first).
double fma_loop_512(int64_t iters, int nthreads) {
  float sink = 0.f;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
  {
    if constexpr (kBuiltAvx512) sink += fma_loop_avx512(iters);
  }
  if (sink == 12345.f || !kBuiltAvx512) return 0.0;  // (the comparison keeps the loop alive)
  return 12.0 * 16 * 2;
}

// Runs the FMA loop on nthreads threads; returns flops per thread per iteration (the caller times it).
double fma_loop(int64_t iters, int nthreads, bool avx2) {
  avx2 = avx2 && kBuiltAvx2;
  float sink = 0.f;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
  {
    if constexpr (kBuiltAvx2)
      sink += avx2 ? fma_loop_avx2(iters) : fma_loop_scalar(iters);
    else
      sink += fma_loop_scalar(iters);
  }
  if (sink == 12345.f) return 0.0;  // keeps the loop alive
  return avx2 ? 10.0 * 8 * 2 : 8.0 * 2;
}

}  // namespace fastllm
