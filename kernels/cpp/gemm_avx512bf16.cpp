// GEMM engine, AVX512-BF16 path (ISA level avx512_dot): bf16 A x bf16 B with vdpbf16ps, the 12x32 dot-product
// micro-kernel of gemm_avx512.h over two B panels in the k-pair layout (kLayoutPairs, gemm.h); epilogue as the
// other paths (gemm_epilogue_avx2.h).
//
// vdpbf16ps adds to each fp32 lane the two products of a k-pair (a[k] b[k] + a[k+1] b[k+1]); a product of two
// bf16 is exact in fp32, so this is an fp32-accumulated GEMM like the fp32 kernels (denormals flush to zero,
// as in oneDNN's bf16 GEMM). One instruction does twice the multiply-adds of an fp32 FMA: per k-pair two B
// loads (64 bytes each), 12 broadcasts of a 32-bit A pair, 24 vdpbf16ps.
#include "gemm_avx512.h"

namespace fastllm {
namespace {

struct Dpbf16 {
  static __m512 madd(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

// k-pairs summed in registers before adding into C: 96. Longer than the fp32 kernels' kChunk: A and B are bf16 and
// so is the output (the GEMM runs only for bf16 x bf16), whose rounding (2^-9 relative) dwarfs the fp32
// accumulation error of 2 * 96 = 192-term sums (~1e-5), and the store/reload per chunk cost ~15% at 16 pairs.
using Bf16Dot = DotOp<float, 2, 96, Dpbf16>;

}  // namespace

void gemm_avx512bf16(const Gemm& g) { gemm_impl<Avx512DotOps<Bf16Dot, kAPackBf16Pairs, 384>>(g); }

}  // namespace fastllm
