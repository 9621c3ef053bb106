"""Norm ops (LayerNorm / RMSNorm, with and without the fused residual add) at LLM shapes, forward, and
forward+backward for the residual variants. Eager is what a model runs today: `h = x + r` then
F.layer_norm, or the Llama/HF RMSNorm expression (fp32 math, cast back)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, devices, dtype_name
from harness import Case

import fastllm

SHAPES = [(4096, 768), (2048, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]


def hf_rms_norm(h, w, eps):
    """The RMSNorm of Llama / HF transformers in eager PyTorch (fp32 math; float64 stays float64, so that the
    float64 reference is one: with HF's literal h.float() it was computed in fp32, equal to eager's)."""
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
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
        "layer_norm": lambda x, w, b: fastllm.layer_norm(x, weight=w, bias=b, eps=1e-5),
        "add_layer_norm": lambda x, r, w, b: fastllm.add_layer_norm(x, r, weight=w, bias=b, eps=1e-5),
        "rms_norm": lambda x, w: fastllm.rms_norm(x, weight=w, eps=1e-6),
        "add_rms_norm": lambda x, r, w: fastllm.add_rms_norm(x, r, weight=w, eps=1e-6),
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
    names = ("y", "h") if residual else ("y",)
    if backward:
        # forward, then backward with dy = ones: the backward reads h and dy and writes dx (+ small dw, db)
        streams += 3
        impls = {k: _fwd_bwd(f, residual) for k, f in impls.items()}
        reference = _fwd_bwd(eager, residual)
        names = ("y", "dx") + (("dr",) if residual else ()) + (("dw",) if rms else ("dw", "db"))
    return Case(op + (" fwd+bwd" if backward else ""), shape, dtype, device, make_inputs, impls, reference,
                bytes=streams * m * n * elem, names=names)  # fmt: skip


def _fwd_bwd(fn, residual):
    def run(*inputs):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        outs = fn(*leaves)
        out = outs[0] if residual else outs
        out.backward(torch.ones_like(out))
        return (out.detach(), *[t.grad for t in leaves])

    return run


def _params():
    fwd = [(device, op, shape, dtype, False) for device in devices() for op in OPS for shape in SHAPES
           for dtype in DTYPES]  # fmt: skip
    bwd = [(device, op, (2048, 4096), dtype, True) for device in devices() for op in ("add_layer_norm", "add_rms_norm")
           for dtype in DTYPES]  # fmt: skip
    return fwd + bwd


def _id(p):
    device, op, shape, dtype, backward = p
    return f"{device}-{op}-{shape[0]}x{shape[1]}-{dtype_name(dtype)}-{'fwdbwd' if backward else 'fwd'}"


def _quick(p):
    _, op, shape, dtype, backward = p
    return (op, shape, dtype, backward) in {("add_rms_norm", (4096, 768), torch.float32, False),
                                            ("add_layer_norm", (2048, 4096), torch.bfloat16, True)}  # fmt: skip


@pytest.mark.parametrize("p", cases(_params(), _id, _quick))
def bench_norm(benchmark, harness, use_compile, p):
    device, op, shape, dtype, backward = p
    harness.run_case(benchmark, make_case(op, shape, dtype, device, use_compile and not backward, backward))
