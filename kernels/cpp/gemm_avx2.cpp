// GEMM engine, AVX2+FMA path: the 6x16 micro-kernel (see gemm.h); epilogue in gemm_epilogue_avx2.h.
//
// Micro-kernel: 12 fp32 accumulators (6 rows x 2 vectors) in named registers, per k step two B vectors
// (fp32 panel: two loads; bf16 panel: one 32-byte load widened by unpacking with zero, which needs the
// kBf16Perm column order) and six broadcasts of A, 12 FMAs. Zen 3 issues 2 FMAs per cycle, so a step is 6
// cycles of FMA for 8 loads: FMA-bound as long as the B panel (kc x 16) stays in L1 and A streams from L2.
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"
#include "ukr_rows.h"

namespace fastllm {
namespace {

constexpr int64_t kMR = 6;

template <int R, int BK>  // BK: 0 fp32 panel, 1 bf16 panel (kBf16Perm order), 2 int8 panel (W8A16)
inline void ukr_t(int64_t kc, const float* a, const void* bv, float* c, int64_t ldc, bool load) {
  const float* bf = static_cast<const float*>(bv);
  const uint16_t* bh = static_cast<const uint16_t*>(bv);
  const int8_t* bq = static_cast<const int8_t*>(bv);
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
      if constexpr (BK == 1) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh));
        b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
        b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
        bh += kNR;
      } else if constexpr (BK == 2) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq));
        b0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        b1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
        bq += kNR;
      } else {
        b0 = _mm256_loadu_ps(bf);
        b1 = _mm256_loadu_ps(bf + 8);
        bf += kNR;
      }
      FASTLLM_EACH_ROW6(FASTLLM_STEP)
      a += kMR;
    }
#undef FASTLLM_STEP
    const bool add = load || k0 > 0;
    FASTLLM_EACH_ROW6(FASTLLM_STORE_ROW6)
  }
}

// Skinny tiles (decode: 1 or 2 rows). The 6-row kernel at R rows keeps 2R FMA chains in flight, and each waits the
// FMA's latency (4 cycles on Zen 3) every k step: at one row that capped the W8A16 GEMV at ~4 bytes of B a cycle
// (~12.7 GB/s measured, against ~24 for fp32). Here NP panels at once: R * NP * 2 independent accumulators (8), one
// broadcast of A shared by the panels. Each element is still summed in the same k order, chunk by chunk, as the
// 6-row kernel sums it, so a row's result does not depend on M or on the panels taken together.
template <int BK>
inline void load_b(const char* p, __m256i zero, __m256& b0, __m256& b1) {
  if constexpr (BK == 1) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
  } else if constexpr (BK == 2) {  // vpmovsxbd from memory: 8 bytes each, no shuffle
    b0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    b1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  } else {
    b0 = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    b1 = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8);
  }
}

template <int R, int NP, int BK>
inline void ukr_skinny(int64_t kc, const float* a, const void* bv, int64_t bstride, float* c, int64_t ldc,
                       bool load) {
  constexpr int64_t kRow = kNR * (BK == 0 ? 4 : BK == 1 ? 2 : 1);  // bytes of one k row of a panel
  const char* b = static_cast<const char*>(bv);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < kc || k0 == 0; k0 += kChunk) {
    const int64_t k1 = kc < k0 + kChunk ? kc : k0 + kChunk;
    __m256 acc[R][NP][2];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < NP; ++q) acc[r][q][0] = acc[r][q][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      __m256 av[R];
      for (int r = 0; r < R; ++r) av[r] = _mm256_broadcast_ss(a + k * kMR + r);
      for (int q = 0; q < NP; ++q) {
        __m256 b0, b1;
        load_b<BK>(b + q * bstride + k * kRow, zero, b0, b1);
        for (int r = 0; r < R; ++r) {
          acc[r][q][0] = _mm256_fmadd_ps(av[r], b0, acc[r][q][0]);
          acc[r][q][1] = _mm256_fmadd_ps(av[r], b1, acc[r][q][1]);
        }
      }
    }
    const bool add = load || k0 > 0;
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < NP; ++q) {
        tile_store(c + r * ldc + q * kNR, acc[r][q][0], add);
        tile_store(c + r * ldc + q * kNR + 8, acc[r][q][1], add);
      }
  }
}

template <int R, int BK>
inline void skinny(int np, int64_t kc, const float* a, const char* b, int64_t bstride, float* c, int64_t ldc,
                   bool load) {
  constexpr int kMaxNP = 4 / R;  // R * NP * 2 accumulators: 8
  for (int q = 0; q < np; q += kMaxNP) {
    const char* bq = b + q * bstride;
    float* cq = c + q * kNR;
    switch (np - q < kMaxNP ? np - q : kMaxNP) {
      case 1: ukr_skinny<R, 1, BK>(kc, a, bq, bstride, cq, ldc, load); break;
      case 2: ukr_skinny<R, 2, BK>(kc, a, bq, bstride, cq, ldc, load); break;
      case 3: ukr_skinny<R, 3, BK>(kc, a, bq, bstride, cq, ldc, load); break;
      default: ukr_skinny<R, kMaxNP, BK>(kc, a, bq, bstride, cq, ldc, load); break;
    }
  }
}

template <int BK>
inline void ukr_any(int rows, int np, int64_t kc, const float* a, const void* bv, int64_t bstride, float* c,
                    int64_t ldc, bool load) {
  const char* b = static_cast<const char*>(bv);
  if (rows == 1) return skinny<1, BK>(np, kc, a, b, bstride, c, ldc, load);
  if (rows == 2) return skinny<2, BK>(np, kc, a, b, bstride, c, ldc, load);
  for (int q = 0; q < np; ++q)
    with_rows<6>(rows, [&](auto r) { ukr_t<decltype(r)::value, BK>(kc, a, b + q * bstride, c + q * kNR, ldc, load); });
}

// Up to 4 panels a call for the skinny tiles (kPanelsSkinny), one for the taller ones.
struct Avx2Ops : OpsShape<kMR, kMC, kKC, 1, kAPackF32, 4>, VecEpilogue {
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bstride, int b_dt, float* c,
                  int64_t ldc, bool load) {
    if (b_dt == kBF16) return ukr_any<1>(rows, np, kc, a, b, bstride, c, ldc, load);
    if (b_dt == kI8) return ukr_any<2>(rows, np, kc, a, b, bstride, c, ldc, load);
    ukr_any<0>(rows, np, kc, a, b, bstride, c, ldc, load);
  }
};

// W8A8: int16 k-pairs of A (broadcast as one 32-bit word) and B (kLayoutI16Pairs: 16 columns x 2 = two
// vectors per pair), vpmaddwd (two int16 products summed into int32: at most 2 * 128 * 128 = 32768, exact;
// vpmaddubsw, the usual u8 x s8 instruction, would saturate its int16 pair sums) + vpaddd. 12 int32
// accumulators (6 rows x 16 columns); the sums over K are exact in int32 (wrapping only past 2^31).
template <int R>
inline void ukr_i16(int64_t kc, const float* af, const void* bv, int32_t* c, int64_t ldc, bool load) {
  const int32_t* a = reinterpret_cast<const int32_t*>(af);
  const __m256i* b = static_cast<const __m256i*>(bv);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define FASTLLM_STEP(r, c0, c1)                           \
  if constexpr (R > r) {                                  \
    const __m256i av = _mm256_set1_epi32(a[r]);           \
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(av, b0)); \
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(av, b1)); \
  }
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t j = 0; j < kc2; ++j) {
    // pair j: columns 0-7 in the first 32 bytes, 8-15 in the next (each column: its two k values)
    const __m256i b0 = _mm256_loadu_si256(b + 2 * j), b1 = _mm256_loadu_si256(b + 2 * j + 1);
    FASTLLM_EACH_ROW6(FASTLLM_STEP)
    a += 6;
  }
#undef FASTLLM_STEP
  const bool add = load;
  FASTLLM_EACH_ROW6(FASTLLM_STORE_ROW6)
}

struct Avx2I8Ops : OpsShape<kMR, kMC, 512, 1, kAPackI16Pairs>, VecEpilogue {
  static void ukr(int rows, int, int64_t kc, const float* a, const void* b, int64_t, int, float* cf, int64_t ldc,
                  bool load) {
    int32_t* c = reinterpret_cast<int32_t*>(cf);
    with_rows<6>(rows, [&](auto r) { ukr_i16<decltype(r)::value>(kc, a, b, c, ldc, load); });
  }
};

}  // namespace

void gemm_avx2(const Gemm& g) { gemm_impl<Avx2Ops>(g); }
void gemm_avx2_i8(const Gemm& g) { gemm_impl<Avx2I8Ops>(g); }

}  // namespace fastllm
