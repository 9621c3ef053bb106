// Rotary position embedding, AVX2 + FMA + F16C path. Same math and row layout as rope.cpp (see rope.h); this file
// rotates 8 pairs (x[i], x[i + half]) per step with fp16/bf16 widened and rounded in registers.
//
// The op is bandwidth bound (per row: read D elements of x and R/2 floats each of cos and sin, write D elements);
// the table rows of a position are shared by all heads of that (b, s), so they stay in L1/L2.
//
// Compiled with -mavx2 -mfma -mf16c; only reached when cpu_features.cpp saw AVX2, FMA and F16C.
#include <immintrin.h>

#include "rope.h"
#include "vec_avx2.h"

namespace fastllm {
namespace {

template <class S>
struct Avx2Row {
  using T = typename S::T;

  // Forward: y1 = x1 c - x2 s, y2 = x2 c + x1 s; INV (s -> -s): y1 = x1 c + x2 s, y2 = x2 c - x1 s.
  // One FMA each: y1 = fma(x1, c, -+(x2 s)), so each output takes two roundings in fp32, then one into T.
  template <bool INV>
  static void rotate(T* y, const T* x, const float* c, const float* s, int64_t half) {
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
      const __m256 x1 = load8<S>(x + i), x2 = load8<S>(x + half + i);  // (8,) each
      const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
      const __m256 x2s = _mm256_mul_ps(x2, sv), x1s = _mm256_mul_ps(x1, sv);
      store8<S>(y + i, INV ? _mm256_fmadd_ps(x1, cv, x2s) : _mm256_fmsub_ps(x1, cv, x2s));
      store8<S>(y + half + i, INV ? _mm256_fmsub_ps(x2, cv, x1s) : _mm256_fmadd_ps(x2, cv, x1s));
    }
    for (; i < half; ++i) {  // half % 8 pairs (partial rotary dims, odd halves)
      const float x1 = S::load(x + i), x2 = S::load(x + half + i);
      y[i] = S::from(INV ? x1 * c[i] + x2 * s[i] : x1 * c[i] - x2 * s[i]);
      y[half + i] = S::from(INV ? x2 * c[i] - x1 * s[i] : x2 * c[i] + x1 * s[i]);
    }
  }
};

}  // namespace

void rope_fwd_avx2(const RopeFwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_rope<decltype(s), Avx2Row<decltype(s)>>(a); });
}

}  // namespace fastllm
