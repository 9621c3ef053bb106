// CPU feature detection and the ISA switch. The AVX2 path needs AVX2, FMA and F16C (fp16 conversion);
// __builtin_cpu_supports also checks that the OS saves the YMM state (XGETBV), so a feature it reports
// is usable. FASTLLM_ISA=scalar|avx2 (or set_isa from Python) overrides the choice, e.g. to test the
// portable path on an AVX2 machine.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.h"

namespace fastllm {

namespace {

bool has(const char* name) {
#if defined(__x86_64__) || defined(__i386__)
  const std::string n(name);
  if (n == "avx2") return __builtin_cpu_supports("avx2");
  if (n == "fma") return __builtin_cpu_supports("fma");
  if (n == "f16c") return __builtin_cpu_supports("f16c");
  if (n == "avx512f") return __builtin_cpu_supports("avx512f");
  if (n == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (n == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (n == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (n == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
  if (n == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
#else
  (void)name;
#endif
  return false;
}

bool avx2_usable() {
#if defined(FASTLLM_HAVE_AVX2)
  return has("avx2") && has("fma") && has("f16c");
#else
  return false;
#endif
}

bool avx512_usable() {
#if defined(FASTLLM_HAVE_AVX512)
  return avx2_usable() && has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq");
#else
  return false;
#endif
}

Isa best_isa() { return avx512_usable() ? Isa::kAvx512 : (avx2_usable() ? Isa::kAvx2 : Isa::kScalar); }

Isa initial_isa() {
  const char* env = std::getenv("FASTLLM_ISA");
  if (env != nullptr && std::string(env) == "scalar") return Isa::kScalar;
  if (env != nullptr && std::string(env) == "avx2" && avx2_usable()) return Isa::kAvx2;
  return best_isa();
}

std::atomic<int> g_isa{static_cast<int>(initial_isa())};

}  // namespace

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "scalar");
}

// Switches the ISA path; returns the previous one. Asking for a path this CPU or build lacks is an error.
std::string set_isa(const std::string& name) {
  const std::string prev = isa_name(active_isa());
  if (name == "scalar") {
    g_isa = static_cast<int>(Isa::kScalar);
  } else if (name == "avx2") {
    if (!avx2_usable()) throw std::invalid_argument("set_isa: this CPU or build has no AVX2+FMA+F16C path");
    g_isa = static_cast<int>(Isa::kAvx2);
  } else if (name == "avx512") {
    if (!avx512_usable()) throw std::invalid_argument("set_isa: this CPU or build has no AVX-512 (F/BW/VL/DQ) path");
    g_isa = static_cast<int>(Isa::kAvx512);
  } else if (name == "auto") {
    g_isa = static_cast<int>(best_isa());
  } else {
    throw std::invalid_argument("set_isa: expected 'auto', 'scalar', 'avx2' or 'avx512', got '" + name + "'");
  }
  return prev;
}

bool cpu_has(const char* name) { return has(name); }
bool avx2_path_available() { return avx2_usable(); }
bool avx512_path_available() { return avx512_usable(); }
bool avx512vnni_path_available() {
#if defined(FASTLLM_HAVE_AVX512VNNI)
  return avx512_usable() && has("avx512vnni");
#else
  return false;
#endif
}
bool avx512bf16_path_available() {
#if defined(FASTLLM_HAVE_AVX512BF16)
  return avx512_usable() && has("avx512bf16");
#else
  return false;
#endif
}

}  // namespace fastllm
