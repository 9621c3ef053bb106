// GEMM engine, AVX2+FMA path: the 6x16 micro-kernel (see gemm.h); epilogue in gemm_epilogue_avx2.h.
//
// Micro-kernel: 12 fp32 accumulators (6 rows x 2 vectors) in named registers, per k step two B vectors
// (fp32 panel: two loads; bf16 panel: one 32-byte load widened by unpacking with zero, which needs the
// kBf16Perm column order) and six broadcasts of A, 12 FMAs. Zen 3 issues 2 FMAs per cycle, so a step is 6
// cycles of FMA for 8 loads: FMA-bound as long as the B panel (kc x 16) stays in L1 and A streams from L2.
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"

namespace fastllm {
namespace {

constexpr int64_t kMR = 6;

template <int R, bool BF>
inline void ukr_t(int64_t kc, const float* a, const void* bv, float* c, int64_t ldc, bool load) {
  const float* bf = static_cast<const float*>(bv);
  const uint16_t* bh = static_cast<const uint16_t*>(bv);
  const __m256i zero = _mm256_setzero_si256();
  // K in chunks of kChunk steps, each summed from zero in the registers and then added to C (blocked
  // summation, see gemm.h); the adds run on Zen's FP-add pipes beside the FMAs.
  for (int64_t k0 = 0; k0 < kc || k0 == 0; k0 += kChunk) {
    const int64_t k1 = kc < k0 + kChunk ? kc : k0 + kChunk;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define FASTLLM_STEP(r, c0, c1)                   \
  if constexpr (R > r) {                          \
    const __m256 av = _mm256_broadcast_ss(a + r); \
    c0 = _mm256_fmadd_ps(av, b0, c0);             \
    c1 = _mm256_fmadd_ps(av, b1, c1);             \
  }
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; ++k) {
      __m256 b0, b1;
      if constexpr (BF) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh));
        b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
        b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
        bh += kNR;
      } else {
        b0 = _mm256_loadu_ps(bf);
        b1 = _mm256_loadu_ps(bf + 8);
        bf += kNR;
      }
      FASTLLM_STEP(0, c00, c01)
      FASTLLM_STEP(1, c10, c11)
      FASTLLM_STEP(2, c20, c21)
      FASTLLM_STEP(3, c30, c31)
      FASTLLM_STEP(4, c40, c41)
      FASTLLM_STEP(5, c50, c51)
      a += kMR;
    }
#undef FASTLLM_STEP
    const bool add = load || k0 > 0;
#define FASTLLM_STORE(r, c0, c1)                       \
  if constexpr (R > r) {                               \
    float* cr = c + r * ldc;                           \
    if (add) {                                         \
      c0 = _mm256_add_ps(c0, _mm256_loadu_ps(cr));     \
      c1 = _mm256_add_ps(c1, _mm256_loadu_ps(cr + 8)); \
    }                                                  \
    _mm256_storeu_ps(cr, c0);                          \
    _mm256_storeu_ps(cr + 8, c1);                      \
  }
    FASTLLM_STORE(0, c00, c01)
    FASTLLM_STORE(1, c10, c11)
    FASTLLM_STORE(2, c20, c21)
    FASTLLM_STORE(3, c30, c31)
    FASTLLM_STORE(4, c40, c41)
    FASTLLM_STORE(5, c50, c51)
#undef FASTLLM_STORE
  }
}

template <bool BF>
inline void ukr_rows(int rows, int64_t kc, const float* a, const void* b, float* c, int64_t ldc, bool load) {
  switch (rows) {
    case 1: return ukr_t<1, BF>(kc, a, b, c, ldc, load);
    case 2: return ukr_t<2, BF>(kc, a, b, c, ldc, load);
    case 3: return ukr_t<3, BF>(kc, a, b, c, ldc, load);
    case 4: return ukr_t<4, BF>(kc, a, b, c, ldc, load);
    case 5: return ukr_t<5, BF>(kc, a, b, c, ldc, load);
    default: return ukr_t<6, BF>(kc, a, b, c, ldc, load);
  }
}

struct Avx2Ops {
  static constexpr int64_t kMR = 6, kMC = fastllm::kMC, kKC = fastllm::kKC, kPanels = 1;
  static constexpr bool kPairs = false;
  static void ukr(int rows, int, int64_t kc, const float* a, const void* b, int64_t, int b_dt, float* c, int64_t ldc,
                  bool load) {
    if (b_dt == kBF16)
      ukr_rows<true>(rows, kc, a, b, c, ldc, load);
    else
      ukr_rows<false>(rows, kc, a, b, c, ldc, load);
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    epilogue_any(g, tile, ldt, m, rows, p);
  }
};

}  // namespace

void gemm_avx2(const Gemm& g) { gemm_impl<Avx2Ops>(g); }

}  // namespace fastllm
