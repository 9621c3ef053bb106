"""The Triton int8 kernels (kernels/triton/int8.py): per-row quantization, the int8 x int8 GEMM with a dequantizing
epilogue and the weight-only int8 GEMM (split-K small-M path and tiled path), called directly (the interpreter on
CPU).

quantize_rows is checked bit for bit against the reference formula; int8_matmul's int32 product exactly (unit
scales, fp32 output, |acc| < 2^24, against an int64 matmul), its epilogue against float64 within a few ulps;
w8a16_matmul with fastllm.testing.assert_equivalent (eager = F.linear of the widened weight in x's dtype).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastllm.testing import assert_equivalent

pytest.importorskip("triton")
from fastllm.kernels.triton import int8

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
F32, BF16, F16, I8 = torch.float32, torch.bfloat16, torch.float16, torch.int8

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)


def rand(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def randq(*shape):
    """Random int8 in [-128, 127]."""
    return torch.randint(-128, 128, shape, dtype=I8, device=DEVICE)


def check_new(out, shape, dtype, name):
    assert out.shape == shape, f"{name}: shape {tuple(out.shape)} != {shape}"
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    assert out.is_contiguous(), f"{name}: not contiguous"


# --------------------------------------------------------------------------------------------------
# quantize_rows


def quantize_ref(x):
    amax = x.float().abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    scale = torch.where(amax == 0, 1, amax / 127)
    q = torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(I8)
    return q, scale


def check_quantize(x, name, **kw):
    q, s = int8.quantize_rows(x, **kw)
    check_new(q, tuple(x.shape), I8, f"{name} q")
    check_new(s, (x.shape[0],), F32, f"{name} scale")
    rq, rs = quantize_ref(x)
    assert torch.equal(s, rs), f"{name}: scale differs at {(s != rs).nonzero()[:4].tolist()}"
    assert torch.equal(q, rq), f"{name}: q differs at {(q != rq).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("K", [1, 7, 100, 1000])
def test_quantize_rows(K, dtype):
    """Rows of different scales (1e-3 .. 1e3), an all-zero row, a row of one repeated value (amax / scale = 127
    exactly), a row with exact .5 quotients (round half to even), a tiny-magnitude row."""
    M = 9
    x = rand(M, K) * torch.logspace(-3, 3, M, device=DEVICE)[:, None]
    x[2] = 0
    x[3] = -2.5
    x[4] = torch.arange(K, device=DEVICE) % 7 - 3.5  # amax 3.5 (scale 3.5 / 127): quotients near .5
    x[5, 0] = 127.0  # scale 1 when the rest is smaller: x / 1 with .5 fractions below
    x[5, 1:] = (torch.arange(K - 1, device=DEVICE) % 255 - 127) / 2
    x[6] *= 1e-30
    x = x.to(dtype)
    check_quantize(x, f"quantize K={K} {dtype}")
    if K > 1:
        check_quantize(x, f"quantize K={K} {dtype} one tile", block=(2, triton_pow2(K)))


def triton_pow2(n):
    return max(16, 1 << (n - 1).bit_length())


def test_quantize_half_even_and_strided():
    """Quotients exactly at k + 0.5 (scale 1: amax 127) round to even; a transposed (column-major) x."""
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], device=DEVICE)
    q, s = int8.quantize_rows(row[None, :])
    assert s.item() == 1.0
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126]
    x = rand(40, 21).T  # (21, 40), strides (1, 21)
    check_quantize(x, "quantize strided", block=(4, 16))
    check_quantize(rand(33, 1000, dtype=BF16)[:, ::3], "quantize column slice")


def test_quantize_empty():
    q, s = int8.quantize_rows(rand(0, 5))
    assert q.shape == (0, 5) and s.shape == (0,)
    q, s = int8.quantize_rows(rand(3, 0))
    assert q.shape == (3, 0) and q.dtype == I8 and torch.equal(s, torch.ones(3, device=DEVICE))


# --------------------------------------------------------------------------------------------------
# int8_matmul


def ones(n):
    return torch.ones(n, dtype=F32, device=DEVICE)


def check_exact_product(a, b, name, **kw):
    """Unit scales, fp32 output: out is the int32 product converted to fp32, exact while |acc| < 2^24."""
    ref = a.long() @ b.long().T
    assert ref.abs().max().item() < 2**24
    out = int8.int8_matmul(a, b, ones(a.shape[0]), ones(b.shape[0]), **kw)
    check_new(out, tuple(ref.shape), F32, name)
    bad = out.double() != ref.double()
    assert not bad.any(), f"{name}: {int(bad.sum())} wrong, first {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("K", [16, 100])
@pytest.mark.parametrize("N", [1, 33])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_int8_product_exact(M, N, K):
    check_exact_product(randq(M, K), randq(N, K), f"int8 {M}x{N}x{K}")


def test_int8_product_extremes():
    """All -128 (sum of 2^14 products: int8 x int8 must not wrap), all 127, mixed signs; several K steps."""
    M, N, K = 7, 33, 100
    full = lambda v, *s: torch.full(s, v, dtype=I8, device=DEVICE)
    check_exact_product(full(-128, M, K), full(-128, N, K), "int8 -128 * -128")
    check_exact_product(full(127, M, K), full(127, N, K), "int8 127 * 127")
    check_exact_product(full(-128, M, K), full(127, N, K), "int8 -128 * 127")
    a = torch.where(torch.rand(M, K, device=DEVICE) < 0.5, -128, 127).to(I8)
    b = torch.where(torch.rand(N, K, device=DEVICE) < 0.5, -128, 127).to(I8)
    check_exact_product(a, b, "int8 mixed extremes")
    check_exact_product(a, b, "int8 mixed extremes block", block=(32, 16, 64))


def test_int8_product_strided():
    """a a transposed view, b a column slice of a wider weight, b a transposed view."""
    a = randq(40, 33).T  # (33, 40)
    b = randq(21, 50)[:, 5:45]  # (21, 40), row stride 50
    check_exact_product(a, b, "int8 strided")
    check_exact_product(a, randq(40, 21).T, "int8 b transposed")


def int8_ref(a, b, sa, sb, bias):
    out = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :]
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_epilogue(has_bias, out_dtype):
    """Scales and bias in fp32, one rounding: within 4 fp32 ulps of float64 (relative to the magnitude of the
    product, since the bias may cancel) for fp32 outputs, one ulp of the output type otherwise."""
    M, N, K = 33, 33, 70
    a, b = randq(M, K), randq(N, K)
    sa, sb = torch.rand(M, device=DEVICE) / 64 + 1e-3, torch.rand(N, device=DEVICE) / 64 + 1e-3
    bias = (rand(N) * 10).to(out_dtype) if has_bias else None
    out = int8.int8_matmul(a, b, sa, sb, bias, out_dtype)
    check_new(out, (M, N), out_dtype, "int8 epilogue")
    ref = int8_ref(a, b, sa, sb, bias)
    prod = (a.double() @ b.double().T).abs() * sa.double()[:, None] * sb.double()[None, :]
    mag = prod + (bias.double().abs() if bias is not None else 0)
    if out_dtype == F32:
        tol = 4 * torch.finfo(F32).eps * mag
    else:
        tol = torch.finfo(out_dtype).eps * ref.abs() + 4 * torch.finfo(F32).eps * mag  # one ulp of the output
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"int8 epilogue {out_dtype}: max err / tol {(err / tol).max().item():.3g}"


def test_int8_k_zero_and_empty():
    M, N = 7, 33
    bias = rand(N)
    out = int8.int8_matmul(randq(M, 0), randq(N, 0), ones(M), ones(N), bias)
    assert torch.equal(out, bias.expand(M, N))
    out = int8.int8_matmul(randq(M, 0), randq(N, 0), ones(M), ones(N), None, BF16)
    check_new(out, (M, N), BF16, "int8 K=0")
    assert (out == 0).all()
    for m, n in [(0, 5), (5, 0)]:
        out = int8.int8_matmul(randq(m, 9), randq(n, 9), ones(m), ones(n), None, F16)
        check_new(out, (m, n), F16, "int8 empty")


def test_int8_quantized_linear_roundtrip():
    """quantize_rows + int8_matmul against the same pipeline in float64 (what fastllm.ops.int8 composes)."""
    x, w, bias = rand(9, 64), rand(17, 64), rand(17)
    xq, xs = int8.quantize_rows(x)
    wq, ws = int8.quantize_rows(w)
    out = int8.int8_matmul(xq, wq, xs, ws, bias)
    ref = int8_ref(xq, wq, xs, ws, bias)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-5)
    assert (out.double() - x.double() @ w.double().T - bias.double()).abs().max() < 0.5  # the quantization error


# --------------------------------------------------------------------------------------------------
# w8a16_matmul


def w8a16_eager(x, b_q, b_scale, bias):
    y = F.linear(x, b_q.to(x.dtype)) * b_scale.to(x.dtype)
    return y + bias if bias is not None else y


def check_w8a16(x, b_q, b_scale, bias, name, **kw):
    out = int8.w8a16_matmul(x, b_q, b_scale, bias, **kw)
    check_new(out, (x.shape[0], b_q.shape[0]), x.dtype, name)
    ref = w8a16_eager(x.double(), b_q, b_scale.double(), bias.double() if bias is not None else None)
    assert_equivalent(out, w8a16_eager(x, b_q, b_scale, bias), ref, name)


# (M, N, K, bias, small_m hook): M <= 16 takes the split-K path by default
W8A16_CASES = [
    (1, 33, 70, True, None),  # split-K, 3 chunks (the interpreter's 32-wide chunks), reduce kernel
    (3, 17, 30, False, None),  # split-K, one chunk: epilogue in the split kernel
    (33, 33, 70, True, None),  # tiled
    (3, 33, 45, True, False),  # tiled path forced at small M
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case", W8A16_CASES, ids=str)
def test_w8a16(case, dtype):
    M, N, K, has_bias, small_m = case
    x, b_q, b_scale = rand(M, K, dtype=dtype), randq(N, K), torch.rand(N, device=DEVICE) / 64
    bias = rand(N, dtype=dtype) if has_bias else None
    check_w8a16(x, b_q, b_scale, bias, f"w8a16 {case} {dtype}", small_m=small_m)


def test_w8a16_fp16_strided_and_blocks():
    x = rand(45, 16, dtype=F16).T  # (16, 45) transposed view: split-K path at M = 16
    b_q, b_scale, bias = randq(37, 45), torch.rand(37, device=DEVICE) / 64, rand(37, dtype=F16)
    check_w8a16(x, b_q, b_scale, bias, "w8a16 fp16 strided")
    check_w8a16(x, b_q, b_scale, bias, "w8a16 fp16 split block", block=(32, 16), k_per_split=16)
    check_w8a16(x, randq(45, 37).T, b_scale, None, "w8a16 fp16 b transposed")
    xb = rand(70, 45, dtype=BF16)
    check_w8a16(xb, b_q, b_scale, bias.to(BF16), "w8a16 bf16 tiled block", block=(32, 16, 32))


def test_w8a16_k_zero_and_empty():
    for M in (1, 33):
        bias = rand(5)
        out = int8.w8a16_matmul(rand(M, 0), randq(5, 0), torch.rand(5, device=DEVICE), bias)
        assert torch.equal(out, bias.expand(M, 5))
        out = int8.w8a16_matmul(rand(M, 0, dtype=BF16), randq(5, 0), torch.rand(5, device=DEVICE))
        check_new(out, (M, 5), BF16, "w8a16 K=0")
        assert (out == 0).all()
    for m, n in [(0, 5), (5, 0), (40, 0)]:
        out = int8.w8a16_matmul(rand(m, 9, dtype=F16), randq(n, 9), torch.rand(n, device=DEVICE))
        check_new(out, (m, n), F16, "w8a16 empty")


def test_bad_hooks():
    with pytest.raises(ValueError, match="BLOCK_K >= 32"):
        int8.int8_matmul(randq(4, 4), randq(4, 4), ones(4), ones(4), block=(16, 16, 16))
    with pytest.raises(ValueError, match="split-K path"):
        int8.w8a16_matmul(rand(17, 4), randq(4, 4), ones(4), small_m=True)


def test_strided_vectors_and_outputs_fully_written(monkeypatch):
    """Scales and bias as strided 1-D views; with torch.empty poisoned to NaN (outputs and the split-K workspace)
    every output element is still written (partial tiles in M and N, several split-K chunks and reduce blocks)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    M, N, K = 35, 37, 70
    a, b = randq(M, K), randq(N, K)
    sa, sb = torch.rand(2 * M, device=DEVICE)[::2], torch.rand(3 * N, device=DEVICE)[::3]
    bias = rand(2 * N)[::2]
    x1, x2 = rand(3, K, dtype=BF16), rand(M, K, dtype=BF16)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        out = int8.int8_matmul(a, b, sa, sb, bias)
        y1 = int8.w8a16_matmul(x1, b, sb, bias.to(BF16))
        y2 = int8.w8a16_matmul(x2, b, sb, bias.to(BF16))
    ref = int8_ref(a, b, sa, sb, bias)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)
    for x, y in [(x1, y1), (x2, y2)]:
        assert not torch.isnan(y).any()
        r = w8a16_eager(x.double(), b, sb.double(), bias.to(BF16).double())
        assert_equivalent(y, w8a16_eager(x, b, sb, bias.to(BF16)), r, "w8a16 poisoned")
