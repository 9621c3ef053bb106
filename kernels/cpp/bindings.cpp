// pybind11 module fastllm._C. No torch headers anywhere in kernels/cpp: Python validates tensors and
// passes raw data pointers (as integers), sizes and strides, so this binary works with any torch version.
// Every kernel call releases the GIL. Thread counts come from Python (torch.get_num_threads()).
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"
#include "layer_norm.h"

namespace py = pybind11;

namespace fastllm {
void norm_fwd(const NormFwd& a);
void norm_bwd(const NormBwd& a);
std::string set_isa(const std::string& name);
const char* isa_name(Isa isa);
bool cpu_has(const char* name);
bool avx2_path_available();
void copy_bytes(void* dst, const void* src, int64_t nbytes, int nthreads, bool stream);
double fma_loop(int64_t iters, int nthreads, bool avx2);
}  // namespace fastllm

namespace {

// Bumped whenever a binding's signature changes, so Python can refuse a stale build of _C.
constexpr int kAbi = 1;

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace fastllm;
  m.doc() = "fastllm C++/OpenMP CPU kernels (ABI-free: raw pointers in, no torch headers)";
  m.attr("ABI") = kAbi;

  m.def("isa", [] { return std::string(isa_name(active_isa())); }, "The ISA path the kernels use now.");
  m.def("set_isa", &set_isa, py::arg("name"), "Switch to 'auto', 'scalar' or 'avx2'; returns the previous path.");
  m.def("avx2_available", &avx2_path_available, "Whether this build and CPU can run the AVX2+FMA+F16C path.");
  m.def("cpu_features", [] {
    py::dict d;
    for (const char* f : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni"}) d[f] = cpu_has(f);
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
}
