"""fastllm.qkv_projection: q, k, v and the gradients of x, weight and bias vs float64 under DESIGN.md's criterion (2x
torch eager's error in the same dtype), on the C++ engine (each ISA level), the Triton kernel (the interpreter on
CPU, small shapes) and the reference; layout (contiguous (B, H, S, D), every element written), strided inputs,
gradcheck, opcheck, torch.compile, NaN / Inf, bad inputs.

Eager is what a PyTorch user writes: F.linear in the input dtype, split, view(B, S, H, D).transpose(1, 2)
.contiguous(), and its autograd.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.ops import qkv as Q
from fastllm.testing import assert_equivalent, assert_same_nonfinite

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("q", "k", "v")
# the Triton interpreter evaluates NaN / Inf arithmetic in numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def eager_qkv(x, w, b, Hq, Hkv):
    B, S, _ = x.shape
    D = w.shape[0] // (Hq + 2 * Hkv)
    y = F.linear(x, w, b)
    q, k, v = y.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return tuple(t.view(B, S, -1, D).transpose(1, 2).contiguous() for t in (q, k, v))


def masters(B, S, hidden, Hq, Hkv, D, bias):
    """float64 x, weight (scaled by 1 / sqrt(hidden)) and bias (or None): random normal."""
    N = (Hq + 2 * Hkv) * D
    x = torch.randn(B, S, hidden, dtype=torch.float64)
    w = torch.randn(N, hidden, dtype=torch.float64) / math.sqrt(hidden)
    return x, w, (torch.randn(N, dtype=torch.float64) if bias else None)


def leaves(ts, dtype, grad=True):
    return [None if t is None else t.detach().to(dtype).requires_grad_(grad) for t in ts]


def check(shape, dtype, bias, grads=True, x_view=None, w_view=None):
    """Ours vs eager vs the float64 reference: q, k, v, and with grads dx, dW, db. x_view / w_view: a function making
    a strided view of the same values (applied to all three copies)."""
    B, S, hidden, Hq, Hkv, D = shape
    ms = masters(B, S, hidden, Hq, Hkv, D, bias)
    ours, eager, ref = leaves(ms, dtype, grads), leaves(ms, dtype, grads), leaves(ms, torch.float64, grads)

    def run(fn, x, w, b):
        x = x_view(x) if x_view else x
        w = w_view(w) if w_view else w
        return fn(x, w, b)

    outs = run(lambda x, w, b: fastllm.qkv_projection(x, w, b, num_heads=Hq, num_kv_heads=Hkv), *ours)
    outs_e = run(lambda x, w, b: eager_qkv(x, w, b, Hq, Hkv), *eager)
    outs_r = run(lambda x, w, b: eager_qkv(x, w, b, Hq, Hkv), *ref)
    for name, o, e, r, h in zip(NAMES, outs, outs_e, outs_r, (Hq, Hkv, Hkv), strict=True):
        assert o.shape == (B, h, S, D) and o.dtype == dtype, (name, o.shape, o.dtype)
        assert o.is_contiguous(), f"{name} is not contiguous"
        assert_equivalent(o, e, r, name)
    if not grads:
        return
    dys = [torch.randn(r.shape, dtype=torch.float64) for r in outs_r]
    torch.autograd.backward(outs, [d.to(dtype) for d in dys])
    torch.autograd.backward(outs_e, [d.to(dtype) for d in dys])
    torch.autograd.backward(outs_r, dys)
    for name, o, e, r in zip(("x", "weight", "bias"), ours, eager, ref, strict=True):
        if o is not None:
            assert o.grad is not None, f"no gradient for {name}"
            assert_equivalent(o.grad, e.grad, r.grad, f"grad {name}")


# (B, S, hidden, Hq, Hkv, D): odd sizes, MHA / GQA / MQA-like head counts, head dims that are and are not multiples of
# the C++ engine's 16-column panels (8, 12: a panel holds several heads; 80: a head spans 5 panels)
SHAPES = [
    (1, 1, 40, 1, 1, 8),
    (3, 7, 96, 4, 2, 64),
    (1, 33, 40, 9, 3, 8),
    (3, 1, 96, 4, 4, 80),
    (3, 33, 40, 4, 2, 80),
    (1, 7, 96, 9, 3, 12),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp(gemm_isa, shape, dtype, bias):
    with fastllm.explain() as log:
        check(shape, dtype, bias)
    assert log[0].op == "qkv_projection" and log[0].backend == "cpp", log[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_smollm2_decode_and_prefill(need_backend, dtype):
    """The SmolLM2-135M attention shape (hidden 576, 9 query heads, 3 kv heads, D 64): decode and a short prefill."""
    need_backend("cpp")
    check((8, 1, 576, 9, 3, 64), dtype, False)
    check((1, 37, 576, 9, 3, 64), dtype, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_reference(shape, dtype):
    with fastllm.backend("reference"), fastllm.explain() as log:
        check(shape, dtype, True)
    assert {d.backend for d in log} == {"reference"}


# small shapes for the interpreter: several 16 x 16 tiles, tiles straddling heads and q / k / v (D 8, 12), K tails
TRITON_SHAPES = [
    (1, 1, 40, 1, 1, 8),
    (3, 7, 40, 4, 2, 8),
    (1, 7, 17, 9, 3, 12),
    (3, 1, 40, 4, 4, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton(need_backend, shape, dtype):
    need_backend("triton")
    with fastllm.backend("triton"), fastllm.explain() as log:
        check(shape, dtype, shape[0] != 3)
    assert {d.backend for d in log} == {"triton"}, {(d.op, d.backend, d.reason) for d in log}


@pytest.mark.parametrize("block", [(16, 16, 16), (32, 64, 16), (16, 32, 64)], ids=str)
def test_triton_blocks(need_backend, block):
    """Forced tiles (test hook): a tile of several heads of q and k, K in one partial or several steps."""
    need_backend("triton")
    from fastllm.kernels.triton import qkv as T

    x, w, b = masters(2, 9, 33, 4, 2, 12, True)
    outs = T.qkv(x.float(), w.float(), b.float(), 4, 2, block=block)
    for name, o, e, r in zip(NAMES, outs, eager_qkv(x.float(), w.float(), b.float(), 4, 2), eager_qkv(x, w, b, 4, 2),
                             strict=True):  # fmt: skip
        assert_equivalent(o, e, r, f"{name} block={block}")


def _poisoned_empty(real):
    def empty(*args, **kwargs):
        return tuple(t.fill_(float("nan")) for t in real(*args, **kwargs))

    return empty


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_every_element_written(need_backend, monkeypatch, backend):
    """Outputs filled with NaN before the kernel runs: every element must be overwritten."""
    need_backend(backend)
    if backend == "cpp":
        monkeypatch.setattr(Q, "_outputs", _poisoned_empty(Q._outputs))
        shapes = [(3, 7, 40, 4, 2, 12), (2, 5, 96, 9, 3, 64), (1, 1, 40, 1, 1, 80)]
    else:
        from fastllm.kernels.triton import qkv as T

        monkeypatch.setattr(T, "_empty_heads", _poisoned_empty(T._empty_heads))
        shapes = [(3, 7, 20, 4, 2, 12)]
    for shape in shapes:
        with fastllm.backend(backend):
            check(shape, torch.float32, True, grads=False)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_strided_inputs(need_backend, backend):
    """x with (B, S) swapped in memory (a copy to rows) and with every other element (column stride 2, read in
    place); the weight as a transposed view and as a row slice."""
    if backend != "reference":
        need_backend(backend)
    big = (2, 5, 24, 4, 2, 8) if backend == "triton" else (3, 7, 96, 4, 2, 64)
    with fastllm.backend(backend):
        check(big, torch.float32, True, x_view=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1))
        check(big, torch.float32, True, x_view=lambda x: x.repeat_interleave(2, dim=2)[..., ::2])
        check(big, torch.bfloat16, False, w_view=lambda w: w.t().contiguous().t())
        check(big, torch.float32, True, w_view=lambda w: torch.cat([w, w[:3]])[: w.shape[0]])


def test_gradcheck_float64():
    """float64 runs the reference forward and the op's own backward (dY rebuilt from dq, dk, dv; gemm_bwd)."""
    x, w, b = (t.requires_grad_() for t in masters(2, 3, 5, 2, 1, 4, True))

    def f(x, w, b):
        return fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: f(x, w, None), (x, w))


def test_only_some_outputs_used():
    """A loss of q alone: the gradients of the unused k and v are zeros (None from autograd)."""
    x, w, b = (t.float().requires_grad_() for t in masters(2, 3, 16, 2, 1, 8, True))
    q, _, _ = fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1)
    q.square().sum().backward()
    xe, we, be = (t.detach().clone().requires_grad_() for t in (x, w, b))
    eager_qkv(xe, we, be, 2, 1)[0].square().sum().backward()
    for o, e in ((x, xe), (w, we), (b, be)):
        torch.testing.assert_close(o.grad, e.grad, rtol=1e-5, atol=1e-5)
    assert (b.grad[16:] == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(need_backend, backend):
    if backend != "reference":
        need_backend(backend)
    x, w, b = (t.float().requires_grad_() for t in masters(2, 3, 16, 4, 2, 8, True))
    with fastllm.backend(backend):
        torch.library.opcheck(torch.ops.fastllm.qkv_projection.default, (x, w, b, 4, 2))
        torch.library.opcheck(torch.ops.fastllm.qkv_projection.default, (x, w, None, 4, 2))


def test_torch_compile_fullgraph():
    """Compiled (fullgraph) against the float64 reference, with eager torch in fp32 as the bar; output and grads."""
    torch._dynamo.reset()
    Hq, Hkv = 4, 2

    def f(x, w, b):
        q, k, v = fastllm.qkv_projection(x, w, b, num_heads=Hq, num_kv_heads=Hkv)
        return q.sum(1) * 2 + k[:, 0] - v[:, 1]

    def eager(x, w, b):
        q, k, v = eager_qkv(x, w, b, Hq, Hkv)
        return q.sum(1) * 2 + k[:, 0] - v[:, 1]

    ms = masters(2, 7, 24, Hq, Hkv, 8, True)
    ours, ea, ref = leaves(ms, torch.float32), leaves(ms, torch.float32), leaves(ms, torch.float64)
    y = torch.compile(f, fullgraph=True)(*ours)
    ye, yr = eager(*ea), eager(*ref)
    assert_equivalent(y, ye, yr, "compiled output")
    dy = torch.randn_like(yr)
    for out in (y, ye, yr):
        out.backward(dy.to(out.dtype))
    for name, o, e, r in zip(("x", "weight", "bias"), ours, ea, ref, strict=True):
        assert_equivalent(o.grad, e.grad, r.grad, f"compiled grad {name}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", ["x", "weight", "bias"])
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_nonfinite(need_backend, backend, where, value):
    """One NaN / +-Inf in x (its row), the weight (its column) or the bias: q, k, v non-finite exactly where eager's
    are (each output element sees one non-finite term at most, so no inf - inf)."""
    if backend != "reference":
        need_backend(backend)
    x, w, b = (t.float() for t in masters(2, 3, 16, 2, 1, 8, True))
    if where == "x":
        x[1, 2, 5] = value
    elif where == "weight":
        w[13, 5] = value
    else:
        b[21] = value
    with fastllm.backend(backend):
        outs = fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1)
    for name, o, e in zip(NAMES, outs, eager_qkv(x, w, b, 2, 1), strict=True):
        assert_same_nonfinite(o, e, f"{name} ({where} = {value}, {backend})")


def test_empty_and_zero_hidden():
    w = torch.randn(32, 8, requires_grad=True)
    x = torch.randn(2, 0, 8, requires_grad=True)
    q, k, v = fastllm.qkv_projection(x, w, num_heads=2, num_kv_heads=1)
    assert q.shape == (2, 2, 0, 8) and k.shape == v.shape == (2, 1, 0, 8)
    (q.sum() + k.sum() + v.sum()).backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()
    # hidden = 0: y = bias
    b = torch.randn(32)
    q, k, v = fastllm.qkv_projection(torch.randn(2, 3, 0), torch.randn(32, 0), b, num_heads=2, num_kv_heads=1)
    torch.testing.assert_close(torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], -1), b.expand(2, 3, 32))


def test_weight_cache_sees_in_place_updates(need_backend):
    need_backend("cpp")
    x, w, b = (t.float() for t in masters(2, 3, 16, 2, 1, 8, True))
    q0, _, _ = fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1)
    w.mul_(-2.0)
    q1, k1, v1 = fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1)
    for o, e in zip((q1, k1, v1), eager_qkv(x, w, b, 2, 1), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q0, q1)


def test_direct_path_and_float64(need_backend):
    """Inference calls skip the registered op (the direct path, same kernel); float64 runs the reference."""
    need_backend("cpp")
    x, w, _ = masters(1, 1, 16, 2, 1, 8, False)
    x, w = x.float(), w.float()
    before = Q.qkv_fwd.direct_calls
    with torch.no_grad():
        fastllm.qkv_projection(x, w, num_heads=2, num_kv_heads=1)
    assert Q.qkv_fwd.direct_calls == before + 1
    with fastllm.explain() as log:
        fastllm.qkv_projection(x.double(), w.double(), num_heads=2, num_kv_heads=1)
    assert log[-1].backend == "reference" and "float64" in log[-1].reason


def test_bad_inputs():
    x, w, b = torch.randn(2, 3, 16), torch.randn(32, 16), torch.randn(32)

    def call(x=x, w=w, b=b, hq=2, hkv=1):
        return fastllm.qkv_projection(x, w, b, num_heads=hq, num_kv_heads=hkv)

    with pytest.raises(ValueError, match="x must be 3-D"):
        call(x=torch.randn(6, 16))
    with pytest.raises(TypeError, match="x must be a tensor"):
        call(x=[1.0])
    with pytest.raises(TypeError, match="x must be a floating"):
        call(x=x.to(torch.int32))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        call(w=torch.randn(32, 16, 1))
    with pytest.raises(ValueError, match=r"weight must be 2-D.*hidden = x's last dim 16"):
        call(w=torch.randn(32, 15))
    with pytest.raises(TypeError, match="weight has dtype"):
        call(w=w.double())
    with pytest.raises(ValueError, match="weight is on meta"):
        call(w=w.to("meta"))
    with pytest.raises(ValueError, match="weight's first dim 30 is not a multiple of num_heads"):
        call(w=torch.randn(30, 16), b=None)
    with pytest.raises(ValueError, match="num_heads \\(3\\) must be a multiple of num_kv_heads \\(2\\)"):
        call(w=torch.randn(35, 16), b=None, hq=3, hkv=2)
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1"):
        call(hkv=0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        call(hq=2.0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        call(hq=True)
    with pytest.raises(ValueError, match="bias must have shape \\(32,\\)"):
        call(b=torch.randn(31))
    with pytest.raises(TypeError, match="bias has dtype"):
        call(b=b.half())
    with pytest.raises(TypeError, match="bias must be a tensor or None"):
        call(b=1.0)
    with pytest.raises(TypeError, match="positional"):
        fastllm.qkv_projection(x, w, b, 2, 1)
    # the same errors through the registered op (grad mode: the op path) and its fake (meta tensors)
    with pytest.raises(ValueError, match="num_heads \\(3\\) must be a multiple"):
        call(x=x.requires_grad_(), w=torch.randn(35, 16), b=None, hq=3, hkv=2)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fastllm.qkv_projection(x.to("meta"), w.to("meta"), torch.empty(3, device="meta"), 2, 1)
