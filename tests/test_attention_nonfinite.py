"""NaN and Inf through attention: the non-finite pattern of the output and of dq, dk, dv must be exactly torch
eager's (torch.nn.functional.scaled_dot_product_attention in the same dtype, with the equivalent attn_mask) on
every backend: C++ (both ISA paths), the reference and Triton (the interpreter on CPU).

One element of q, k, v or of an additive mask is set to NaN, +inf or -inf, at a place every query row that reads
it can see (so the comparison does not depend on how a tiled kernel treats keys a row cannot see, see below).

Eager is torch's SDPA math kernel (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), the plain composition
softmax(q k^T * scale + mask) v, given an explicit attn_mask (all True when nothing is masked). Not the CPU flash
kernel that SDPA picks by default on CPU: in torch 2.13 it returns zeros, silently, for a query row holding a NaN
when there is no mask (or is_causal=True), and in bfloat16 / float16 for a row with a +inf score (a +inf in k or
q times a key element of the right sign), where its math kernel, and fastllm, return NaN.

Documented differences, not tested as equal: a NaN / Inf in k or v at a key a row cannot see (causal, bool mask
False, past cache_seqlens) does not reach that row through its score (fastllm replaces invisible scores by -inf;
torch adds the -inf mask to the NaN score, which stays NaN), and past cache_seqlens nothing is read at all
(test_decode_ignores_nan_past_cache_length); a NaN / Inf *value* (v) of such a key does reach the rows whose tile
computes P V over it (0 * NaN; the reference: every row), where torch gives NaN in every row. Fully masked rows
give zeros and zero gradients, as torch 2.13 does (tested below).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastllm
from fastllm.testing import assert_same_nonfinite

# numpy's warnings from NaN / Inf arithmetic (and max over a NaN row) in the Triton interpreter are what these
# tests are about
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["out", "dq", "dk", "dv"]


def sdpa_math(q, k, v, mask):
    """torch's eager SDPA (math kernel, see the module docstring) with GQA."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def causal_keep(Sq, Sk):
    """Bool (Sq, Sk): bottom-right causal, query i sees key j <= i + Sk - Sq (flash_attention's alignment)."""
    return torch.arange(Sk).view(1, -1) <= torch.arange(Sq).view(-1, 1) + (Sk - Sq)


def make_case(layout, inp, value, dtype, shape):
    """(q, k, v, fastllm's attn_mask, eager's attn_mask, causal) with one element poisoned.

    q: its last query row (which sees every key, causal or not); k and v: key 0 (seen by every row); mask: the
    element (last row, key 0). The additive mask is there for input "mask" and for layout "additive"."""
    B, Hq, Hkv, Sq, Sk, D = shape
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    mask = torch.randn(B, 1, Sq, Sk, dtype=dtype) if inp == "mask" or layout == "additive" else None
    x = VALUES[value]
    if inp == "q":
        q[B - 1, Hq - 1, Sq - 1, 1] = x
    elif inp == "k":
        k[B - 1, Hkv - 1, 0, 1] = x
    elif inp == "v":
        v[B - 1, Hkv - 1, 0, 1] = x
    else:
        mask[B - 1, 0, Sq - 1, 0] = x
    causal = layout == "causal"
    keep = causal_keep(Sq, Sk) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    eager_mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
    return q, k, v, mask, eager_mask, causal


def grads_of(fn, q, k, v, dout, backward):
    """[out] or [out, dq, dk, dv] of fn(q, k, v) with the loss sum(out * dout)."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    out = fn(*leaves)
    if not backward:
        return [out.detach()]
    (out.double() * dout.double()).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def check(backend, layout, inp, value, dtype, backward, shape):
    q, k, v, mask, eager_mask, causal = make_case(layout, inp, value, dtype, shape)
    eager = compare(
        backend, q, k, v, mask, eager_mask, causal, backward, f"{backend} {layout} {dtype} {value} in {inp}"
    )
    if value == "nan" or inp in ("q", "v") or (inp == "mask" and value == "inf"):
        assert not torch.isfinite(eager[0]).all(), "the injected value should reach eager's output"


def compare(backend, q, k, v, mask, eager_mask, causal, backward, what):
    """flash_attention on `backend` against eager: the same non-finite pattern in out (and dq, dk, dv)."""
    dout = torch.randn(q.shape, dtype=q.dtype)
    with fastllm.backend(backend), fastllm.explain() as log:
        got = grads_of(
            lambda q, k, v: fastllm.flash_attention(q, k, v, causal=causal, attn_mask=mask), q, k, v, dout, backward
        )
    ran = [(d.op, d.backend) for d in log]
    assert ran == [("attention_fwd", backend)] + ([("attention_bwd", backend)] if backward else []), ran
    eager = grads_of(lambda q, k, v: sdpa_math(q, k, v, eager_mask), q, k, v, dout, backward)
    for name, g, e in zip(NAMES[: len(got)], got, eager, strict=True):
        assert_same_nonfinite(g, e, f"{what}: {name}")
    return eager


# (B, Hq, Hkv, Sq, Sk, D): GQA, odd lengths (partial tiles, padded rows); "long" has two key splits in the C++
# forward (a query block against > 528 keys); Triton: Sq <= 16 takes the split-K decode kernels, 20 the FA-2 kernel.
SHAPE = (2, 4, 2, 5, 7, 24)
LONG = (1, 2, 1, 3, 700, 16)
TRITON_SHAPES = {"decode": (1, 2, 1, 5, 21, 8), "fa2": (1, 2, 1, 20, 21, 8)}
INPUTS = ["q", "k", "v", "mask"]
LAYOUTS = ["plain", "additive", "causal"]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp(cpu_isa, dtype, layout, inp, value, backward):
    check("cpp", layout, inp, value, dtype, backward, SHAPE)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_split_keys(cpu_isa, dtype, inp, value):
    """The forward's split-K merge (flash-decoding) must keep a split's NaN."""
    check("cpp", "causal", inp, value, dtype, True, LONG)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference(dtype, layout, inp, value, backward):
    check("reference", layout, inp, value, dtype, backward, SHAPE)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("layout", ["plain", "causal"])
@pytest.mark.parametrize("kernel", TRITON_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton(need_backend, dtype, kernel, layout, inp, value):
    need_backend("triton")
    check("triton", layout, inp, value, dtype, True, TRITON_SHAPES[kernel])


def check_key_hidden_by_inf(backend, dtype, shape):
    """k[key 3, d 1] = -inf and q[..., 1] > 0 everywhere: every row scores that key -inf (it sees it with weight
    0), so out, dk and dv stay finite and dq is NaN in column 1 only (0 * inf in dS K), as in eager. Padded query
    rows of a partial tile (q = 0 there, 0 * -inf = NaN) must not reach dK / dV."""
    B, Hq, Hkv, Sq, Sk, D = shape
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    q[..., 1] = q[..., 1].abs() + 0.1
    k, v = (torch.randn(B, Hkv, Sk, D, dtype=dtype) for _ in range(2))
    k[:, :, 3, 1] = float("-inf")
    eager = compare(backend, q, k, v, None, torch.ones(Sq, Sk, dtype=torch.bool), False, True, f"{backend} {dtype}")
    assert torch.isfinite(eager[0]).all() and torch.isfinite(eager[3]).all() and torch.isnan(eager[1]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_hidden_by_inf_cpp(cpu_isa, dtype):
    check_key_hidden_by_inf("cpp", dtype, SHAPE)


@pytest.mark.parametrize("shape", [SHAPE, *TRITON_SHAPES.values()], ids=["shape", *TRITON_SHAPES])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_hidden_by_inf(need_backend, dtype, backend, shape):
    check_key_hidden_by_inf(need_backend(backend), dtype, shape)


# ---------------------------------------------------------------------------------------------- fully masked rows


def fully_masked_case(kind, dtype):
    """q/k/v (1, 2, 6, 9, 16) and a mask hiding every key from row 2 of head 0 (and from row 4 of head 1)."""
    q, k, v = (torch.randn(1, 2, n, 16, dtype=dtype) for n in (6, 9, 9))
    keep = torch.rand(1, 2, 6, 9) < 0.8
    keep[0, 0, 2] = False
    keep[0, 1, 4] = False
    if kind == "bool":
        return q, k, v, keep
    return q, k, v, torch.randn(1, 2, 6, 9, dtype=dtype).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_cpp(cpu_isa, dtype, kind):
    check_fully_masked("cpp", dtype, kind)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(need_backend, dtype, backend, kind):
    need_backend(backend)
    check_fully_masked(backend, dtype, kind)


def check_fully_masked(backend, dtype, kind):
    """out = 0 and dq = 0 on a row that sees no key, and no NaN anywhere: fastllm's documented rule, which torch
    2.13's eager SDPA (CPU, its math and its flash kernel alike) follows too (checked here on the math kernel, so
    a torch that changes shows up)."""
    q, k, v, mask = fully_masked_case(kind, dtype)
    dout = torch.randn(q.shape, dtype=dtype)
    with fastllm.backend(backend), fastllm.explain() as log:
        got = grads_of(lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, mask), q, k, v, dout, True)
    assert {d.backend for d in log} == {backend}, [str(d) for d in log]
    eager = grads_of(lambda q, k, v: sdpa_math(q, k, v, mask), q, k, v, dout, True)
    for name, g, e in zip(NAMES, got, eager, strict=True):
        assert torch.isfinite(e).all(), f"torch's eager SDPA: {name} not finite on a fully masked row"
        assert_same_nonfinite(g, e, f"{backend} {kind} {dtype} {name}")
    for t, name in [(got[0], "out"), (got[1], "dq"), (eager[0], "eager out"), (eager[1], "eager dq")]:
        assert (t[0, 0, 2] == 0).all() and (t[0, 1, 4] == 0).all(), f"{name}: fully masked rows must be 0"


# ---------------------------------------------------------------------------------------------- decode


def decode_eager(q, k_cache, v_cache, lens):
    """Per sequence: torch's SDPA (math) over the first len keys with an explicit bottom-right causal mask."""
    out = torch.zeros_like(q)
    for b, n in enumerate(lens.tolist()):
        if n:
            m = causal_keep(q.shape[2], n)
            out[b : b + 1] = sdpa_math(q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n], m)
    return out


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_cpp(cpu_isa, dtype, inp, value):
    check_decode("cpp", dtype, inp, value)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("inp", ["q", "k", "v"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(need_backend, dtype, backend, inp, value):
    need_backend(backend)
    check_decode(backend, dtype, inp, value)


def check_decode(backend, dtype, inp, value):
    """decode_attention with a non-finite element in a visible cache slot (key 0 of sequence 1, or a query) and NaN
    past every sequence's length (never read). The C++ path splits the 700-key cache in two (3 row blocks for one
    thread: flash-decoding with its merge), the Triton one runs its split-K kernels."""
    S_max = 40 if backend == "triton" else 700
    lens = torch.tensor([S_max - 3, S_max // 2, 0], dtype=torch.int32)
    q = torch.randn(3, 4, 2, 16, dtype=dtype)  # MQA: 4 query heads on one kv head
    k_cache, v_cache = (torch.randn(3, 1, S_max, 16, dtype=dtype) for _ in range(2))
    for b, n in enumerate(lens.tolist()):
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("nan")
    {"q": q[1, 3, 1], "k": k_cache[1, 0, 0], "v": v_cache[1, 0, 0]}[inp][5] = VALUES[value]
    with fastllm.backend(backend), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k_cache, v_cache, lens)
    assert [d.backend for d in log] == [backend], [str(d) for d in log]
    eager = decode_eager(q, k_cache, v_cache, lens)
    assert torch.isfinite(eager[0]).all(), "sequence 0 holds no injected value"
    if value == "nan" or inp != "k":
        assert not torch.isfinite(eager).all(), "the injected value should reach eager's output"
    assert_same_nonfinite(out, eager, f"decode {backend} {dtype} {value} in {inp}")
