"""The Triton GEMM kernels (kernels/triton/gemm.py): linear (bias + activation + residual epilogue), the gated FFN
projection and the backward matmuls (plain, dact, dgated), called directly (the interpreter on CPU).

Criterion (fastllm.testing.assert_equivalent): err(ours) <= 2 * err(eager) + floor, errors against the same
computation in float64. "Eager" is what a PyTorch user runs in the input dtype: F.linear / matmul, then the
activation (and its autograd for the derivatives), then the residual or the gate product, each rounded to the
dtype. Shapes are small and odd (the interpreter is slow): several tiles of the interpreter's 16 x 16 x 16 config,
partial tiles in M, N and the K tail.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops.gemm import act_ref as act
from fastllm.testing import assert_equivalent

pytest.importorskip("triton")
from fastllm.kernels.triton import gemm

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ACTS = list(gemm.ACTIVATIONS)
GATED_ACTS = list(gemm.GATED_ACTIVATIONS)
# the interpreter evaluates exp(-t) of the sigmoids in numpy, which warns where it overflows to inf (as intended)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)


def rand(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


FP32_AND_BF16 = pytest.mark.parametrize("dtype", [F32, BF16], ids=str)


def opt(present: bool, *shape, dtype):
    """An optional input (bias, residual): a random tensor or None."""
    return rand(*shape, dtype=dtype) if present else None


def d64(t):
    return None if t is None else t.double()


def check_new(out, shape, dtype, name):
    """A new output: right shape and dtype, contiguous, no NaN."""
    assert out.shape == shape, f"{name}: shape {tuple(out.shape)} != {shape}"
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    assert out.is_contiguous(), f"{name}: not contiguous"
    assert not torch.isnan(out).any(), f"{name}: NaN"


# --------------------------------------------------------------------------------------------------
# linear


def linear_eager(x, w, b, r, activation):
    pre = F.linear(x, w, b)
    y = act(activation, pre)
    return (y + r if r is not None else y), pre


def check_linear(x, w, b, r, activation, save_pre, name, **kw):
    M, N = x.shape[0], w.shape[0]
    y, pre = gemm.linear(x, w, b, r, activation, save_pre, **kw)
    check_new(y, (M, N), x.dtype, f"{name} y")
    ref_y, ref_pre = linear_eager(x.double(), w.double(), d64(b), d64(r), activation)
    eager_y, eager_pre = linear_eager(x, w, b, r, activation)
    assert_equivalent(y, eager_y, ref_y, f"{name} y")
    if save_pre and activation != "none":
        check_new(pre, (M, N), x.dtype, f"{name} pre")
        assert_equivalent(pre, eager_pre, ref_pre, f"{name} pre")
    else:
        assert pre is None, f"{name}: pre returned without save_pre / activation"


# (M, N, K, bias, residual, save_pre)
LINEAR_CASES = [
    (1, 65, 33, True, False, True),
    (33, 65, 7, False, True, False),
    (65, 33, 65, True, True, True),
    (7, 1, 1, True, True, True),
]


@FP32_AND_BF16
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear(case, activation, dtype):
    M, N, K, has_b, has_r, save_pre = case
    x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype)
    b, r = opt(has_b, N, dtype=dtype), opt(has_r, M, N, dtype=dtype)
    check_linear(x, w, b, r, activation, save_pre, f"linear {case} {activation}")


@FP32_AND_BF16
def test_linear_strided_inputs(dtype):
    """x a transposed view, w a transposed view (K-contiguous -> N-contiguous), residual a column slice."""
    x = rand(40, 33, dtype=dtype).T  # (33, 40), stride (1, 33)
    w = rand(40, 21, dtype=dtype).T  # (21, 40), stride (1, 21)
    r = rand(33, 50, dtype=dtype)[:, 3:24]  # (33, 21), stride (50, 1)
    b = rand(21, dtype=dtype)
    check_linear(x, w, b, r, "gelu", True, "linear strided")


def test_linear_fp16():
    x, w, b, r = rand(33, 40, dtype=F16), rand(17, 40, dtype=F16), rand(17, dtype=F16), rand(33, 17, dtype=F16)
    check_linear(x, w, b, r, "silu", True, "linear fp16")


# (BLOCK_M, BLOCK_N, BLOCK_K[, EPI_SPLIT]): the test hook's forced tiles
BLOCKS = [(16, 32, 16, 2), (32, 16, 32), (16, 64, 64, 4)]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_linear_forced_blocks(block):
    """Other tile shapes: grouped order over 5 x 1-3 tiles, K in one partial or several steps, the epilogue on
    column slices of the tile (EPI_SPLIT 2, 4; slices wholly past N included)."""
    x, w, b, r = rand(70, 45), rand(37, 45), rand(37), rand(70, 37)
    check_linear(x, w, b, r, "quick_gelu", True, f"linear block={block}", block=block)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_gated_and_dgated_forced_blocks(block):
    x, wg, wu, bg, bu = rand(70, 45), rand(37, 45), rand(37, 45), rand(37), rand(37)
    check_gated(x, wg, wu, bg, bu, "gelu", True, f"gated block={block}", block=block)
    a, b = operands(70, 37, 45, F32, True, False)
    g, u = rand(70, 37), rand(70, 37)
    dg, du = gemm.matmul(a, b, "dgated", "silu", g, u, block=block)
    refs = dgated_eager(a.double() @ b.double(), g.double(), u.double(), "silu")
    eagers = dgated_eager(a @ b, g, u, "silu")
    assert_equivalent(dg, eagers[0], refs[0], f"dg block={block}")
    assert_equivalent(du, eagers[1], refs[1], f"du block={block}")


# --------------------------------------------------------------------------------------------------
# gated


def gated_eager(x, wg, wu, bg, bu, activation):
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)
    return act(activation, g) * u, g, u


def check_gated(x, wg, wu, bg, bu, activation, save_pre, name, **kw):
    M, N = x.shape[0], wg.shape[0]
    h, g, u = gemm.gated(x, wg, wu, bg, bu, activation, save_pre, **kw)
    refs = gated_eager(x.double(), wg.double(), wu.double(), d64(bg), d64(bu), activation)
    eagers = gated_eager(x, wg, wu, bg, bu, activation)
    check_new(h, (M, N), x.dtype, f"{name} h")
    assert_equivalent(h, eagers[0], refs[0], f"{name} h")
    if save_pre:
        for tname, t, e, ref in zip(["g", "u"], [g, u], eagers[1:], refs[1:], strict=True):
            check_new(t, (M, N), x.dtype, f"{name} {tname}")
            assert_equivalent(t, e, ref, f"{name} {tname}")
    else:
        assert g is None and u is None, f"{name}: g, u returned without save_pre"


# (M, N, K, bg, bu, save_pre). test_gated mirrors test_linear line for line (`duplicates` pairs them by shape):
# two ops with different arguments, kept as two plain parametrized tests rather than one indirect one.
GATED_CASES = [
    (1, 33, 7, True, True, True),
    (33, 7, 65, False, False, False),
    (65, 40, 33, True, False, True),
]


@FP32_AND_BF16
@pytest.mark.parametrize("activation", GATED_ACTS)
@pytest.mark.parametrize("case", GATED_CASES, ids=str)
def test_gated(case, activation, dtype):
    M, N, K, has_bg, has_bu, save_pre = case
    x, wg, wu = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype), rand(N, K, dtype=dtype)
    bg, bu = opt(has_bg, N, dtype=dtype), opt(has_bu, N, dtype=dtype)
    check_gated(x, wg, wu, bg, bu, activation, save_pre, f"gated {case} {activation}")


def test_gated_strided_and_fp16():
    x = rand(40, 21, dtype=F16).T  # (21, 40) transposed view
    w = rand(2 * 19, 40, dtype=F16)
    wg, wu = w[:19], w[19:]  # the halves of one fused weight, as a module may store them
    check_gated(x, wg, wu, rand(19, dtype=F16), rand(19, dtype=F16), "gelu_tanh", True, "gated fp16 strided")
    xs = rand(21, 40)
    check_gated(xs, rand(40, 19).T, rand(40, 19).T, None, None, "silu", True, "gated w.T views", block=(32, 16, 16))


# --------------------------------------------------------------------------------------------------
# matmul


def dact_eager(acc, pre, activation):
    """acc * act'(pre) by autograd of act in pre's dtype (what the backward of F.gelu etc. computes)."""
    leaf = pre.detach().clone().requires_grad_(True)
    (d,) = torch.autograd.grad(act(activation, leaf), leaf, grad_outputs=acc)
    return d


def dgated_eager(acc, g, u, activation):
    """(dg, du) of h = act(g) * u with dh = acc, by autograd in g's dtype."""
    gl, ul = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    return torch.autograd.grad(act(activation, gl) * ul, (gl, ul), grad_outputs=acc)


def operands(M, N, K, dtype, a_t, b_t):
    """a (M, K), b (K, N), each a transposed view when asked (as dy.T, w in the backward)."""
    a = rand(K, M, dtype=dtype).T if a_t else rand(M, K, dtype=dtype)
    b = rand(N, K, dtype=dtype).T if b_t else rand(K, N, dtype=dtype)
    return a, b


# (M, N, K, a transposed, b transposed)
MM_CASES = [(33, 7, 65, True, False), (65, 40, 33, False, True), (1, 33, 7, True, True)]


@FP32_AND_BF16
@pytest.mark.parametrize("case", MM_CASES, ids=str)
def test_matmul_none(case, dtype):
    M, N, K, a_t, b_t = case
    a, b = operands(M, N, K, dtype, a_t, b_t)
    c, c2 = gemm.matmul(a, b)
    check_new(c, (M, N), dtype, "matmul")
    assert c2 is None
    assert_equivalent(c, a @ b, a.double() @ b.double(), f"matmul {case}")


@FP32_AND_BF16
@pytest.mark.parametrize("activation", GATED_ACTS)
@pytest.mark.parametrize("case", MM_CASES[:2], ids=str)
def test_matmul_dact(case, activation, dtype):
    M, N, K, a_t, b_t = case
    a, b = operands(M, N, K, dtype, a_t, b_t)
    pre = rand(M, N, dtype=dtype)
    c, c2 = gemm.matmul(a, b, "dact", activation, pre)
    check_new(c, (M, N), dtype, "dact")
    assert c2 is None
    ref = dact_eager(a.double() @ b.double(), pre.double(), activation)
    assert_equivalent(c, dact_eager(a @ b, pre, activation), ref, f"dact {case} {activation}")


@FP32_AND_BF16
@pytest.mark.parametrize("activation", GATED_ACTS)
@pytest.mark.parametrize("case", MM_CASES[:2], ids=str)
def test_matmul_dgated(case, activation, dtype):
    M, N, K, a_t, b_t = case
    a, b = operands(M, N, K, dtype, a_t, b_t)
    g, u = rand(M, N, dtype=dtype), rand(M, N, dtype=dtype)
    dg, du = gemm.matmul(a, b, "dgated", activation, g, u)
    refs = dgated_eager(a.double() @ b.double(), g.double(), u.double(), activation)
    eagers = dgated_eager(a @ b, g, u, activation)
    for name, t, e, r in zip(["dg", "du"], [dg, du], eagers, refs, strict=True):
        check_new(t, (M, N), dtype, name)
        assert_equivalent(t, e, r, f"dgated {case} {activation} {name}")


def test_matmul_fp16_and_strided_aux():
    a, b = operands(21, 17, 40, F16, True, False)
    g = rand(21, 30, dtype=F16)[:, 5:22]  # aux with a row stride of 30
    u = rand(17, 21, dtype=F16).T  # aux2 column-major
    dg, du = gemm.matmul(a, b, "dgated", "gelu", g, u)
    refs = dgated_eager(a.double() @ b.double(), g.double(), u.double(), "gelu")
    eagers = dgated_eager(a @ b, g, u, "gelu")
    assert_equivalent(dg, eagers[0], refs[0], "fp16 dg")
    assert_equivalent(du, eagers[1], refs[1], "fp16 du")
    c, _ = gemm.matmul(a, b, "dact", "silu", u, block=(32, 32, 16))
    assert_equivalent(c, dact_eager(a @ b, u, "silu"), dact_eager(a.double() @ b.double(), u.double(), "silu"), "dact")


# --------------------------------------------------------------------------------------------------
# Empty dimensions.


@FP32_AND_BF16
def test_k_zero(dtype):
    """K == 0: acc = 0, the epilogue still runs (bias, activation, residual, the gate)."""
    M, N = 7, 33
    x, w = rand(M, 0, dtype=dtype), rand(N, 0, dtype=dtype)
    b, r = rand(N, dtype=dtype), rand(M, N, dtype=dtype)
    check_linear(x, w, b, r, "gelu", True, "linear K=0")
    y, _ = gemm.linear(x, w, None, None, "silu")
    assert (y == 0).all()
    bg, bu = rand(N, dtype=dtype), rand(N, dtype=dtype)
    check_gated(x, w, w, bg, bu, "silu", True, "gated K=0")
    a, bm = rand(M, 0, dtype=dtype), rand(0, N, dtype=dtype)
    c, _ = gemm.matmul(a, bm)
    check_new(c, (M, N), dtype, "matmul K=0")
    assert (c == 0).all()
    dg, du = gemm.matmul(a, bm, "dgated", "gelu", rand(M, N, dtype=dtype), rand(M, N, dtype=dtype))
    assert (dg == 0).all() and (du == 0).all()


def test_m_or_n_zero():
    """M == 0 or N == 0: empty outputs of the right shapes, nothing launched."""
    for M, N in [(0, 7), (7, 0)]:
        x, w = rand(M, 5), rand(N, 5)
        y, pre = gemm.linear(x, w, rand(N), rand(M, N), "relu", True)
        assert y.shape == (M, N) and pre.shape == (M, N) and y.dtype == F32
        h, g, u = gemm.gated(x, w, w, None, None, "silu", True)
        assert h.shape == g.shape == u.shape == (M, N)
        c, c2 = gemm.matmul(rand(M, 5), rand(5, N), "dgated", "silu", rand(M, N), rand(M, N))
        assert c.shape == c2.shape == (M, N)


def test_outputs_fully_written(monkeypatch):
    """Every element of every output is written: with torch.empty poisoned to NaN the results still meet the
    criterion (partial tiles in M and N)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x, w, wu, b = rand(35, 19), rand(21, 19), rand(21, 19), rand(21)
    a, bm = rand(35, 19), rand(19, 21)
    aux, aux2 = rand(35, 21), rand(35, 21)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        y, pre = gemm.linear(x, w, b, None, "gelu", True)
        h, g, u = gemm.gated(x, w, wu, b, None, "silu", True)
        dact, _ = gemm.matmul(a, bm, "dact", "relu", aux)
        dg, du = gemm.matmul(a, bm, "dgated", "quick_gelu", aux, aux2)
    for t in (y, pre, h, g, u, dact, dg, du):
        assert not torch.isnan(t).any()
    assert_equivalent(y, F.gelu(F.linear(x, w, b)), F.gelu(F.linear(x.double(), w.double(), b.double())), "y")
    assert_equivalent(h, *(gated_eager(x_, w_, u_, b_, None, "silu")[0] for x_, w_, u_, b_ in [
        (x, w, wu, b), (x.double(), w.double(), wu.double(), b.double())]), "h")  # fmt: skip
    ref = dgated_eager(a.double() @ bm.double(), aux.double(), aux2.double(), "quick_gelu")
    eager = dgated_eager(a @ bm, aux, aux2, "quick_gelu")
    assert_equivalent(dg, eager[0], ref[0], "dg")
    assert_equivalent(du, eager[1], ref[1], "du")


def test_bad_block():
    with pytest.raises(ValueError, match="powers of two"):
        gemm.linear(rand(4, 4), rand(4, 4), block=(8, 16, 16))
    with pytest.raises(ValueError, match="split"):
        gemm.linear(rand(4, 4), rand(4, 4), block=(16, 16, 16, 3))
