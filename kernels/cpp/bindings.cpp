// pybind11 module fastllm._C. No torch headers anywhere in kernels/cpp: Python validates tensors and
// passes raw data pointers (as integers), sizes and strides, so this binary works with any torch version.
// Every kernel call releases the GIL. Thread counts come from Python (torch.get_num_threads()).
#include <cstring>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attention.h"
#include "common.h"
#include "gemm.h"
#include "layer_norm.h"
#include "int8.h"
#include "rope.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace fastllm {
void norm_fwd(const NormFwd& a);
void norm_bwd(const NormBwd& a);
void attn_fwd(const AttnFwd& a);
void attn_bwd(const AttnBwd& a);
std::string set_isa(const std::string& name);
const char* isa_name(Isa isa);
std::vector<std::pair<std::string, std::string>> isa_levels();
bool cpu_has(const char* name);
bool avx2_path_available();
bool avx512_path_available();
void copy_bytes(void* dst, const void* src, int64_t nbytes, int nthreads, bool stream);
double fma_loop(int64_t iters, int nthreads, bool avx2);
double fma_loop_512(int64_t iters, int nthreads);
}  // namespace fastllm

namespace {

// Bumped whenever a binding's signature changes, so Python can refuse a stale build of _C.
constexpr int kAbi = 11;

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using Strides = std::vector<int64_t>;

void copy_strides(int64_t* dst, const Strides& src, size_t n, const char* name) {
  if (src.size() != n) throw std::invalid_argument(std::string("attention: ") + name + " needs " + std::to_string(n) + " strides");
  for (size_t i = 0; i < n; ++i) dst[i] = src[i];
}

fastllm::AttnShape attn_shape(uintptr_t q, uintptr_t k, uintptr_t v, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                              int64_t Sk, int64_t D, const Strides& qs, const Strides& ks, const Strides& vs,
                              uintptr_t mask, int mask_dtype, const Strides& ms, bool causal, bool bottom_right,
                              double scale, int dtype, int nthreads) {
  fastllm::AttnShape s{};
  s.q = ptr<const void>(q);
  s.k = ptr<const void>(k);
  s.v = ptr<const void>(v);
  s.B = B, s.Hq = Hq, s.Hkv = Hkv, s.Sq = Sq, s.Sk = Sk, s.D = D;
  copy_strides(s.qs, qs, 3, "q");
  copy_strides(s.ks, ks, 3, "k");
  copy_strides(s.vs, vs, 3, "v");
  s.mask = ptr<const void>(mask);
  s.mask_dtype = mask == 0 ? fastllm::kMaskNone : mask_dtype;
  copy_strides(s.ms, ms, 4, "mask");
  s.causal = causal, s.bottom_right = bottom_right;
  s.scale = static_cast<float>(scale);
  s.dtype = dtype;
  s.nthreads = nthreads < 1 ? 1 : nthreads;
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace fastllm;
  m.doc() = "fastllm C++/OpenMP CPU kernels (ABI-free: raw pointers in, no torch headers)";
  m.attr("ABI") = kAbi;

  // The codes of the enums Python passes, by name: fastllm/_ext.py reads every code from these tables.
  m.attr("DTYPES") = py::dict("float32"_a = int(kF32), "bfloat16"_a = int(kBF16), "float16"_a = int(kF16),
                              "int8"_a = int(kI8));
  m.attr("ACTIVATIONS") = py::dict("none"_a = int(kActNone), "gelu"_a = int(kActGelu),
                                   "gelu_tanh"_a = int(kActGeluTanh), "quick_gelu"_a = int(kActQuickGelu),
                                   "relu"_a = int(kActRelu), "silu"_a = int(kActSilu));
  m.attr("EPILOGUES") = py::dict("plain"_a = int(kEpiPlain), "gated"_a = int(kEpiGated), "dact"_a = int(kEpiDact),
                                 "dgated"_a = int(kEpiDgated), "int8"_a = int(kEpiInt8), "scale"_a = int(kEpiScale));
  m.attr("LAYOUTS") = py::dict("rows"_a = int(kLayoutRows), "pairs"_a = int(kLayoutPairs),
                               "i8_rows"_a = int(kLayoutI8Rows), "i16_pairs"_a = int(kLayoutI16Pairs),
                               "i8_quads"_a = int(kLayoutI8Quads));
  m.attr("MASKS") = py::dict("none"_a = kMaskNone, "bool"_a = kMaskBool);  // attention: else a DTYPES code

  m.def("isa", [] { return std::string(isa_name(active_isa())); }, "The ISA level the kernels use now.");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Switch to 'auto' (the best available) or a level of isa_levels(); returns the previous level. "
        "ValueError (with the reason) for a level this CPU or build cannot run.");
  m.def("isa_levels", &isa_levels,
        "[(level, why not)] for scalar, avx2, avx512, avx512_dot in order; why not is '' where this CPU and "
        "build can run the level.");
  m.def("avx2_available", &avx2_path_available, "Whether this build and CPU can run the AVX2+FMA+F16C path.");
  m.def("avx512_available", &avx512_path_available, "Whether this build and CPU can run the AVX-512 GEMM path.");
  m.def("avx512vnni_available", &avx512vnni_path_available,
        "Whether level avx512_dot runs W8A8 GEMMs with vpdpbusd (B packed in k-quads).");
  m.def("avx512bf16_available", &avx512bf16_path_available,
        "Whether level avx512_dot runs bf16 GEMMs with vdpbf16ps (B packed in k-pairs).");
  m.def("cpu_features", [] {
    py::dict d;
    for (const char* f : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni",
                          "avx512bf16"})
      d[f] = cpu_has(f);
    return d;
  });
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });

  m.def(
      "norm_fwd",
      [](uintptr_t out, uintptr_t h, uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t b, int64_t M, int64_t N,
         int64_t x_stride, int64_t res_stride, double eps, bool rms, bool stream, int dtype, int nthreads) {
        NormFwd a{ptr<void>(out), ptr<void>(h), ptr<const void>(x), ptr<const void>(res), ptr<const void>(w),
                  ptr<const void>(b), M, N, x_stride, res_stride, static_cast<float>(eps), rms, stream, dtype,
                  nthreads};
        norm_fwd(a);
      },
      py::arg("out"), py::arg("h"), py::arg("x"), py::arg("res"), py::arg("w"), py::arg("b"), py::arg("M"),
      py::arg("N"), py::arg("x_stride"), py::arg("res_stride"), py::arg("eps"), py::arg("rms"), py::arg("stream"),
      py::arg("dtype"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "norm_bwd",
      [](uintptr_t dx, uintptr_t dw, uintptr_t db, uintptr_t dy, uintptr_t dh, uintptr_t h, uintptr_t w, int64_t M,
         int64_t N, int64_t dy_stride, int64_t dh_stride, int64_t h_stride, double eps, bool rms, bool stream,
         int dtype, int nthreads) {
        NormBwd a{ptr<void>(dx),       ptr<void>(dw), ptr<void>(db), ptr<const void>(dy), ptr<const void>(dh),
                  ptr<const void>(h),  ptr<const void>(w), M, N, dy_stride, dh_stride, h_stride,
                  static_cast<float>(eps), rms, stream, dtype, nthreads};
        norm_bwd(a);
      },
      py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("dy"), py::arg("dh"), py::arg("h"), py::arg("w"),
      py::arg("M"), py::arg("N"), py::arg("dy_stride"), py::arg("dh_stride"), py::arg("h_stride"), py::arg("eps"),
      py::arg("rms"), py::arg("stream"), py::arg("dtype"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "attn_fwd",
      [](uintptr_t out, uintptr_t stats, uintptr_t q, uintptr_t k, uintptr_t v, int64_t B, int64_t Hq, int64_t Hkv,
         int64_t Sq, int64_t Sk, int64_t D, const Strides& q_strides, const Strides& k_strides,
         const Strides& v_strides, uintptr_t mask, int mask_dtype, const Strides& mask_strides, uintptr_t kv_len,
         bool causal, bool bottom_right, double scale, int dtype, int nthreads, const Strides& o_strides) {
        AttnFwd a{};
        if (!o_strides.empty()) copy_strides(a.os, o_strides, 3, "o_strides");
        a.s = attn_shape(q, k, v, B, Hq, Hkv, Sq, Sk, D, q_strides, k_strides, v_strides, mask, mask_dtype,
                         mask_strides, causal, bottom_right, scale, dtype, nthreads);
        a.out = ptr<void>(out);
        a.stats = ptr<float>(stats);
        a.kv_len = ptr<const int32_t>(kv_len);
        py::gil_scoped_release release;
        attn_fwd(a);
      },
      py::arg("out"), py::arg("stats"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("B"), py::arg("Hq"),
      py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"), py::arg("q_strides"), py::arg("k_strides"),
      py::arg("v_strides"), py::arg("mask"), py::arg("mask_dtype"), py::arg("mask_strides"), py::arg("kv_len"),
      py::arg("causal"), py::arg("bottom_right"), py::arg("scale"), py::arg("dtype"), py::arg("nthreads"),
      py::arg("o_strides") = Strides{},
      "Flash attention forward: out (B, Hq, Sq, D) and stats (B, Hq, Sq, 2) fp32 = (row max m in log2 units, l). "
      "o_strides (batch, head, seq) of out in elements, head_dim stride 1; empty: contiguous.");

  m.def(
      "attn_bwd",
      [](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
         uintptr_t out, uintptr_t stats, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
         const Strides& q_strides, const Strides& k_strides, const Strides& v_strides, const Strides& o_strides,
         const Strides& do_strides, uintptr_t mask, int mask_dtype, const Strides& mask_strides, bool causal,
         bool bottom_right, double scale, int dtype, int nthreads) {
        AttnBwd a{};
        a.s = attn_shape(q, k, v, B, Hq, Hkv, Sq, Sk, D, q_strides, k_strides, v_strides, mask, mask_dtype,
                         mask_strides, causal, bottom_right, scale, dtype, nthreads);
        a.dq = ptr<void>(dq);
        a.dk = ptr<void>(dk);
        a.dv = ptr<void>(dv);
        a.dout = ptr<const void>(dout);
        a.out = ptr<const void>(out);
        a.stats = ptr<const float>(stats);
        copy_strides(a.os, o_strides, 3, "out");
        copy_strides(a.dos, do_strides, 3, "dout");
        py::gil_scoped_release release;
        attn_bwd(a);
      },
      py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
      py::arg("out"), py::arg("stats"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"),
      py::arg("D"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"),
      py::arg("do_strides"), py::arg("mask"), py::arg("mask_dtype"), py::arg("mask_strides"), py::arg("causal"),
      py::arg("bottom_right"), py::arg("scale"), py::arg("dtype"), py::arg("nthreads"),
      "Flash attention backward: dq, dk, dv (contiguous) from dout, q, k, v, out and the forward's stats.");

  m.def(
      "pack_b",
      [](uintptr_t dst, uintptr_t src, uintptr_t src2, int64_t K, int64_t N, int64_t s_k, int64_t s_n, int src_dt,
         int layout, uintptr_t colsum, int nthreads) {
        PackB p{ptr<void>(dst), ptr<const void>(src), ptr<const void>(src2), K, N, s_k, s_n, src_dt, layout,
                ptr<int32_t>(colsum), nthreads};
        pack_b(p);
      },
      py::arg("dst"), py::arg("src"), py::arg("src2"), py::arg("K"), py::arg("N"), py::arg("s_k"), py::arg("s_n"),
      py::arg("src_dt"), py::arg("layout"), py::arg("colsum"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "Pack B(k, n) = src[k*s_k + n*s_n] (K x N) into 16-column panels (gemm.h); src2: the gated layout.");
  m.def("packed_b_elems", &packed_b_elems, py::arg("K"), py::arg("N"), py::arg("gated"), py::arg("layout"));
  m.def("pack_dtype", &pack_dtype, py::arg("src_dt"));

  m.def(
      "gemm",
      [](int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_rs, int64_t a_cs, int a_dt, uintptr_t b, int b_dt,
         int b_layout, int mode, int act, uintptr_t c, int64_t ldc, uintptr_t c2, uintptr_t bias, uintptr_t bias2, uintptr_t res,
         int64_t ld_res, uintptr_t pre, uintptr_t pre2, int64_t ld_pre, uintptr_t aux, uintptr_t aux2, int64_t ld_aux,
         int c_dt, uintptr_t a_scale, uintptr_t b_scale, uintptr_t b_colsum, int nthreads) {
        Gemm g{M, N, K, ptr<const void>(a), a_rs, a_cs, a_dt, ptr<const void>(b), b_dt, b_layout, mode, act, ptr<void>(c),
               ldc, ptr<void>(c2), ptr<const void>(bias), ptr<const void>(bias2), ptr<const void>(res), ld_res,
               ptr<void>(pre), ptr<void>(pre2), ld_pre, ptr<const void>(aux), ptr<const void>(aux2), ld_aux, c_dt,
               ptr<const float>(a_scale), ptr<const float>(b_scale), ptr<const int32_t>(b_colsum), nthreads};
        gemm(g);
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a"), py::arg("a_rs"), py::arg("a_cs"), py::arg("a_dt"),
      py::arg("b"), py::arg("b_dt"), py::arg("b_layout"), py::arg("mode"), py::arg("act"), py::arg("c"), py::arg("ldc"), py::arg("c2"),
      py::arg("bias"), py::arg("bias2"), py::arg("res"), py::arg("ld_res"), py::arg("pre"), py::arg("pre2"),
      py::arg("ld_pre"), py::arg("aux"), py::arg("aux2"), py::arg("ld_aux"), py::arg("c_dt"), py::arg("a_scale"), py::arg("b_scale"), py::arg("b_colsum"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "C = A B with a fused epilogue (gemm.h); B packed by pack_b.");

  m.def(
      "gemm_heads",
      [](int64_t M, int64_t K, uintptr_t a, int64_t a_rs, int64_t a_cs, int a_dt, uintptr_t b, int b_dt, int b_layout,
         uintptr_t bias, uintptr_t q, uintptr_t k, uintptr_t v, int64_t S, int64_t D, int64_t Hq, int64_t Hkv, int c_dt,
         int nthreads) {
        Gemm g{};
        g.M = M, g.N = (Hq + 2 * Hkv) * D, g.K = K, g.a = ptr<const void>(a), g.a_rs = a_rs, g.a_cs = a_cs;
        g.a_dt = a_dt, g.b = ptr<const void>(b), g.b_dt = b_dt, g.b_layout = b_layout, g.mode = kEpiPlain;
        g.act = kActNone, g.c = ptr<void>(q), g.bias = ptr<const void>(bias), g.c_dt = c_dt, g.nthreads = nthreads;
        g.heads_S = S, g.heads_D = D, g.heads_Hq = Hq, g.heads_Hkv = Hkv, g.c_k = ptr<void>(k), g.c_v = ptr<void>(v);
        gemm(g);
      },
      py::arg("M"), py::arg("K"), py::arg("a"), py::arg("a_rs"), py::arg("a_cs"), py::arg("a_dt"), py::arg("b"),
      py::arg("b_dt"), py::arg("b_layout"), py::arg("bias"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("S"),
      py::arg("D"), py::arg("Hq"), py::arg("Hkv"), py::arg("c_dt"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>(),
      "q, k, v = the heads of A B + bias in the attention layout (B, H, S, D) (gemm.h, Gemm::heads_S): the QKV "
      "projection with B the packed concatenated weight; M = batch * S rows of A.");

  m.def(
      "quantize_rows",
      [](uintptr_t q, uintptr_t scale, uintptr_t x, int64_t M, int64_t K, int64_t x_stride, int dtype, int nthreads) {
        Quant a{ptr<int8_t>(q), ptr<float>(scale), ptr<const void>(x), M, K, x_stride, dtype, nthreads};
        quantize_rows(a);
      },
      py::arg("q"), py::arg("scale"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("x_stride"), py::arg("dtype"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "Per-row symmetric int8 quantization: q (M x K int8), scale (M fp32) = amax / 127 (1 for zero rows).");

  m.def(
      "rope_fwd",
      [](uintptr_t q_out, uintptr_t k_out, uintptr_t q, uintptr_t k, uintptr_t cos, uintptr_t sin, uintptr_t pos,
         int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t R, int64_t P, int64_t q_sb, int64_t q_sh,
         int64_t q_ss, int64_t k_sb, int64_t k_sh, int64_t k_ss, int64_t pos_sb, int64_t pos_ss, int64_t cs_stride,
         bool pos64, bool inverse, int dtype, int nthreads) {
        RopeFwd a{ptr<void>(q_out), ptr<void>(k_out), ptr<const void>(q), ptr<const void>(k), ptr<const float>(cos),
                  ptr<const float>(sin), ptr<const void>(pos), B, Hq, Hkv, S, D, R, P, {q_sb, q_sh, q_ss},
                  {k_sb, k_sh, k_ss}, {pos_sb, pos_ss}, cs_stride, pos64, inverse, dtype, nthreads};
        rope_fwd(a);
      },
      py::arg("q_out"), py::arg("k_out"), py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("pos"),
      py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("S"), py::arg("D"), py::arg("R"), py::arg("P"),
      py::arg("q_sb"), py::arg("q_sh"), py::arg("q_ss"), py::arg("k_sb"), py::arg("k_sh"), py::arg("k_ss"),
      py::arg("pos_sb"), py::arg("pos_ss"), py::arg("cs_stride"), py::arg("pos64"), py::arg("inverse"),
      py::arg("dtype"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "RoPE of q and k (rope.h): outputs contiguous; inputs strided (b, h, s) with unit stride along D.");

  m.def(
      "kv_write",
      [](uintptr_t dst, uintptr_t src, uintptr_t pos, int64_t B, int64_t H, int64_t S, int64_t D, int64_t S_max,
         int64_t elt, int64_t d_sb, int64_t d_sh, int64_t s_sb, int64_t s_sh, int64_t s_ss) {
        // dst[b, h, pos[b] + s, :] = src[b, h, s, :] (strides in elements, unit stride along D), pos (B,) int32:
        // the new tokens of a decode step into the KV cache at each row's own length. Nothing is written and false
        // is returned when a row would leave [0, S_max).
        const int32_t* p = ptr<const int32_t>(pos);
        for (int64_t b = 0; b < B; ++b)
          if (p[b] < 0 || p[b] + S > S_max) return false;
        auto* d = ptr<char>(dst);
        const auto* x = ptr<const char>(src);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < S; ++t)
              std::memcpy(d + ((b * d_sb + h * d_sh + (p[b] + t) * D) * elt), x + ((b * s_sb + h * s_sh + t * s_ss) * elt),
                          static_cast<size_t>(D * elt));
        return true;
      },
      py::arg("dst"), py::arg("src"), py::arg("pos"), py::arg("B"), py::arg("H"), py::arg("S"), py::arg("D"),
      py::arg("S_max"), py::arg("elt"), py::arg("d_sb"), py::arg("d_sh"), py::arg("s_sb"), py::arg("s_sh"),
      py::arg("s_ss"), py::call_guard<py::gil_scoped_release>(),
      "KV-cache append: dst (B, H, S_max, D) with unit stride along D and D along S; false if out of range.");

  m.def(
      "copy_bytes",
      [](uintptr_t dst, uintptr_t src, int64_t nbytes, int nthreads, bool stream) {
        copy_bytes(ptr<void>(dst), ptr<const void>(src), nbytes, nthreads < 1 ? 1 : nthreads, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("nthreads"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "Parallel copy, memcpy or non-temporal (bandwidth ceiling probe).");
  m.def(
      "fma_loop",
      [](int64_t iters, int nthreads, bool avx2) { return fma_loop(iters, nthreads < 1 ? 1 : nthreads, avx2); },
      py::arg("iters"), py::arg("nthreads"), py::arg("avx2"), py::call_guard<py::gil_scoped_release>(),
      "FMA loop (compute ceiling probe); returns flops per thread per iteration.");
  m.def(
      "fma_loop_avx512",
      [](int64_t iters, int nthreads) { return fma_loop_512(iters, nthreads < 1 ? 1 : nthreads); },
      py::arg("iters"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "AVX-512 FMA loop (compute ceiling on AVX-512 CPUs); returns flops per thread per iteration.");
}
