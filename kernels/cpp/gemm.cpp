// GEMM engine: B packing, the portable micro-kernel and epilogue, and the ISA dispatch (see gemm.h).
#include "gemm.h"

#include <stdexcept>

namespace fastllm {

// The ISA paths' entry points (gemm_avx2.cpp, gemm_avx512*.cpp, int8_avx512vnni.cpp), called only where built
// (common.h, kBuilt*) and only at an ISA level that reaches them.
void gemm_avx2(const Gemm& g);
void gemm_avx2_i8(const Gemm& g);
void gemm_avx512(const Gemm& g);
void gemm_avx512bf16(const Gemm& g);
void gemm_avx512vnni(const Gemm& g);

namespace {

// One panel. The loop order follows the source: a weight read as B (s_k == 1, nn.Linear layout) is read along
// k for each of the 16 columns; a row-major B (s_n == 1: activations, weights in the backward) is read 16
// contiguous columns per k. (The other order strides through memory: it packed a row-major 9 MB B at ~4 GB/s.)
template <class S>
void pack_panel(const PackB& pb, int64_t p) {
  const bool gated = pb.src2 != nullptr;
  const bool pairs = pb.layout == kLayoutPairs;  // bf16 only (checked): (k, c) at (k/2)*32 + 2c + k%2
  const bool to_bf16 = pack_dtype(pb.src_dt) == kBF16;
  const int64_t K = pb.K, kp = panel_k(K, pb.layout);
  using T = typename S::T;
  const T* col[kNR];
  int64_t pos[kNR];
  for (int c = 0; c < kNR; ++c) {
    const int64_t n = gated ? p * 8 + (c & 7) : p * kNR + c;
    col[c] = n < pb.N ? static_cast<const T*>(gated && c >= 8 ? pb.src2 : pb.src) + n * pb.s_n : nullptr;
    pos[c] = pairs ? 2 * c : (to_bf16 ? kBf16Perm[c] : c);
  }
  auto put = [&](int64_t k, int c, const T* s) {  // element (k, c) from s (null: zero)
    const int64_t at = pairs ? (k / 2) * 32 + pos[c] + (k & 1) : k * kNR + pos[c];
    if (to_bf16)
      static_cast<uint16_t*>(pb.dst)[p * kp * kNR + at] = s ? *reinterpret_cast<const uint16_t*>(s) : 0;
    else
      static_cast<float*>(pb.dst)[p * kp * kNR + at] = s ? S::load(s) : 0.f;
  };
  if (pb.layout == kLayoutI8Rows || pb.layout == kLayoutI16Pairs || pb.layout == kLayoutI8Quads) {
    for (int c = 0; c < kNR; ++c) {
      const int8_t* s = reinterpret_cast<const int8_t*>(col[c]);
      int32_t sum = 0;
      for (int64_t k = 0; k < kp; ++k) {
        const int8_t v = s && k < K ? s[k * pb.s_k] : 0;
        sum += v;
        if (pb.layout == kLayoutI8Rows)
          static_cast<int8_t*>(pb.dst)[p * kp * kNR + k * kNR + c] = v;
        else if (pb.layout == kLayoutI16Pairs)
          static_cast<int16_t*>(pb.dst)[p * kp * kNR + (k / 2) * 32 + 2 * c + (k & 1)] = v;
        else
          static_cast<int8_t*>(pb.dst)[p * kp * kNR + (k / 4) * 64 + 4 * c + (k & 3)] = v;
      }
      if (pb.colsum != nullptr) pb.colsum[p * kNR + c] = sum;
    }
    return;
  }
  if (pb.s_k == 1 && pb.s_n != 1) {
    for (int c = 0; c < kNR; ++c)
      for (int64_t k = 0; k < kp; ++k) put(k, c, col[c] && k < K ? col[c] + k : nullptr);
  } else {
    for (int64_t k = 0; k < kp; ++k)
      for (int c = 0; c < kNR; ++c) put(k, c, col[c] && k < K ? col[c] + k * pb.s_k : nullptr);
  }
}

template <class S>
void pack_all(const PackB& pb);

struct I8s {  // int8 storage, for pack_panel's column pointers (load is unused for int8 layouts)
  using T = int8_t;
  static constexpr int kCode = kI8;
  static float load(const int8_t* p) { return *p; }
};

template <class S>
void pack_all(const PackB& pb) {
  const int64_t panels = num_panels(pb.N, pb.src2 != nullptr);
  parallel_chunks(panels, pb.nthreads, 4, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p) pack_panel<S>(pb, p);
  });
}

// The portable epilogue: scalar, per row and column.
struct ScalarEpilogue {
  static void epilogue(const Gemm& g, const float* tile, int64_t ldt, int64_t m, int rows, int64_t p) {
    const int64_t w = panel_out_cols(g, p);
    with_float_dtype(g.c_dt, [&](auto s) {
      if (g.heads_S > 0) return epilogue_heads<decltype(s), HeadsRunScalar>(g, tile, ldt, m, rows, p);
      for (int r = 0; r < rows; ++r) epilogue_cols_scalar<decltype(s)>(g, tile + r * ldt, m + r, p, 0, w);
    });
  }
};

struct ScalarOps : OpsShape<6, kMC, kKC, 1, kAPackF32>, ScalarEpilogue {
  static void ukr(int rows, int, int64_t kc, const float* a, const void* b, int64_t, int b_dt, float* c, int64_t ldc,
                  bool load) {
    float acc[kMR][kNR] = {}, part[kMR][kNR] = {};
    for (int64_t k = 0; k < kc; ++k) {
      if (k % kChunk == 0 && k > 0) {  // the same blocked summation as the AVX2 kernel
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < kNR; ++j) part[r][j] += acc[r][j], acc[r][j] = 0.f;
      }
      float bv[kNR];
      if (b_dt == kBF16) {
        const uint16_t* bk = static_cast<const uint16_t*>(b) + k * kNR;
        for (int j = 0; j < kNR; ++j) bv[j] = bf16_to_f32(bk[kBf16Perm[j]]);
      } else if (b_dt == kI8) {  // W8A16: int8 rows
        const int8_t* bk = static_cast<const int8_t*>(b) + k * kNR;
        for (int j = 0; j < kNR; ++j) bv[j] = static_cast<float>(bk[j]);
      } else {
        const float* bk = static_cast<const float*>(b) + k * kNR;
        for (int j = 0; j < kNR; ++j) bv[j] = bk[j];
      }
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < kNR; ++j) acc[r][j] += a[k * kMR + r] * bv[j];
    }
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < kNR; ++j) {
        const float v = kc > kChunk ? part[r][j] + acc[r][j] : acc[r][j];
        c[r * ldc + j] = load ? c[r * ldc + j] + v : v;
      }
  }
};

// W8A8, portable: int16 k-pairs of A and B (kLayoutI16Pairs), exact int32 sums.
struct ScalarI8Ops : OpsShape<6, kMC, 512, 1, kAPackI16Pairs>, ScalarEpilogue {
  static void ukr(int rows, int, int64_t kc, const float* af, const void* b, int64_t, int, float* cf, int64_t ldc,
                  bool load) {
    const int16_t* a = reinterpret_cast<const int16_t*>(af);
    const int16_t* bb = static_cast<const int16_t*>(b);
    int32_t acc[kMR][kNR] = {};
    for (int64_t j = 0; j < (kc + 1) / 2; ++j)
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < kNR; ++c)
          acc[r][c] += a[(j * kMR + r) * 2] * bb[j * 32 + 2 * c] + a[(j * kMR + r) * 2 + 1] * bb[j * 32 + 2 * c + 1];
    int32_t* c = reinterpret_cast<int32_t*>(cf);
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < kNR; ++j) c[r * ldc + j] = load ? c[r * ldc + j] + acc[r][j] : acc[r][j];
  }
};

bool bad_dt(int dt) { return dt != kF32 && dt != kBF16 && dt != kF16; }

}  // namespace

void pack_b(const PackB& pb) {
  const bool int8_layout = pb.layout == kLayoutI8Rows || pb.layout == kLayoutI16Pairs || pb.layout == kLayoutI8Quads;
  if (pb.dst == nullptr || pb.src == nullptr || pb.K < 0 || pb.N < 0 || (bad_dt(pb.src_dt) && pb.src_dt != kI8) ||
      pb.layout < kLayoutRows || pb.layout > kLayoutI8Quads || (pb.layout == kLayoutPairs && pb.src_dt != kBF16) ||
      int8_layout != (pb.src_dt == kI8) || (pb.layout == kLayoutI8Quads && pb.colsum == nullptr) ||
      (int8_layout && pb.src2 != nullptr))
    throw std::invalid_argument("pack_b: bad arguments");
  if (pb.src_dt == kI8) return pack_all<I8s>(pb);
  with_float_dtype(pb.src_dt, [&](auto s) { pack_all<decltype(s)>(pb); });
}

void gemm(const Gemm& g) {
  const bool w8a8 = g.mode == kEpiInt8, w8a16 = g.mode == kEpiScale;
  if (g.M < 0 || g.N < 0 || g.K < 0 || (w8a8 ? g.a_dt != kI8 : bad_dt(g.a_dt)) || bad_dt(g.c_dt) ||
      g.b_dt != pack_dtype(g.b_dt) || g.mode < kEpiPlain || g.mode > kEpiScale || g.act < kActNone ||
      g.act > kActSilu)
    throw std::invalid_argument("gemm: bad arguments");
  if ((w8a8 || w8a16) &&
      (g.b_dt != kI8 || g.b_scale == nullptr || (w8a8 && g.a_scale == nullptr) ||
       (w8a16 && g.b_layout != kLayoutI8Rows) ||
       (w8a8 && g.b_layout != kLayoutI16Pairs && g.b_layout != kLayoutI8Quads) ||
       ((g.b_layout == kLayoutI8Quads) != (g.b_colsum != nullptr))))
    throw std::invalid_argument("gemm: inconsistent int8 arguments");
  if (!w8a8 && !w8a16 && g.b_dt == kI8) throw std::invalid_argument("gemm: int8 B needs an int8 epilogue");
  if (g.c == nullptr || (g.K > 0 && (g.a == nullptr || g.b == nullptr)))
    throw std::invalid_argument("gemm: missing pointer");
  if ((g.mode == kEpiDact && g.aux == nullptr) ||
      (g.mode == kEpiDgated && (g.aux == nullptr || g.aux2 == nullptr || g.c2 == nullptr)) ||
      (g.mode == kEpiGated && (g.pre == nullptr) != (g.pre2 == nullptr)))
    throw std::invalid_argument("gemm: inconsistent epilogue arguments");
  if (g.heads_S < 0 || (g.heads_S > 0 && (g.mode != kEpiPlain || g.act != kActNone || g.res || g.pre ||
                                          g.c_k == nullptr || g.c_v == nullptr || g.heads_D < 1 || g.heads_Hq < 1 ||
                                          g.heads_Hkv < 1 || g.N != (g.heads_Hq + 2 * g.heads_Hkv) * g.heads_D ||
                                          g.M % g.heads_S != 0)))
    throw std::invalid_argument("gemm: bad heads-store arguments");
  if (g.M == 0 || g.N == 0) return;
  const Isa isa = active_isa();
  if (w8a8) {
    if (g.b_layout == kLayoutI8Quads) {  // packed for the AVX512-VNNI kernel only
      if constexpr (kBuiltAvx512Vnni)
        if (isa >= Isa::kAvx512Dot && avx512vnni_path_available()) return gemm_avx512vnni(g);
      throw std::invalid_argument("gemm: B is packed for the AVX512-VNNI kernel, which this CPU or ISA level lacks");
    }
    if constexpr (kBuiltAvx2)
      if (isa >= Isa::kAvx2) return gemm_avx2_i8(g);
    return gemm_impl<ScalarI8Ops>(g);
  }
  if (g.b_layout == kLayoutPairs) {  // packed for the AVX512-BF16 kernel only
    if (g.a_dt != kBF16 || g.b_dt != kBF16) throw std::invalid_argument("gemm: the k-pair layout takes bf16 A and B");
    if constexpr (kBuiltAvx512Bf16)
      if (isa >= Isa::kAvx512Dot && avx512bf16_path_available()) return gemm_avx512bf16(g);
    throw std::invalid_argument("gemm: B is packed for the AVX512-BF16 kernel, which this CPU or ISA level lacks");
  }
  if (g.b_layout != kLayoutRows && !(w8a16 && g.b_layout == kLayoutI8Rows))
    throw std::invalid_argument("gemm: bad B layout");
  if constexpr (kBuiltAvx512)
    if (isa >= Isa::kAvx512) return gemm_avx512(g);
  if constexpr (kBuiltAvx2)
    if (isa >= Isa::kAvx2) return gemm_avx2(g);
  gemm_impl<ScalarOps>(g);
}

}  // namespace fastllm
