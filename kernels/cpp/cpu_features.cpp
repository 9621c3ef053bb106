// CPU feature detection and the ISA level switch (the levels: common.h, enum Isa).
//
// __builtin_cpu_supports also checks that the OS saves the vector state (XGETBV), so a feature it reports is
// usable. The level starts at the best one this CPU and build can run; set_isa switches it (tests, benchmarks,
// and fastllm/_ext.py, which applies FASTLLM_ISA after validating it: a bad value is an error there, where
// Python can name the variable, instead of being ignored here).
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace fastllm {

namespace {

struct Feature {
  const char* name;
  bool on;
};

// The CPU features the kernels look at, read once. (__builtin_cpu_supports takes only a string literal.)
const std::vector<Feature>& features() {
#if defined(__x86_64__) || defined(__i386__)
#define FASTLLM_FEATURE(f) Feature{f, __builtin_cpu_supports(f) != 0}
  static const std::vector<Feature> t = [] {
    __builtin_cpu_init();  // safe to call twice; needed if this runs before libgcc's own constructor
    return std::vector<Feature>{FASTLLM_FEATURE("avx2"),     FASTLLM_FEATURE("fma"),        FASTLLM_FEATURE("f16c"),
                                FASTLLM_FEATURE("avx512f"),  FASTLLM_FEATURE("avx512bw"),   FASTLLM_FEATURE("avx512vl"),
                                FASTLLM_FEATURE("avx512dq"), FASTLLM_FEATURE("avx512vnni"), FASTLLM_FEATURE("avx512bf16")};
  }();
#undef FASTLLM_FEATURE
#else
  static const std::vector<Feature> t;
#endif
  return t;
}

bool has(const char* name) {
  for (const Feature& f : features())
    if (std::strcmp(f.name, name) == 0) return f.on;
  return false;
}

// Whether this CPU and build can run a level, and why not (each level needs the one below).
struct Level {
  bool ok;
  const char* why_not;
};

Level level_of(Isa isa) {
  if (isa == Isa::kScalar) return {true, nullptr};
  if (!kBuiltAvx2) return {false, "this build has no x86 SIMD kernels"};
  if (!(has("avx2") && has("fma") && has("f16c"))) return {false, "this CPU lacks AVX2, FMA or F16C"};
  if (isa == Isa::kAvx2) return {true, nullptr};
  if (!kBuiltAvx512) return {false, "this build has no AVX-512 kernels"};
  if (!(has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq")))
    return {false, "this CPU lacks AVX-512 F, BW, VL or DQ"};
  if (isa == Isa::kAvx512) return {true, nullptr};
  if (!avx512bf16_path_available() && !avx512vnni_path_available())
    return {false, "this CPU (or this build's compiler) has neither AVX512-BF16 (vdpbf16ps) nor AVX512-VNNI (vpdpbusd)"};
  return {true, nullptr};
}

constexpr Isa kLevels[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Dot};

Isa best_isa() {
  Isa best = Isa::kScalar;
  for (Isa isa : kLevels)
    if (level_of(isa).ok) best = isa;
  return best;
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};

}  // namespace

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Dot: return "avx512_dot";
    default: return "scalar";
  }
}

// Every level in order, with "" where this CPU and build can run it and the reason where not.
std::vector<std::pair<std::string, std::string>> isa_levels() {
  std::vector<std::pair<std::string, std::string>> out;
  for (Isa isa : kLevels) {
    const Level l = level_of(isa);
    out.emplace_back(isa_name(isa), l.ok ? "" : l.why_not);
  }
  return out;
}

// Switches to a level by name ("auto": the best available); returns the previous one. A level this CPU or
// build cannot run is an error that says why.
std::string set_isa(const std::string& name) {
  const std::string prev = isa_name(active_isa());
  if (name == "auto") {
    g_isa = static_cast<int>(best_isa());
    return prev;
  }
  for (Isa isa : kLevels) {
    if (name != isa_name(isa)) continue;
    const Level l = level_of(isa);
    if (!l.ok) throw std::invalid_argument("set_isa('" + name + "'): " + l.why_not);
    g_isa = static_cast<int>(isa);
    return prev;
  }
  throw std::invalid_argument("set_isa: expected auto|scalar|avx2|avx512|avx512_dot, got '" + name + "'");
}

bool cpu_has(const char* name) { return has(name); }
bool avx2_path_available() { return level_of(Isa::kAvx2).ok; }
bool avx512_path_available() { return level_of(Isa::kAvx512).ok; }
bool avx512vnni_path_available() {
  static const bool ok = kBuiltAvx512Vnni && avx512_path_available() && has("avx512vnni");
  return ok;
}
bool avx512bf16_path_available() {
  static const bool ok = kBuiltAvx512Bf16 && avx512_path_available() && has("avx512bf16");
  return ok;
}

}  // namespace fastllm
