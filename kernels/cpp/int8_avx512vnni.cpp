// GEMM engine, W8A8 on AVX512-VNNI (ISA level avx512_dot): int8 x int8 -> exact int32 with vpdpbusd, the 12x32
// dot-product micro-kernel of gemm_avx512.h over two B panels in the k-quad layout (kLayoutI8Quads, gemm.h);
// epilogue as the other paths (gemm_epilogue_avx2.h).
//
// Exactness: vpdpbusd multiplies unsigned bytes by signed bytes and adds the four products of a k-quad to an
// int32 lane without saturation (modular). A is packed as u8 = a + 128, so each lane accumulates
// sum (a + 128) b = sum a b + 128 sum b; the epilogue subtracts 128 * colsum(b), precomputed per column at
// pack time. In modular int32 arithmetic the result is exact whenever the true sum fits int32 (|sum a b| <=
// 128 * 128 * K: any K < 131072). (vpmaddubsw, the AVX2 u8 x s8 instruction, saturates its int16 pair sums
// and is not used; the AVX2 path sign-extends to int16 and uses vpmaddwd, gemm_avx2.cpp.)
// Per k-quad: two B loads (16 columns x 4 bytes each), 12 broadcasts of a 32-bit A quad, 24 vpdpbusd (64
// multiply-adds each); no blocked summation is needed: integer sums are exact.
#include "gemm_avx512.h"

namespace fastllm {
namespace {

struct Dpbusd {
  static __m512i madd(__m512i acc, __m512i a, __m512i b) { return _mm512_dpbusd_epi32(acc, a, b); }
};

using VnniDot = DotOp<int32_t, 4, 0, Dpbusd>;  // one pass over K: integer sums need no blocked summation

}  // namespace

// B micro-panels: 2 x 16 columns x kc bytes = 32 KiB at kc = 1024 (L1 48 KiB on Zen 5)
void gemm_avx512vnni(const Gemm& g) { gemm_impl<Avx512DotOps<VnniDot, kAPackU8Quads, 1024>>(g); }

}  // namespace fastllm
