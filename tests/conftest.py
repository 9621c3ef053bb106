import os

import torch

# The Triton interpreter reads TRITON_INTERPRET when a kernel is decorated, i.e. when fastllm's kernel
# modules are imported: set it before any test imports them, on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastllm._ext
from fastllm.testing import import_torchvision

# PyPI's torchvision (a CUDA build) fails to import beside the CPU torch, and then breaks transformers too: load it
# without its compiled ops before any test imports transformers, timm or open_clip (fastllm.testing explains).
TORCHVISION = import_torchvision()


def _interpreter_bf16_rounds_to_nearest_even() -> None:
    """Make the Triton interpreter's fp32 -> bf16 conversion round to nearest even, as the GPU's cvt.rn.bf16.f32
    does. triton 3.6's interpreter truncates (measured: half of all conversions differ from torch's, with twice
    the mean error), which would make every interpreted bf16 kernel look twice as inaccurate as on a GPU and
    fail the norm-wise 16-bit criterion for a reason that is not the kernel's."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._convert_float
    if getattr(original, "fastllm_rne", False):
        return

    def convert(data, src_ty, dst_ty, rounding_mode):
        import numpy as np
        import triton.language as tl

        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(np.shape(data))
        return original(data, src_ty, dst_ty, rounding_mode)

    convert.fastllm_rne = True
    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_rounds_to_nearest_even()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def backend_missing(name: str) -> str | None:
    """Why backend `name` cannot run CPU tensors in this process (None if it can). Tests of a backend skip with
    this reason rather than pass on another path."""
    if name == "cpp" and fastllm._ext.C is None:
        return f"C++ extension not loaded ({fastllm._ext.STATUS})"
    if name == "triton":
        from fastllm._op import triton_interpret, triton_missing

        if triton_missing():
            return triton_missing()
        if not (torch.cuda.is_available() or triton_interpret()):
            return "Triton on CPU needs TRITON_INTERPRET=1"
    return None


@pytest.fixture
def need_backend():
    """need_backend("cpp") skips the test (with the reason) when that backend cannot run here."""

    def need(name: str) -> str:
        why = backend_missing(name)
        if why:
            pytest.skip(why)
        return name

    return need


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


@pytest.fixture(params=["avx512_dot", "avx512", "avx2", "scalar"])
def gemm_isa(request):
    """The GEMM engine's ISA levels: avx512_dot (vdpbf16ps for bf16, vpdpbusd for W8A8), avx512 (FMA kernels),
    avx2, scalar. Only the GEMM has AVX-512 kernels; the other ops run AVX2 code at the avx512 levels."""
    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    why_not = dict(C.isa_levels())[request.param]
    if why_not:
        pytest.skip(f"ISA level {request.param}: {why_not}")
    prev = C.set_isa(request.param)
    yield request.param
    C.set_isa(prev)
