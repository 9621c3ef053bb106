// Ceiling probes (roofline.cpp): the entry points of the ISA TUs and the FMA peak loop they share.
#pragma once

#include "common.h"

namespace fastllm {

float fma_loop_avx2(int64_t iters);
float fma_loop_avx512(int64_t iters);
void stream_copy_avx2(float* dst, const float* src, int64_t n);

namespace {

// The FMA peak loop: kChains independent chains of vectors V (GCC vector types such as __m256: they take
// scalar operands and subscripts), a[k] = fma(a[k], m, c), enough chains to cover the FMA latency on two
// pipes, so the loop runs at the core's FMA throughput. Returns a value that depends on every chain (a sink).
template <int kChains, class V, class Fma>
float fma_chains(int64_t iters, Fma fma) {
  V a[kChains];
  for (int k = 0; k < kChains; ++k) a[k] = V{} + (1.f + 0.1f * static_cast<float>(k));
  const V m = V{} + 0.9999999f, c = V{} + 1e-7f;
  for (int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < kChains; ++k) a[k] = fma(a[k], m, c);
  }
  V s = a[0];
  for (int k = 1; k < kChains; ++k) s += a[k];
  return s[0] + s[sizeof(V) / sizeof(float) - 1];
}

}  // namespace
}  // namespace fastllm
