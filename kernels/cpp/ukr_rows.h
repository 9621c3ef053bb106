// Helpers shared by the register-tile micro-kernels (gemm_*.cpp): apply a per-row macro to every row of a tile
// (the accumulators are named variables, see gemm_avx2.cpp), and call a kernel templated on its row count
// with a run-time count.
#pragma once

#include <type_traits>

// M(r, acc_of_panel_0, acc_of_panel_1) for the rows of a 6-row (AVX2) or 12-row (AVX-512) tile.
#define FASTLLM_EACH_ROW6(M) M(0, c00, c01) M(1, c10, c11) M(2, c20, c21) M(3, c30, c31) M(4, c40, c41) M(5, c50, c51)
#define FASTLLM_EACH_ROW12(M)                                                                                   \
  M(0, c0, d0) M(1, c1, d1) M(2, c2, d2) M(3, c3, d3) M(4, c4, d4) M(5, c5, d5) M(6, c6, d6) M(7, c7, d7)      \
  M(8, c8, d8) M(9, c9, d9) M(10, c10, d10) M(11, c11, d11)

namespace fastllm {
namespace {

// f(std::integral_constant<int, rows>{}) for 1 <= rows <= MaxR (rows outside the range run MaxR).
template <int MaxR, int R = 1, class F>
inline void with_rows(int rows, F&& f) {
  if constexpr (R >= MaxR) {
    f(std::integral_constant<int, MaxR>{});
  } else {
    if (rows == R) return f(std::integral_constant<int, R>{});
    with_rows<MaxR, R + 1>(rows, static_cast<F&&>(f));
  }
}

}  // namespace
}  // namespace fastllm
