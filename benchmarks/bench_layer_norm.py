"""Norm ops (LayerNorm / RMSNorm, with and without the fused residual add) at LLM shapes, forward, and
forward+backward for the residual variants. Eager is what a model runs today: `h = x + r` then
F.layer_norm, or the Llama/HF RMSNorm expression (fp32 math, cast back)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import devices
from harness import Case

import fastllm

SHAPES = [(4096, 768), (2048, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]


def hf_rms_norm(h, w, eps):
    """The RMSNorm of Llama / HF transformers in eager PyTorch."""
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def eager_fn(op):
    n_eps = {"layer_norm": 1e-5, "add_layer_norm": 1e-5, "rms_norm": 1e-6, "add_rms_norm": 1e-6}[op]
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, n_eps)
    if op == "add_layer_norm":

        def add_ln(x, r, w, b):
            h = x + r
            return F.layer_norm(h, (x.shape[-1],), w, b, n_eps), h

        return add_ln
    if op == "rms_norm":
        return lambda x, w: hf_rms_norm(x, w, n_eps)

    def add_rms(x, r, w):
        h = x + r
        return hf_rms_norm(h, w, n_eps), h

    return add_rms


def fastllm_fn(op):
    return {
        "layer_norm": lambda x, w, b: fastllm.layer_norm(x, w, b, 1e-5),
        "add_layer_norm": lambda x, r, w, b: fastllm.add_layer_norm(x, r, w, b, 1e-5),
        "rms_norm": lambda x, w: fastllm.rms_norm(x, w, 1e-6),
        "add_rms_norm": lambda x, r, w: fastllm.add_rms_norm(x, r, w, 1e-6),
    }[op]


def make_case(op, shape, dtype, device, use_compile, backward=False):
    residual, rms = op.startswith("add_"), "rms" in op
    m, n = shape

    def make_inputs():
        x = torch.randn(m, n, dtype=dtype, device=device)
        w = 1 + 0.5 * torch.randn(n, dtype=dtype, device=device)
        ins = [x] + ([torch.randn(m, n, dtype=dtype, device=device)] if residual else []) + [w]
        if not rms:
            ins.append(torch.randn(n, dtype=dtype, device=device))
        return tuple(ins)

    eager, fast = eager_fn(op), fastllm_fn(op)
    impls = {"fastllm": fast, "eager": eager}
    if use_compile:
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    elem = torch.finfo(dtype).bits // 8
    streams = 4 if residual else 2  # x (+ r) in, out (+ h) out
    reference = eager
    if backward:
        # forward, then backward with dy = ones: the backward reads h and dy and writes dx (+ small dw, db)
        streams += 3
        impls = {k: _fwd_bwd(f, residual) for k, f in impls.items()}
        reference = _fwd_bwd(eager, residual)
    return Case(op + (" fwd+bwd" if backward else ""), shape, dtype, device, make_inputs, impls, reference,
                bytes=streams * m * n * elem)  # fmt: skip


def _fwd_bwd(fn, residual):
    def run(*inputs):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        outs = fn(*leaves)
        out = outs[0] if residual else outs
        out.backward(torch.ones_like(out))
        return (out.detach(), *[t.grad for t in leaves])

    return run


IMPLS = ["fastllm", "eager", "torch.compile"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", devices())
def bench_norm_forward(benchmark, harness, use_compile, device, op, shape, dtype, impl):
    if impl == "torch.compile" and not use_compile:
        pytest.skip("--no-compile")
    key = (op, shape, dtype, device, False)
    if key not in _cases:
        _cases[key] = make_case(op, shape, dtype, device, use_compile)
    harness.run(benchmark, _cases[key], impl)


@pytest.mark.parametrize("impl", ["fastllm", "eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("device", devices())
def bench_norm_forward_backward(benchmark, harness, device, op, dtype, impl):
    shape = (2048, 4096)
    key = (op, shape, dtype, device, True)
    if key not in _cases:
        _cases[key] = make_case(op, shape, dtype, device, False, True)
    harness.run(benchmark, _cases[key], impl)


_cases: dict = {}
