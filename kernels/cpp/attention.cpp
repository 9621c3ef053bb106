// Flash attention, portable path (any CPU the compiler targets) and the ISA dispatch. The tiling, masks,
// online softmax, splits and backward are the drivers of attention.h; this file gives them plain loops.
#include "attention.h"

#include <cmath>
#include <stdexcept>

namespace fastllm {
namespace {

struct ScalarOps {
  // Same contract and the same blocked summation over K (chunks of 64 added to the total in C) as the AVX2 path.
  static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                   int64_t b_ks, float* C, int64_t ldc, bool acc, float* colmax = nullptr) {
    constexpr int64_t kKc = 64, kNc = 256;
    float part[kNc];
    for (int64_t r = 0; r < M; ++r) {
      float* c = C + r * ldc;
      for (int64_t n0 = 0; n0 < N; n0 += kNc) {
        const int64_t n1 = N < n0 + kNc ? N : n0 + kNc;
        if (!acc)
          for (int64_t n = n0; n < n1; ++n) c[n] = 0.f;
        for (int64_t k0 = 0; k0 < K; k0 += kKc) {
          const int64_t k1 = K < k0 + kKc ? K : k0 + kKc;
          for (int64_t n = n0; n < n1; ++n) part[n - n0] = 0.f;
          for (int64_t k = k0; k < k1; ++k) {
            const float av = A[r * a_rs + k * a_ks];
            const float* b = B + k * b_ks;
            for (int64_t n = n0; n < n1; ++n) part[n - n0] += av * b[n];
          }
          for (int64_t n = n0; n < n1; ++n) c[n] += part[n - n0];
        }
      }
      if (colmax != nullptr)
        for (int64_t n = 0; n < N; ++n) colmax[n] = c[n] > colmax[n] ? c[n] : colmax[n];
    }
  }
  static void qk_small(int64_t n, int64_t M, int64_t Dp, const float* K, int64_t ldk, const float* Qr, float* St,
                       float* colmax) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < M; ++r) {
        float acc = 0.f;
        for (int64_t d = 0; d < Dp; ++d) acc += K[j * ldk + d] * Qr[r * Dp + d];
        St[j * 8 + r] = acc;
        colmax[r] = acc > colmax[r] ? acc : colmax[r];
      }
  }
  static void exp2_block(float* St, int64_t n, int64_t ld, int64_t w, const float* m, float cb, const float* post,
                         float* sum) {
    for (int64_t c = 0; c < w; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp2(std::fma(St[j * ld + c], cb, -m[c])) * (post != nullptr ? post[c] : 1.f);
        St[j * ld + c] = e;
        acc += e;
      }
      if (sum != nullptr) sum[c] = acc;
    }
  }
  static void vmax(float* acc, const float* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) acc[j] = x[j] > acc[j] ? x[j] : acc[j];
  }
  static void vadd(float* acc, const float* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j) acc[j] += x[j];
  }
  static void dsoftmax(float* dp, const float* p, const float* delta, int64_t n) {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta[j]);
  }
  static void divide(float* x, int64_t n, float d) {
    for (int64_t j = 0; j < n; ++j) x[j] /= d;
  }
  static void scale(float* x, int64_t n, float s) {
    for (int64_t j = 0; j < n; ++j) x[j] *= s;
  }
  static void axpby(float* y, const float* x, int64_t n, float a) {
    for (int64_t j = 0; j < n; ++j) y[j] = a * y[j] + x[j];
  }
  static void axpy(float* y, const float* x, int64_t n, float w) {
    for (int64_t j = 0; j < n; ++j) y[j] += w * x[j];
  }
  template <class S>
  static void load_row(float* dst, const typename S::T* src, int64_t D, int64_t Dp) {
    int64_t d = 0;
    for (; d < D; ++d) dst[d] = S::load(src + d);
    for (; d < Dp; ++d) dst[d] = 0.f;
  }
  template <class S>
  static void store_row(typename S::T* dst, const float* src, int64_t D) {
    for (int64_t d = 0; d < D; ++d) dst[d] = S::from(src[d]);
  }
};

}  // namespace

void attn_fwd_scalar(const AttnFwd& a) {
  switch (a.s.dtype) {
    case kBF16: return attn_fwd_impl<ScalarOps, BF16s>(a);
    case kF16: return attn_fwd_impl<ScalarOps, F16s>(a);
    default: return attn_fwd_impl<ScalarOps, F32s>(a);
  }
}

void attn_bwd_scalar(const AttnBwd& a) {
  switch (a.s.dtype) {
    case kBF16: return attn_bwd_impl<ScalarOps, BF16s>(a);
    case kF16: return attn_bwd_impl<ScalarOps, F16s>(a);
    default: return attn_bwd_impl<ScalarOps, F32s>(a);
  }
}

namespace {
void check_shape(const AttnShape& s) {
  if (s.q == nullptr || s.k == nullptr || s.v == nullptr) throw std::invalid_argument("attention: missing pointer");
  if (s.B < 1 || s.Hq < 1 || s.Hkv < 1 || s.Sq < 1 || s.Sk < 1 || s.D < 1 || s.Hq % s.Hkv != 0)
    throw std::invalid_argument("attention: bad shape (empty inputs are handled in Python)");
  if (s.dtype != kF32 && s.dtype != kBF16 && s.dtype != kF16) throw std::invalid_argument("attention: bad dtype code");
  if (s.mask != nullptr && s.mask_dtype != kMaskBool && s.mask_dtype != kF32 && s.mask_dtype != kBF16 &&
      s.mask_dtype != kF16)
    throw std::invalid_argument("attention: bad mask dtype code");
}
}  // namespace

void attn_fwd(const AttnFwd& a) {
  check_shape(a.s);
  if (a.out == nullptr || a.stats == nullptr) throw std::invalid_argument("attn_fwd: missing output pointer");
#ifdef FASTLLM_HAVE_AVX2
  if (active_isa() >= Isa::kAvx2) return attn_fwd_avx2(a);
#endif
  attn_fwd_scalar(a);
}

void attn_bwd(const AttnBwd& a) {
  check_shape(a.s);
  if (a.dq == nullptr || a.dk == nullptr || a.dv == nullptr || a.dout == nullptr || a.out == nullptr ||
      a.stats == nullptr)
    throw std::invalid_argument("attn_bwd: missing pointer");
#ifdef FASTLLM_HAVE_AVX2
  if (active_isa() >= Isa::kAvx2) return attn_bwd_avx2(a);
#endif
  attn_bwd_scalar(a);
}

}  // namespace fastllm
