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
#include "ukr_rows.h"

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
    FASTLLM_EACH_ROW12(FASTLLM_STEP)
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
  FASTLLM_EACH_ROW12(FASTLLM_STORE)
#undef FASTLLM_STORE
#undef FASTLLM_STORE1
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
    with_rows<12>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      if (np > 1) return ukr_vnni<R, 2>(kc, a, b, bps, c, ldc, load);
      ukr_vnni<R, 1>(kc, a, b, bps, c, ldc, load);
    });
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    epilogue_any(g, tile, ldt, m, rows, p);
  }
};

}  // namespace

void gemm_avx512vnni(const Gemm& g) { gemm_impl<Avx512VnniOps>(g); }

}  // namespace fastllm
