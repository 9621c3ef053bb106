// Symmetric per-row int8 quantization (fastllm.quantize_int8): for each row of x (M x K, fp32/bf16/fp16),
//   amax = max |x| (NaN if the row holds a NaN; inf if it holds an inf and no NaN),
//   scale = amax / 127 (1 when amax == 0, so an all-zero row dequantizes to exact zeros),
//   q = clamp(round_half_even(x / scale), -127, 127), and 0 where x / scale is not finite
// with IEEE fp32 division and rounding, bit-identical to the PyTorch reference in fastllm/ops/int8.py.
// A NaN / inf row thus has q = 0 and its NaN / inf in the scale, which the GEMM epilogues propagate.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "parallel.h"

namespace fastllm {

struct Quant {
  int8_t* q;       // M x K, row stride K
  float* scale;    // M
  const void* x;   // M x K, row stride x_stride, unit column stride
  int64_t M, K, x_stride;
  int dtype;
  int nthreads;
};

void quantize_rows(const Quant& a);
void quantize_rows_avx2(const Quant& a);

// Row helpers shared by the scalar and AVX2 paths.

// max |x| over a row, NaN-sticky (std::fmax and maxps drop a NaN operand, so the NaN is kept as a flag).
struct AbsMax {
  float amax = 0.f;
  bool nan = false;
  void add(float v) {
    v = std::fabs(v);
    nan |= std::isnan(v);
    amax = std::fmax(amax, v);
  }
  float scale() const {
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    return amax == 0.f ? 1.f : amax / 127.f;
  }
};

// Stores row i's scale. Returns whether x / scale is finite for every x of the row, i.e. the scale is finite and
// nonzero (x is finite then, and |x / scale| <= ~190 even for a denormal scale); otherwise (NaN / inf scale, or
// amax / 127 underflowed to 0) every quotient is NaN, inf or 0 / inf = 0, and the row's q is set to zeros here.
inline bool store_scale(const Quant& a, int64_t i, float scale) {
  a.scale[i] = scale;
  if (scale != 0.f && std::isfinite(scale)) return true;
  std::memset(a.q + i * a.K, 0, static_cast<size_t>(a.K));
  return false;
}

// q of one element of a row whose quotients are finite; nearbyint rounds half to even (default rounding mode).
inline int8_t quantize_one(float x, float scale) {
  return static_cast<int8_t>(std::fmin(127.f, std::fmax(-127.f, std::nearbyint(x / scale))));
}

}  // namespace fastllm
