// Fused (add +) LayerNorm / RMSNorm on the CPU: argument blocks and the parallel drivers shared by the
// portable (layer_norm.cpp) and AVX2 (layer_norm_avx2.cpp) row kernels.
//
// Glossary: M rows (all leading dims flattened), N hidden size, T storage type (fp32 / bf16 / fp16),
// h = x + residual (rounded to T) or x itself, xhat = (h - mean) * rstd (LN) or h * rstd (RMS).
// Statistics and all arithmetic are fp32; each output is rounded once into T.
#pragma once

#include <cmath>

#include "common.h"
#include "parallel.h"

namespace fastllm {

struct NormFwd {
  void* out;          // (M, N) contiguous, T
  void* h;            // (M, N) contiguous, T: x + residual; null when there is no residual
  const void* x;      // (M, N), row stride x_stride
  const void* res;    // (M, N), row stride res_stride, or null
  const void* w;      // (N,) or null (= 1)
  const void* b;      // (N,) or null (= 0)
  int64_t M, N, x_stride, res_stride;
  float eps;
  bool rms;           // RMSNorm: no mean subtraction, no bias
  bool stream;        // non-temporal stores for outputs that will not fit in cache
  int dtype;          // DType
  int nthreads;
};

struct NormBwd {
  void* dx;           // (M, N) contiguous, T
  void* dw;           // (N,) T or null
  void* db;           // (N,) T or null
  const void* dy;     // (M, N), row stride dy_stride
  const void* dh;     // (M, N), row stride dh_stride, or null: gradient flowing straight into h
  const void* h;      // (M, N), row stride h_stride: the normalized input, stats are recomputed from it
  const void* w;      // (N,) or null
  int64_t M, N, dy_stride, dh_stride, h_stride;
  float eps;
  bool rms;
  bool stream;
  int dtype;
  int nthreads;
};

void norm_fwd_scalar(const NormFwd& a);
void norm_bwd_scalar(const NormBwd& a);
void norm_fwd_avx2(const NormFwd& a);
void norm_bwd_avx2(const NormBwd& a);

namespace {  // internal linkage: each TU instantiates its own copy (see common.h)

// Per-thread scratch, in floats, padded to whole 8-lane vectors: the fp32 row, the fp32 weight and bias.
inline int64_t fwd_scratch(int64_t N) { return 3 * round_up8(N); }

// The backward's per-thread scratch, fp32 rows of Np = round_up8(N) floats, zeroed by run_norm_bwd: the row (h,
// then xhat), g = dy * w, the weight, the dw and db partials of the current kRowBlock rows, and their running sums.
struct BwdScratch {
  float *row, *g, *w, *dw, *db, *dw_sum, *db_sum;
};
inline BwdScratch bwd_parts(float* s, int64_t Np) {
  return {s, s + Np, s + 2 * Np, s + 3 * Np, s + 4 * Np, s + 5 * Np, s + 6 * Np};
}

// rstd = 1/sqrt(mean + eps) evaluated in double: correctly rounded, so the output carries one rounding
// less than a float sqrt followed by a float division (once per row, so the cost is nil).
inline float rstd_of(float sum, int64_t N, float eps) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(sum) / static_cast<double>(N) + eps));
}

// dw/db partials: each thread sums kRowBlock rows into an inner fp32 vector, then folds it into an outer
// one (blocked summation over rows: error grows with M/kRowBlock + kRowBlock terms, not M).
constexpr int64_t kRowBlock = 32;
inline bool fold_due(int64_t i, int64_t r0, int64_t r1) { return (i - r0) % kRowBlock == kRowBlock - 1 || i == r1 - 1; }
inline void fold_partials(float* inner, float* outer, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    outer[j] += inner[j];
    inner[j] = 0.f;
  }
}

// Rows are independent: contiguous ranges, a few per thread (claimed, parallel.h), each thread's scratch by slot.
template <class Rows>
void run_norm_fwd(const NormFwd& a) {
  const int nt = static_cast<int>(a.M < a.nthreads ? a.M : a.nthreads);
  const int64_t per = fwd_scratch(a.N);
  float* scratch = alloc_floats(static_cast<size_t>(nt) * per);
  parallel_chunks(a.M, nt, 4, [&](int64_t r0, int64_t r1, int slot) { Rows::fwd(a, r0, r1, scratch + slot * per); });
  std::free(scratch);
}

// Backward: rows split into nt contiguous ranges (one task each, whichever thread runs it); each range accumulates
// dw/db partial sums over its rows in its own fp32 vectors (scratch by task), then the partials are summed over
// the ranges in a fixed order (deterministic for a given thread count) and rounded into T.
template <class Rows, class S>
void run_norm_bwd(const NormBwd& a) {
  using T = typename S::T;
  const int nt = static_cast<int>(a.M < a.nthreads ? a.M : a.nthreads);
  const int64_t Np = round_up8(a.N);
  const int64_t per = 7 * Np;  // bwd_parts
  float* scratch = alloc_floats(static_cast<size_t>(nt) * per);
  std::memset(scratch, 0, sizeof(float) * static_cast<size_t>(nt) * per);
  parallel_for(nt, nt, [&](int64_t t, int) { Rows::bwd(a, a.M * t / nt, a.M * (t + 1) / nt, scratch + t * per); });
  if (a.dw != nullptr || a.db != nullptr) {
    T* dw = static_cast<T*>(a.dw);
    T* db = static_cast<T*>(a.db);
    parallel_chunks(a.N, a.N >= 4096 ? nt : 1, 4, [&](int64_t j0, int64_t j1, int) {
      for (int64_t j = j0; j < j1; ++j) {
        float sw = 0.f, sb = 0.f;
        for (int t = 0; t < nt; ++t) {
          const BwdScratch part = bwd_parts(scratch + t * per, Np);
          sw += part.dw_sum[j];
          sb += part.db_sum[j];
        }
        if (dw != nullptr) dw[j] = S::from(sw);
        if (db != nullptr) db[j] = S::from(sb);
      }
    });
  }
  std::free(scratch);
}

}  // namespace
}  // namespace fastllm
