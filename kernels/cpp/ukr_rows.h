// Helpers shared by the register-tile micro-kernels (gemm_*.cpp, int8_avx512vnni.cpp; included only by ISA
// TUs): apply a per-row macro to every row of a tile (the accumulators are named variables, see
// gemm_avx2.cpp), store a row of the 6 x 16 AVX2 tile, and call a kernel templated on its row count with a
// run-time count. The AVX-512 tile's pieces: gemm_avx512.h.
#pragma once

#include <immintrin.h>

#include <type_traits>

// M(r, acc_of_panel_0, acc_of_panel_1) for the rows of a 6-row (AVX2) or 12-row (AVX-512) tile.
#define FASTLLM_EACH_ROW6(M) M(0, c00, c01) M(1, c10, c11) M(2, c20, c21) M(3, c30, c31) M(4, c40, c41) M(5, c50, c51)
#define FASTLLM_EACH_ROW12(M)                                                                                   \
  M(0, c0, d0) M(1, c1, d1) M(2, c2, d2) M(3, c3, d3) M(4, c4, d4) M(5, c5, d5) M(6, c6, d6) M(7, c7, d7)      \
  M(8, c8, d8) M(9, c9, d9) M(10, c10, d10) M(11, c11, d11)

// Row r of a 6 x 16 AVX2 tile (two 8-lane accumulators) into C at c + r * ldc, added to what C holds when
// `add`. Names from the kernel: R (its rows), c, ldc, add.
#define FASTLLM_STORE_ROW6(r, c0, c1) \
  if constexpr (R > r) {              \
    auto* cr = c + r * ldc;           \
    tile_store(cr, c0, add);          \
    tile_store(cr + 8, c1, add);      \
  }

namespace fastllm {
namespace {

inline void tile_store(float* p, __m256 v, bool add) {
  if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(p));
  _mm256_storeu_ps(p, v);
}
inline void tile_store(int32_t* p, __m256i v, bool add) {
  __m256i* q = reinterpret_cast<__m256i*>(p);
  if (add) v = _mm256_add_epi32(v, _mm256_loadu_si256(q));
  _mm256_storeu_si256(q, v);
}

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
