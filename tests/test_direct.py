"""The direct path (fastllm/_op.py): calls that need nothing of the registered op skip it; every other call goes
through it. Both give the same results; compile, autograd, tracing modes and explain never take the direct path."""

import importlib

import pytest
import torch

import fastllm

# (the submodules, not the functions fastllm.ops re-exports under the same names)
A = importlib.import_module("fastllm.ops.attention")
G = importlib.import_module("fastllm.ops.gemm")
L = importlib.import_module("fastllm.ops.layer_norm")


def _calls(op, fn):
    before = op.direct_calls
    out = fn()
    return out, op.direct_calls - before


def _inputs():
    x = torch.randn(5, 37)
    w, b = torch.randn(37), torch.randn(37)
    lw = torch.randn(13, 37)
    return x, w, b, lw


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "no_input_requires_grad"])
def test_direct_path_taken_and_identical(mode):
    x, w, b, lw = _inputs()
    with torch.no_grad(), fastllm.explain():  # through the op: explain forces it
        ref_ln = fastllm.layer_norm(x, w, b)
        ref_lin = fastllm.linear(x, lw, activation="gelu")
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode, torch.enable_grad)
    with ctx():
        ln, n_ln = _calls(L._layer_norm, lambda: fastllm.layer_norm(x, w, b))
        lin, n_lin = _calls(G.linear_fwd, lambda: fastllm.linear(x, lw, activation="gelu"))
    assert n_ln == 1 and n_lin == 1
    assert torch.equal(ln, ref_ln) and torch.equal(lin, ref_lin)


def test_decode_attention_direct_identical():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lens = torch.tensor([9, 4], dtype=torch.int32)
    with torch.inference_mode():
        out, n = _calls(A.attention_fwd, lambda: fastllm.decode_attention(q, k, v, lens))
        with fastllm.explain() as log:
            ref = fastllm.decode_attention(q, k, v, lens)
    assert n == 1 and len(log) == 1 and torch.equal(out, ref)


def test_autograd_takes_the_op():
    x, w, b, _ = _inputs()
    x.requires_grad_(True)
    out, n = _calls(L._layer_norm, lambda: fastllm.layer_norm(x, w, b))
    assert n == 0 and out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None


def test_parameter_requiring_grad_takes_the_op():
    x, _, _, lw = _inputs()
    p = torch.nn.Parameter(lw)
    out, n = _calls(G.linear_fwd, lambda: fastllm.linear(x, p))
    assert n == 0 and out.requires_grad


def test_explain_takes_the_op():
    x, w, b, _ = _inputs()
    with torch.inference_mode(), fastllm.explain() as log:
        _, n = _calls(L._layer_norm, lambda: fastllm.layer_norm(x, w, b))
    assert n == 0 and len(log) == 1


def test_compile_takes_the_op():
    x, w, b, _ = _inputs()

    def f(x):
        return fastllm.layer_norm(x, w, b) * 2

    cf = torch.compile(f, backend="eager", fullgraph=True)
    before = L._layer_norm.direct_calls
    with torch.no_grad():
        out = cf(x)
        ref = f(x)
    # the compiled call went through torch.ops.fastllm.layer_norm (fullgraph: no graph break around a direct call)
    assert L._layer_norm.direct_calls - before == 1  # only the eager f(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_make_fx_and_fake_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, b, _ = _inputs()
    with torch.no_grad():
        gm = make_fx(lambda x: fastllm.layer_norm(x, w, b))(x)
    assert any("fastllm.layer_norm" in str(n.target) for n in gm.graph.nodes)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = fastllm.layer_norm(fx, mode.from_tensor(w), mode.from_tensor(b))
    assert out.shape == x.shape


def test_meta_tensors_take_the_op():
    x = torch.empty(3, 8, device="meta")
    with torch.inference_mode():
        out = fastllm.layer_norm(x, None, None)
    assert out.device.type == "meta" and out.shape == x.shape


def test_bad_input_still_validated_on_direct_path():
    x, w, _, _ = _inputs()
    with torch.inference_mode(), pytest.raises(ValueError, match="weight"):
        fastllm.layer_norm(x, w[:-1])
    with torch.inference_mode(), pytest.raises(TypeError):
        fastllm.linear(x, torch.randn(3, 37, dtype=torch.float64))


def test_backend_override_respected_on_direct_path():
    x, w, b, _ = _inputs()
    with torch.inference_mode(), fastllm.backend("reference"):
        out, n = _calls(L._layer_norm, lambda: fastllm.layer_norm(x, w, b))
    assert n == 1
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (37,), w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_linear_lean_lane_identical(dtype, activation):
    """linear's decode lane (ops/gemm.py _lean_linear: 3-D x, bias, residual) = the op's result, bit for bit."""
    x = torch.randn(2, 3, 37, dtype=dtype)
    w, b, r = torch.randn(13, 37, dtype=dtype), torch.randn(13, dtype=dtype), torch.randn(2, 3, 13, dtype=dtype)
    with torch.inference_mode():
        with fastllm.explain() as log:
            ref = fastllm.linear(x, w, b, activation=activation, residual=r)
        got, n = _calls(G.linear_fwd, lambda: fastllm.linear(x, w, b, activation=activation, residual=r))
        assert len(log) == 1 and n == 1 and torch.equal(got, ref) and got.shape == (2, 3, 13)
        with pytest.raises(ValueError, match="activation 'none'"):
            fastllm.linear(x, w, activation="none")
        with pytest.raises(ValueError, match="residual"):
            fastllm.linear(x, w, residual=r[:, :2])  # a wrong residual shape leaves the lane and is refused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("biases", [False, True])
def test_gated_ffn_lean_lane_identical(dtype, biases):
    """fused_gated_ffn's decode lane (ops/gemm.py _lean_gated: 3-D x, optional biases) = the op's result (explain
    turns the lane off), bit for bit; the lane counts as a direct call; bad arguments leave it and are refused."""
    x = torch.randn(2, 3, 37, dtype=dtype)
    wg, wu, wd = (torch.randn(*s, dtype=dtype) for s in ((29, 37), (29, 37), (13, 29)))
    bg, bu, bd = (torch.randn(n, dtype=dtype) if biases else None for n in (29, 29, 13))

    def call():
        return fastllm.fused_gated_ffn(x, wg, wu, wd, b_gate=bg, b_up=bu, b_down=bd, activation="silu")

    with torch.inference_mode():
        with fastllm.explain() as log:
            ref = call()
        got, n = _calls(G.fused_gated_ffn_fwd, call)
        assert len(log) == 1 and n == 1 and torch.equal(got, ref) and got.shape == (2, 3, 13)
        with pytest.raises(ValueError, match="activation 'none'"):
            fastllm.fused_gated_ffn(x, wg, wu, wd, activation="none")
        with pytest.raises(ValueError, match="one shape"):
            fastllm.fused_gated_ffn(x, wg, wu[:5], wd)  # (w_up's shape leaves the lane and is refused)
