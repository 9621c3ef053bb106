// GEMM engine, AVX512-BF16 path: bf16 A x bf16 B with vdpbf16ps, a 12x32 micro-kernel over two B panels in
// the k-pair layout (kLayoutPairs, gemm.h); epilogue as the other paths (gemm_epilogue_avx2.h).
//
// vdpbf16ps adds to each fp32 lane the two products of a k-pair (a[k] b[k] + a[k+1] b[k+1]); a product of two
// bf16 is exact in fp32, so this is an fp32-accumulated GEMM like the fp32 kernels (denormals flush to zero,
// as in oneDNN's bf16 GEMM). One instruction does twice the multiply-adds of an fp32 FMA: per k-pair two B
// loads (64 bytes each), 12 broadcasts of a 32-bit A pair, 24 vdpbf16ps. K is summed in chunks of
// kChunkPairs k-pairs (blocked summation, gemm.h).
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"
#include "ukr_rows.h"

namespace fastllm {
namespace {

constexpr int64_t kRows = 12;
// k-pairs summed in registers before adding into C. Longer than the fp32 kernels' kChunk: A and B are bf16 and
// so is the output (the GEMM runs only for bf16 x bf16), whose rounding (2^-9 relative) dwarfs the fp32
// accumulation error of 2 * 96 = 192-term sums (~1e-5), and the store/reload per chunk cost ~15% at 16 pairs.
constexpr int64_t kChunkPairs = 96;

template <int R, int NP>
inline void ukr_bf16(int64_t kc, const float* af, const void* bv, int64_t b_pstride, float* c, int64_t ldc,
                     bool load) {
  const int32_t* a = reinterpret_cast<const int32_t*>(af);
  const char* bb = static_cast<const char*>(bv);
  const int64_t kc2 = (kc + 1) / 2, chunk2 = kChunkPairs;
  for (int64_t j0 = 0; j0 < kc2 || j0 == 0; j0 += chunk2) {
    const int64_t j1 = kc2 < j0 + chunk2 ? kc2 : j0 + chunk2;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
    __m512 d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0, d8 = c0, d9 = c0, d10 = c0,
           d11 = c0;
#define FASTLLM_STEP(r, cr, dr)                                        \
  if constexpr (R > r) {                                               \
    const __m512bh av = (__m512bh)_mm512_set1_epi32(a[r]);             \
    cr = _mm512_dpbf16_ps(cr, av, b0);                                 \
    if constexpr (NP > 1) dr = _mm512_dpbf16_ps(dr, av, b1);           \
  }
    for (int64_t j = j0; j < j1; ++j) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bb + j * 64);
      __m512bh b1;
      if constexpr (NP > 1) b1 = (__m512bh)_mm512_loadu_si512(bb + b_pstride + j * 64);
      FASTLLM_EACH_ROW12(FASTLLM_STEP)
      a += kRows;
    }
#undef FASTLLM_STEP
    const bool add = load || j0 > 0;
#define FASTLLM_STORE1(p, v)                            \
  {                                                     \
    __m512 w = v;                                       \
    if (add) w = _mm512_add_ps(w, _mm512_loadu_ps(p));  \
    _mm512_storeu_ps(p, w);                             \
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
}

struct Avx512Bf16Ops {
  static constexpr int64_t kMR = kRows, kMC = 144, kKC = 384, kPanels = 2;
  static void pack_a(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* d) {
    pack_a_pairs<kMR>(g, m0, mr, k0, kc, d);
  }
  static int64_t a_words(int64_t kc) { return (kc + 1) / 2; }
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bps, int, float* c,
                  int64_t ldc, bool load) {
    with_rows<12>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      if (np > 1) return ukr_bf16<R, 2>(kc, a, b, bps, c, ldc, load);
      ukr_bf16<R, 1>(kc, a, b, bps, c, ldc, load);
    });
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    epilogue_any(g, tile, ldt, m, rows, p);
  }
};

}  // namespace

void gemm_avx512bf16(const Gemm& g) { gemm_impl<Avx512Bf16Ops>(g); }

}  // namespace fastllm
