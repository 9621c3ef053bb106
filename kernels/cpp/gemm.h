// GEMM engine for fastllm.linear / fused_ffn / fused_gated_ffn (forward and backward): C = A B with a
// fused epilogue, BLIS-style (Van Zee & van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", 2015; Goto & van de Geijn, "Anatomy of High-Performance Matrix Multiplication", 2008).
//
// Glossary
//   M, N, K     C is M x N (N = output columns; for the gated mode N = the intermediate size I), K the depth
//   A           M x K, element (m, k) at a[m * a_rs + k * a_cs], fp32/bf16/fp16; packed per cache block into
//               fp32 micro-panels of kMR rows (Ops::kMR: 6 for AVX2 and portable, 12 for AVX-512), k-major
//               ([k][kMR], rows past M are zero)
//   B           K x Nacc, pre-packed by pack_b() (cached by Python for weights): panels of kNR = 16 columns,
//               panel p = K x 16 elements k-major, zero past N and, for 16-bit weights, bf16 with the column
//               order of kBf16Perm (the micro-kernel widens a 16-element row with two unpacks); fp32 otherwise
//   Nacc        accumulator columns: N, or 2 * round_up8(N) for the gated mode, whose panel p holds gate
//               columns 8p..8p+7 (panel columns 0..7) and up columns 8p..8p+7 (panel columns 8..15), so that
//               one 6x16 register tile holds a gate tile and the matching up tile side by side
//   kMC, kKC    cache blocking: a task packs kMC x kc of A (L2) and streams the B panels (kc x 16, L1);
//               sums over K run in registers for kc <= kKC steps, then add into a per-task fp32 buffer
//               (blocked summation: error grows with kKC, not K)
//   task        (row block of <= kMC rows, range of B panels), claimed one at a time by the threads (parallel.h)
//
// Epilogue (applied to each finished 6x16 tile while it is in L1; acc = the fp32 sum):
//   plain    pre = acc + bias;  out = act(pre) + residual;  pre saved if asked
//   gated    g = acc_g + bias, u = acc_u + bias2;  out = act(g) * u;  g, u saved if asked
//   dact     out = acc * act'(aux)                         (aux = the forward's pre-activation)
//   dgated   out = acc * aux2 * act'(aux), out2 = acc * act(aux)   (aux = g, aux2 = u: d g and d u)
//   int8     acc is the exact int32 sum (minus 128 * colsum for the VNNI kernel's u8 offset);
//            out = (float(acc) * a_scale[m]) * b_scale[n] + bias                      (W8A8)
//   scale    out = acc * b_scale[n] + bias                                           (W8A16)
// Every epilogue tensor (bias, residual, pre, aux, out, out2) has dtype c_dt and unit column stride.
#pragma once

#include <cmath>

#include "common.h"
#include "parallel.h"

namespace fastllm {

// The enums Python passes codes of: exported by name as _C.ACTIVATIONS / EPILOGUES / LAYOUTS (bindings.cpp).
enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActQuickGelu = 3, kActRelu = 4, kActSilu = 5 };
enum EpiMode : int { kEpiPlain = 0, kEpiGated = 1, kEpiDact = 2, kEpiDgated = 3, kEpiInt8 = 4, kEpiScale = 5 };

constexpr int64_t kNR = 16;
// k steps summed in registers before adding into C (blocked summation). 64: with 32 the C round trip every 32 steps
// cost 10-15% (1 thread, 2048 x 384 -> 1152 and two other encoder shapes: 71-76 -> 83-86 GFLOP/s, Zen 3); 128 and 256
// ran as fast as 64 but failed the criterion (1 element of 33300 of a fused gated FFN's weight gradient).
constexpr int64_t kChunk = 64;
// Default cache blocking (AVX2 / portable: 6-row tiles, 32 KiB L1). kMC 72: 96 left 2048 rows as 21 x 96 + 32
// and ran 2048^3 at 187 GFLOP/s against 215 with 72 (84, 120: 214-218; 2 threads, this machine's AVX2 path).
constexpr int64_t kMC = 72, kKC = 256;
constexpr int64_t kMaxPanelsPerTask = 64;  // bounds the per-task fp32 buffer at 1024 columns

// bf16 panels: column c of a 16-wide row is stored at kBf16Perm[c] (see the glossary).
constexpr int kBf16Perm[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

// Packed-B layouts. kLayoutRows: the panels above. kLayoutPairs (bf16 only, for the AVX512-BF16 kernel):
// panel p holds ceil(K/2) rows of 16 column pairs, element (k, c) at p*K2*32 + (k/2)*32 + 2c + (k%2), zero
// for k >= K, so one 64-byte row feeds vdpbf16ps (16 lanes, each the dot of a k-pair).
// int8 weights (src dtype kI8): kLayoutI8Rows (as kLayoutRows, 1 byte per element: the W8A16 kernels widen
// them to fp32), kLayoutI16Pairs (as kLayoutPairs with the values sign-extended to int16: the AVX2 / portable
// W8A8 kernels, vpmaddwd), kLayoutI8Quads (ceil(K/4) rows of 16 column quads, (k, c) at (k/4)*64 + 4c + k%4:
// the AVX512-VNNI W8A8 kernel, vpdpbusd; pack_b also writes each column's sum for its u8 offset correction).
enum Layout : int { kLayoutRows = 0, kLayoutPairs = 1, kLayoutI8Rows = 2, kLayoutI16Pairs = 3, kLayoutI8Quads = 4 };

struct PackB {
  void* dst;          // packed_b_elems() elements of dtype pack_dtype(src_dt)
  const void* src;    // B(k, n) = src[k * s_k + n * s_n]
  const void* src2;   // gated: the up projection (same shape and strides), else null
  int64_t K, N, s_k, s_n;
  int src_dt;
  int layout;
  int32_t* colsum;  // kLayoutI8Quads: per packed column, sum over k of B (num_panels * 16 int32), else null
  int nthreads;
};

static inline int pack_dtype(int src_dt) { return src_dt == kBF16 || src_dt == kI8 ? src_dt : kF32; }
static inline int64_t acc_cols(int64_t N, bool gated) { return gated ? 2 * round_up8(N) : N; }
static inline int64_t num_panels(int64_t N, bool gated) { return (acc_cols(N, gated) + kNR - 1) / kNR; }
static inline int64_t panel_k(int64_t K, int layout) {
  if (layout == kLayoutPairs || layout == kLayoutI16Pairs) return (K + 1) / 2 * 2;
  return layout == kLayoutI8Quads ? (K + 3) / 4 * 4 : K;
}
// Bytes per packed element: fp32 4; bf16, int16 2; int8 1.
static inline int64_t packed_elem_bytes(int b_dt, int layout) {
  if (layout == kLayoutI8Rows || layout == kLayoutI8Quads) return 1;
  if (layout == kLayoutI16Pairs) return 2;
  return b_dt == kF32 ? 4 : 2;
}
static inline int64_t packed_b_elems(int64_t K, int64_t N, bool gated, int layout) {
  return num_panels(N, gated) * panel_k(K, layout) * kNR;
}

struct Gemm {
  int64_t M, N, K;
  const void* a;
  int64_t a_rs, a_cs;
  int a_dt;
  const void* b;  // packed (PackB layout of dtype b_dt; gated layout iff mode == kEpiGated)
  int b_dt;
  int b_layout;
  int mode, act;
  void* c;  // M x N, row stride ldc
  int64_t ldc;
  void* c2;  // dgated: d u (row stride ldc)
  const void* bias;
  const void* bias2;
  const void* res;
  int64_t ld_res;
  void* pre;  // plain: pre-activation; gated: g (null: not saved)
  void* pre2;  // gated: u
  int64_t ld_pre;
  const void* aux;
  const void* aux2;
  int64_t ld_aux;
  int c_dt;
  const float* a_scale;     // int8: per row of A
  const float* b_scale;     // int8, scale: per column
  const int32_t* b_colsum;  // int8 with kLayoutI8Quads: per column
  int nthreads;
  // Heads store (fastllm.qkv_projection), when heads_S > 0: the plain epilogue (bias only: no activation,
  // residual or pre) writes output (m, n) into the attention layout instead of c[m * ldc + n]. Row m = (b, s) =
  // (m / S, m % S), column n = (head j, d) = (n / D, n % D); heads j < Hq go to c (q: B x Hq x S x D), the next Hkv
  // to c_k and the last Hkv to c_v (k, v: B x Hkv x S x D), each contiguous; N = (Hq + 2 Hkv) D, ldc unused.
  int64_t heads_S = 0, heads_D = 0, heads_Hq = 0, heads_Hkv = 0;
  void* c_k = nullptr;
  void* c_v = nullptr;
};

void pack_b(const PackB& p);
void gemm(const Gemm& g);

// ---------------------------------------------------------------------------------------------------
// Scalar activations in double (the portable path, and the column tails of the AVX2 epilogue).

static inline double act_d(int act, double x) {
  switch (act) {
    case kActGelu: return 0.5 * x * std::erfc(-x * 0.70710678118654752440);
    case kActGeluTanh: {
      const double z = 0.7978845608028654 * (x + 0.044715 * x * x * x);
      return x / (1.0 + std::exp(-2.0 * z));  // 0.5 x (1 + tanh z) = x sigmoid(2z)
    }
    case kActQuickGelu: return x / (1.0 + std::exp(-1.702 * x));
    case kActRelu: return x > 0.0 ? x : (x == x ? 0.0 : x);
    case kActSilu: return x / (1.0 + std::exp(-x));
    default: return x;
  }
}

static inline double dact_d(int act, double x) {
  switch (act) {
    case kActGelu: {
      const double cdf = 0.5 * std::erfc(-x * 0.70710678118654752440);
      return cdf + x * 0.3989422804014327 * std::exp(-0.5 * x * x);
    }
    case kActGeluTanh: {
      const double z = 0.7978845608028654 * (x + 0.044715 * x * x * x);
      const double s = 1.0 / (1.0 + std::exp(-2.0 * z));
      return s + x * 2.0 * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * x * x);
    }
    case kActQuickGelu: {
      const double s = 1.0 / (1.0 + std::exp(-1.702 * x));
      return s + 1.702 * x * s * (1.0 - s);
    }
    case kActRelu: return x > 0.0 ? 1.0 : 0.0;
    case kActSilu: {
      const double s = 1.0 / (1.0 + std::exp(-x));
      return s * (1.0 + x * (1.0 - s));
    }
    default: return 1.0;
  }
}

template <class S>
static inline float ld(const void* p, int64_t i) {
  return S::load(static_cast<const typename S::T*>(p) + i);
}
template <class S>
static inline void st(void* p, int64_t i, float v) {
  static_cast<typename S::T*>(p)[i] = S::from(v);
}

// Epilogue of one accumulator row, scalar: columns [c0, c1) of accumulator row `acc` (panel p's 16 columns;
// gated: 8 output columns), output row m. The AVX2 path calls it for partial 8-column groups.
template <class S>
static inline void epilogue_cols_scalar(const Gemm& g, const float* acc, int64_t m, int64_t p, int64_t c0,
                                        int64_t c1) {
  if (g.mode == kEpiInt8 || g.mode == kEpiScale) {
    for (int64_t j = c0; j < c1; ++j) {
      const int64_t n = p * kNR + j;
      float v;
      if (g.mode == kEpiInt8) {
        int32_t iv;
        std::memcpy(&iv, acc + j, 4);  // the tile holds int32 sums
        if (g.b_colsum) iv -= 128 * g.b_colsum[n];
        v = static_cast<float>(iv) * g.a_scale[m];
        v = v * g.b_scale[n];
      } else {
        v = acc[j] * g.b_scale[n];
      }
      if (g.bias) v += ld<S>(g.bias, n);
      st<S>(g.c, m * g.ldc + n, v);
    }
    return;
  }
  if (g.mode == kEpiGated) {
    for (int64_t j = c0; j < c1; ++j) {
      const int64_t n = p * 8 + j;
      float gv = acc[j], uv = acc[8 + j];
      if (g.bias) gv += ld<S>(g.bias, n);
      if (g.bias2) uv += ld<S>(g.bias2, n);
      if (g.pre) st<S>(g.pre, m * g.ld_pre + n, gv), st<S>(g.pre2, m * g.ld_pre + n, uv);
      st<S>(g.c, m * g.ldc + n, static_cast<float>(act_d(g.act, gv) * uv));
    }
    return;
  }
  for (int64_t j = c0; j < c1; ++j) {
    const int64_t n = p * kNR + j;
    const float v = acc[j];
    switch (g.mode) {
      case kEpiDact:
        st<S>(g.c, m * g.ldc + n, static_cast<float>(v * dact_d(g.act, ld<S>(g.aux, m * g.ld_aux + n))));
        break;
      case kEpiDgated: {
        const double gv = ld<S>(g.aux, m * g.ld_aux + n), uv = ld<S>(g.aux2, m * g.ld_aux + n);
        st<S>(g.c, m * g.ldc + n, static_cast<float>(v * uv * dact_d(g.act, gv)));
        st<S>(g.c2, m * g.ldc + n, static_cast<float>(v * act_d(g.act, gv)));
        break;
      }
      default: {
        float pre = v;
        if (g.bias) pre += ld<S>(g.bias, n);
        if (g.pre) st<S>(g.pre, m * g.ld_pre + n, pre);
        float y = g.act == kActNone ? pre : static_cast<float>(act_d(g.act, pre));
        if (g.res) y += ld<S>(g.res, m * g.ld_res + n);
        st<S>(g.c, m * g.ldc + n, y);
      }
    }
  }
}

// Output columns held by panel p (clipped at N): plain 16, gated 8.
static inline int64_t panel_out_cols(const Gemm& g, int64_t p) {
  const int64_t w = g.mode == kEpiGated ? 8 : kNR;
  return imin(w, g.N - p * w);
}

// The heads store (Gemm::heads_S) of rows [m, m + rows) of panel p: out = acc + bias, rounded once. The panel's
// columns go in runs that stay inside one head (contiguous in q, k or v); Run::run<S>(dst, acc, bias, len) stores
// one run of one row (bias: at the run's first column, or null). Two divisions per row and run: a 16-column panel
// is one run when D % 16 == 0, at most ceil(16 / D) + 1 otherwise.
template <class S, class Run>
static inline void epilogue_heads(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
  using T = typename S::T;
  const int64_t Sq = g.heads_S, D = g.heads_D, Hq = g.heads_Hq, Hkv = g.heads_Hkv;
  const int64_t n0 = p * kNR, w = panel_out_cols(g, p);
  for (int64_t j = 0; j < w;) {
    const int64_t n = n0 + j, head = n / D, d = n - head * D, len = imin(w - j, D - d);
    void* out = g.c;  // q, k or v, and the head's index h there among H heads
    int64_t h = head, H = Hq;
    if (head >= Hq + Hkv)
      out = g.c_v, h = head - Hq - Hkv, H = Hkv;
    else if (head >= Hq)
      out = g.c_k, h = head - Hq, H = Hkv;
    T* col = static_cast<T*>(out) + h * Sq * D + d;  // (b, h, s, d) at ((b H + h) S + s) D + d
    const T* bias = g.bias ? static_cast<const T*>(g.bias) + n : nullptr;
    for (int r = 0; r < rows; ++r) {
      const int64_t b = (m + r) / Sq, s = m + r - b * Sq;
      Run::template run<S>(col + (b * H * Sq + s) * D, tile + r * ldt + j, bias, len);
    }
    j += len;
  }
}

namespace {  // internal linkage (common.h): the ISA TUs instantiate their own copies

// The portable Run of epilogue_heads (and the AVX2 one's tail): per element, as the plain epilogue.
struct HeadsRunScalar {
  template <class S>
  static void run(typename S::T* dst, const float* acc, const typename S::T* bias, int64_t len) {
    for (int64_t i = 0; i < len; ++i) {
      float v = acc[i];
      if (bias) v += S::load(bias + i);
      dst[i] = S::from(v);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The blocked driver, shared by every ISA path. Ops provides:
//   kMR, kMC, kKC: rows of a micro-tile, cache blocking; kPanels: B panels per micro-kernel call (1 or 2), and
//       kPanelsSkinny when the row block has at most 2 rows (the taller tiles' B panel stays in L1 across row tiles)
//   pack_a(g, m0, mr, k0, kc, dst), a_words(kc): A's block in the micro-kernel's layout (OpsShape below)
//   ukr(R, np, kc, a_panel, b_panel, b_pstride, b_dt, c, ldc, load): c (R x 16 np fp32) (+)= A_panel times
//       np panels (the second at b_panel + b_pstride bytes) over kc steps
//   epilogue(g, tile, ldt, m, rows, p): the epilogue of rows [m, m + rows) of panel p from the fp32 tile

template <class S, int64_t MR>
static void pack_a_block(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* dst) {
  const auto* a = static_cast<const typename S::T*>(g.a);
  for (int64_t r0 = 0; r0 < mr; r0 += MR) {
    float* d = dst + r0 * kc;
    const int64_t rows = imin(MR, mr - r0);
    for (int64_t r = 0; r < MR; ++r) {
      if (r >= rows) {
        for (int64_t k = 0; k < kc; ++k) d[k * MR + r] = 0.f;
        continue;
      }
      const typename S::T* src = a + (m0 + r0 + r) * g.a_rs + k0 * g.a_cs;
      if (g.a_cs == 1) {
        for (int64_t k = 0; k < kc; ++k) d[k * MR + r] = S::to(src[k]);
      } else if (g.a_rs != 1) {
        for (int64_t k = 0; k < kc; ++k) d[k * MR + r] = S::to(src[k * g.a_cs]);
      }
    }
    if (g.a_cs != 1 && g.a_rs == 1) {  // a transposed view (dy^T in the backward): the rows of step k adjacent
      const typename S::T* src = a + (m0 + r0) + k0 * g.a_cs;
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t r = 0; r < rows; ++r) d[k * MR + r] = S::to(src[k * g.a_cs + r]);
    }
  }
}

// A in k-groups for the integer and dot-product kernels: [ceil(kc/G)][MR] 32-bit words per micro-panel, word
// (j, r) = elements k = G j .. G j + G - 1 of row r, each mapped by P::cvt; rows past M and k past kc hold
// cvt(0). P: kG, E (A's element type), D (the packed element type), cvt, and row(d32, src, kc, MR): the
// words of one contiguous row (d32 steps by MR), the fast path.
template <class P, int64_t MR>
static void pack_a_groups(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* dst_f) {
  using E = typename P::E;
  constexpr int64_t G = P::kG;
  const auto* a = static_cast<const E*>(g.a);
  auto* dst = reinterpret_cast<typename P::D*>(dst_f);
  const int64_t kcg = (kc + G - 1) / G;
  auto at = [](int64_t k, int64_t r) { return (k / G) * MR * G + r * G + (k % G); };  // (k, r) in a micro-panel
  for (int64_t r0 = 0; r0 < mr; r0 += MR) {
    auto* d = dst + r0 * kcg * G;
    const int64_t rows = imin(MR, mr - r0);
    if (g.a_cs != 1 && g.a_rs == 1) {  // a transposed view: the rows of step k adjacent
      const E* src = a + (m0 + r0) + k0 * g.a_cs;
      for (int64_t k = 0; k < G * kcg; ++k)
        for (int64_t r = 0; r < MR; ++r) d[at(k, r)] = P::cvt(r < rows && k < kc ? src[k * g.a_cs + r] : E(0));
      continue;
    }
    for (int64_t r = 0; r < MR; ++r) {
      const E* src = r < rows ? a + (m0 + r0 + r) * g.a_rs + k0 * g.a_cs : nullptr;
      if (src != nullptr && g.a_cs == 1) {
        P::row(reinterpret_cast<uint32_t*>(d) + r, src, kc, MR);
        continue;
      }
      for (int64_t k = 0; k < G * kcg; ++k) d[at(k, r)] = P::cvt(src && k < kc ? src[k * g.a_cs] : E(0));
    }
  }
}

namespace {  // internal linkage: the portable and the ISA TUs each instantiate their own copies (common.h)

// The words of a contiguous row whose k-groups are whole bytes: word j = the bytes of elements G j .. G j + G - 1
// XOR Flip (d32 steps by MR); the last, partial group padded with zero bytes (then flipped).
template <int64_t G, uint32_t Flip, class E>
static inline void copy_groups(uint32_t* d32, const E* src, int64_t kc, int64_t MR) {
  const int64_t full = kc / G;
  for (int64_t j = 0; j < full; ++j) {
    uint32_t v;
    std::memcpy(&v, src + G * j, 4);
    d32[j * MR] = v ^ Flip;
  }
  if (kc % G) {
    uint32_t v = 0;
    std::memcpy(&v, src + G * full, static_cast<size_t>(kc % G) * sizeof(E));
    d32[full * MR] = v ^ Flip;
  }
}

// bf16 k-pairs (the AVX512-BF16 kernel): a row's pairs are its 32-bit words as they are.
struct APairsBf16 {
  static constexpr int64_t kG = 2;
  using E = uint16_t;
  using D = uint16_t;
  static uint16_t cvt(uint16_t v) { return v; }
  static void row(uint32_t* d32, const uint16_t* src, int64_t kc, int64_t MR) { copy_groups<2, 0>(d32, src, kc, MR); }
};

// int8 as sign-extended int16 k-pairs (the AVX2 and portable W8A8 kernels, vpmaddwd).
struct APairsI16 {
  static constexpr int64_t kG = 2;
  using E = int8_t;
  using D = int16_t;
  static int16_t cvt(int8_t v) { return v; }
  static void row(uint32_t* d32, const int8_t* src, int64_t kc, int64_t MR) {
    for (int64_t j = 0; j < (kc + 1) / 2; ++j) {
      const int16_t lo = src[2 * j], hi = 2 * j + 1 < kc ? src[2 * j + 1] : 0;
      d32[j * MR] = static_cast<uint16_t>(lo) | (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
    }
  }
};

// int8 as u8 k-quads, a + 128 in each byte (the VNNI kernel's unsigned operand; a + 128 (mod 256) = a ^ 0x80);
// padding k are 128 (times B's zero padding: nothing).
struct AQuadsU8 {
  static constexpr int64_t kG = 4;
  using E = int8_t;
  using D = uint8_t;
  static uint8_t cvt(int8_t v) { return static_cast<uint8_t>(static_cast<int>(v) + 128); }
  static void row(uint32_t* d32, const int8_t* src, int64_t kc, int64_t MR) {
    copy_groups<4, 0x80808080u>(d32, src, kc, MR);
  }
};

// How an Ops packs A: fp32 rows, or one of the k-group layouts above.
enum APack : int { kAPackF32, kAPackBf16Pairs, kAPackI16Pairs, kAPackU8Quads };

// The shape part of an Ops: tile rows, cache blocking, panels per call (NPS: when the row block has at most 2 rows,
// the decode GEMV; see gemm_avx2.cpp), A packing (derive and add ukr and epilogue).
template <int64_t MR, int64_t MC, int64_t KC, int64_t NP, APack P, int64_t NPS = NP>
struct OpsShape {
  static constexpr int64_t kMR = MR, kMC = MC, kKC = KC, kPanels = NP, kPanelsSkinny = NPS;
  static void pack_a(const Gemm& g, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float* d) {
    if constexpr (P == kAPackBf16Pairs) return pack_a_groups<APairsBf16, MR>(g, m0, mr, k0, kc, d);
    if constexpr (P == kAPackI16Pairs) return pack_a_groups<APairsI16, MR>(g, m0, mr, k0, kc, d);
    if constexpr (P == kAPackU8Quads) return pack_a_groups<AQuadsU8, MR>(g, m0, mr, k0, kc, d);
    if constexpr (P == kAPackF32) {
      with_float_dtype(g.a_dt, [&](auto s) { pack_a_block<decltype(s), MR>(g, m0, mr, k0, kc, d); });
    }
  }
  // 32-bit words per packed row of A: kc fp32, or the k-groups of 2 (pairs) or 4 (quads)
  static int64_t a_words(int64_t kc) {
    constexpr int64_t G = P == kAPackF32 ? 1 : (P == kAPackU8Quads ? 4 : 2);
    return (kc + G - 1) / G;
  }
};

}  // namespace

template <class Ops>
void gemm_impl(const Gemm& g) {
  constexpr int64_t kMR = Ops::kMR, kMC = Ops::kMC, kKC = Ops::kKC;
  const bool gated = g.mode == kEpiGated;
  const int64_t M = g.M, K = g.K, panels = num_panels(g.N, gated);
  const int nt = g.nthreads < 1 ? 1 : g.nthreads;
  int64_t mblocks = (M + kMC - 1) / kMC;
  const int64_t mc = ((M + mblocks - 1) / mblocks + kMR - 1) / kMR * kMR;  // balanced, whole micro-tiles
  mblocks = (M + mc - 1) / mc;
  // split the columns too when there are few row blocks (decode), and to bound the per-task buffer: about 4 tasks
  // per thread, so that claiming balances a late thread (parallel.h); 8 cost more than they balanced (a task has a
  // fixed cost of ~1 us: 1x576x1536 fp32 on 2 threads took ~10% longer). Each output element's sums do not depend
  // on the split: results do not depend on nt.
  int64_t nsplit = imax(1, imin(panels, (4 * nt + mblocks - 1) / mblocks));
  nsplit = imax(nsplit, (panels + kMaxPanelsPerTask - 1) / kMaxPanelsPerTask);
  const int64_t ppt = (panels + nsplit - 1) / nsplit;
  nsplit = (panels + ppt - 1) / ppt;
  const int64_t kblocks = K > 0 ? (K + kKC - 1) / kKC : 1;
  const int64_t kcmax = K > 0 ? round_up8((K + kblocks - 1) / kblocks) : 0;
  const int64_t mcp = (mc + kMR - 1) / kMR * kMR;
  const int64_t ldt = ppt * kNR + kNR;  // +16: rows of the C buffer must not be 4 KiB apart (L1 set aliasing)
  const int64_t per_thread = mcp * kcmax + mcp * ldt + 64;
  float* scratch = alloc_floats(static_cast<size_t>(per_thread) * nt);
  const int64_t ntasks = mblocks * nsplit;
  const int64_t bsz = packed_elem_bytes(g.b_dt, g.b_layout);

  parallel_for(ntasks, nt, [&](int64_t t, int slot) {
    float* apack = scratch + slot * per_thread;
    float* cbuf = apack + mcp * kcmax;
    const int64_t mb = t / nsplit, ns = t % nsplit;
    const int64_t m0 = mb * mc, mr = imin(mc, M - m0);
    const int64_t p0 = ns * ppt, p1 = imin(panels, p0 + ppt);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = kb * kcmax, kc = imax(0, imin(kcmax, K - k0));
      const bool last = kb + 1 == kblocks;
      Ops::pack_a(g, m0, mr, k0, kc, apack);
      const int64_t kp = panel_k(K, g.b_layout);  // k rows per packed panel
      const int64_t a_panel = Ops::a_words(kc);    // 32-bit words per packed A row (fp32: kc; pairs: kc/2 ...)
      const int64_t pstep = mr <= 2 ? Ops::kPanelsSkinny : Ops::kPanels;
      for (int64_t p = p0; p < p1; p += pstep) {
        const char* bp = static_cast<const char*>(g.b) + (p * kp + k0) * kNR * bsz;
        const int np = static_cast<int>(imin(pstep, p1 - p));  // panels in this step
        float* ct = cbuf + (p - p0) * kNR;
        for (int64_t r0 = 0; r0 < mr; r0 += kMR) {
          const int rows = static_cast<int>(imin(kMR, mr - r0));
          Ops::ukr(rows, np, kc, apack + r0 * a_panel, bp, kp * kNR * bsz, g.b_dt, ct + r0 * ldt, ldt, kb > 0);
          if (last)
            for (int q = 0; q < np; ++q) Ops::epilogue(g, ct + r0 * ldt + q * kNR, ldt, m0 + r0, rows, p + q);
        }
      }
    }
  });
  std::free(scratch);
}

}  // namespace fastllm
