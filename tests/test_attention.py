"""fastllm.flash_attention / scaled_dot_product_attention / decode_attention: equivalence (forward and
backward) against torch's own SDPA (float64 = reference, input dtype = eager) on the C++ backend (both ISA
paths) and the reference, GQA/MQA, causal (bottom-right), bool/additive masks, decode with ragged
cache lengths, non-contiguous and empty inputs, bad inputs, opcheck, torch.compile, determinism, memory."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastllm
import fastllm._ext
from fastllm.testing import assert_equivalent

NEG_INF = float("-inf")


def cpp_expected():
    return "cpp" if fastllm._ext.C is not None else "reference"


# ---------------------------------------------------------------------------------------------- torch oracle


def causal_keep(Sq, Sk, bottom_right=True):
    """Bool (Sq, Sk): query i sees key j <= i + (Sk - Sq) (bottom-right) or j <= i (top-left)."""
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Sk).view(1, -1)
    return j <= i + ((Sk - Sq) if bottom_right else 0)


def combined_mask(Sq, Sk, causal, mask):
    """The user mask combined with the bottom-right causal mask, as one torch SDPA attn_mask (or None)."""
    if not causal:
        return mask
    keep = causal_keep(Sq, Sk)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.tensor(NEG_INF, dtype=mask.dtype))


def torch_attention(q, k, v, *, causal=False, attn_mask=None, scale=None):
    """What a user writes in eager PyTorch for fastllm.flash_attention (float64 inputs: the reference)."""
    m = attn_mask
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    m = combined_mask(q.shape[-2], k.shape[-2], causal, m)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


def visible_rows(B, Hq, Sq, Sk, causal, mask):
    """Bool (B, Hq, Sq): which query rows see at least one key."""
    vis = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool)
    if causal:
        vis = vis & causal_keep(Sq, Sk)
    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask != NEG_INF
        vis = vis & m
    return vis.any(-1)


def run_with_grads(fn, q, k, v, dout, **kw):
    """[out, dq, dk, dv] of fn with the loss sum(out * dout) (gradients in the inputs' dtype)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    (out.double() * dout.double()).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


NAMES = ["out", "dq", "dk", "dv"]


def check_equivalent(got, eager, ref, name):
    """assert_equivalent; for float64 inputs (eager *is* the reference) a tight relative check instead."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    else:
        assert_equivalent(got, eager, ref, name)


# ---------------------------------------------------------------------------------------------- inputs


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    return q, k, v


def make_mask(kind, B, Hq, Sq, Sk, dtype):
    """Masks with at least one fully masked query row (except the key-padding mask at B == 1)."""
    if kind is None:
        return None
    if kind == "bool4":  # full (B, Hq, Sq, Sk)
        m = torch.rand(B, Hq, Sq, Sk) < 0.8
        m[0, 0, Sq // 2] = False
    elif kind == "float4":  # additive, broadcast over heads
        m = torch.randn(B, 1, Sq, Sk) * 2
        m[torch.rand(B, 1, Sq, Sk) < 0.1] = NEG_INF
        m[-1, 0, 0] = NEG_INF
        m = m.to(dtype)
    elif kind == "keypad":  # (B, 1, 1, Sk) key padding; lengths from Sk down to 0 (batch B-1 sees nothing)
        lens = torch.linspace(Sk, 0, B).round().long() if B > 1 else torch.tensor([max(1, Sk // 2)])
        m = torch.arange(Sk).view(1, 1, 1, Sk) < lens.view(B, 1, 1, 1)
    elif kind == "bool2":  # 2-D (Sq, Sk)
        m = torch.rand(Sq, Sk) < 0.7
        m[0] = False
    elif kind == "float2":  # 2-D additive
        m = torch.randn(Sq, Sk) * 2
        m[-1] = NEG_INF
        m = m.to(dtype)
    else:
        raise AssertionError(kind)
    return m


def check_attention(
    B, Hq, Hkv, Sq, Sk, D, dtype, causal=False, mask_kind=None, backend="auto", expect=None, scale=None
):
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype)
    mask = make_mask(mask_kind, B, Hq, Sq, Sk, dtype)
    dout = torch.randn(B, Hq, Sq, D, dtype=dtype)
    with fastllm.backend(backend), fastllm.explain() as log:
        got = run_with_grads(fastllm.flash_attention, q, k, v, dout, causal=causal, attn_mask=mask, scale=scale)
    eager = run_with_grads(torch_attention, q, k, v, dout, causal=causal, attn_mask=mask, scale=scale)
    ref = run_with_grads(
        torch_attention, q.double(), k.double(), v.double(), dout, causal=causal, attn_mask=mask, scale=scale
    )
    what = f"{backend} {dtype} B{B} Hq{Hq} Hkv{Hkv} Sq{Sq} Sk{Sk} D{D} causal={causal} mask={mask_kind}"
    for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
        assert g.dtype == dtype
        check_equivalent(g, e, r, f"{what} {name}")
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
    # rows that see no key: exactly zero output, zero dq
    empty = ~visible_rows(B, Hq, Sq, Sk, causal, mask)
    if empty.any():
        assert (got[0][empty] == 0).all(), f"{what}: fully masked rows must give exact zeros"
        assert (got[1][empty] == 0).all(), f"{what}: fully masked rows must give zero dq"
    ran = {d.backend for d in log}
    assert ran == {expect or backend}, f"expected the {expect or backend} path, ran {[str(d) for d in log]}"


# ---------------------------------------------------------------------------------------------- equivalence

# (B, Hq, Hkv, Sq, Sk, D, causal, mask kind)
CASES = [
    (2, 4, 4, 17, 17, 64, False, None),
    (2, 4, 2, 17, 128, 32, True, None),  # Sq < Sk, causal (bottom-right)
    (1, 4, 1, 128, 128, 80, True, None),  # MQA, Sq == Sk causal
    (2, 8, 2, 128, 17, 128, False, None),  # Sq > Sk
    (1, 2, 2, 128, 17, 64, True, None),  # Sq > Sk causal: the first 111 rows see no key
    (1, 2, 1, 333, 333, 256, True, None),
    (1, 4, 4, 1, 333, 96, False, None),  # one query
    (1, 2, 2, 333, 1, 40, False, None),  # one key
    (3, 2, 2, 1, 1, 8, True, None),
    (2, 4, 2, 17, 333, 160, False, "bool4"),
    (2, 4, 4, 128, 128, 8, True, "float4"),
    (3, 2, 1, 17, 128, 64, False, "keypad"),
    (1, 4, 2, 128, 333, 1, False, "bool2"),
    (1, 4, 4, 333, 128, 64, True, "float2"),
    (2, 4, 1, 17, 1000, 32, True, "keypad"),
    (1, 2, 1, 1000, 1000, 64, True, None),  # large, few heads
    (1, 1, 1, 1000, 333, 128, False, "bool2"),
    (1, 2, 2, 17, 1000, 256, True, "float4"),
]


def _case_id(c):
    B, Hq, Hkv, Sq, Sk, D, causal, mask = c
    return f"B{B}-H{Hq}/{Hkv}-{Sq}x{Sk}-D{D}" + ("-causal" if causal else "") + (f"-{mask}" if mask else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equivalence(dtype, case):
    check_attention(*case[:6], dtype, causal=case[6], mask_kind=case[7], expect=cpp_expected())


FP16_CASES = [
    (2, 4, 2, 17, 128, 64, True, None),
    (1, 4, 4, 128, 128, 80, False, "float4"),
    (3, 2, 1, 33, 65, 128, True, "keypad"),
]


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_equivalence_fp16(case):
    check_attention(*case[:6], torch.float16, causal=case[6], mask_kind=case[7], expect=cpp_expected())


ISA_CASES = [
    (2, 4, 2, 17, 33, 64, True, None),
    (1, 4, 1, 65, 65, 40, True, "bool4"),
    (2, 2, 2, 70, 17, 96, False, "float4"),
    (1, 2, 1, 3, 130, 256, False, "keypad"),
]


@pytest.mark.parametrize("case", ISA_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_isa_paths(cpu_isa, dtype, case):
    check_attention(*case[:6], dtype, causal=case[6], mask_kind=case[7], backend="cpp")


def test_explicit_scale():
    check_attention(2, 4, 2, 17, 40, 64, torch.float32, causal=True, scale=0.3, expect=cpp_expected())
    check_attention(1, 2, 2, 33, 33, 32, torch.bfloat16, mask_kind="float4", scale=1.7, expect=cpp_expected())


REF_CASES = [
    (2, 4, 2, 17, 128, 64, True, "bool4"),
    (2, 4, 1, 128, 17, 40, True, "float4"),
    (3, 2, 2, 33, 65, 96, False, "keypad"),
]


@pytest.mark.parametrize("case", REF_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reference_backend(dtype, case):
    """The reference (the fallback and the kernels' spec) against torch's SDPA."""
    check_attention(*case[:6], dtype, causal=case[6], mask_kind=case[7], backend="reference")


def test_float64_and_large_head_dim_fall_back_to_reference():
    check_attention(1, 2, 1, 9, 12, 16, torch.float64, causal=True, mask_kind="bool4", expect="reference")
    check_attention(1, 2, 2, 9, 12, 264, torch.float32, causal=True, expect="reference")
    with fastllm.explain() as log:
        fastllm.flash_attention(*make_qkv(1, 2, 1, 3, 4, 8, torch.float64))
        fastllm.flash_attention(*make_qkv(1, 2, 1, 3, 4, 264, torch.float32))
    reasons = [d.reason for d in log]
    if fastllm._ext.C is not None:
        assert "float64" in reasons[0] and "head_dim 264 > 256" in reasons[1], reasons
    else:
        assert all("FASTLLM_NO_CPP" in r for r in reasons), reasons


# ---------------------------------------------------------------------------------------------- torch SDPA drop-in


def check_sdpa(args, kwargs, dtype=torch.float32, grads=True):
    """fastllm.scaled_dot_product_attention vs torch's on the same arguments (float64 = reference)."""
    q, k, v = args[:3]
    dout = torch.randn(q.shape, dtype=dtype)

    def call(fn, conv):
        leaves = [conv(t).detach().requires_grad_(grads) for t in (q, k, v)]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        kw = {key: val for key, val in kwargs.items() if key != "attn_mask"}
        if mask is not None and mask.dtype != torch.bool:
            mask = conv(mask)
        out = fn(*leaves, attn_mask=mask, **kw)
        if grads:
            (out.double() * dout.double()).sum().backward()
        return [out.detach()] + ([t.grad for t in leaves] if grads else [])

    q, k, v = (t.to(dtype) for t in (q, k, v))
    with fastllm.explain() as log:
        got = call(fastllm.scaled_dot_product_attention, lambda t: t.to(dtype))
    eager = call(F.scaled_dot_product_attention, lambda t: t.to(dtype))
    ref = call(F.scaled_dot_product_attention, lambda t: t.double())
    for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
        assert_equivalent(g, e, r, f"sdpa {kwargs} {name}")
    assert {d.backend for d in log} == {cpp_expected()}, [str(d) for d in log]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_top_left_causal(dtype):
    for Sq, Sk in [(17, 40), (40, 17), (33, 33)]:  # top-left: with Sq > Sk every row sees key 0
        q, k, v = make_qkv(2, 4, 4, Sq, Sk, 64, dtype)
        check_sdpa((q, k, v), {"is_causal": True}, dtype)


def test_sdpa_gqa_scale_and_masks():
    q, k, v = make_qkv(2, 8, 2, 17, 33, 32, torch.float32)
    check_sdpa((q, k, v), {"enable_gqa": True})
    check_sdpa((q, k, v), {"enable_gqa": True, "scale": 0.25, "is_causal": True})
    check_sdpa((q, k, v, torch.rand(17, 33) < 0.7), {"enable_gqa": True})
    check_sdpa((q, k, v), {"enable_gqa": True, "attn_mask": torch.randn(2, 1, 17, 33)})
    q, k, v = make_qkv(2, 4, 4, 17, 33, 32, torch.float32)
    check_sdpa((q, k, v, torch.randn(1, 4, 1, 33)), {"scale": 2.0})


def test_sdpa_3d_inputs():
    q, k, v = (t[:, 0] for t in make_qkv(3, 1, 1, 17, 29, 48, torch.float32))  # (N, L, E)
    check_sdpa((q, k, v), {})
    check_sdpa((q, k, v), {"is_causal": True})
    check_sdpa((q, k, v, torch.rand(3, 17, 29) < 0.8), {})  # 3-D mask (N, L, S)
    check_sdpa((q, k, v, torch.randn(17, 29)), {})  # 2-D mask
    out = fastllm.scaled_dot_product_attention(q, k, v)
    assert out.shape == (3, 17, 48)


def test_sdpa_dropout_goes_to_torch():
    q, k, v = make_qkv(2, 4, 4, 17, 33, 32, torch.float32)
    with fastllm.explain() as log:
        out = fastllm.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert log == []  # torch's own SDPA ran, no fastllm op
    torch.manual_seed(1)
    a = fastllm.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(1)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.testing.assert_close(a, b)


def test_sdpa_errors():
    q, k, v = make_qkv(1, 4, 2, 5, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="is_causal=True cannot be combined"):
        fastllm.scaled_dot_product_attention(q, q, q, torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fastllm.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        fastllm.scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fastllm.scaled_dot_product_attention(
            q, k[:, :1].expand(1, 3, 6, 8), v[:, :1].expand(1, 3, 6, 8), enable_gqa=True
        )


# ---------------------------------------------------------------------------------------------- decode


def decode_torch(q, k_cache, v_cache, lens, scale=None):
    """Per sequence: torch SDPA over the first len keys, the Sn queries being the last Sn positions."""
    B, Hq, Sn, D = q.shape
    out = torch.zeros(B, Hq, Sn, D, dtype=q.dtype)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kb, vb = k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
        m = causal_keep(Sn, n)
        out[b : b + 1] = F.scaled_dot_product_attention(q[b : b + 1], kb, vb, attn_mask=m, scale=scale, enable_gqa=True)
    return out


def check_decode(B, Hq, Hkv, Sn, S_max, D, lens, dtype, scale=None, backend="auto", expect=None):
    q = torch.randn(B, Hq, Sn, D, dtype=dtype)
    k_cache = torch.randn(B, Hkv, S_max, D, dtype=dtype)
    v_cache = torch.randn(B, Hkv, S_max, D, dtype=dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    for b in range(B):  # garbage (finite, large) past each sequence's length
        k_cache[b, :, int(lens[b]) :] = 1e3
        v_cache[b, :, int(lens[b]) :] = -1e3
    with fastllm.backend(backend), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k_cache, v_cache, lens, scale=scale)
    eager = decode_torch(q, k_cache, v_cache, lens, scale)
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens, scale)
    what = f"decode {backend} {dtype} B{B} Hq{Hq} Hkv{Hkv} Sn{Sn} S_max{S_max} D{D} lens={lens.tolist()}"
    assert out.dtype == dtype
    check_equivalent(out, eager, ref, what)
    assert (out[lens == 0] == 0).all(), f"{what}: an empty cache must give zeros"
    assert {d.backend for d in log} == {expect or backend}, [str(d) for d in log]


DECODE_CASES = [
    # (B, Hq, Hkv, Sn, S_max, D, lens)
    (3, 32, 8, 1, 77, 32, [0, 77, 40]),  # ragged incl. empty and full
    (3, 32, 8, 4, 130, 64, [130, 4, 57]),
    (3, 8, 8, 16, 200, 16, [16, 200, 0]),
    (1, 32, 8, 1, 3000, 64, [3000]),  # long cache, one sequence: split-K
    (1, 32, 8, 4, 3000, 32, [2777]),
    (1, 8, 1, 16, 3000, 128, [3000]),  # MQA
    (4, 4, 2, 1, 1, 8, [1, 0, 1, 1]),
]


def _decode_id(c):
    B, Hq, Hkv, Sn, S_max, D, _lens = c
    return f"B{B}-H{Hq}/{Hkv}-Sn{Sn}-S{S_max}-D{D}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode(dtype, case):
    check_decode(*case, dtype, expect=cpp_expected())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_isa_paths(cpu_isa, dtype):
    check_decode(3, 32, 8, 4, 300, 64, [0, 300, 123], dtype, backend="cpp")
    check_decode(1, 8, 2, 1, 2000, 40, [1999], dtype, backend="cpp")


def test_decode_reference_backend_and_scale():
    check_decode(3, 8, 2, 4, 60, 32, [60, 0, 17], torch.float32, backend="reference")
    check_decode(2, 8, 2, 16, 60, 32, [60, 33], torch.float64, scale=0.2, expect="reference")
    check_decode(2, 4, 4, 1, 50, 64, [50, 20], torch.float32, scale=0.5, expect=cpp_expected())


def test_decode_shorter_than_new_tokens():
    """len < Sn: new token t sees keys j <= len - Sn + t, the first Sn - len tokens see none (zeros)."""
    check_decode(2, 4, 2, 8, 20, 32, [3, 20], torch.float32, expect=cpp_expected())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_decode_ignores_nan_past_cache_length(backend):
    """A cache allocated with torch.empty may hold NaN past each sequence's length: it must not be read."""
    q = torch.randn(2, 8, 2, 32)
    k_cache, v_cache = torch.randn(2, 2, 50, 32), torch.randn(2, 2, 50, 32)
    lens = torch.tensor([20, 50], dtype=torch.int32)
    k_cache[0, :, 20:] = float("nan")
    v_cache[0, :, 20:] = float("nan")
    with fastllm.backend(backend):
        out = fastllm.decode_attention(q, k_cache, v_cache, lens)
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens)
    assert not torch.isnan(out).any(), f"{backend}: NaN from the cache past cache_seqlens leaked into the output"
    assert_equivalent(out, decode_torch(q, k_cache, v_cache, lens), ref, f"decode nan tail {backend}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_kv_len_gradients_are_right_or_refused(backend):
    """attention_fwd with kv_len (decode_attention) has autograd registered: its gradients must account for
    kv_len (or the backward must refuse), never be silently wrong."""
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, requires_grad=True)
    lens = torch.tensor([4], dtype=torch.int32)
    with fastllm.backend(backend):
        out = fastllm.decode_attention(q, k, v, lens)
        try:
            got = torch.autograd.grad(out.sum(), (q, k, v))
        except (RuntimeError, NotImplementedError, ValueError):
            return
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(decode_torch(*leaves, lens).sum(), leaves)
    for name, g, r in zip(["dq", "dk", "dv"], got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- layouts, empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(dtype):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 33, 45, 64
    q = torch.randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)  # (B, S, H, D) storage
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Sk, Hkv, 2 * D, dtype=dtype).transpose(1, 2)[..., ::2]  # strided head_dim as well
    mask = torch.randn(1, 1, Sq, Sk, dtype=dtype).expand(B, Hq, Sq, Sk)  # stride-0 dims
    bmask = (torch.rand(Sk, Sq) < 0.8).t().view(1, 1, Sq, Sk).expand(B, 1, Sq, Sk)  # transposed + expanded
    dout = torch.randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, mask, bmask, dout))
    for kw in [{"attn_mask": mask}, {"attn_mask": bmask, "causal": True}, {}]:
        with fastllm.explain() as log:
            got = run_with_grads(fastllm.flash_attention, q, k, v, dout, **kw)
        eager = run_with_grads(torch_attention, q, k, v, dout, **kw)
        ref = run_with_grads(torch_attention, q.double(), k.double(), v.double(), dout, **kw)
        for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
            assert_equivalent(g, e, r, f"noncontiguous {dtype} {list(kw)} {name}")
        assert {d.backend for d in log} == {cpp_expected()}


def test_noncontiguous_decode_cache():
    """A cache stored (B, S_max, H, D) and viewed as (B, H, S_max, D)."""
    q = torch.randn(2, 1, 8, 32).transpose(1, 2)
    k_cache = torch.randn(2, 100, 2, 32).transpose(1, 2)
    v_cache = torch.randn(2, 100, 2, 32).transpose(1, 2)
    lens = torch.tensor([100, 61], dtype=torch.int32)
    out = fastllm.decode_attention(q, k_cache, v_cache, lens)
    eager = decode_torch(q, k_cache, v_cache, lens)
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens)
    assert_equivalent(out, eager, ref, "noncontiguous decode")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 0, 7, 16), (2, 4, 2, 5, 0, 16), (0, 4, 2, 5, 7, 16), (1, 2, 1, 0, 0, 8)])
def test_empty(backend, shape):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32))
    for causal, mask in [
        (False, None),
        (True, torch.ones(Sq, Sk, dtype=torch.bool)),
        (False, torch.zeros(B, 1, Sq, Sk)),
    ]:
        with fastllm.backend(backend):
            out = fastllm.flash_attention(q, k, v, causal=causal, attn_mask=mask)
            assert out.shape == (B, Hq, Sq, D)
            assert (out == 0).all()  # Sk == 0: no key visible anywhere
            dq, dk, dv = torch.autograd.grad((out * 2).sum(), (q, k, v))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()
    with fastllm.backend(backend):
        assert fastllm.scaled_dot_product_attention(q, k, v, enable_gqa=True).shape == (B, Hq, Sq, D)
        if B:
            lens = torch.zeros(B, dtype=torch.int32)
            assert (fastllm.decode_attention(q.detach(), k.detach(), v.detach(), lens) == 0).all()


# ---------------------------------------------------------------------------------------------- bad input


def _q(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


FA = fastllm.flash_attention
DEC = fastllm.decode_attention
Q, K = _q(1, 4, 3, 8), _q(1, 2, 5, 8)
I32 = torch.int32

BAD = [
    ("q 3-D", lambda: FA(_q(4, 3, 8), _q(2, 5, 8), _q(2, 5, 8)), ValueError, "q must be 4-D"),
    ("k 5-D", lambda: FA(Q, _q(1, 1, 2, 5, 8), _q(1, 1, 2, 5, 8)), ValueError, "k must be 4-D"),
    ("head_dim q vs k", lambda: FA(Q, _q(1, 2, 5, 16), _q(1, 2, 5, 16)), ValueError, "head_dim of k/v (16) differs"),
    ("k vs v shape", lambda: FA(Q, K, _q(1, 2, 6, 8)), ValueError, "k and v must have one shape"),
    ("batch", lambda: FA(Q, _q(2, 2, 5, 8), _q(2, 2, 5, 8)), ValueError, "batch of k/v"),
    ("Hq % Hkv", lambda: FA(Q, _q(1, 3, 5, 8), _q(1, 3, 5, 8)), ValueError, "multiple of key/value heads"),
    ("dtype mismatch", lambda: FA(Q, K.half(), K.half()), TypeError, "k has dtype torch.float16"),
    ("int tensors", lambda: FA(Q.int(), K.int(), K.int()), TypeError, "floating"),
    ("not a tensor", lambda: FA(Q, K.tolist(), K), TypeError, "k must be a tensor"),
    ("device", lambda: FA(Q, _q(1, 2, 5, 8, device="meta"), _q(1, 2, 5, 8, device="meta")), ValueError, "meta"),
    ("mask device", lambda: FA(Q, K, K, attn_mask=torch.ones(3, 5, dtype=torch.bool, device="meta")), ValueError, "attn_mask is on meta"),
    ("mask broadcast", lambda: FA(Q, K, K, attn_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask heads", lambda: FA(Q, K, K, attn_mask=torch.ones(1, 2, 3, 5, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask 5-D", lambda: FA(Q, K, K, attn_mask=torch.ones(1, 1, 1, 3, 5, dtype=torch.bool)), ValueError, "at most 4 dims"),
    ("mask dtype", lambda: FA(Q, K, K, attn_mask=torch.zeros(3, 5, dtype=torch.float64)), TypeError, "attn_mask must be bool"),
    ("mask int", lambda: FA(Q, K, K, attn_mask=torch.zeros(3, 5, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ("mask not tensor", lambda: FA(Q, K, K, attn_mask=[[True] * 5] * 3), TypeError, "attn_mask must be a tensor or None"),
    ("scale nan", lambda: FA(Q, K, K, scale=float("nan")), ValueError, "scale must be finite"),
    ("scale inf", lambda: FA(Q, K, K, scale=float("inf")), ValueError, "scale must be finite"),
    ("scale str", lambda: FA(Q, K, K, scale="0.1"), TypeError, "scale must be a float"),
    ("causal int", lambda: FA(Q, K, K, causal=1), TypeError, "causal must be a bool"),
    ("causal tensor", lambda: FA(Q, K, K, causal=torch.tensor(True)), TypeError, "causal must be a bool"),
    ("head_dim 0", lambda: FA(_q(1, 4, 3, 0), _q(1, 2, 5, 0), _q(1, 2, 5, 0)), ValueError, "head_dim must be >= 1"),
    ("Hkv 0", lambda: FA(Q, _q(1, 0, 5, 8), _q(1, 0, 5, 8)), ValueError, "multiple of key/value heads"),
    ("seqlens > S_max", lambda: DEC(Q, K, K, torch.tensor([6], dtype=I32)), ValueError, "cache_seqlens must lie in [0, 5]"),
    ("seqlens < 0", lambda: DEC(Q, K, K, torch.tensor([-1], dtype=I32)), ValueError, "cache_seqlens must lie in [0, 5]"),
    ("seqlens int64", lambda: DEC(Q, K, K, torch.tensor([5])), TypeError, "cache_seqlens must be int32"),
    ("seqlens shape", lambda: DEC(Q, K, K, torch.tensor([5, 5], dtype=I32)), ValueError, "cache_seqlens must have shape (1,)"),
    ("seqlens 0-dim", lambda: DEC(Q, K, K, torch.tensor(5, dtype=I32)), ValueError, "cache_seqlens must have shape (1,)"),
    ("seqlens list", lambda: DEC(Q, K, K, [5]), TypeError, "cache_seqlens must be a tensor"),
    ("seqlens device", lambda: DEC(Q, K, K, torch.tensor([5], dtype=I32, device="meta")), ValueError, "cache_seqlens is on meta"),
    ("decode head_dim", lambda: DEC(Q, _q(1, 2, 5, 4), _q(1, 2, 5, 4), torch.tensor([5], dtype=I32)), ValueError, "head_dim of k_cache/v_cache"),
    ("decode 3-D", lambda: DEC(Q[0], K[0], K[0], torch.tensor([5], dtype=I32)), ValueError, "q must be 4-D"),
    ("sdpa dtype", lambda: fastllm.scaled_dot_product_attention(Q, Q.double(), Q.double()), TypeError, "key has dtype torch.float64"),
    ("sdpa head_dim", lambda: fastllm.scaled_dot_product_attention(Q, _q(1, 4, 5, 4), _q(1, 4, 5, 4)), ValueError, "head_dim of key/value"),
    ("sdpa scale", lambda: fastllm.scaled_dot_product_attention(Q, Q, Q, scale=float("nan")), ValueError, "scale must be finite"),
]  # fmt: skip


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value), str(info.value)


def test_bad_input_reaches_no_kernel_in_every_backend():
    for backend in ["cpp", "triton", "reference"]:
        with fastllm.backend(backend), pytest.raises(ValueError, match="multiple of key/value heads"):
            fastllm.flash_attention(Q, _q(1, 3, 5, 8), _q(1, 3, 5, 8))
        with fastllm.backend(backend), pytest.raises(ValueError, match="cache_seqlens must lie"):
            fastllm.decode_attention(Q, K, K, torch.tensor([9], dtype=I32))


def test_bad_op_arguments():
    """The internal ops validate too (the public wrappers are not the only callers)."""
    lse = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="dout/out must have q's shape"):
        torch.ops.fastllm.attention_bwd(Q[:, :, :2], Q, K, K, Q, lse, None, False, True, 0.3)
    with pytest.raises(TypeError, match="dout has dtype"):
        torch.ops.fastllm.attention_bwd(Q.half(), Q, K, K, Q, lse, None, False, True, 0.3)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.fastllm.attention_fwd(Q, K, K, torch.ones(3, 5, dtype=torch.bool), None, False, True, 0.3)


# ---------------------------------------------------------------------------------------------- torch.library


def _fwd_args(mask=None, kv_len=None, causal=True, dtype=torch.float32, requires_grad=True):
    q, k, v = (t.requires_grad_(requires_grad) for t in make_qkv(2, 4, 2, 5, 9, 16, dtype))
    return (q, k, v, mask, kv_len, causal, True, 0.3)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_opcheck(backend):
    fwd, bwd = torch.ops.fastllm.attention_fwd.default, torch.ops.fastllm.attention_bwd.default
    with fastllm.backend(backend):
        torch.library.opcheck(fwd, _fwd_args())
        torch.library.opcheck(fwd, _fwd_args(mask=torch.rand(2, 1, 5, 9) < 0.7, causal=False))
        torch.library.opcheck(fwd, _fwd_args(mask=torch.randn(1, 4, 5, 9)))
        torch.library.opcheck(fwd, _fwd_args(dtype=torch.bfloat16, requires_grad=False))
        lens = torch.tensor([9, 3], dtype=torch.int32)
        torch.library.opcheck(fwd, _fwd_args(kv_len=lens, requires_grad=False))
        for mask in [None, torch.rand(2, 4, 5, 9) < 0.7]:
            q, k, v = make_qkv(2, 4, 2, 5, 9, 16, torch.float32)
            out, lse = fwd(q, k, v, mask, None, True, True, 0.3)
            torch.library.opcheck(bwd, (torch.randn_like(q), q, k, v, out, lse, mask, True, True, 0.3))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_opcheck_noncontiguous(backend):
    """q/k/v as (B, S, H, D) storage viewed (B, H, S, D): the fakes must give the real outputs' strides."""
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    k, v = (torch.randn(2, 9, 2, 16).transpose(1, 2) for _ in range(2))
    mask = torch.rand(2, 1, 1, 9) < 0.7
    with fastllm.backend(backend):
        torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, (q, k, v, mask, None, False, True, 0.3))
        out, lse = torch.ops.fastllm.attention_fwd(q, k, v, mask, None, False, True, 0.3)
        dout = torch.randn(2, 5, 4, 16).transpose(1, 2)
        args = (dout, q, k, v, out, lse, mask, False, True, 0.3)
        torch.library.opcheck(torch.ops.fastllm.attention_bwd.default, args)


def test_torch_compile_fullgraph():
    """The ops are opaque to dynamo: no graph break, and the compiled forward+backward matches eager."""
    torch._dynamo.reset()

    def block(x, wq, wk, wv, mask):
        B, S, _ = x.shape
        q = (x @ wq).view(B, S, 4, 16).transpose(1, 2)
        k = (x @ wk).view(B, S, 2, 16).transpose(1, 2)
        v = (x @ wv).view(B, S, 2, 16).transpose(1, 2)
        a = fastllm.flash_attention(q, k, v, causal=True)
        b = fastllm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return (a + b).transpose(1, 2).reshape(B, S, 64)

    x = torch.randn(2, 11, 32)
    ws = [torch.randn(32, 64) * 0.2, torch.randn(32, 32) * 0.2, torch.randn(32, 32) * 0.2]
    mask = torch.rand(2, 1, 11, 11) < 0.8
    leaves_e = [t.clone().requires_grad_(True) for t in [x, *ws]]
    leaves_c = [t.clone().requires_grad_(True) for t in [x, *ws]]
    compiled = torch.compile(block, fullgraph=True)
    with fastllm.explain() as log:
        out_c = compiled(*leaves_c, mask)
        out_e = block(*leaves_e, mask)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
    assert {d.backend for d in log} == {cpp_expected()}
    assert {d.op for d in log} == {"attention_fwd", "attention_bwd"}
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(leaves_c, leaves_e, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------- determinism, memory


@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 90, 64), (1, 4, 1, 100, 300, 32)], ids=str)
def test_cpp_backward_deterministic(shape):
    """Bit-identical gradients from two runs (the second shape has fewer kv heads than threads: split keys)."""
    if fastllm._ext.C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    q, k, v = make_qkv(*shape, torch.float32)
    dout = torch.randn(q.shape)
    mask = torch.rand(shape[0], 1, shape[3], shape[4]) < 0.9
    runs = []
    for _ in range(2):
        with fastllm.backend("cpp"):
            runs.append(run_with_grads(fastllm.flash_attention, q, k, v, dout, causal=True, attn_mask=mask))
    for name, a, b in zip(NAMES, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_thread_count_does_not_change_the_result():
    """Forward (and backward) on 1 and 2 threads both meet the criterion; so does split-K decode."""
    q, k, v = make_qkv(1, 4, 2, 150, 300, 64, torch.float32)
    dout = torch.randn(q.shape)
    eager = run_with_grads(torch_attention, q, k, v, dout, causal=True)
    ref = run_with_grads(torch_attention, q.double(), k.double(), v.double(), dout, causal=True)
    qd, kc, vc = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 3000, 64), torch.randn(1, 2, 3000, 64)
    lens = torch.tensor([2999], dtype=torch.int32)
    dec_eager = decode_torch(qd, kc, vc, lens)
    dec_ref = decode_torch(qd.double(), kc.double(), vc.double(), lens)
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = run_with_grads(fastllm.flash_attention, q, k, v, dout, causal=True)
            for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
                assert_equivalent(g, e, r, f"{n} threads {name}")
            assert_equivalent(fastllm.decode_attention(qd, kc, vc, lens), dec_eager, dec_ref, f"{n} threads decode")
    finally:
        torch.set_num_threads(prev)


MEMORY_CODE = textwrap.dedent(
    """
    import resource, torch, fastllm
    B, H, S, D = 1, 8, 16384, 64
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))  # allocated and touched
    fastllm.flash_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True)  # warm-up (thread pool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with fastllm.explain() as log:
        out = fastllm.flash_attention(q, k, v, causal=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    print(log[0].backend, (after - before) * 1024)
    """
)


def test_cpu_forward_memory_is_linear_in_sequence():
    """B=1, H=8, S=16384, D=64 fp32: peak RSS grows by less than 64 MB beyond the output and lse
    (the (S, S) scores would be 8.6 GB)."""
    if fastllm._ext.C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS}); the reference would need ~8.6 GB")
    r = subprocess.run([sys.executable, "-c", MEMORY_CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    backend, delta = r.stdout.split()
    assert backend == "cpp"
    B, H, S, D = 1, 8, 16384, 64
    extra = int(delta) - (B * H * S * D * 4 + B * H * S * 4)  # minus out (32 MiB) and lse (fp32)
    assert extra < 64 * 2**20, f"forward used {extra / 2**20:.1f} MiB beyond out and lse"
