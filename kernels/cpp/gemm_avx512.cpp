// GEMM engine, AVX-512 path: a 12x32 micro-kernel over two B panels (see gemm.h); the epilogue is the AVX2
// one (gemm_epilogue_avx2.h), run once per finished tile.
//
// One B panel row (16 columns) is one zmm; 24 accumulators (12 rows x 2 panels) of the 32 registers; per k
// step two B loads, 12 broadcasts of A, 24 FMAs. On CPUs with two 512-bit FMA pipes (Zen 5, Intel server
// cores) a step is 12 cycles of FMA, twice the AVX2 kernel's work per cycle. (A 12x16 tile with the A
// element as a {1to16} memory operand ran at 64-75% of the FMA-loop peak here; 12x32 halves the loads.)
// bf16 panels (kBf16Perm column order, made for the AVX2 unpack) are widened in memory order with
// vpmovzxwd + shift; the accumulators then hold the columns permuted and are put back in order (one vpermps
// per row) when they are added into C. K is summed in chunks of kChunk steps (blocked summation, gemm.h).
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"
#include "ukr_rows.h"

namespace fastllm {
namespace {

constexpr int64_t kMR12 = 12;

template <int R, int NP, int BK>  // BK: 0 fp32, 1 bf16 (kBf16Perm order), 2 int8 (W8A16)
inline void ukr12(int64_t kc, const float* a, const void* bv, int64_t b_pstride, float* c, int64_t ldc, bool load) {
  const char* bb = static_cast<const char*>(bv);
  const __m512i perm = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t k0 = 0; k0 < kc || k0 == 0; k0 += kChunk) {
    const int64_t k1 = kc < k0 + kChunk ? kc : k0 + kChunk;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
    __m512 d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0, d8 = c0, d9 = c0, d10 = c0,
           d11 = c0;
#define FASTLLM_STEP(r, cr, dr)                    \
  if constexpr (R > r) {                           \
    const __m512 av = _mm512_set1_ps(a[r]);        \
    cr = _mm512_fmadd_ps(av, b0, cr);              \
    if constexpr (NP > 1) dr = _mm512_fmadd_ps(av, b1, dr); \
  }
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
      FASTLLM_EACH_ROW12(FASTLLM_STEP)
      a += kMR12;
    }
#undef FASTLLM_STEP
    const bool add = load || k0 > 0;
#define FASTLLM_STORE1(p, v)                                         \
  {                                                                  \
    __m512 w = BK == 1 ? _mm512_permutexvar_ps(perm, v) : v;              \
    if (add) w = _mm512_add_ps(w, _mm512_loadu_ps(p));               \
    _mm512_storeu_ps(p, w);                                          \
  }
#define FASTLLM_STORE(r, cr, dr)                                     \
  if constexpr (R > r) {                                             \
    FASTLLM_STORE1(c + r * ldc, cr)                                  \
    if constexpr (NP > 1) FASTLLM_STORE1(c + r * ldc + kNR, dr)      \
  }
    FASTLLM_EACH_ROW12(FASTLLM_STORE)
#undef FASTLLM_STORE
#undef FASTLLM_STORE1
  }
}

struct Avx512Ops {
  // 12 x 32 register tile (two B panels), larger cache blocks than AVX2 (Zen 5: 48 KiB L1, 1 MiB L2)
  static constexpr int64_t kMR = kMR12, kMC = 144, kKC = 384, kPanels = 2;
  static void pack_a(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* d) {
    pack_a_float<kMR>(g, m0, mr, k0, kc, d);
  }
  static int64_t a_words(int64_t kc) { return kc; }
  static void ukr(int rows, int np, int64_t kc, const float* a, const void* b, int64_t bps, int b_dt, float* c,
                  int64_t ldc, bool load) {
    const int bk = b_dt == kBF16 ? 1 : (b_dt == kI8 ? 2 : 0);
    with_rows<12>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      if (np > 1) {
        if (bk == 1) return ukr12<R, 2, 1>(kc, a, b, bps, c, ldc, load);
        if (bk == 2) return ukr12<R, 2, 2>(kc, a, b, bps, c, ldc, load);
        return ukr12<R, 2, 0>(kc, a, b, bps, c, ldc, load);
      }
      if (bk == 1) return ukr12<R, 1, 1>(kc, a, b, bps, c, ldc, load);
      if (bk == 2) return ukr12<R, 1, 2>(kc, a, b, bps, c, ldc, load);
      ukr12<R, 1, 0>(kc, a, b, bps, c, ldc, load);
    });
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    epilogue_any(g, tile, ldt, m, rows, p);
  }
};

}  // namespace

void gemm_avx512(const Gemm& g) { gemm_impl<Avx512Ops>(g); }

}  // namespace fastllm
