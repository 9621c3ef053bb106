// Per-row int8 quantization, portable path and dispatch (see int8.h).
#include "int8.h"

#include <stdexcept>

namespace fastllm {

namespace {

template <class S>
void rows_scalar(const Quant& a, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const auto* x = static_cast<const typename S::T*>(a.x) + i * a.x_stride;
    AbsMax m;
    for (int64_t k = 0; k < a.K; ++k) m.add(S::load(x + k));
    const float scale = m.scale();
    if (!store_scale(a, i, scale)) continue;  // a NaN / inf row: q = 0
    int8_t* q = a.q + i * a.K;
    for (int64_t k = 0; k < a.K; ++k) q[k] = quantize_one(S::load(x + k), scale);
  }
}

template <class S>
void run_scalar(const Quant& a) {
  parallel_chunks(a.M, a.nthreads, 4, [&](int64_t r0, int64_t r1, int) { rows_scalar<S>(a, r0, r1); });
}

}  // namespace

void quantize_rows(const Quant& a) {
  if (a.q == nullptr || a.scale == nullptr || a.x == nullptr || a.M < 0 || a.K < 0 ||
      (a.dtype != kF32 && a.dtype != kBF16 && a.dtype != kF16))
    throw std::invalid_argument("quantize_rows: bad arguments");
  if constexpr (kBuiltAvx2)
    if (active_isa() >= Isa::kAvx2) return quantize_rows_avx2(a);
  with_float_dtype(a.dtype, [&](auto s) { run_scalar<decltype(s)>(a); });
}

}  // namespace fastllm
