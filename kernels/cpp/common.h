// Shared helpers for the C++ kernels: dtype codes, scalar fp16/bf16 conversions, ISA selection.
//
// Everything here is `static inline` or a plain declaration: this header is included by the portable TUs
// and by the *_avx2.cpp TUs (compiled with -mavx2 -mfma -mf16c). Internal linkage keeps the linker from
// merging an AVX2-compiled copy of a helper into the portable path (an ODR trap that would SIGILL on
// CPUs without AVX2). For the same reason the *_avx2.cpp TUs use no std:: containers or algorithms.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace fastllm {

// Storage dtype codes, shared with fastllm/_ext.py (DTYPE_CODES).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// Instruction-set paths; chosen once from the CPU's features (cpu_features.cpp), overridable for tests.
// Ordered: a path runs the kernels of every lower path that has no version of its own (only the GEMM has an
// AVX-512 version; under kAvx512 the other ops run their AVX2 kernels).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa active_isa();

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

// Scalar storage policies: load one element as fp32 / round one fp32 into storage.
struct F32s {
  using T = float;
  static constexpr int kCode = kF32;
  static constexpr bool kIsF32 = true;
  static float load(const float* p) { return *p; }
  static float from(float v) { return v; }
  static float to(float v) { return v; }
};
struct BF16s {
  using T = uint16_t;
  static constexpr int kCode = kBF16;
  static constexpr bool kIsF32 = false;
  static float load(const uint16_t* p) { return bf16_to_f32(*p); }
  static uint16_t from(float v) { return f32_to_bf16(v); }
  static float to(uint16_t v) { return bf16_to_f32(v); }
};
struct F16s {
  using T = uint16_t;
  static constexpr int kCode = kF16;
  static constexpr bool kIsF32 = false;
  static float load(const uint16_t* p) { return f16_to_f32(*p); }
  static uint16_t from(float v) { return f32_to_f16(v); }
  static float to(uint16_t v) { return f16_to_f32(v); }
};

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
