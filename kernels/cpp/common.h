// Shared helpers for the C++ kernels: dtype codes, scalar fp16/bf16 conversions, ISA levels, dispatch helpers.
//
// Everything here is `static inline`, a template in an unnamed namespace, or a plain declaration: this header
// is included by the portable TUs and by the *_avx2.cpp / *_avx512*.cpp TUs (compiled with wider ISA flags).
// Internal linkage keeps the linker from merging a wider-ISA copy of a helper into the portable path (an ODR
// trap that would SIGILL on CPUs without that ISA). For the same reason the ISA TUs use no std:: containers
// or algorithms.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

namespace fastllm {

// Storage dtype codes. Python reads them by name from the extension (_C.DTYPES, bindings.cpp), never by number.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// ISA levels, ordered; each adds kernels to the one below, and an op without a kernel of its own at the active
// level runs its kernel of the highest level below (cpu_features.cpp):
//   kScalar     portable C++
//   kAvx2       AVX2 + FMA + F16C: every op
//   kAvx512     AVX-512 F/BW/VL/DQ FMA kernels: the GEMM engine (fp32/bf16/fp16 and W8A16)
//   kAvx512Dot  + the dot-product instructions this CPU has: vdpbf16ps (AVX512-BF16) for bf16 x bf16 GEMMs,
//               vpdpbusd (AVX512-VNNI) for W8A8
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Dot = 3 };
Isa active_isa();
bool avx512bf16_path_available();  // the AVX512-BF16 GEMM kernel: built, and this CPU has the instructions
bool avx512vnni_path_available();  // the AVX512-VNNI W8A8 kernel: likewise

// The ISA kernels this build compiled: CMake defines FASTLLM_HAVE_<ISA>=1 for each kind of TU it could build.
// FASTLLM_BUILT(M) is true where M is defined as 1 (it stringizes M's expansion: "1", or the macro's own name
// where it is undefined). A dispatch calls an ISA entry point under `if constexpr (kBuilt...)`: in a build
// without that TU the call is a discarded statement, so the declaration needs no definition.
#define FASTLLM_STR_(x) #x
#define FASTLLM_BUILT(m) (FASTLLM_STR_(m)[0] == '1')
constexpr bool kBuiltAvx2 = FASTLLM_BUILT(FASTLLM_HAVE_AVX2);
constexpr bool kBuiltAvx512 = FASTLLM_BUILT(FASTLLM_HAVE_AVX512);
constexpr bool kBuiltAvx512Bf16 = FASTLLM_BUILT(FASTLLM_HAVE_AVX512BF16);
constexpr bool kBuiltAvx512Vnni = FASTLLM_BUILT(FASTLLM_HAVE_AVX512VNNI);

// Hint the OS to back a large, about-to-be-written output with huge pages (memory.cpp).
void advise_huge_pages(void* p, int64_t nbytes);

static inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// bf16 is the top half of an fp32: widening is a shift.
static inline float bf16_to_f32(uint16_t v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN instead of rounding up into Inf.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half -> fp32 (exact: every half is an fp32).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_to_f32(f32_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));  // Inf / NaN
  return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> IEEE half, round to nearest even. Normal range: add the rounding bias on the bit pattern;
// subnormal range: let the FPU round by adding a magic constant that aligns the half's 2^-24 ulp with
// the fp32 ulp (the trick described by F. Giesen, "float->half variants", 2016).
static inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return sign | 0x7c00u | (u > 0x7f800000u ? 0x200u : 0u);  // Inf / NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to Inf
  if (u < 0x38800000u) {                        // < 2^-14: half subnormal (or zero)
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    const float r = bits_to_f32(u) + bits_to_f32(magic);
    return sign | static_cast<uint16_t>(f32_to_bits(r) - magic);
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(u >> 13);
}

static inline float f32_same(float v) { return v; }

// Scalar storage policies: T the storage type, load one element as fp32 / round one fp32 into storage.
// To and From are internal-linkage functions, so each TU instantiates its own copy (see above).
template <class T_, int Code, float (*To)(T_), T_ (*From)(float)>
struct Scalars {
  using T = T_;
  static constexpr int kCode = Code;
  static constexpr bool kIsF32 = Code == kF32;
  static float load(const T* p) { return To(*p); }
  static T from(float v) { return From(v); }
  static float to(T v) { return To(v); }
};
using F32s = Scalars<float, kF32, f32_same, f32_same>;
using BF16s = Scalars<uint16_t, kBF16, bf16_to_f32, f32_to_bf16>;
using F16s = Scalars<uint16_t, kF16, f16_to_f32, f32_to_f16>;

// f(S{}) with the scalar storage policy S of a float dtype code (codes are validated before any kernel runs;
// anything but kBF16 and kF16 is fp32). Turns a run-time dtype into a template argument without a switch
// per call site; the call inlines.
template <class F>
static inline void with_float_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kBF16: return f(BF16s{});
    case kF16: return f(F16s{});
    default: return f(F32s{});
  }
}

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): two run-time flags as template arguments.
template <class F>
static inline void with_flags(bool a, bool b, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (a)
    b ? f(T{}, T{}) : f(T{}, N{});
  else
    b ? f(N{}, T{}) : f(N{}, N{});
}

// 64-byte aligned float scratch; throws std::bad_alloc (-> MemoryError) before any parallel region.
static inline float* alloc_floats(size_t n) {
  const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<float*>(p);
}

static inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace fastllm
