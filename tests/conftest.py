import os

import torch

# The Triton interpreter reads TRITON_INTERPRET when a kernel is decorated, i.e. when fastllm's kernel
# modules are imported: set it before any test imports them, on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastllm._ext


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["avx2", "scalar"])
def cpu_isa(request):
    """Run a test on each ISA path of the C++ kernels (skipping only a path this CPU cannot run)."""
    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    if request.param == "avx2" and not C.avx2_available():
        pytest.skip("this CPU has no AVX2+FMA+F16C")
    prev = C.set_isa(request.param)
    yield request.param
    C.set_isa(prev)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def gemm_isa(request):
    """The GEMM engine's ISA paths (only it has an AVX-512 kernel; the other ops run AVX2 code under avx512)."""
    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    if request.param == "avx2" and not C.avx2_available():
        pytest.skip("this CPU has no AVX2+FMA+F16C")
    if request.param == "avx512" and not C.avx512_available():
        pytest.skip("this CPU or build has no AVX-512 (F/BW/VL/DQ)")
    prev = C.set_isa(request.param)
    yield request.param
    C.set_isa(prev)
