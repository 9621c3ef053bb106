// Fused (add +) LayerNorm / RMSNorm, portable path (any CPU the compiler targets), and the ISA dispatch.
//
// Math per row (fp32), with h = round_T(x + residual) or x:
//   LN:  mean = sum(h)/N, var = sum((h-mean)^2)/N (two passes over the row, which is in L1/L2), rstd = 1/sqrt(var+eps)
//        out = (h-mean)*rstd*w + b
//   RMS: rstd = 1/sqrt(sum(h^2)/N + eps), out = h*rstd*w
// Backward (stats recomputed from h, nothing saved but h), g = dy*w, xhat as above:
//   dx = rstd*(g - mean(g) - xhat*mean(g*xhat)) + dh     (RMS: no mean(g) term)
//   dw += dy*xhat, db += dy   (per-thread fp32 partials, summed in layer_norm.h)
// Sums use 8 lanes over chunks of 512 elements folded into a total (as the AVX2 path does), so the
// rounding error grows like a blocked sum, not like one long running sum.
#include "layer_norm.h"

#include <cmath>
#include <stdexcept>

namespace fastllm {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kChunk = 512;

inline float lane_sum(const float* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Blocked accumulator: add(j, v) for j = 0, 1, 2, ... in order; total() at the end.
struct BlockedSum {
  float lanes[kLanes] = {0.f};
  float tot = 0.f;
  void add(int64_t j, float v) {
    lanes[j % kLanes] += v;
    if (j % kChunk == kChunk - 1) flush();
  }
  void flush() {
    tot += lane_sum(lanes);
    for (float& l : lanes) l = 0.f;
  }
  float total() {
    flush();
    return tot;
  }
};

template <class S>
struct ScalarRows {
  using T = typename S::T;

  // scratch: row (Np) | weight (Np) | bias (Np)
  static void fwd(const NormFwd& a, int64_t r0, int64_t r1, float* scratch) {
    const int64_t N = a.N, Np = round_up8(N);
    float* row = scratch;
    float* wf = scratch + Np;
    float* bf = scratch + 2 * Np;
    const T* w = static_cast<const T*>(a.w);
    const T* b = static_cast<const T*>(a.b);
    for (int64_t j = 0; j < N; ++j) {  // weight/bias widened once per thread
      wf[j] = w ? S::load(w + j) : 1.f;
      bf[j] = b ? S::load(b + j) : 0.f;
    }
    for (int64_t i = r0; i < r1; ++i) {
      const T* x = static_cast<const T*>(a.x) + i * a.x_stride;
      const T* r = a.res ? static_cast<const T*>(a.res) + i * a.res_stride : nullptr;
      T* h = a.h ? static_cast<T*>(a.h) + i * N : nullptr;
      T* y = static_cast<T*>(a.out) + i * N;
      // pass 1: h = x (+ r) rounded to T, kept in fp32; sum (LN) or sum of squares (RMS)
      BlockedSum s;
      for (int64_t j = 0; j < N; ++j) {
        float v = S::load(x + j);
        if (r) {
          const T hv = S::from(v + S::load(r + j));
          h[j] = hv;
          v = S::to(hv);
        }
        row[j] = v;
        s.add(j, a.rms ? v * v : v);
      }
      float mean = 0.f, rstd;
      if (a.rms) {
        rstd = rstd_of(s.total(), N, a.eps);
      } else {  // pass 2: variance about the mean
        mean = s.total() / static_cast<float>(N);
        BlockedSum q;
        for (int64_t j = 0; j < N; ++j) q.add(j, (row[j] - mean) * (row[j] - mean));
        rstd = rstd_of(q.total(), N, a.eps);
      }
      // pass 3: normalize, scale, shift
      for (int64_t j = 0; j < N; ++j) y[j] = S::from((row[j] - mean) * rstd * wf[j] + bf[j]);
    }
  }

  // scratch: bwd_parts (layer_norm.h)
  static void bwd(const NormBwd& a, int64_t r0, int64_t r1, float* scratch) {
    const int64_t N = a.N, Np = round_up8(N);
    const auto [row, gb, wf, dwp, dbp, dwo, dbo] = bwd_parts(scratch, Np);
    const T* w = static_cast<const T*>(a.w);
    for (int64_t j = 0; j < N; ++j) wf[j] = w ? S::load(w + j) : 1.f;
    const float inv_n = 1.f / static_cast<float>(N);
    for (int64_t i = r0; i < r1; ++i) {
      const T* hr = static_cast<const T*>(a.h) + i * a.h_stride;
      const T* dy = static_cast<const T*>(a.dy) + i * a.dy_stride;
      const T* dh = a.dh ? static_cast<const T*>(a.dh) + i * a.dh_stride : nullptr;
      T* dx = static_cast<T*>(a.dx) + i * N;
      // pass 1 (+2 for LN): recompute mean and rstd from h
      BlockedSum s;
      for (int64_t j = 0; j < N; ++j) {
        const float v = S::load(hr + j);
        row[j] = v;
        s.add(j, a.rms ? v * v : v);
      }
      float mean = 0.f, rstd;
      if (a.rms) {
        rstd = rstd_of(s.total(), N, a.eps);
      } else {
        mean = s.total() / static_cast<float>(N);
        BlockedSum q;
        for (int64_t j = 0; j < N; ++j) q.add(j, (row[j] - mean) * (row[j] - mean));
        rstd = rstd_of(q.total(), N, a.eps);
      }
      // pass 3: xhat, g = dy*w, the two row reductions, dw/db partials
      BlockedSum sg, sgx;
      for (int64_t j = 0; j < N; ++j) {
        const float xh = (row[j] - mean) * rstd;
        const float d = S::load(dy + j);
        const float g = d * wf[j];
        sg.add(j, g);
        sgx.add(j, g * xh);
        dwp[j] += d * xh;
        dbp[j] += d;
        row[j] = xh;
        gb[j] = g;
      }
      const float c1 = sgx.total() * inv_n;
      const float c2 = a.rms ? 0.f : sg.total() * inv_n;
      // pass 4: dx
      for (int64_t j = 0; j < N; ++j) {
        float v = rstd * (gb[j] - c2 - row[j] * c1);
        if (dh) v += S::load(dh + j);
        dx[j] = S::from(v);
      }
      if (fold_due(i, r0, r1)) {
        fold_partials(dwp, dwo, N);
        fold_partials(dbp, dbo, N);
      }
    }
  }
};

void check_common(int64_t M, int64_t N, int nthreads, int dtype) {
  if (M < 1 || N < 1) throw std::invalid_argument("norm: M and N must be >= 1 (empty inputs are handled in Python)");
  if (nthreads < 1) throw std::invalid_argument("norm: nthreads must be >= 1");
  if (dtype < kF32 || dtype > kF16) throw std::invalid_argument("norm: unknown dtype code");
}

}  // namespace

void norm_fwd_scalar(const NormFwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_norm_fwd<ScalarRows<decltype(s)>>(a); });
}

void norm_bwd_scalar(const NormBwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_norm_bwd<ScalarRows<decltype(s)>, decltype(s)>(a); });
}

// Entry points used by the bindings: validate what Python cannot get wrong by accident, pick the ISA.
void norm_fwd(const NormFwd& a) {
  check_common(a.M, a.N, a.nthreads, a.dtype);
  if (a.out == nullptr || a.x == nullptr || (a.res != nullptr) != (a.h != nullptr))
    throw std::invalid_argument("norm_fwd: missing pointer");
  const int64_t bytes = a.M * a.N * (a.dtype == kF32 ? 4 : 2);
  advise_huge_pages(a.out, bytes);
  advise_huge_pages(a.h, bytes);
  if constexpr (kBuiltAvx2)
    if (active_isa() >= Isa::kAvx2) return norm_fwd_avx2(a);
  norm_fwd_scalar(a);
}

void norm_bwd(const NormBwd& a) {
  check_common(a.M, a.N, a.nthreads, a.dtype);
  if (a.dx == nullptr || a.dy == nullptr || a.h == nullptr) throw std::invalid_argument("norm_bwd: missing pointer");
  advise_huge_pages(a.dx, a.M * a.N * (a.dtype == kF32 ? 4 : 2));
  if constexpr (kBuiltAvx2)
    if (active_isa() >= Isa::kAvx2) return norm_bwd_avx2(a);
  norm_bwd_scalar(a);
}

}  // namespace fastllm
