"""NaN and +-Inf propagate as in torch's eager op, on every backend: one element of each input of each op is set
to NaN, +inf or -inf, and the output's NaN / +inf / -inf pattern must equal eager's in the same dtype; with a NaN
input, no gradient may be finite where eager's is NaN. Norms and the GEMM family here; attention in test_attention_nonfinite.py, int8 in test_int8.py
(quantized ops keep the non-finite values in their scales)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.ops.gemm import act_ref
from fastllm.testing import assert_same_nonfinite

VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
BACKENDS = ["cpp-avx2", "cpp-scalar", "reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, need_backend):
    """(backend name, the ISA for cpp) with the C++ ISA set for the test's duration."""
    name, _, isa = request.param.partition("-")
    need_backend(name)
    if not isa:
        yield name
        return
    C = fastllm._ext.C
    if isa == "avx2" and not C.avx2_available():
        pytest.skip("this CPU has no AVX2+FMA+F16C")
    prev = C.set_isa(isa)
    yield name
    C.set_isa(prev)


def _inject(t: torch.Tensor, value: float, seed: int) -> torch.Tensor:
    """A copy of t with one element (a random one, fixed by seed) set to value."""
    t = t.detach().clone()
    g = torch.Generator().manual_seed(seed)
    t.view(-1)[torch.randint(t.numel(), (1,), generator=g)] = value
    return t


def _check(name, fast, eager, inputs, value, backend, dtype, grads=True):
    """Inject `value` into each input in turn; compare the non-finite patterns of the outputs and gradients."""
    for i in range(len(inputs)):
        if inputs[i] is None:
            continue
        args = [None if t is None else t.to(dtype) for t in inputs]
        args[i] = _inject(args[i], value, seed=i)
        leaves_f = [None if t is None else t.clone().requires_grad_(grads) for t in args]
        leaves_e = [None if t is None else t.clone().requires_grad_(grads) for t in args]
        with fastllm.backend(backend), fastllm.explain() as log:
            out = fast(*leaves_f)
            if grads:
                out.backward(torch.ones_like(out))
        ran = {d.backend for d in log}
        assert ran == {backend}, f"{name}: asked for {backend}, ran {[str(d) for d in log]}"
        ref = eager(*leaves_e)
        where = f"{name} {dtype} {value} in input {i}"
        assert_same_nonfinite(out, ref, f"{where}: output")
        if grads and math.isnan(value):
            # Gradients: a NaN input must not give a finite gradient where eager's is NaN (no silent number).
            # Under +-inf inputs the gradient is mathematically undefined and torch's pattern is an artefact of
            # its backward formula (layer_norm, the activations' derivatives), so only forward outputs are held
            # to eager's exact pattern there.
            ref.backward(torch.ones_like(ref))
            for j, (lf, le) in enumerate(zip(leaves_f, leaves_e, strict=True)):
                if lf is not None:
                    silent = ~torch.isfinite(le.grad) & torch.isfinite(lf.grad)
                    assert not silent.any(), (
                        f"{where}: grad of input {j} is finite at {int(silent.sum())} places where eager's is not"
                    )


def _interpreter_budget(backend, dtype, act):
    """The Triton interpreter is slow: bf16 there runs one activation per op (fp32 runs all of them)."""
    if backend == "triton" and dtype != torch.float32 and act not in (None, "silu"):
        pytest.skip("Triton interpreter time budget: bf16 runs with activation None / silu only")


def _w(n_out, n_in):
    return torch.randn(n_out, n_in) / math.sqrt(n_in)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_norms(backend, op, dtype, value):
    n = 37
    x, r, w, b = torch.randn(5, n), torch.randn(5, n), 1 + 0.1 * torch.randn(n), torch.randn(n)
    if op == "layer_norm":
        cases = (lambda x, w, b: fastllm.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (n,), w, b), [x, w, b])
    elif op == "rms_norm":
        cases = (lambda x, w: fastllm.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (n,), w, 1e-6), [x, w])
    elif op == "add_layer_norm":
        cases = (lambda x, r, w, b: sum(fastllm.add_layer_norm(x, r, w, b)),
                 lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b) + (x + r), [x, r, w, b])  # fmt: skip
    else:
        cases = (lambda x, r, w: sum(fastllm.add_rms_norm(x, r, w, 1e-6)),
                 lambda x, r, w: F.rms_norm(x + r, (n,), w, 1e-6) + (x + r), [x, r, w])  # fmt: skip
    _check(op, cases[0], cases[1], cases[2], VALUES[value], backend, dtype, grads=backend != "triton")


ACTS = [None, "gelu", "gelu_tanh", "quick_gelu", "relu", "silu"]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_linear(backend, act, dtype, value):
    _interpreter_budget(backend, dtype, act)

    def fast(x, w, b, r):
        return fastllm.linear(x, w, b, activation=act, residual=r)

    def eager(x, w, b, r):
        y = F.linear(x, w, b)
        return (act_ref(act, y) if act else y) + r

    inputs = [torch.randn(6, 19), _w(11, 19), torch.randn(11), torch.randn(6, 11)]
    _check(f"linear {act}", fast, eager, inputs, VALUES[value], backend, dtype)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS[1:])
def test_fused_ffn(backend, act, dtype, value):
    _interpreter_budget(backend, dtype, act)

    def fast(x, w1, w2, b1, b2):
        return fastllm.fused_ffn(x, w1, w2, b1=b1, b2=b2, activation=act)

    def eager(x, w1, w2, b1, b2):
        return F.linear(act_ref(act, F.linear(x, w1, b1)), w2, b2)

    inputs = [torch.randn(5, 17), _w(23, 17), _w(13, 23), torch.randn(23), torch.randn(13)]
    _check(f"fused_ffn {act}", fast, eager, inputs, VALUES[value], backend, dtype)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_fused_gated_ffn(backend, act, dtype, value):
    _interpreter_budget(backend, dtype, act)

    def fast(x, wg, wu, wd, bg):
        return fastllm.fused_gated_ffn(x, wg, wu, wd, b_gate=bg, activation=act)

    def eager(x, wg, wu, wd, bg):
        return F.linear(act_ref(act, F.linear(x, wg, bg)) * F.linear(x, wu), wd)

    inputs = [torch.randn(5, 17), _w(23, 17), _w(23, 17), _w(13, 23), torch.randn(23)]
    _check(f"fused_gated_ffn {act}", fast, eager, inputs, VALUES[value], backend, dtype)
