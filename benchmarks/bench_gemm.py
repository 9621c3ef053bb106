"""GEMM: fastllm.linear (the C++ GEMM engine on CPU, Triton on CUDA) against torch's F.linear (MKL / oneDNN on
CPU, cuBLAS on CUDA): y = x W^T with W in nn.Linear layout (out, in).

CPU: M x N x K in {2048^3, 512 x 3072 x 768 (BERT fc1), 512 x 768 x 3072 (BERT fc2)}, fp32 and bf16. The weight
is packed once and cached (as oneDNN's prepacked weights; fastllm.linear's cache, fastllm/ops/ffn.py); the
row "fastllm-pack" clears the cache before every call, so it includes packing the weight. GPU: bf16 at
4096^3 and 8192^3, TFLOP/s. FLOPs 2 M N K; "% ceil" is against the harness's measured compute ceiling.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import devices
from harness import Case

import fastllm

CPU_SHAPES = [(2048, 2048, 2048), (512, 3072, 768), (512, 768, 3072)]
GPU_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192)]


def _pack_each_call(x, w):
    fastllm.clear_weight_cache()
    return fastllm.linear(x, w)


def make_case(device, dtype, M, N, K):
    def make_inputs():
        x = torch.randn(M, K, dtype=dtype, device=device)
        w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
        return x, w

    impls = {"fastllm": lambda x, w: fastllm.linear(x, w), "eager": lambda x, w: F.linear(x, w)}
    if device == "cpu" and dtype == torch.float32:
        impls["fastllm-pack"] = _pack_each_call
    return Case("linear (GEMM)", (M, N, K), dtype, device, make_inputs, impls, impls["eager"], flops=2 * M * N * K)


def _params():
    out = []
    for device in devices():
        if device == "cpu":
            out += [(device, dt, *s) for s in CPU_SHAPES for dt in (torch.float32, torch.bfloat16)]
        else:
            out += [(device, torch.bfloat16, *s) for s in GPU_SHAPES]
    return out


def _id(p):
    device, dtype, M, N, K = p
    return f"{device}-{str(dtype).replace('torch.', '')}-{M}x{N}x{K}"


_cases: dict = {}


def _case(p):
    if p not in _cases:
        _cases.clear()
        _cases[p] = make_case(*p)
    return _cases[p]


@pytest.mark.parametrize("impl", ["fastllm", "fastllm-pack", "eager"])
@pytest.mark.parametrize("p", _params(), ids=_id)
def bench_gemm(benchmark, harness, p, impl):
    case = _case(p)
    if impl not in case.impls:
        pytest.skip(f"no {impl} row for this case")
    if impl == "fastllm":
        for slot in case.inputs():  # pack every rotation slot's weight once, outside the timed rounds
            fastllm.linear(*slot)
    harness.run(benchmark, case, impl)
