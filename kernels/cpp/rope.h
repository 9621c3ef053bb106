// Rotary position embedding (RoPE) of q and k on the CPU: the argument block and the parallel driver shared by
// the portable (rope.cpp) and AVX2 (rope_avx2.cpp) row kernels.
//
// Glossary: B batch, Hq / Hkv query / key heads, S sequence, D head dim, R rotary dim (even, R <= D),
// half = R / 2, P table positions, T storage type (fp32 / bf16 / fp16). A "row" is one (b, h, s) head vector of
// D elements; q's B * Hq * S rows come first, then k's B * Hkv * S rows.
//
// Math per row, HF rotate_half convention (Llama / Mistral / Qwen2 / GPT-NeoX), p = positions[b, s],
// c = cos[p, i], s = sin[p, i] for i < half (s negated for the inverse rotation, i.e. the backward):
//   out[i] = x[i] c - x[i + half] s ;  out[i + half] = x[i + half] c + x[i] s ;  out[R:] = x[R:] (bit copy)
// computed in fp32, each output rounded once into T.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"
#include "parallel.h"

namespace fastllm {

struct RopeFwd {
  void* q_out;          // (B, Hq, S, D) contiguous, T
  void* k_out;          // (B, Hkv, S, D) contiguous, T
  const void* q;        // (B, Hq, S, D), strides qs of (b, h, s) in elements, unit stride along D
  const void* k;        // (B, Hkv, S, D), strides ks
  const float* cos;     // (P, half) fp32, row stride cs_stride
  const float* sin;     // (P, half) fp32, row stride cs_stride
  const void* pos;      // (B, S) int32 or int64, strides ps of (b, s) (ps[0] = 0: one row for every b)
  int64_t B, Hq, Hkv, S, D, R, P;
  int64_t qs[3], ks[3], ps[2], cs_stride;
  bool pos64;           // positions are int64 (else int32)
  bool inverse;         // rotate by -theta (sin negated): the backward
  int dtype;            // DType
  int nthreads;
};

void rope_fwd(const RopeFwd& a);  // checks the block and the positions, picks the ISA (rope.cpp)
void rope_fwd_scalar(const RopeFwd& a);
void rope_fwd_avx2(const RopeFwd& a);

namespace {  // internal linkage: each TU instantiates its own copy (see common.h)

// The rows [i0, i1) of one tensor (x with H heads and strides xs, output y contiguous). The (b, h, s) of the
// first row is decoded once; later rows step the counters (a division per row would cost as much as the
// rotation of a 64-wide row). Row::rotate<INV>(y, x, c, s, half) writes y[0:R] of one row; the pass-through
// tail y[R:D] is a byte copy, so it is exact for every value (NaN payloads included), as torch.cat is.
// Positions are in [0, P): rope_fwd checks them all before any row is rotated.
template <class S, class Row, bool INV, bool POS64>
void rope_part(const RopeFwd& a, const typename S::T* x, typename S::T* y, int64_t H, const int64_t* xs,
               int64_t i0, int64_t i1) {
  using T = typename S::T;
  if (i0 >= i1) return;
  const int64_t Sq = a.S, D = a.D, R = a.R, half = R / 2, cs = a.cs_stride;
  const int64_t ps0 = a.ps[0], ps1 = a.ps[1];
  const int64_t* pos64 = static_cast<const int64_t*>(a.pos);
  const int32_t* pos32 = static_cast<const int32_t*>(a.pos);
  int64_t b = i0 / (H * Sq), h = (i0 / Sq) % H, s = i0 % Sq;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t pi = b * ps0 + s * ps1;
    const int64_t p = POS64 ? pos64[pi] : static_cast<int64_t>(pos32[pi]);
    const T* xr = x + b * xs[0] + h * xs[1] + s * xs[2];
    T* yr = y + i * D;
    Row::template rotate<INV>(yr, xr, a.cos + p * cs, a.sin + p * cs, half);
    if (D > R) std::memcpy(yr + R, xr + R, static_cast<size_t>(D - R) * sizeof(T));
    if (++s == Sq) {
      s = 0;
      if (++h == H) {
        h = 0;
        ++b;
      }
    }
  }
}

// All rows (q's, then k's) in contiguous ranges, a few per thread (claimed, parallel.h). Rows are independent, so
// the result does not depend on which thread runs which range; a range may span q's last rows and k's first.
template <class S, class Row>
void run_rope(const RopeFwd& a) {
  using T = typename S::T;
  const int64_t rows_q = a.B * a.Hq * a.S, rows = rows_q + a.B * a.Hkv * a.S;
  const int nt = static_cast<int>(imax(1, imin(a.nthreads, rows)));
  with_flags(a.inverse, a.pos64, [&](auto inv, auto p64) {
    parallel_chunks(rows, nt, 4, [&](int64_t r0, int64_t r1, int) {
      rope_part<S, Row, inv, p64>(a, static_cast<const T*>(a.q), static_cast<T*>(a.q_out), a.Hq, a.qs, r0,
                                  imin(r1, rows_q));
      rope_part<S, Row, inv, p64>(a, static_cast<const T*>(a.k), static_cast<T*>(a.k_out), a.Hkv, a.ks,
                                  imax(r0, rows_q) - rows_q, r1 - rows_q);
    });
  });
}

}  // namespace
}  // namespace fastllm
