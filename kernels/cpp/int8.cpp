// Per-row int8 quantization, portable path and dispatch (see quant.h).
#include "quant.h"

#include <cmath>
#include <stdexcept>

namespace fastllm {

namespace {

template <class S>
void rows_scalar(const Quant& a, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const auto* x = static_cast<const typename S::T*>(a.x) + i * a.x_stride;
    float amax = 0.f;
    for (int64_t k = 0; k < a.K; ++k) amax = std::fmax(amax, std::fabs(S::load(x + k)));
    const float scale = amax == 0.f ? 1.f : amax / 127.f;
    a.scale[i] = scale;
    int8_t* q = a.q + i * a.K;
    for (int64_t k = 0; k < a.K; ++k) {
      const float v = std::nearbyint(S::load(x + k) / scale);  // round half to even (default rounding mode)
      q[k] = static_cast<int8_t>(std::fmin(127.f, std::fmax(-127.f, v)));
    }
  }
}

template <class S>
void run_scalar(const Quant& a) {
#pragma omp parallel for schedule(static) num_threads(a.nthreads < 1 ? 1 : a.nthreads)
  for (int64_t i = 0; i < a.M; ++i) rows_scalar<S>(a, i, i + 1);
}

}  // namespace

void quantize_rows(const Quant& a) {
  if (a.q == nullptr || a.scale == nullptr || a.x == nullptr || a.M < 0 || a.K < 0 ||
      (a.dtype != kF32 && a.dtype != kBF16 && a.dtype != kF16))
    throw std::invalid_argument("quantize_rows: bad arguments");
#ifdef FASTLLM_HAVE_AVX2
  if (active_isa() >= Isa::kAvx2) return quantize_rows_avx2(a);
#endif
  switch (a.dtype) {
    case kBF16: return run_scalar<BF16s>(a);
    case kF16: return run_scalar<F16s>(a);
    default: return run_scalar<F32s>(a);
  }
}

}  // namespace fastllm
