// GEMM engine, AVX-512 path (ISA level avx512): a 12x32 fp32 FMA micro-kernel over two B panels (see gemm.h,
// and gemm_avx512.h for the tile); the epilogue is the AVX2 one (gemm_epilogue_avx2.h), run once per finished
// tile.
//
// Per k step two B loads, 12 broadcasts of A, 24 FMAs. On CPUs with two 512-bit FMA pipes (Zen 5, Intel server
// cores) a step is 12 cycles of FMA, twice the AVX2 kernel's work per cycle. (A 12x16 tile with the A
// element as a {1to16} memory operand ran at 64-75% of the FMA-loop peak here; 12x32 halves the loads.)
// bf16 panels (kBf16Perm column order, made for the AVX2 unpack) are widened in memory order with
// vpmovzxwd + shift; the accumulators then hold the columns permuted and are put back in order (one vpermps
// per row) when they are added into C. K is summed in chunks of kChunk steps (blocked summation, gemm.h).
#include "gemm_avx512.h"

namespace fastllm {
namespace {

struct Fma {
  static __m512 bcast(const float* a) { return _mm512_set1_ps(*a); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

template <int R, int NP, int BK>  // BK: 0 fp32, 1 bf16 (kBf16Perm order), 2 int8 (W8A16)
inline void ukr12(int64_t kc, const float* a, const void* bv, int64_t b_pstride, float* c, int64_t ldc, bool load) {
  using Op = Fma;
  const char* bb = static_cast<const char*>(bv);
  const __m512i perm = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t k0 = 0; k0 < kc || k0 == 0; k0 += kChunk) {
    const int64_t k1 = kc < k0 + kChunk ? kc : k0 + kChunk;
    FASTLLM_TILE12(__m512, _mm512_setzero_ps())
    for (int64_t k = k0; k < k1; ++k) {
      __m512 b0, b1;
      if constexpr (BK == 2) {
        b0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bb) + k)));
        if constexpr (NP > 1)
          b1 = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bb + b_pstride) + k)));
      } else if constexpr (BK == 1) {
        const uint16_t* bh = reinterpret_cast<const uint16_t*>(bb) + k * kNR;
        b0 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh))), 16));
        if constexpr (NP > 1) {
          const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bb + b_pstride) + k);
          b1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
        }
      } else {
        b0 = _mm512_loadu_ps(reinterpret_cast<const float*>(bb) + k * kNR);
        if constexpr (NP > 1) b1 = _mm512_loadu_ps(reinterpret_cast<const float*>(bb + b_pstride) + k * kNR);
      }
      FASTLLM_EACH_ROW12(FASTLLM_STEP_ROW12)
      a += kMR12;
    }
    const bool add = load || k0 > 0;
    if constexpr (BK == 1) {  // the columns back in order
#define FASTLLM_UNPERM(r, cr, dr)                               \
  if constexpr (R > r) {                                        \
    cr = _mm512_permutexvar_ps(perm, cr);                       \
    if constexpr (NP > 1) dr = _mm512_permutexvar_ps(perm, dr); \
  }
      FASTLLM_EACH_ROW12(FASTLLM_UNPERM)
#undef FASTLLM_UNPERM
    }
    FASTLLM_EACH_ROW12(FASTLLM_STORE_ROW12)
  }
}

struct Avx512Ops : Avx512Shape<kAPackF32, 384> {
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bps, int b_dt, float* c,
                  int64_t ldc, bool load) {
    with_tile12(rows, np, [&](auto r, auto n) {
      constexpr int R = decltype(r)::value, NP = decltype(n)::value;
      if (b_dt == kBF16) return ukr12<R, NP, 1>(kc, a, b, bps, c, ldc, load);
      if (b_dt == kI8) return ukr12<R, NP, 2>(kc, a, b, bps, c, ldc, load);
      ukr12<R, NP, 0>(kc, a, b, bps, c, ldc, load);
    });
  }
};

}  // namespace

void gemm_avx512(const Gemm& g) { gemm_impl<Avx512Ops>(g); }

}  // namespace fastllm
