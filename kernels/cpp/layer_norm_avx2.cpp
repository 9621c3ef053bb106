// Fused (add +) LayerNorm / RMSNorm, AVX2 + FMA + F16C path. Same math and pass structure as
// layer_norm.cpp (see there); this file adds 8-wide vectors, two accumulators per reduction, fp16/bf16
// conversion in registers and non-temporal stores for outputs too large to stay in cache.
//
// Memory traffic per row (the op is bandwidth bound): read x (+ residual), write out (+ h); every
// other pass re-reads the fp32 copy of the row from L1/L2. With `stream`, output stores bypass the cache
// (no read-for-ownership), which is what lets the fused add+norm move 4 streams instead of eager's 7.
//
// Compiled with -mavx2 -mfma -mf16c; only reached when cpu_features.cpp saw AVX2, FMA and F16C.
#include <immintrin.h>

#include <cmath>

#include "layer_norm.h"

namespace fastllm {
namespace {

// Storage policies: P is the packed (storage) vector of 8 elements.
//   pack(v)            fp32 -> storage, round to nearest even
//   pack_rt(v, &r)     the same, and r = the stored value widened back to fp32 (h as the backward sees it)
//   storep(p, v, st)   st: non-temporal store; the caller decides once per row (st implies p is aligned)
struct F32v {
  using T = float;
  using P = __m256;
  static constexpr uintptr_t kAlign = 32;
  static P loadp(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 unpack(P p) { return p; }
  static P pack(__m256 v) { return v; }
  static P pack_rt(__m256 v, __m256* r) {
    *r = v;
    return v;
  }
  static void storep(float* p, P v, bool st) {
    if (st)
      _mm256_stream_ps(p, v);
    else
      _mm256_storeu_ps(p, v);
  }
};

struct BF16v {
  using T = uint16_t;
  using P = __m128i;
  static constexpr uintptr_t kAlign = 16;
  static P loadp(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static __m256 unpack(P p) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(p), 16)); }
  // Round to nearest even on the bit pattern: add 0x7fff + the lsb of the kept half, keep the top half.
  // No NaN special case is needed here: every NaN these kernels pack either came from a bf16 input
  // (low 16 bits zero, so the bias cannot carry out of them) or was made by the FPU (the default quiet
  // NaN, low bits zero too); x86 arithmetic propagates an operand NaN's payload unchanged.
  static __m256i round_bits(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  }
  static P pack_bits(__m256i r) {
    const __m256i hi = _mm256_srli_epi32(r, 16);  // 8 x u32 in [0, 0xffff]
    // packus works per 128-bit lane: (a0..a3 a0..a3 | a4..a7 a4..a7) -> gather qwords 0 and 2
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xd8));
  }
  static P pack(__m256 v) { return pack_bits(round_bits(v)); }
  static P pack_rt(__m256 v, __m256* r) {
    const __m256i b = round_bits(v);
    *r = _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    return pack_bits(b);
  }
  static void storep(uint16_t* p, P v, bool st) {
    if (st)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), v);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
  }
};

struct F16v : BF16v {
  static __m256 unpack(P p) { return _mm256_cvtph_ps(p); }
  static P pack(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static P pack_rt(__m256 v, __m256* r) {
    const P p = pack(v);
    *r = unpack(p);
    return p;
  }
};

// Non-temporal stores for this row's output: requested and the row start is aligned for them (8-element
// steps then keep every vector aligned).
template <class S>
inline bool stream_row(bool stream, const void* p) {
  return stream && (reinterpret_cast<uintptr_t>(p) & (S::kAlign - 1)) == 0;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, rem) all ones: masks the padded tail of the last vector out of reductions.
inline __m256 tail_mask(int64_t rem) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), idx));
}

// Tail of a row (rem < 8 elements) through a zero-padded stack buffer, so the main loops stay full-width.
template <class S>
inline __m256 load_tail(const typename S::T* p, int64_t rem) {
  alignas(32) typename S::T tmp[8] = {};
  std::memcpy(tmp, p, static_cast<size_t>(rem) * sizeof(typename S::T));
  return S::unpack(S::loadp(tmp));
}

template <class S>
inline void store_tail(typename S::T* p, typename S::P v, int64_t rem) {
  alignas(32) typename S::T tmp[8];
  S::storep(tmp, v, false);
  std::memcpy(p, tmp, static_cast<size_t>(rem) * sizeof(typename S::T));
}

// Widen n elements (or fill with `fill` when p is null) into an fp32 buffer padded with zeros to 8.
template <class S>
inline void widen(float* dst, const typename S::T* p, int64_t n, float fill) {
  const int64_t nv = n / 8 * 8;
  for (int64_t j = 0; j < nv; j += 8)
    _mm256_store_ps(dst + j, p ? S::unpack(S::loadp(p + j)) : _mm256_set1_ps(fill));
  if (n > nv) {
    const __m256 m = tail_mask(n - nv);
    const __m256 v = p ? load_tail<S>(p + nv, n - nv) : _mm256_set1_ps(fill);
    _mm256_store_ps(dst + nv, _mm256_and_ps(v, m));
  }
}

// Row sums run over chunks of kChunk elements; each chunk's partial sum is added to the total, so
// rounding error grows with N/kChunk + kChunk/8 terms instead of N/8 (blocked summation).
constexpr int64_t kChunk = 512;

// sum((row - mean)^2) over n = nv + rem valid entries (blocked, padded lanes masked out)
inline float centered_sumsq(const float* row, int64_t nv, int64_t rem, float mean, __m256 mask) {
  const __m256 mv = _mm256_set1_ps(mean);
  __m256 tot = _mm256_setzero_ps();
  for (int64_t c = 0; c < nv; c += kChunk) {
    const int64_t ce = c + kChunk < nv ? c + kChunk : nv;
    __m256 q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
    int64_t j = c;
    for (; j + 16 <= ce; j += 16) {
      const __m256 d0 = _mm256_sub_ps(_mm256_load_ps(row + j), mv);
      const __m256 d1 = _mm256_sub_ps(_mm256_load_ps(row + j + 8), mv);
      q0 = _mm256_fmadd_ps(d0, d0, q0);
      q1 = _mm256_fmadd_ps(d1, d1, q1);
    }
    for (; j < ce; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_load_ps(row + j), mv);
      q0 = _mm256_fmadd_ps(d, d, q0);
    }
    tot = _mm256_add_ps(tot, _mm256_add_ps(q0, q1));
  }
  if (rem) {
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(_mm256_load_ps(row + nv), mv), mask);
    tot = _mm256_fmadd_ps(d, d, tot);
  }
  return hsum(tot);
}

template <class S>
struct Avx2Rows {
  using T = typename S::T;

  // The flags are template parameters and the struct fields are copied to locals: stores through T*
  // may alias `a` as far as the compiler knows, which otherwise reloads and re-tests them per vector.
  // scratch: row (Np) | weight (Np) | bias (Np), all fp32, 32-byte aligned, zero padded
  template <bool RMS, bool RES> static void fwd_rows(const NormFwd& a, int64_t r0, int64_t r1, float* scratch) {
    const int64_t N = a.N, Np = round_up8(N), nv = N / 8 * 8, rem = N - nv;
    const bool stream = a.stream;
    const float eps = a.eps;
    const int64_t x_stride = a.x_stride, res_stride = a.res_stride;
    float* row = scratch;
    float* wf = scratch + Np;
    float* bf = scratch + 2 * Np;
    widen<S>(wf, static_cast<const T*>(a.w), N, 1.f);
    widen<S>(bf, static_cast<const T*>(a.b), N, 0.f);
    const __m256 mask = tail_mask(rem);
    for (int64_t i = r0; i < r1; ++i) {
      const T* x = static_cast<const T*>(a.x) + i * x_stride;
      const T* r = RES ? static_cast<const T*>(a.res) + i * res_stride : nullptr;
      T* h = RES ? static_cast<T*>(a.h) + i * N : nullptr;
      T* y = static_cast<T*>(a.out) + i * N;
      const bool st_h = RES && stream_row<S>(stream, h), st_y = stream_row<S>(stream, y);
      // pass 1: h = round_T(x + r) -> row (fp32) and the h output; s = sum(h) or sum(h^2), blocked:
      // per-chunk partial sums folded into the total keep the rounding error near that of a pairwise sum
      __m256 s0 = _mm256_setzero_ps();
      int64_t j = 0;
      for (int64_t c = 0; c < nv; c += kChunk) {
        const int64_t ce = c + kChunk < nv ? c + kChunk : nv;
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
        const auto step = [&](int64_t k, __m256& acc) {
          __m256 v = S::unpack(S::loadp(x + k));  // (8,)
          if constexpr (RES) S::storep(h + k, S::pack_rt(_mm256_add_ps(v, S::unpack(S::loadp(r + k))), &v), st_h);
          _mm256_store_ps(row + k, v);
          acc = RMS ? _mm256_fmadd_ps(v, v, acc) : _mm256_add_ps(acc, v);
        };
        for (j = c; j + 16 <= ce; j += 16) {  // two accumulators hide the add latency
          step(j, p0);
          step(j + 8, p1);
        }
        if (j < ce) step(j, p0);
        s0 = _mm256_add_ps(s0, _mm256_add_ps(p0, p1));
      }
      j = nv;
      if (rem) {  // padded lanes load as 0 (and 0 + 0 rounds to 0), so they add nothing to s
        __m256 v = load_tail<S>(x + j, rem);
        if constexpr (RES) {
          const typename S::P hp = S::pack(_mm256_add_ps(v, load_tail<S>(r + j, rem)));
          store_tail<S>(h + j, hp, rem);
          v = S::unpack(hp);
        }
        _mm256_store_ps(row + j, v);
        s0 = RMS ? _mm256_fmadd_ps(v, v, s0) : _mm256_add_ps(s0, v);
      }
      float mean = 0.f, rstd;
      if constexpr (RMS) {
        rstd = rstd_of(hsum(s0), N, eps);
      } else {  // pass 2: variance about the mean, from the fp32 row in cache
        mean = hsum(s0) / static_cast<float>(N);
        rstd = rstd_of(centered_sumsq(row, nv, rem, mean, mask), N, eps);
      }
      // pass 3: y = (h - mean) * rstd * w + b
      const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
      for (j = 0; j < nv; j += 8) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(row + j), mv), rv);
        const __m256 v = _mm256_fmadd_ps(xh, _mm256_load_ps(wf + j), _mm256_load_ps(bf + j));
        S::storep(y + j, S::pack(v), st_y);
      }
      if (rem) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(row + j), mv), rv);
        store_tail<S>(y + j, S::pack(_mm256_fmadd_ps(xh, _mm256_load_ps(wf + j), _mm256_load_ps(bf + j))), rem);
      }
    }
    if (stream) _mm_sfence();  // order the non-temporal stores before the caller reads the outputs
  }

  // scratch: bwd_parts (layer_norm.h)
  template <bool RMS, bool DH> static void bwd_rows(const NormBwd& a, int64_t r0, int64_t r1, float* scratch) {
    const int64_t N = a.N, Np = round_up8(N), nv = N / 8 * 8, rem = N - nv;
    const bool stream = a.stream;
    const float eps = a.eps;
    const int64_t h_stride = a.h_stride, dy_stride = a.dy_stride, dh_stride = a.dh_stride;
    const auto [row, gb, wf, dwp, dbp, dwo, dbo] = bwd_parts(scratch, Np);
    widen<S>(wf, static_cast<const T*>(a.w), N, 1.f);
    const __m256 mask = tail_mask(rem);
    const float inv_n = 1.f / static_cast<float>(N);
    for (int64_t i = r0; i < r1; ++i) {
      const T* hr = static_cast<const T*>(a.h) + i * h_stride;
      const T* dy = static_cast<const T*>(a.dy) + i * dy_stride;
      const T* dh = DH ? static_cast<const T*>(a.dh) + i * dh_stride : nullptr;
      T* dx = static_cast<T*>(a.dx) + i * N;
      const bool st_dx = stream_row<S>(stream, dx);
      // pass 1: h -> row (fp32, zero padded), blocked sum or sum of squares
      __m256 s0 = _mm256_setzero_ps();
      int64_t j = 0;
      for (int64_t c = 0; c < nv; c += kChunk) {
        const int64_t ce = c + kChunk < nv ? c + kChunk : nv;
        __m256 p0 = _mm256_setzero_ps();
        for (j = c; j < ce; j += 8) {
          const __m256 v = S::unpack(S::loadp(hr + j));
          _mm256_store_ps(row + j, v);
          p0 = RMS ? _mm256_fmadd_ps(v, v, p0) : _mm256_add_ps(p0, v);
        }
        s0 = _mm256_add_ps(s0, p0);
      }
      j = nv;
      if (rem) {
        const __m256 v = load_tail<S>(hr + j, rem);
        _mm256_store_ps(row + j, v);
        s0 = RMS ? _mm256_fmadd_ps(v, v, s0) : _mm256_add_ps(s0, v);
      }
      float mean = 0.f, rstd;
      if constexpr (RMS) {
        rstd = rstd_of(hsum(s0), N, eps);
      } else {  // pass 2: variance
        mean = hsum(s0) / static_cast<float>(N);
        rstd = rstd_of(centered_sumsq(row, nv, rem, mean, mask), N, eps);
      }
      // pass 3: xhat, g = dy * w, sums of g and g*xhat, dw/db partials. Padded lanes have dy = 0, so
      // g = 0 there and they add nothing (xhat is finite: the padded row is 0).
      const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
      __m256 sg = _mm256_setzero_ps(), sgx = _mm256_setzero_ps();
      for (int64_t c = 0; c < Np; c += kChunk) {
        const int64_t ce = c + kChunk < Np ? c + kChunk : Np;
        __m256 pg = _mm256_setzero_ps(), pgx = _mm256_setzero_ps();
        for (j = c; j < ce; j += 8) {
          const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(row + j), mv), rv);
          const __m256 d = j < nv ? S::unpack(S::loadp(dy + j)) : load_tail<S>(dy + j, rem);
          const __m256 g = _mm256_mul_ps(d, _mm256_load_ps(wf + j));
          pg = _mm256_add_ps(pg, g);
          pgx = _mm256_fmadd_ps(g, xh, pgx);
          _mm256_store_ps(dwp + j, _mm256_fmadd_ps(d, xh, _mm256_load_ps(dwp + j)));
          _mm256_store_ps(dbp + j, _mm256_add_ps(d, _mm256_load_ps(dbp + j)));
          _mm256_store_ps(row + j, xh);
          _mm256_store_ps(gb + j, g);
        }
        sg = _mm256_add_ps(sg, pg);
        sgx = _mm256_add_ps(sgx, pgx);
      }
      const __m256 c1 = _mm256_set1_ps(hsum(sgx) * inv_n);
      const __m256 c2 = _mm256_set1_ps(RMS ? 0.f : hsum(sg) * inv_n);
      // pass 4: dx = rstd * (g - c2 - xhat * c1) (+ dh)
      for (j = 0; j < nv; j += 8) {
        const __m256 t = _mm256_sub_ps(_mm256_load_ps(gb + j), c2);
        __m256 v = _mm256_mul_ps(rv, _mm256_fnmadd_ps(_mm256_load_ps(row + j), c1, t));
        if constexpr (DH) v = _mm256_add_ps(v, S::unpack(S::loadp(dh + j)));
        S::storep(dx + j, S::pack(v), st_dx);
      }
      if (rem) {
        const __m256 t = _mm256_sub_ps(_mm256_load_ps(gb + j), c2);
        __m256 v = _mm256_mul_ps(rv, _mm256_fnmadd_ps(_mm256_load_ps(row + j), c1, t));
        if constexpr (DH) v = _mm256_add_ps(v, load_tail<S>(dh + j, rem));
        store_tail<S>(dx + j, S::pack(v), rem);
      }
      if (fold_due(i, r0, r1)) {
        fold_partials(dwp, dwo, Np);
        fold_partials(dbp, dbo, Np);
      }
    }
    if (stream) _mm_sfence();
  }

  // The Rows interface (layer_norm.h): the flags as template arguments.
  static void fwd(const NormFwd& a, int64_t r0, int64_t r1, float* s) {
    with_flags(a.rms, a.res != nullptr, [&](auto rms, auto res) { fwd_rows<rms, res>(a, r0, r1, s); });
  }

  static void bwd(const NormBwd& a, int64_t r0, int64_t r1, float* s) {
    with_flags(a.rms, a.dh != nullptr, [&](auto rms, auto dh) { bwd_rows<rms, dh>(a, r0, r1, s); });
  }
};

// The vector storage policy of a scalar one.
template <class S>
using VecOf = std::conditional_t<S::kCode == kF32, F32v, std::conditional_t<S::kCode == kBF16, BF16v, F16v>>;

}  // namespace

void norm_fwd_avx2(const NormFwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_norm_fwd<Avx2Rows<VecOf<decltype(s)>>>(a); });
}

void norm_bwd_avx2(const NormBwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_norm_bwd<Avx2Rows<VecOf<decltype(s)>>, decltype(s)>(a); });
}

}  // namespace fastllm
