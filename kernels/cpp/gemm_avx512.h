// The pieces shared by the AVX-512 micro-kernels: gemm_avx512.cpp (fp32 FMA, ISA level avx512),
// gemm_avx512bf16.cpp (vdpbf16ps) and int8_avx512vnni.cpp (vpdpbusd) (level avx512_dot). Included only by
// those TUs (internal linkage, see common.h).
//
// The register tile is 12 rows x 32 columns: two B panels of 16 columns, one zmm per row and panel, so 24
// accumulators of the 32 registers; c<r> holds row r of panel 0, d<r> row r of panel 1 (NP = 1: only the
// c<r> are used). Per k step (or k-group) a kernel loads the B rows of both panels, broadcasts each of the 12
// A values and issues 24 FMA or dot instructions. The cache blocking (kMC 144, Zen 5: 48 KiB L1, 1 MiB L2) is
// larger than the AVX2 path's.
#pragma once

#include <immintrin.h>

#include "gemm_epilogue_avx2.h"
#include "ukr_rows.h"

// Declares the tile's 24 accumulators of vector type V, all zero.
#define FASTLLM_TILE12(V, zero)                                                                                   \
  V c0 = zero, c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0; \
  V d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0, d8 = c0, d9 = c0, d10 = c0, d11 = c0;

// One k step (or k-group) of row r of the tile: A's value broadcast by Op::bcast(a + r), then acc =
// Op::madd(acc, a, b) with each panel's B vector. Names from the kernel: R, NP, Op, a, b0, b1.
#define FASTLLM_STEP_ROW12(r, cr, dr)                \
  if constexpr (R > r) {                             \
    const auto av = Op::bcast(a + r);                \
    cr = Op::madd(cr, av, b0);                       \
    if constexpr (NP > 1) dr = Op::madd(dr, av, b1); \
  }

// Row r of the tile into C at c + r * ldc (panel 1 at + 16 columns), added to what C holds when `add`. Names
// from the kernel: R (its rows), NP (its panels), c, ldc, add.
#define FASTLLM_STORE_ROW12(r, cr, dr)                            \
  if constexpr (R > r) {                                          \
    tile_store(c + r * ldc, cr, add);                             \
    if constexpr (NP > 1) tile_store(c + r * ldc + kNR, dr, add); \
  }

namespace fastllm {
namespace {

constexpr int64_t kMR12 = 12;

inline void tile_store(float* p, __m512 v, bool add) {
  if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(p));
  _mm512_storeu_ps(p, v);
}
inline void tile_store(int32_t* p, __m512i v, bool add) {
  if (add) v = _mm512_add_epi32(v, _mm512_loadu_si512(p));
  _mm512_storeu_si512(p, v);
}

// f(rows, panels) with both as std::integral_constant: 1 <= rows <= 12, panels 1 or 2.
template <class F>
inline void with_tile12(int rows, int np, F&& f) {
  with_rows<12>(rows, [&](auto r) {
    if (np > 1) return f(r, std::integral_constant<int, 2>{});
    f(r, std::integral_constant<int, 1>{});
  });
}

// The shape of an AVX-512 Ops: the 12 x 32 tile over two B panels, the cache blocking, A packed as P.
template <APack P, int64_t KC>
struct Avx512Shape : OpsShape<kMR12, 144, KC, 2, P>, VecEpilogue {};

// The avx512_dot micro-kernel: A and B hold k-groups of Op::kG values (2 bf16, 4 int8) per 32-bit lane (A:
// the bf16 pairs or u8 quads of gemm.h; B: kLayoutPairs or kLayoutI8Quads, one 64-byte row of 16 column
// groups per k-group and panel). Per k-group: 2 B loads, 12 broadcasts of an A word, 24 Op::madd (each adds
// the dot product of a k-group to each of 16 lanes). K is summed in chunks of Op::kChunk groups from zero in
// the registers, each then added into C (blocked summation, gemm.h); kChunk 0: one pass over all of kc
// (integer sums are exact).
// Op: DotOp below (ukr12 in gemm_avx512.cpp uses the same bcast / madd interface for its FMAs).
template <class Op, int R, int NP>
inline void ukr_dot(int64_t kc, const float* af, const void* bv, int64_t b_pstride, float* cf, int64_t ldc,
                    bool load) {
  const int32_t* a = reinterpret_cast<const int32_t*>(af);
  const char* bb = static_cast<const char*>(bv);
  auto* c = reinterpret_cast<typename Op::C*>(cf);
  const int64_t kcg = (kc + Op::kG - 1) / Op::kG;
  // k-groups [j0, j1) summed from zero, then into C (always inlined: `a` must stay a register)
  auto groups = [&](int64_t j0, int64_t j1, bool add) __attribute__((always_inline)) {
    FASTLLM_TILE12(typename Op::V, Op::zero())
    for (int64_t j = j0; j < j1; ++j) {
      const __m512i b0 = _mm512_loadu_si512(bb + j * 64);
      __m512i b1;
      if constexpr (NP > 1) b1 = _mm512_loadu_si512(bb + b_pstride + j * 64);
      FASTLLM_EACH_ROW12(FASTLLM_STEP_ROW12)
      a += kMR12;
    }
    FASTLLM_EACH_ROW12(FASTLLM_STORE_ROW12)
  };
  if constexpr (Op::kChunk > 0) {
    for (int64_t j0 = 0; j0 < kcg || j0 == 0; j0 += Op::kChunk)
      groups(j0, kcg < j0 + Op::kChunk ? kcg : j0 + Op::kChunk, load || j0 > 0);
  } else {
    groups(0, kcg, load);
  }
}

// The accumulator vector of a dot kernel by its element type (vector types are not template arguments here:
// GCC drops their attributes there, -Wignored-attributes).
template <class C>
struct AccOf {
  using V = __m512i;  // int32 sums
};
template <>
struct AccOf<float> {
  using V = __m512;  // fp32 sums
};

// The dot-product instruction of an avx512_dot kernel, as the Op of ukr_dot: sums of element type C (float,
// int32_t), G values per 32-bit lane, K in chunks of Chunk groups (0: one pass), and M::madd(acc, a, b) adding
// each lane's dot product of a k-group.
template <class C_, int64_t G, int64_t Chunk, class M>
struct DotOp {
  using C = C_;
  using V = typename AccOf<C>::V;
  static constexpr int64_t kG = G, kChunk = Chunk;
  static V zero() {
    if constexpr (std::is_same_v<C, float>)
      return _mm512_setzero_ps();
    else
      return _mm512_setzero_si512();
  }
  static __m512i bcast(const int32_t* a) { return _mm512_set1_epi32(*a); }
  static V madd(V acc, __m512i a, __m512i b) { return M::madd(acc, a, b); }
};

// The Ops of a dot-product kernel (A packed as P, K blocked by KC).
template <class Op, APack P, int64_t KC>
struct Avx512DotOps : Avx512Shape<P, KC> {
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bps, int, float* c,
                  int64_t ldc, bool load) {
    with_tile12(rows, np, [&](auto r, auto n) {
      ukr_dot<Op, decltype(r)::value, decltype(n)::value>(kc, a, b, bps, c, ldc, load);
    });
  }
};

}  // namespace
}  // namespace fastllm
