// Flash attention on the CPU: argument blocks and the tiled drivers, shared by the portable
// (attention.cpp) and AVX2 (attention_avx2.cpp) paths, which differ only in their `Ops` (the GEMM
// micro-kernel, exp2 and the row-vector helpers).
//
// Glossary
//   B, Hq, Hkv, Sq, Sk, D   batch, query heads, key/value heads, query and key lengths, head dim
//   Hg = Hq / Hkv           query heads per kv head (GQA group). The Hg * Sq query rows of one (b, kv head)
//                           are one flattened row range ("group rows", row g -> head g / Sq, query g % Sq):
//                           a row block may span heads, and k/v are read once for all heads of the group
//                           (for decode, Hg * Sn rows make one block: the GEMM is Hg times wider).
//   BM, BN                  query rows per row block, keys per key block
//   Mp, Dp                  BM and D rounded up to whole 8-lane vectors
//   c = scale * log2(e)     exponents are in the log2 domain (exp2): x = fma(q.k, c, -m), see "Scales" below
//   St                      the score tile, *transposed*: (keys x query rows), query rows contiguous
//
// Why St is transposed: St = K_block . Qt needs K rows as broadcast operands (read straight from the
// input, no packing of K for fp32) and Qt = (c q)^T packed once per row block. Per-row softmax
// statistics then become elementwise max / add over the key rows of St (vertical, fully vectorised),
// and P V takes St^T as its A operand (consecutive query rows = consecutive floats).
//
// Forward (FlashAttention-2, Dao 2023; online softmax of Milakov & Gimelshein 2018), per row block:
//   for each key block: St = K Qt; mask; mx = max over keys; m' = max(m, mx); alpha = exp2(m - m');
//   P = exp2(St - m'); l = l alpha + sum(P); O = O alpha + P^T V.      out = O / l, stats = (m, l)
// A row with no visible key keeps m = -inf, l = 0: out = 0, stats = (+inf, 1); a NaN or +inf among a row's
// visible scores makes l NaN and the row NaN (see finish_row: no test in the key loop). Causal: key blocks past
// the last visible key of a row block are skipped; blocks that straddle a row's limit are masked element-wise.
// Decode shapes (few row blocks, long keys) split the keys into chunks computed in parallel whose
// partial (O, m, l) are merged at the end (flash-decoding, Dao et al. 2023).
//
// Backward (FlashAttention-2 order, probabilities recomputed from the stats), per (b, kv head, key chunk):
//   for each row block: pack Qt, Q, dO^T, dO, m, 1/l, delta = rowsum(dO * O);
//     for each key block: P = exp2(K Qt - m) / l (St is bit-identical to the forward's, so St - m is as
//                         exact as in the forward); dV += P dO; dP = V dO^T; dS = P (dP - delta);
//                         dK += dS Q; dQ += dS^T K
//   The task owns dK/dV of its keys (GQA: summed over the group's rows by construction) and, when there
//   is one chunk per (b, kv head), dQ of its rows: no atomics, deterministic for any thread count.
//   With fewer (b, kv head) pairs than threads, keys are split into chunks whose dQ partials are summed
//   in a fixed order afterwards.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "parallel.h"

namespace fastllm {

// mask dtype codes: DType for additive float masks, kMaskBool for bool (True = attend), kMaskNone.
constexpr int kMaskNone = -1;
constexpr int kMaskBool = 3;

struct AttnShape {
  const void* q;
  const void* k;
  const void* v;
  int64_t B, Hq, Hkv, Sq, Sk, D;
  int64_t qs[3], ks[3], vs[3];  // strides (batch, head, seq) in elements; head_dim stride is 1
  const void* mask;             // broadcast to (B, Hq, Sq, Sk) by strides (0 for broadcast dims) or null
  int mask_dtype;               // kMaskNone, kMaskBool, or a DType (additive)
  int64_t ms[4];
  bool causal, bottom_right;    // query i sees keys j <= i + offset, offset = Sk_b - Sq or 0
  float scale;
  int dtype;
  int nthreads;
};

struct AttnFwd {
  AttnShape s;
  void* out;              // (B, Hq, Sq, D), strides os (all 0: contiguous)
  int64_t os[3];          // out's strides (batch, head, seq) in elements; head_dim stride 1
  float* stats;           // (B, Hq, Sq, 2): m (row max, log2 domain; +inf for a row without keys), l
  const int32_t* kv_len;  // (B,) valid keys per sequence, or null (all Sk)
};

struct AttnBwd {
  AttnShape s;
  void* dq;                  // (B, Hq, Sq, D) contiguous
  void* dk;                  // (B, Hkv, Sk, D) contiguous
  void* dv;
  const void* dout;          // like q, strides dos
  const void* out;           // the forward output, strides os
  const float* stats;        // (B, Hq, Sq, 2) contiguous, from the forward
  int64_t os[3], dos[3];
};

void attn_fwd_scalar(const AttnFwd& a);
void attn_fwd_avx2(const AttnFwd& a);
void attn_bwd_scalar(const AttnBwd& a);
void attn_bwd_avx2(const AttnBwd& a);

namespace {  // internal linkage: each TU instantiates its own copy (see common.h)

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scales. The exponent of a probability is x = s log2(e) - m, s = scale (q.k) (+ mask), m the row max of
// s log2(e). It is formed as one fma, x = fma(St, cb, -m): the only rounding is that of the small result,
// as in eager's exp(s - max). So St holds raw q.k (cb = scale log2 e), pre-multiplying q by scale log2(e) as
// FlashAttention does would add a rounding per q element and one at the magnitude of s (fp32 gradients then
// drifted past 2x eager's error).
// An additive mask: apply_mask forms s = fma(q.k, scale, mask) in place (one rounding, as eager's) and those
// blocks use cb = log2(e). A scale <= 0 (max(St) * cb would not be the max of St * cb) folds scale into q
// (qc = scale): St is s, cb = log2(e) everywhere.
struct Scales {
  float qc;   // multiplier of q when packed (1, or scale when folded)
  float cm;   // multiplier of St in apply_mask's additive-mask step: s = fma(St, cm, mask)
  float cb;   // multiplier of St in the exponent
  float dk;   // dK = dk * dS^T (q qc): scale / qc
};

inline Scales scales_of(const AttnShape& s) {
  const bool fold = !(s.scale > 0.f);
  const bool additive = s.mask != nullptr && s.mask_dtype != kMaskBool;
  if (fold) return Scales{s.scale, 1.f, kLog2e, 1.f};
  return Scales{1.f, s.scale, additive ? kLog2e : s.scale * kLog2e, s.scale};
}

inline int64_t attn_bm(int64_t rows) { return rows <= 8 ? 8 : 48; }  // decode: one 8-wide query block
// Block sizes: BN a multiple of 6 (the micro-kernel's rows: no remainder tile); K, V, Qt, O and St stay
// in L2 (512 KiB). Measured at S = 2048, D = 64 on one Zen 3 core: (BM, BN) from (48, 96) to (144, 192) all
// within 3% of each other; smaller BM wastes less on the causal diagonal.
inline int64_t attn_bn(int64_t D) { return D > 128 ? 48 : 132; }

// Per-row metadata of a row block: where the row's q / mask live, and its last visible key + 1.
struct RowInfo {
  int64_t h, i;     // query head, query index
  int64_t lim;      // keys j < lim are visible before the mask (0: none)
  int64_t moff;     // mask element offset of (b, h, i, 0)
};

// Fills info for group rows [r0, r0 + M) of (b, hkv); returns (max lim, min lim) through kend/kmin.
inline void row_info(const AttnShape& s, int64_t b, int64_t hkv, int64_t r0, int64_t M, int64_t Skb, RowInfo* info,
                     int64_t* kend, int64_t* kmin) {
  const int64_t Hg = s.Hq / s.Hkv;
  const int64_t offset = s.bottom_right ? Skb - s.Sq : 0;
  int64_t hi = 0, lo = Skb;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t g = r0 + r, h = hkv * Hg + g / s.Sq, i = g % s.Sq;
    int64_t lim = Skb;
    if (s.causal) {
      const int64_t c = i + offset + 1;
      lim = c < 0 ? 0 : (c < Skb ? c : Skb);
    }
    info[r] = RowInfo{h, i, lim, b * s.ms[0] + h * s.ms[1] + i * s.ms[2]};
    hi = lim > hi ? lim : hi;
    lo = lim < lo ? lim : lo;
  }
  *kend = hi;
  *kmin = lo;
}

template <class S>
inline float mask_val(const void* m, int64_t off) {
  return S::load(static_cast<const typename S::T*>(m) + off);
}

// Scores St (n keys x Mp rows, log2 domain) of keys [kb, kb + n): -inf where invisible, + mask * log2e
// for additive masks. Only called for blocks that need it (a mask, or a row limit inside the block).
template <class MS>
void apply_mask_t(const AttnShape& s, const RowInfo* info, int64_t M, int64_t kb, int64_t n, float* St, int64_t Mp,
                  float cm) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t key = kb + j;
    float* row = St + j * Mp;
    for (int64_t r = 0; r < M; ++r) {
      if (key >= info[r].lim) {
        row[r] = kNegInf;
      } else if (s.mask != nullptr) {
        const float mv = mask_val<MS>(s.mask, info[r].moff + key * s.ms[3]);
        if (s.mask_dtype == kMaskBool) {
          if (mv == 0.f) row[r] = kNegInf;
        } else {
          row[r] = std::fma(row[r], cm, mv);  // s = scale q.k + mask (see Scales)
        }
      }
    }
  }
}

struct BoolMask {  // torch.bool is one byte, 0 or 1
  using T = uint8_t;
  static float load(const uint8_t* p) { return *p ? 1.f : 0.f; }
};

inline void apply_mask(const AttnShape& s, const RowInfo* info, int64_t M, int64_t kb, int64_t n, float* St,
                       int64_t Mp, float cm) {
  if (s.mask == nullptr) {  // row limits only (causal, kv_len): blank the tail of each column, no per-element test
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = imax(0, info[r].lim - kb); j < n; ++j) St[j * Mp + r] = kNegInf;
    return;
  }
  switch (s.mask_dtype) {
    case kMaskBool: return apply_mask_t<BoolMask>(s, info, M, kb, n, St, Mp, cm);
    case kBF16: return apply_mask_t<BF16s>(s, info, M, kb, n, St, Mp, cm);
    case kF16: return apply_mask_t<F16s>(s, info, M, kb, n, St, Mp, cm);
    default: return apply_mask_t<F32s>(s, info, M, kb, n, St, Mp, cm);
  }
}

// K or V rows [kb, kb + n) of (b, hkv) as fp32 rows for a GEMM operand: the input itself when it is fp32
// (and, for a B operand read 8 lanes at a time, D is a multiple of 8), else converted into buf (n x Dp,
// zero-padded columns). Returns the pointer and sets *ld to its row stride.
template <class Ops, class S>
const float* kv_rows(const void* base, const int64_t* st, int64_t b, int64_t hkv, int64_t kb, int64_t n, int64_t D,
                     int64_t Dp, bool as_b_operand, float* buf, int64_t* ld) {
  using T = typename S::T;
  const T* p = static_cast<const T*>(base) + b * st[0] + hkv * st[1] + kb * st[2];
  if (S::kIsF32 && (!as_b_operand || D % 8 == 0)) {
    *ld = st[2];
    return reinterpret_cast<const float*>(p);
  }
  for (int64_t j = 0; j < n; ++j) Ops::template load_row<S>(buf + j * Dp, p + j * st[2], D, Dp);
  *ld = Dp;
  return buf;
}

template <class S>
void prefetch_rows(const void* base, const int64_t* st, int64_t b, int64_t hkv, int64_t kb, int64_t n, int64_t D) {
  using T = typename S::T;
  const char* p = reinterpret_cast<const char*>(static_cast<const T*>(base) + b * st[0] + hkv * st[1] + kb * st[2]);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T)), stride = st[2] * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < n; ++j, p += stride)
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 2);  // into L2
}

// The scratch of one driver call: `per` floats and `bm` RowInfo per thread, and `shared` floats (the split
// partials), freed on every way out. Allocations happen before any parallel region (std::bad_alloc -> MemoryError).
struct Workspace {
  float* floats = nullptr;
  RowInfo* infos = nullptr;
  float* shared = nullptr;
  int64_t per, bm;

  Workspace(int nt, int64_t per_thread, int64_t bm_rows, int64_t shared_floats) : per(per_thread), bm(bm_rows) {
    try {
      floats = alloc_floats(static_cast<size_t>(nt) * per);
      infos = static_cast<RowInfo*>(std::malloc(sizeof(RowInfo) * static_cast<size_t>(nt * bm)));
      if (infos == nullptr) throw std::bad_alloc();
      if (shared_floats > 0) shared = alloc_floats(static_cast<size_t>(shared_floats));
    } catch (...) {
      release();
      throw;
    }
  }
  ~Workspace() { release(); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void release() {
    std::free(shared);
    std::free(infos);
    std::free(floats);
  }
  float* thread_floats(int t) const { return floats + t * per; }
  RowInfo* thread_infos(int t) const { return infos + t * bm; }
};

// carve(p, a, na, b, nb, ...): a = p, b = p + na, ...: a thread's arrays, laid out one after another in its scratch.
inline void carve(float*) {}
template <class... Rest>
inline void carve(float* p, float*& first, int64_t n, Rest&&... rest) {
  first = p;
  carve(p + n, static_cast<Rest&&>(rest)...);
}

// ------------------------------------------------------------------------------------------------
// Forward.

// out = O / l rounded to T; stats = (m, l). l == 0 exactly means the row saw no key (its max element alone
// adds exp2(0) = 1 otherwise): out = 0, stats = (+inf, 1). A NaN or +inf among the visible scores makes l NaN
// (exp2(NaN), or exp2(inf - inf) at the max), and l stays NaN through every rescale: the division then gives a
// NaN row, as torch's softmax does. So `l == 0`, never `!(l > 0)`, picks the empty rows (NaN > 0 is false).
template <class Ops, class S>
void finish_row(const AttnFwd& a, int64_t row, int64_t D, int64_t Dp, float* O, float m, float l) {
  using T = typename S::T;
  const bool empty = l == 0.f;
  if (empty) {
    std::memset(O, 0, sizeof(float) * Dp);
  } else {
    Ops::divide(O, Dp, l);
  }
  int64_t at = row * D;  // row = (b Hq + h) Sq + i
  if (a.os[0] | a.os[1] | a.os[2]) {
    const int64_t i = row % a.s.Sq, bh = row / a.s.Sq;
    at = (bh / a.s.Hq) * a.os[0] + (bh % a.s.Hq) * a.os[1] + i * a.os[2];
  }
  Ops::template store_row<S>(static_cast<T*>(a.out) + at, O, D);
  a.stats[2 * row] = empty ? kInf : m;
  a.stats[2 * row + 1] = empty ? 1.f : l;
}

template <class Ops, class S>
void attn_fwd_impl(const AttnFwd& a) {
  using T = typename S::T;
  const AttnShape& s = a.s;
  const int64_t Hg = s.Hq / s.Hkv, R = Hg * s.Sq, D = s.D, Dp = round_up8(D);
  const int64_t BM = attn_bm(R), BN = attn_bn(D), Mp = BM;
  const int64_t nrb = cdiv(R, BM);
  const int64_t groups = s.B * s.Hkv * nrb;
  const int nt0 = s.nthreads < 1 ? 1 : s.nthreads;
  // Split the keys when there are too few row blocks to keep every thread busy (decode).
  int64_t nsplit = 1;
  if (groups < 4 * nt0) nsplit = imin(cdiv(4 * nt0, groups), cdiv(s.Sk, 4 * BN));
  if (nsplit < 1) nsplit = 1;
  const int64_t chunk = cdiv(cdiv(s.Sk, nsplit), BN) * BN;
  nsplit = cdiv(s.Sk, chunk);
  const int64_t ntasks = groups * nsplit;
  const int nt = static_cast<int>(ntasks < nt0 ? ntasks : nt0);

  // per-thread scratch (floats): Qt D x Mp | St BN x Mp | O, Ob, Qr Mp x Dp | Kc, Vc BN x Dp | 5 row vectors Mp
  // (Qr: q rows, for the dot-product scores of decode-shaped blocks, BM == 8)
  const bool small = BM == 8;
  const int64_t per = D * Mp + BN * Mp + 3 * Mp * Dp + 2 * BN * Dp + 5 * Mp;
  // split partials (shared): O (Mp x Dp), m, l per task
  const Workspace ws(nt, per, BM, nsplit > 1 ? ntasks * (Mp * Dp + 2 * Mp) : 0);
  float* part = ws.shared;
  const Scales sc = scales_of(s);

  parallel_for(ntasks, nt, [&](int64_t task, int t) {
    float *Qt, *St, *O, *Ob, *Qr, *Kc, *Vc, *m, *l, *mx, *mu, *lsum;
    carve(ws.thread_floats(t), Qt, D * Mp, St, BN * Mp, O, Mp * Dp, Ob, Mp * Dp, Qr, Mp * Dp, Kc, BN * Dp, Vc, BN * Dp,
          m, Mp, l, Mp, mx, Mp, mu, Mp, lsum, Mp);
    RowInfo* info = ws.thread_infos(t);

    const int64_t sp = task % nsplit, grp = task / nsplit;
    const int64_t rb = grp % nrb, bh = grp / nrb, hkv = bh % s.Hkv, b = bh / s.Hkv;
    const int64_t r0 = rb * BM, M = (R - r0) < BM ? (R - r0) : BM;
    int64_t Skb = s.Sk;
    if (a.kv_len != nullptr) {
      const int64_t L = a.kv_len[b];
      Skb = L < 0 ? 0 : (L < s.Sk ? L : s.Sk);
    }
    int64_t kend, kmin;
    row_info(s, b, hkv, r0, M, Skb, info, &kend, &kmin);
    const int64_t k0 = sp * chunk, k1 = imin(k0 + chunk, kend);

    for (int64_t r = 0; r < Mp; ++r) {
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::memset(O, 0, sizeof(float) * Mp * Dp);
    if (k1 > k0) {
      // Qt = (c q)^T, zero columns past M
      std::memset(Qt, 0, sizeof(float) * D * Mp);
      for (int64_t r = 0; r < M; ++r) {
        const T* qr = static_cast<const T*>(s.q) + b * s.qs[0] + info[r].h * s.qs[1] + info[r].i * s.qs[2];
        for (int64_t d = 0; d < D; ++d) Qt[d * Mp + r] = S::load(qr + d) * sc.qc;
      }
      if (small) {
        std::memset(St, 0, sizeof(float) * BN * Mp);  // columns past M stay 0 (qk_small skips them)
        std::memset(Qr, 0, sizeof(float) * Mp * Dp);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t d = 0; d < D; ++d) Qr[r * Dp + d] = Qt[d * Mp + r];
      }
    }
    for (int64_t kb = k0; kb < k1; kb += BN) {
      const int64_t n = imin(BN, k1 - kb);
      // Decode (one small row block against many keys) streams K and V from DRAM once: ask for the next
      // block while this one is computed (the GEMMs walk K and V in column strips, which the hardware
      // prefetcher follows poorly).
      if (BM <= 8) {  // K is read row after row (the hardware prefetcher follows); V is not
        if (kb == k0) prefetch_rows<S>(s.v, s.vs, b, hkv, kb, imin(BN, k1 - kb), D);
        if (kb + BN < k1) prefetch_rows<S>(s.v, s.vs, b, hkv, kb + BN, imin(BN, k1 - kb - BN), D);
      }
      int64_t ldk, ldv;
      const float* Kb = kv_rows<Ops, S>(s.k, s.ks, b, hkv, kb, n, D, Dp, small, Kc, &ldk);
      for (int64_t r = 0; r < Mp; ++r) mx[r] = kNegInf;
      if (small) {  // decode: dot-product scores (reads Dp columns of K: kv_rows pads when D % 8 != 0)
        if (s.mask != nullptr || kb + n > kmin) {
          Ops::qk_small(n, M, Dp, Kb, ldk, Qr, St, Ob);  // Ob: a throwaway max
          apply_mask(s, info, M, kb, n, St, Mp, sc.cm);
          for (int64_t j = 0; j < n; ++j) Ops::vmax(mx, St + j * Mp, Mp);
        } else {
          Ops::qk_small(n, M, Dp, Kb, ldk, Qr, St, mx);
        }
      } else if (s.mask != nullptr || kb + n > kmin) {  // masked block: the max must come after the mask
        Ops::gemm(n, Mp, D, Kb, ldk, 1, Qt, Mp, St, Mp, false);
        apply_mask(s, info, M, kb, n, St, Mp, sc.cm);
        for (int64_t j = 0; j < n; ++j) Ops::vmax(mx, St + j * Mp, Mp);
      } else {
        Ops::gemm(n, Mp, D, Kb, ldk, 1, Qt, Mp, St, Mp, false, mx);
      }
      for (int64_t r = 0; r < Mp; ++r) mx[r] = mx[r] == kNegInf ? kNegInf : mx[r] * sc.cb;  // log2 domain
      // online softmax over this block, column-wise (one column per query row)
      for (int64_t r = 0; r < Mp; ++r) {
        const float mn = m[r] > mx[r] ? m[r] : mx[r];
        const float alpha = m[r] == kNegInf ? 0.f : std::exp2(m[r] - mn);
        mu[r] = mn == kNegInf ? 0.f : mn;
        m[r] = mn;
        mx[r] = alpha;  // reuse mx for alpha
      }
      Ops::exp2_block(St, n, Mp, Mp, mu, sc.cb, nullptr, lsum);
      for (int64_t r = 0; r < Mp; ++r) l[r] = l[r] * mx[r] + lsum[r];
      // O = alpha O + P^T V, the block's product formed on its own first: O's rounding error then grows
      // with the number of key blocks plus BN, not with Sk (a sequential sum over all keys)
      const float* Vb = kv_rows<Ops, S>(s.v, s.vs, b, hkv, kb, n, D, Dp, true, Vc, &ldv);
      Ops::gemm(M, Dp, n, St, 1, Mp, Vb, ldv, Ob, Dp, false);
      for (int64_t r = 0; r < M; ++r) Ops::axpby(O + r * Dp, Ob + r * Dp, Dp, mx[r]);
    }

    if (nsplit > 1) {
      float* po = part + task * (Mp * Dp + 2 * Mp);
      std::memcpy(po, O, sizeof(float) * Mp * Dp);
      std::memcpy(po + Mp * Dp, m, sizeof(float) * Mp);
      std::memcpy(po + Mp * Dp + Mp, l, sizeof(float) * Mp);
      return;
    }
    for (int64_t r = 0; r < M; ++r) {
      const int64_t row = (b * s.Hq + info[r].h) * s.Sq + info[r].i;
      finish_row<Ops, S>(a, row, D, Dp, O + r * Dp, m[r], l[r]);
    }
  });

  if (nsplit > 1) {  // merge the splits of each row block (once every task is done)
    parallel_for(groups, nt, [&](int64_t grp, int t) {
      float *Qt, *St, *O;
      carve(ws.thread_floats(t), Qt, D * Mp, St, BN * Mp, O, Mp * Dp);
      RowInfo* info = ws.thread_infos(t);
      const int64_t rb = grp % nrb, bh = grp / nrb, hkv = bh % s.Hkv, b = bh / s.Hkv;
      const int64_t r0 = rb * BM, M = (R - r0) < BM ? (R - r0) : BM;
      int64_t kend, kmin;
      row_info(s, b, hkv, r0, M, s.Sk, info, &kend, &kmin);
      for (int64_t r = 0; r < M; ++r) {
        // A split whose l is NaN met a NaN / +inf score (finish_row): the row is NaN whatever the other
        // splits hold, and its m may be anything (-inf included), so l, not m, is what is checked.
        float mm = kNegInf;
        bool nan = false;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const float* ml = part + (grp * nsplit + sp) * (Mp * Dp + 2 * Mp) + Mp * Dp;
          mm = ml[r] > mm ? ml[r] : mm;
          nan = nan || ml[Mp + r] != ml[Mp + r];
        }
        float ll = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
        std::memset(O, 0, sizeof(float) * Dp);
        if (!nan && mm != kNegInf) {
          for (int64_t sp = 0; sp < nsplit; ++sp) {
            const float* po = part + (grp * nsplit + sp) * (Mp * Dp + 2 * Mp);
            const float ms = po[Mp * Dp + r];
            if (ms == kNegInf) continue;
            const float w = std::exp2(ms - mm);
            ll += po[Mp * Dp + Mp + r] * w;
            Ops::axpy(O, po + r * Dp, Dp, w);
          }
        }
        const int64_t row = (b * s.Hq + info[r].h) * s.Sq + info[r].i;
        finish_row<Ops, S>(a, row, D, Dp, O, mm, ll);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.

template <class Ops, class S>
void attn_bwd_impl(const AttnBwd& a) {  // its preamble of tiling sizes is attn_fwd_impl's, kept inline to read as one
  using T = typename S::T;
  const AttnShape& s = a.s;
  const int64_t Hg = s.Hq / s.Hkv, R = Hg * s.Sq, D = s.D, Dp = round_up8(D);
  const int64_t BM = attn_bm(R), BN = attn_bn(D), Mp = BM;
  const int64_t nrb = cdiv(R, BM), nkb = cdiv(s.Sk, BN);
  const int nt0 = s.nthreads < 1 ? 1 : s.nthreads;
  const int64_t heads = s.B * s.Hkv;
  int64_t nchunk = heads >= nt0 ? 1 : imin(cdiv(2 * nt0, heads), nkb);
  const int64_t chunk = cdiv(nkb, nchunk) * BN;
  nchunk = cdiv(s.Sk, chunk);
  const int64_t ntasks = heads * nchunk;
  const int nt = static_cast<int>(ntasks < nt0 ? ntasks : nt0);

  // per-thread: Qt, dOt (D x Mp) | Q, dO, dQ, dQ block (Mp x Dp) | St, dPt (BN x Mp) | Kc, Vc, block (BN x Dp) |
  //             dK, dV accumulators (chunk x Dp) | m, 1/l, delta (Mp)
  // Every product is formed on its own in a block buffer and then added to its accumulator, so sums over
  // many rows (dK, dV: Hg * Sq of them) or keys (dQ) round like a blocked sum, not a sequential one.
  const int64_t per = 2 * D * Mp + 4 * Mp * Dp + 2 * BN * Mp + 3 * BN * Dp + 2 * chunk * Dp + 4 * Mp;
  // decode-shaped blocks (BM == 8): the forward formed St with qk_small (dot products, another summation order than
  // the GEMM's), so the backward does too: St bit-identical to the forward's, P = exp2(St cb - m) / l exactly the
  // forward's P (with the GEMM, an Sq = Sk = 1 case gave dV = dO (1 + 6 ulp) where eager is exact: the fuzzer found it)
  const bool small = BM == 8;
  // dQ partials per chunk (fp32, shared), summed in chunk order at the end; only with several chunks
  const int64_t qrows = s.B * s.Hq * s.Sq;
  const Workspace ws(nt, per, BM, nchunk > 1 ? nchunk * qrows * Dp : 0);
  float* dq_part = ws.shared;
  const Scales sc = scales_of(s);

  parallel_for(ntasks, nt, [&](int64_t task, int t) {
    float *Qt, *dOt, *Qr, *dOr, *dQr, *dQb, *St, *dPt, *Kc, *Vc, *Tb, *dKa, *dVa, *mrow, *linv, *delta, *mxs;
    carve(ws.thread_floats(t), Qt, D * Mp, dOt, D * Mp, Qr, Mp * Dp, dOr, Mp * Dp, dQr, Mp * Dp, dQb, Mp * Dp, St,
          BN * Mp, dPt, BN * Mp, Kc, BN * Dp, Vc, BN * Dp, Tb, BN * Dp, dKa, chunk * Dp, dVa, chunk * Dp, mrow, Mp,
          linv, Mp, delta, Mp, mxs, Mp);
    RowInfo* info = ws.thread_infos(t);

    const int64_t ch = task % nchunk, bh = task / nchunk, hkv = bh % s.Hkv, b = bh / s.Hkv;
    const int64_t c0 = ch * chunk, c1 = imin(c0 + chunk, s.Sk);
    std::memset(dKa, 0, sizeof(float) * (c1 - c0) * Dp);
    std::memset(dVa, 0, sizeof(float) * (c1 - c0) * Dp);
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const int64_t r0 = rb * BM, M = (R - r0) < BM ? (R - r0) : BM;
      int64_t kend, kmin;
      row_info(s, b, hkv, r0, M, s.Sk, info, &kend, &kmin);
      const int64_t k1 = imin(c1, kend);
      std::memset(dQr, 0, sizeof(float) * Mp * Dp);
      if (k1 > c0) {
        std::memset(Qt, 0, sizeof(float) * D * Mp);
        std::memset(dOt, 0, sizeof(float) * D * Mp);
        std::memset(Qr, 0, sizeof(float) * Mp * Dp);
        std::memset(dOr, 0, sizeof(float) * Mp * Dp);
        for (int64_t r = 0; r < Mp; ++r) {
          mrow[r] = kInf;  // padding rows: P = exp2(St - inf) = 0
          linv[r] = 1.f;
          delta[r] = 0.f;
        }
        for (int64_t r = 0; r < M; ++r) {
          const int64_t h = info[r].h, i = info[r].i;
          const T* qr = static_cast<const T*>(s.q) + b * s.qs[0] + h * s.qs[1] + i * s.qs[2];
          const T* dor = static_cast<const T*>(a.dout) + b * a.dos[0] + h * a.dos[1] + i * a.dos[2];
          const T* orow = static_cast<const T*>(a.out) + b * a.os[0] + h * a.os[1] + i * a.os[2];
          // delta = rowsum(dO * O) in double: dP - delta cancels where a row sees few keys, and an fp32 sum
          // over D made dq miss 2x eager's error there (once per row: the cost is nil)
          double dsum = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const float qv = S::load(qr + d) * sc.qc, dv = S::load(dor + d);
            Qt[d * Mp + r] = qv;
            Qr[r * Dp + d] = qv;
            dOt[d * Mp + r] = dv;
            dOr[r * Dp + d] = dv;
            dsum += static_cast<double>(dv) * static_cast<double>(S::load(orow + d));
          }
          delta[r] = static_cast<float>(dsum);
          const float* st = a.stats + 2 * ((b * s.Hq + h) * s.Sq + i);
          mrow[r] = st[0];
          linv[r] = 1.f / st[1];
        }
      }
      for (int64_t kb = c0; kb < k1; kb += BN) {
        const int64_t n = imin(BN, k1 - kb);
        int64_t ldk, ldv;
        const float* Kb = kv_rows<Ops, S>(s.k, s.ks, b, hkv, kb, n, D, Dp, true, Kc, &ldk);
        const float* Vb = kv_rows<Ops, S>(s.v, s.vs, b, hkv, kb, n, D, Dp, false, Vc, &ldv);
        if (small) {
          std::memset(St, 0, sizeof(float) * BN * Mp);  // columns past M stay 0 (qk_small skips them)
          for (int64_t r = 0; r < Mp; ++r) mxs[r] = kNegInf;
          Ops::qk_small(n, M, Dp, Kb, ldk, Qr, St, mxs);  // mxs: a throwaway max
        } else {
          Ops::gemm(n, Mp, D, Kb, ldk, 1, Qt, Mp, St, Mp, false);
        }
        if (s.mask != nullptr || kb + n > kmin) apply_mask(s, info, M, kb, n, St, Mp, sc.cm);
        Ops::exp2_block(St, n, Mp, Mp, mrow, sc.cb, linv, nullptr);  // P^T
        float* dKb = dKa + (kb - c0) * Dp;
        float* dVb = dVa + (kb - c0) * Dp;
        Ops::gemm(n, Dp, M, St, Mp, 1, dOr, Dp, Tb, Dp, false);  // dV += P^T dO
        Ops::vadd(dVb, Tb, n * Dp);
        Ops::gemm(n, Mp, D, Vb, ldv, 1, dOt, Mp, dPt, Mp, false);  // dP^T = V dO^T
        for (int64_t j = 0; j < n; ++j) Ops::dsoftmax(dPt + j * Mp, St + j * Mp, delta, Mp);  // dS^T
        Ops::gemm(n, Dp, M, dPt, Mp, 1, Qr, Dp, Tb, Dp, false);  // dK += dS^T (c Q)
        Ops::vadd(dKb, Tb, n * Dp);
        Ops::gemm(M, Dp, n, dPt, 1, Mp, Kb, ldk, dQb, Dp, false);  // dQ += dS K
        Ops::vadd(dQr, dQb, M * Dp);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t row = (b * s.Hq + info[r].h) * s.Sq + info[r].i;
        Ops::scale(dQr + r * Dp, Dp, s.scale);
        if (nchunk > 1)
          std::memcpy(dq_part + (ch * qrows + row) * Dp, dQr + r * Dp, sizeof(float) * Dp);
        else
          Ops::template store_row<S>(static_cast<T*>(a.dq) + row * D, dQr + r * Dp, D);
      }
    }
    for (int64_t j = c0; j < c1; ++j) {
      const int64_t row = (b * s.Hkv + hkv) * s.Sk + j;
      Ops::scale(dKa + (j - c0) * Dp, Dp, sc.dk);
      Ops::template store_row<S>(static_cast<T*>(a.dk) + row * D, dKa + (j - c0) * Dp, D);
      Ops::template store_row<S>(static_cast<T*>(a.dv) + row * D, dVa + (j - c0) * Dp, D);
    }
  });

  if (nchunk > 1) {  // dq: the chunks' partials summed in chunk order
    parallel_chunks(qrows, nt, 4, [&](int64_t row0, int64_t row1, int) {
      for (int64_t row = row0; row < row1; ++row) {
        float* acc = dq_part + row * Dp;
        for (int64_t ch = 1; ch < nchunk; ++ch) Ops::axpy(acc, dq_part + (ch * qrows + row) * Dp, Dp, 1.f);
        Ops::template store_row<S>(static_cast<T*>(a.dq) + row * D, acc, D);
      }
    });
  }
}

}  // namespace
}  // namespace fastllm
