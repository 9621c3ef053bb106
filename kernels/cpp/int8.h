// Symmetric per-row int8 quantization (fastllm.quantize_int8): for each row of x (M x K, fp32/bf16/fp16),
//   amax = max |x|,  scale = amax / 127 (1 when amax == 0, so an all-zero row dequantizes to exact zeros),
//   q = clamp(round_half_even(x / scale), -127, 127)
// with IEEE fp32 division and rounding, bit-identical to the PyTorch reference in fastllm/ops/int8.py.
#pragma once

#include "common.h"

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

}  // namespace fastllm
