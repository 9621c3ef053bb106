// Rotary position embedding, portable path (any CPU the compiler targets) and the ISA dispatch. Math and row
// layout: rope.h.
#include "rope.h"

#include <stdexcept>
#include <string>

namespace fastllm {
namespace {

template <class S>
struct ScalarRow {
  using T = typename S::T;

  // y[0:R] of one row from x[0:R]; c, s: the table rows of this row's position (half entries each).
  // INV: the inverse rotation (s -> -s), written out so the sign costs nothing in the loop.
  template <bool INV>
  static void rotate(T* y, const T* x, const float* c, const float* s, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = S::load(x + i), x2 = S::load(x + half + i);
      const float ci = c[i], si = s[i];
      y[i] = S::from(INV ? x1 * ci + x2 * si : x1 * ci - x2 * si);
      y[half + i] = S::from(INV ? x2 * ci - x1 * si : x2 * ci + x1 * si);
    }
  }
};

// Every position in [0, P), or std::invalid_argument (Python's ValueError) naming the first one outside. One pass
// over the B x S positions here costs less than a min/max reduction in Python per call (several microseconds a
// call in torch, against nanoseconds here), and the rotation can then index the tables unchecked.
void check_positions(const RopeFwd& a) {
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t i = b * a.ps[0] + s * a.ps[1];
      const int64_t p = a.pos64 ? static_cast<const int64_t*>(a.pos)[i] : static_cast<const int32_t*>(a.pos)[i];
      if (p < 0 || p >= a.P)
        throw std::invalid_argument("rotary_embedding: positions must be in [0, P) = [0, " + std::to_string(a.P) +
                                    ") for cos/sin tables of P rows, got " + std::to_string(p) + " at [" +
                                    std::to_string(b) + ", " + std::to_string(s) + "]");
    }
}

}  // namespace

void rope_fwd_scalar(const RopeFwd& a) {
  with_float_dtype(a.dtype, [&](auto s) { run_rope<decltype(s), ScalarRow<decltype(s)>>(a); });
}

// Entry point used by the bindings: check what Python cannot get wrong by accident, pick the ISA.
void rope_fwd(const RopeFwd& a) {
  if (a.B < 0 || a.Hq < 0 || a.Hkv < 0 || a.S < 0 || a.D < 1 || a.R < 0 || a.R % 2 != 0 || a.R > a.D || a.P < 0)
    throw std::invalid_argument("rope_fwd: bad sizes");
  if (a.nthreads < 1) throw std::invalid_argument("rope_fwd: nthreads must be >= 1");
  if (a.dtype < kF32 || a.dtype > kF16) throw std::invalid_argument("rope_fwd: unknown dtype code");
  const bool any_q = a.B * a.Hq * a.S > 0, any_k = a.B * a.Hkv * a.S > 0;
  if ((any_q && (a.q == nullptr || a.q_out == nullptr)) || (any_k && (a.k == nullptr || a.k_out == nullptr)) ||
      ((any_q || any_k) && (a.pos == nullptr || (a.R > 0 && (a.cos == nullptr || a.sin == nullptr)))))
    throw std::invalid_argument("rope_fwd: missing pointer");
  if (any_q || any_k) check_positions(a);
  const int64_t esize = a.dtype == kF32 ? 4 : 2;
  advise_huge_pages(a.q_out, a.B * a.Hq * a.S * a.D * esize);
  advise_huge_pages(a.k_out, a.B * a.Hkv * a.S * a.D * esize);
  if constexpr (kBuiltAvx2)
    if (active_isa() >= Isa::kAvx2) return rope_fwd_avx2(a);
  rope_fwd_scalar(a);
}

}  // namespace fastllm
