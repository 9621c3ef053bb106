// GEMM engine, AVX-512 path: a 12x16 micro-kernel (see gemm.h); the epilogue is the AVX2 one
// (gemm_epilogue_avx2.h), run once per finished tile.
//
// One B panel row (16 columns) is one zmm; 12 accumulators (12 rows x 1 zmm) of the 32 registers; per k step
// one B load and 12 FMAs with the A element broadcast from memory ({1to16} operand). On CPUs with two 512-bit
// FMA pipes (Zen 5, Intel server cores) a step is 6 cycles of FMA, twice the AVX2 kernel's work per cycle.
// bf16 panels (kBf16Perm column order, made for the AVX2 unpack) are widened in memory order with
// vpmovzxwd + shift; the accumulators then hold the columns permuted and are put back in order (one vpermps
// per row) when they are added into C. K is summed in chunks of kChunk steps (blocked summation, gemm.h).
#include <immintrin.h>

#include "gemm_epilogue_avx2.h"

namespace fastllm {
namespace {

constexpr int64_t kMR12 = 12;

template <int R, bool BF>
inline void ukr12(int64_t kc, const float* a, const void* bv, float* c, int64_t ldc, bool load) {
  const float* bf = static_cast<const float*>(bv);
  const uint16_t* bh = static_cast<const uint16_t*>(bv);
  const __m512i perm = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t k0 = 0; k0 < kc || k0 == 0; k0 += kChunk) {
    const int64_t k1 = kc < k0 + kChunk ? kc : k0 + kChunk;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
#define FASTLLM_STEP(r, cr) \
  if constexpr (R > r) cr = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), b, cr);
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; ++k) {
      __m512 b;
      if constexpr (BF) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        bh += kNR;
      } else {
        b = _mm512_loadu_ps(bf);
        bf += kNR;
      }
      FASTLLM_STEP(0, c0)
      FASTLLM_STEP(1, c1)
      FASTLLM_STEP(2, c2)
      FASTLLM_STEP(3, c3)
      FASTLLM_STEP(4, c4)
      FASTLLM_STEP(5, c5)
      FASTLLM_STEP(6, c6)
      FASTLLM_STEP(7, c7)
      FASTLLM_STEP(8, c8)
      FASTLLM_STEP(9, c9)
      FASTLLM_STEP(10, c10)
      FASTLLM_STEP(11, c11)
      a += kMR12;
    }
#undef FASTLLM_STEP
    const bool add = load || k0 > 0;
#define FASTLLM_STORE(r, cr)                                          \
  if constexpr (R > r) {                                              \
    float* p = c + r * ldc;                                           \
    __m512 v = BF ? _mm512_permutexvar_ps(perm, cr) : cr;             \
    if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(p));                \
    _mm512_storeu_ps(p, v);                                           \
  }
    FASTLLM_STORE(0, c0)
    FASTLLM_STORE(1, c1)
    FASTLLM_STORE(2, c2)
    FASTLLM_STORE(3, c3)
    FASTLLM_STORE(4, c4)
    FASTLLM_STORE(5, c5)
    FASTLLM_STORE(6, c6)
    FASTLLM_STORE(7, c7)
    FASTLLM_STORE(8, c8)
    FASTLLM_STORE(9, c9)
    FASTLLM_STORE(10, c10)
    FASTLLM_STORE(11, c11)
#undef FASTLLM_STORE
  }
}

template <bool BF>
inline void ukr12_rows(int rows, int64_t kc, const float* a, const void* b, float* c, int64_t ldc, bool load) {
  switch (rows) {
    case 1: return ukr12<1, BF>(kc, a, b, c, ldc, load);
    case 2: return ukr12<2, BF>(kc, a, b, c, ldc, load);
    case 3: return ukr12<3, BF>(kc, a, b, c, ldc, load);
    case 4: return ukr12<4, BF>(kc, a, b, c, ldc, load);
    case 5: return ukr12<5, BF>(kc, a, b, c, ldc, load);
    case 6: return ukr12<6, BF>(kc, a, b, c, ldc, load);
    case 7: return ukr12<7, BF>(kc, a, b, c, ldc, load);
    case 8: return ukr12<8, BF>(kc, a, b, c, ldc, load);
    case 9: return ukr12<9, BF>(kc, a, b, c, ldc, load);
    case 10: return ukr12<10, BF>(kc, a, b, c, ldc, load);
    case 11: return ukr12<11, BF>(kc, a, b, c, ldc, load);
    default: return ukr12<12, BF>(kc, a, b, c, ldc, load);
  }
}

struct Avx512Ops {
  static constexpr int64_t kMR = kMR12;
  static void ukr(int rows, int64_t kc, const float* a, const void* b, int b_dt, float* c, int64_t ldc, bool load) {
    if (b_dt == kBF16)
      ukr12_rows<true>(rows, kc, a, b, c, ldc, load);
    else
      ukr12_rows<false>(rows, kc, a, b, c, ldc, load);
  }
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    switch (g.c_dt) {
      case kBF16: return epilogue_t<BF16s>(g, tile, ldt, m, rows, p);
      case kF16: return epilogue_t<F16s>(g, tile, ldt, m, rows, p);
      default: return epilogue_t<F32s>(g, tile, ldt, m, rows, p);
    }
  }
};

}  // namespace

void gemm_avx512(const Gemm& g) { gemm_impl<Avx512Ops>(g); }

}  // namespace fastllm
