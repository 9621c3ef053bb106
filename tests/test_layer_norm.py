"""fastllm.layer_norm / add_layer_norm / rms_norm / add_rms_norm: equivalence (forward and backward) on the
C++ and Triton (interpreter) backends, opcheck, torch.compile, modules, bad inputs."""

import os

import pytest
import torch
import torch.nn.functional as F

import fastllm
import fastllm._ext
from fastllm.ops.layer_norm import norm_bwd_ref, norm_ref
from fastllm.testing import assert_equivalent

OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {"layer_norm": 1e-5, "add_layer_norm": 1e-5, "rms_norm": 1e-6, "add_rms_norm": 1e-6}
ON_GPU = torch.cuda.is_available()


def _spec(op):
    return op.startswith("add_"), "rms" in op


def make_inputs(op, shape, dtype, device="cpu", affine=True, bias=True):
    residual, rms = _spec(op)
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    w = (1 + 0.5 * torch.randn(n, dtype=dtype, device=device)) if affine else None
    b = torch.randn(n, dtype=dtype, device=device) if (affine and bias and not rms) else None
    return x, r, w, b


def call_fastllm(op, x, r, w, b):
    eps = EPS[op]
    if op == "layer_norm":
        return fastllm.layer_norm(x, w, b, eps), None
    if op == "add_layer_norm":
        return fastllm.add_layer_norm(x, r, w, b, eps)
    if op == "rms_norm":
        return fastllm.rms_norm(x, w, eps), None
    return fastllm.add_rms_norm(x, r, w, eps)


def call_eager(op, x, r, w, b):
    """What a user writes in eager PyTorch (also used in float64 as the reference)."""
    residual, rms = _spec(op)
    h = x + r if residual else x
    n = x.shape[-1]
    out = F.rms_norm(h, (n,), w, EPS[op]) if rms else F.layer_norm(h, (n,), w, b, EPS[op])
    return out, (h if residual else None)


def run_with_grads(fn, op, inputs, dy, dh):
    """Forward and backward; returns [out, h, grads of (x, r, w, b)] (None where absent)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out, h = fn(op, *leaves)
    loss = (out.double() * dy.double()).sum()
    if h is not None:
        loss = loss + (h.double() * dh.double()).sum()
    loss.backward()
    return [out, h] + [t.grad if t is not None else None for t in leaves]


NAMES = ["out", "h", "dx", "dresidual", "dweight", "dbias"]


def check_op(op, shape, dtype, backend, device="cpu", affine=True, bias=True, expect=None):
    inputs = make_inputs(op, shape, dtype, device, affine, bias)
    dy = torch.randn(shape, dtype=dtype, device=device)
    dh = torch.randn(shape, dtype=dtype, device=device)
    with fastllm.backend(backend), fastllm.explain() as log:
        got = run_with_grads(call_fastllm, op, inputs, dy, dh)
    eager = run_with_grads(call_eager, op, inputs, dy, dh)
    ref = run_with_grads(call_eager, op, [t.double() if t is not None else None for t in inputs], dy, dh)
    for name, g, e, rf in zip(NAMES, got, eager, ref, strict=True):
        assert (g is None) == (rf is None), f"{op} {name}: presence differs"
        if g is not None:
            assert_equivalent(g, e, rf, f"{op} {backend} {dtype} {tuple(shape)} {name}")
    ran = {d.backend for d in log}
    assert ran == {expect or backend}, f"expected the {expect or backend} path, ran {[str(d) for d in log]}"


CPP_SHAPES = [(1, 1), (3, 7), (2, 5, 37), (17, 129), (4, 1000), (2, 4096), (3, 5000)]


@pytest.mark.parametrize("shape", CPP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cpp_equivalence(need_backend, op, dtype, shape):
    check_op(op, shape, dtype, need_backend("cpp"))


@pytest.mark.parametrize("shape", [(3, 7), (9, 333)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cpp_isa_paths(cpu_isa, op, dtype, shape):
    check_op(op, shape, dtype, "cpp")


@pytest.mark.parametrize("op", OPS)
def test_cpp_large_hidden(need_backend, op):
    need_backend("cpp")
    """Hidden sizes past 64K (fp32 statistics over long rows), many rows (dw/db sums over M), non-affine."""
    check_op(op, (2, 65537), torch.float32, "cpp")
    check_op(op, (4099, 48), torch.float32, "cpp")
    check_op(op, (3, 100), torch.bfloat16, "cpp", affine=False)
    if not _spec(op)[1]:
        check_op(op, (3, 100), torch.float32, "cpp", bias=False)


TRITON_SHAPES = [(1, 1), (3, 7), (5, 100), (2, 3, 256)]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_triton_equivalence(op, dtype, shape):
    pytest.importorskip("triton")
    device = "cuda" if ON_GPU else "cpu"
    check_op(op, shape, dtype, "triton", device=device)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_triton_many_rows(op):
    """dw/db summed over many rows (several rows per backward program) still meets the criterion in fp32."""
    pytest.importorskip("triton")
    check_op(op, (300, 16), torch.float32, "triton", device="cuda" if ON_GPU else "cpu")


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_looped_path(rms, dtype):
    """Rows longer than one block: force a small block so the multi-pass kernels run in the interpreter."""
    pytest.importorskip("triton")
    from fastllm.kernels.triton import layer_norm as tri

    device = "cuda" if ON_GPU else "cpu"
    m, n = 5, 100
    x, r = (torch.randn(m, n, dtype=dtype, device=device) for _ in range(2))
    w = 1 + 0.5 * torch.randn(n, dtype=dtype, device=device)
    b = None if rms else torch.randn(n, dtype=dtype, device=device)
    dy, dh = (torch.randn(m, n, dtype=dtype, device=device) for _ in range(2))
    out, h = tri.norm_fwd(x, r, w, b, 1e-5, rms, block_n=32)
    ref_out, ref_h = norm_ref(*(t.double() if t is not None else None for t in (x, r, w, b)), 1e-5, rms)
    eager_out, eager_h = norm_ref(x, r, w, b, 1e-5, rms)
    assert_equivalent(out, eager_out, ref_out, "looped out")
    assert_equivalent(h, eager_h, ref_h, "looped h")
    dx, dw, db = tri.norm_bwd(dy, dh, h, w, b is not None, 1e-5, rms, block_n=32)
    ref = norm_bwd_ref(dy.double(), dh.double(), h.double(), w.double(), b is not None, 1e-5, rms)
    eager = norm_bwd_ref(dy, dh, h, w, b is not None, 1e-5, rms)
    for name, g, e, rf in zip(["dx", "dw", "db"], (dx, dw, db), eager, ref, strict=True):
        if rf is not None:
            assert_equivalent(g, e, rf, f"looped {name}")


def test_reference_backend_float64():
    """float64 has no fast kernel: auto falls back to the reference, and says why."""
    x = torch.randn(3, 10, dtype=torch.float64)
    w = torch.randn(10, dtype=torch.float64)
    with fastllm.explain() as log:
        out = fastllm.layer_norm(x, w, None)
    torch.testing.assert_close(out, F.layer_norm(x, (10,), w, None, 1e-5))
    assert log[0].backend == "reference"
    assert ("float64" if fastllm._ext.C is not None else "FASTLLM_NO_CPP") in log[0].reason, log[0].reason


@pytest.mark.parametrize("used", ["out", "h"])
def test_grad_of_one_output_only(used):
    """With only one output of add_layer_norm in the loss, the other's gradient is None (not zeros)."""
    x, r, w = torch.randn(6, 37, requires_grad=True), torch.randn(6, 37), torch.randn(37, requires_grad=True)
    out, h = fastllm.add_layer_norm(x, r, w, None)
    (out if used == "out" else h).square().sum().backward()
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    out_d, h_d = call_eager("add_layer_norm", xd, r.double(), wd, None)
    (out_d if used == "out" else h_d).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-4, atol=1e-5)
    if used == "out":
        torch.testing.assert_close(w.grad, wd.grad.float(), rtol=1e-4, atol=1e-5)
    else:  # h does not depend on w
        assert wd.grad is None and (w.grad is None or not w.grad.any())


def test_noncontiguous_inputs():
    base = torch.randn(6, 2 * 37)
    for x in (base[:, ::2], base[:, :37], base.t()[:37].t()[:, :], base.view(6, 2, 37)[:, 1]):
        r = torch.randn(x.shape).t().contiguous().t()  # column-major residual
        w = torch.randn(x.shape[-1])
        out, h = fastllm.add_layer_norm(x, r, w, None)
        ref_out, ref_h = call_eager("add_layer_norm", x.double(), r.double(), w.double(), None)
        e_out, e_h = call_eager("add_layer_norm", x, r, w, None)
        assert_equivalent(out, e_out, ref_out, "noncontiguous out")
        assert_equivalent(h, e_h, ref_h, "noncontiguous h")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_zero_size(need_backend, op, backend):
    need_backend(backend)
    for shape in [(0, 8), (3, 0), (2, 0, 5)]:
        x, r, w, b = make_inputs(op, shape, torch.float32)
        x.requires_grad_(True)
        with fastllm.backend(backend):
            out, h = call_fastllm(op, x, r, w, b)
            assert out.shape == x.shape and (h is None or h.shape == x.shape)
            out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_nan_inf_propagate_like_torch(op, dtype):
    x, r, w, b = make_inputs(op, (4, 33), dtype)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    if dtype != torch.float32:  # a signaling NaN with a payload in the low mantissa bits
        x.view(torch.int16)[0, 7] = 0x7F81 if dtype == torch.bfloat16 else 0x7C01
    if r is not None:
        r[0, 9] = float("-inf")
    out, h = call_fastllm(op, x, r, w, b)
    e_out, e_h = call_eager(op, x, r, w, b)
    if h is not None:
        assert torch.equal(torch.isnan(h), torch.isnan(e_h)) and torch.equal(torch.isinf(h), torch.isinf(e_h))
    assert torch.equal(torch.isnan(out), torch.isnan(e_out))
    assert torch.equal(torch.isinf(out), torch.isinf(e_out))
    assert torch.isfinite(out[3]).all()


# ---------------------------------------------------------------------------------------------- torch.library


def _op_args(op, dtype=torch.float32, requires_grad=True):
    x, r, w, b = make_inputs(op, (5, 37), dtype)
    residual, rms = _spec(op)
    args = [x] + ([r] if residual else []) + [w] + ([] if rms else [b]) + [EPS[op]]
    return [a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    with fastllm.backend(backend):
        torch.library.opcheck(getattr(torch.ops.fastllm, op).default, _op_args(op))
        torch.library.opcheck(getattr(torch.ops.fastllm, op).default, _op_args(op, torch.bfloat16, False))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck_backward_op(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h, dy, dh = (torch.randn(4, 19) for _ in range(3))
    w = torch.randn(19)
    with fastllm.backend(backend):
        for args in [(dy, dh, h, w, True, 1e-5, False), (dy, None, h, None, False, 1e-6, True)]:
            torch.library.opcheck(torch.ops.fastllm.norm_backward.default, args)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_torch_compile_fullgraph(need_backend, backend):
    """The ops are opaque to dynamo: no graph break; the compiled forward and backward meet the criterion against
    the float64 reference (eager torch in fp32 as the bar)."""
    need_backend(backend)
    torch._dynamo.reset()

    def block(x, r, w1, b1, w2):
        y, h = fastllm.add_layer_norm(x, r, w1, b1)
        z, h2 = fastllm.add_rms_norm(y, h, w2)
        return fastllm.layer_norm(z, None, None) + fastllm.rms_norm(h2, w2)

    def eager(x, r, w1, b1, w2):
        h = x + r
        y = F.layer_norm(h, (48,), w1, b1, 1e-5)
        h2 = y + h
        z = F.rms_norm(h2, (48,), w2, 1e-6)
        return F.layer_norm(z, (48,), None, None, 1e-5) + F.rms_norm(h2, (48,), w2, 1e-6)

    inputs = [torch.randn(4, 9, 48, dtype=torch.float64), torch.randn(4, 9, 48, dtype=torch.float64)]
    inputs += [torch.randn(48, dtype=torch.float64) for _ in range(3)]
    leaves_c, leaves_e = ([t.float().requires_grad_(True) for t in inputs] for _ in range(2))
    leaves_r = [t.clone().requires_grad_(True) for t in inputs]
    compiled = torch.compile(block, fullgraph=True)
    with fastllm.backend(backend), fastllm.explain() as log:
        out_c = compiled(*leaves_c)
        out_c.square().sum().backward()
    out_e, out_r = eager(*leaves_e), eager(*leaves_r)
    out_e.square().sum().backward()
    out_r.square().sum().backward()
    assert {d.backend for d in log} == {backend}
    assert_equivalent(out_c, out_e, out_r, "compiled out")
    for name, c, e, r in zip(["x", "r", "w1", "b1", "w2"], leaves_c, leaves_e, leaves_r, strict=True):
        assert_equivalent(c.grad, e.grad, r.grad, f"compiled grad {name}")


# ---------------------------------------------------------------------------------------------- modules


def test_layernorm_module_loads_torch_state_dict():
    ref = torch.nn.LayerNorm(96)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = fastllm.nn.LayerNorm(96)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 96)
    torch.testing.assert_close(mod(x), ref(x))
    r = torch.randn(2, 7, 96)
    out, h = mod.add_forward(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, ref(x + r))
    with pytest.raises(TypeError):
        mod(x, r)  # forward has one return type: the residual form is add_forward
    # multi-dim normalized_shape and no affine
    ref2, mod2 = (
        torch.nn.LayerNorm((4, 6), elementwise_affine=False),
        fastllm.nn.LayerNorm((4, 6), elementwise_affine=False),
    )
    x2 = torch.randn(3, 4, 6)
    torch.testing.assert_close(mod2(x2), ref2(x2))
    assert list(fastllm.nn.LayerNorm(8, bias=False).state_dict()) == ["weight"]


def test_rmsnorm_module_loads_torch_state_dict():
    ref = torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    mod = fastllm.nn.RMSNorm(64, eps=1e-6)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(mod(x), ref(x))
    x.requires_grad_(True)
    mod(x).sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.shape == (64,)
    default_eps = fastllm.nn.RMSNorm(64)
    torch.testing.assert_close(default_eps(x), torch.nn.RMSNorm(64)(x))
    r = torch.randn(5, 64)
    out, h = mod.add_forward(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, ref(x + r))


# ---------------------------------------------------------------------------------------------- bad input

BAD = [
    ("x int", lambda: fastllm.layer_norm(torch.ones(2, 3, dtype=torch.int32)), TypeError, "floating"),
    ("x not tensor", lambda: fastllm.layer_norm([1.0, 2.0]), TypeError, "x must be a tensor"),
    ("x 0-dim", lambda: fastllm.layer_norm(torch.tensor(1.0)), ValueError, "at least 1 dim"),
    ("weight size", lambda: fastllm.layer_norm(torch.randn(2, 8), torch.randn(7)), ValueError, "weight must have shape (8,)"),
    ("weight 2-d", lambda: fastllm.rms_norm(torch.randn(2, 8), torch.randn(1, 8)), ValueError, "weight must have shape (8,)"),
    ("bias size", lambda: fastllm.layer_norm(torch.randn(2, 8), None, torch.randn(9)), ValueError, "bias must have shape (8,)"),
    ("weight dtype", lambda: fastllm.layer_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.float64)), TypeError, "weight has dtype"),
    ("residual dtype", lambda: fastllm.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half()), TypeError, "residual has dtype"),
    ("residual shape", lambda: fastllm.add_layer_norm(torch.randn(2, 8), torch.randn(1, 8)), ValueError, "residual must have"),
    ("device", lambda: fastllm.layer_norm(torch.randn(2, 8), torch.randn(8, device="meta")), ValueError, "meta"),
    ("eps negative", lambda: fastllm.layer_norm(torch.randn(2, 8), eps=-1.0), ValueError, "eps must be >= 0"),
    ("eps type", lambda: fastllm.rms_norm(torch.randn(2, 8), eps="1e-6"), TypeError, "eps must be a float"),
    ("weight type", lambda: fastllm.rms_norm(torch.randn(2, 8), weight=3.0), TypeError, "weight must be a tensor or None"),
]  # fmt: skip


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, msg):
    with pytest.raises(exc, match=None) as info:
        call()
    assert msg in str(info.value), str(info.value)


def test_bad_input_reaches_no_kernel_in_every_backend():
    for backend in ["cpp", "triton", "reference"]:
        with fastllm.backend(backend), pytest.raises(ValueError, match="weight must have shape"):
            fastllm.add_layer_norm(torch.randn(2, 8), torch.randn(2, 8), torch.randn(3))


def test_cpp_extension_loaded_unless_disabled():
    """A broken build must fail CI, not silently run the reference everywhere."""
    if os.environ.get("FASTLLM_NO_CPP") == "1":
        assert fastllm._ext.C is None
    else:
        assert fastllm._ext.C is not None, fastllm._ext.STATUS
