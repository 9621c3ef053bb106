// GEMM engine, W8A8 on AVX512-VNNI: int8 x int8 -> exact int32 with vpdpbusd, a 12x32 micro-kernel over two
// B panels in the k-quad layout (kLayoutI8Quads, gemm.h); epilogue as the other paths (gemm_epilogue_avx2.h).
//
// Exactness: vpdpbusd multiplies unsigned bytes by signed bytes and adds the four products of a k-quad to an
// int32 lane without saturation (modular). A is packed as u8 = a + 128, so each lane accumulates
// sum (a + 128) b = sum a b + 128 sum b; the epilogue subtracts 128 * colsum(b), precomputed per column at
// pack time. In modular int32 arithmetic the result is exact whenever the true sum fits int32 (|sum a b| <=
// 128 * 128 * K: any K < 131072). (vpmaddubsw, the AVX2 u8 x s8 instruction, saturates its int16 pair sums
// and is not used; the AVX2 path sign-extends to int16 and uses vpmaddwd, gemm_avx2.cpp.)
// Per k-quad: two B loads (16 columns x 4 bytes each), 12 broadcasts of a 32-bit A quad, 24 vpdpbusd (64
// multiply-adds each); no blocked summation is needed: integer sums are exact.
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"

namespace fastllm {
namespace {

constexpr int64_t kRows = 12;

template <int R, int NP>
inline void ukr_vnni(int64_t kc, const float* af, const void* bv, int64_t b_pstride, float* cf, int64_t ldc,
                     bool load) {
  const int32_t* a = reinterpret_cast<const int32_t*>(af);
  const char* bb = static_cast<const char*>(bv);
  int32_t* c = reinterpret_cast<int32_t*>(cf);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
          c9 = c0, c10 = c0, c11 = c0;
  __m512i d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0, d8 = c0, d9 = c0, d10 = c0,
          d11 = c0;
#define FASTLLM_STEP(r, cr, dr)                                 \
  if constexpr (R > r) {                                        \
    const __m512i av = _mm512_set1_epi32(a[r]);                 \
    cr = _mm512_dpbusd_epi32(cr, av, b0);                       \
    if constexpr (NP > 1) dr = _mm512_dpbusd_epi32(dr, av, b1); \
  }
  const int64_t kc4 = (kc + 3) / 4;
  for (int64_t j = 0; j < kc4; ++j) {
    const __m512i b0 = _mm512_loadu_si512(bb + j * 64);
    __m512i b1;
    if constexpr (NP > 1) b1 = _mm512_loadu_si512(bb + b_pstride + j * 64);
    FASTLLM_STEP(0, c0, d0)
    FASTLLM_STEP(1, c1, d1)
    FASTLLM_STEP(2, c2, d2)
    FASTLLM_STEP(3, c3, d3)
    FASTLLM_STEP(4, c4, d4)
    FASTLLM_STEP(5, c5, d5)
    FASTLLM_STEP(6, c6, d6)
    FASTLLM_STEP(7, c7, d7)
    FASTLLM_STEP(8, c8, d8)
    FASTLLM_STEP(9, c9, d9)
    FASTLLM_STEP(10, c10, d10)
    FASTLLM_STEP(11, c11, d11)
    a += kRows;
  }
#undef FASTLLM_STEP
#define FASTLLM_STORE1(p, v)                              \
  {                                                       \
    __m512i w = v;                                        \
    if (load) w = _mm512_add_epi32(w, _mm512_loadu_si512(p)); \
    _mm512_storeu_si512(p, w);                            \
  }
#define FASTLLM_STORE(r, cr, dr)                                \
  if constexpr (R > r) {                                        \
    FASTLLM_STORE1(c + r * ldc, cr)                             \
    if constexpr (NP > 1) FASTLLM_STORE1(c + r * ldc + kNR, dr) \
  }
  FASTLLM_STORE(0, c0, d0)
  FASTLLM_STORE(1, c1, d1)
  FASTLLM_STORE(2, c2, d2)
  FASTLLM_STORE(3, c3, d3)
  FASTLLM_STORE(4, c4, d4)
  FASTLLM_STORE(5, c5, d5)
  FASTLLM_STORE(6, c6, d6)
  FASTLLM_STORE(7, c7, d7)
  FASTLLM_STORE(8, c8, d8)
  FASTLLM_STORE(9, c9, d9)
  FASTLLM_STORE(10, c10, d10)
  FASTLLM_STORE(11, c11, d11)
#undef FASTLLM_STORE
#undef FASTLLM_STORE1
}

template <int NP>
inline void ukr_vnni_rows(int rows, int64_t kc, const float* a, const void* b, int64_t bps, float* c, int64_t ldc,
                          bool load) {
  switch (rows) {
    case 1: return ukr_vnni<1, NP>(kc, a, b, bps, c, ldc, load);
    case 2: return ukr_vnni<2, NP>(kc, a, b, bps, c, ldc, load);
    case 3: return ukr_vnni<3, NP>(kc, a, b, bps, c, ldc, load);
    case 4: return ukr_vnni<4, NP>(kc, a, b, bps, c, ldc, load);
    case 5: return ukr_vnni<5, NP>(kc, a, b, bps, c, ldc, load);
    case 6: return ukr_vnni<6, NP>(kc, a, b, bps, c, ldc, load);
    case 7: return ukr_vnni<7, NP>(kc, a, b, bps, c, ldc, load);
    case 8: return ukr_vnni<8, NP>(kc, a, b, bps, c, ldc, load);
    case 9: return ukr_vnni<9, NP>(kc, a, b, bps, c, ldc, load);
    case 10: return ukr_vnni<10, NP>(kc, a, b, bps, c, ldc, load);
    case 11: return ukr_vnni<11, NP>(kc, a, b, bps, c, ldc, load);
    default: return ukr_vnni<12, NP>(kc, a, b, bps, c, ldc, load);
  }
}

struct Avx512VnniOps {
  // B micro-panels: 2 x 16 columns x kc bytes = 32 KiB at kc = 1024 (L1 48 KiB on Zen 5)
  static constexpr int64_t kMR = kRows, kMC = 144, kKC = 1024, kPanels = 2;
  static void pack_a(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* d) {
    pack_a_u8quads<kMR>(g, m0, mr, k0, kc, d);
  }
  static int64_t a_words(int64_t kc) { return (kc + 3) / 4; }
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bps, int, float* c,
                  int64_t ldc, bool load) {
    if (np > 1) return ukr_vnni_rows<2>(rows, kc, a, b, bps, c, ldc, load);
    ukr_vnni_rows<1>(rows, kc, a, b, bps, c, ldc, load);
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    epilogue_any(g, tile, ldt, m, rows, p);
  }
};

}  // namespace

void gemm_avx512vnni(const Gemm& g) { gemm_impl<Avx512VnniOps>(g); }

}  // namespace fastllm
