"""fastllm.flash_attention and scaled_dot_product_attention: equivalence (forward and backward) against torch's own
SDPA (float64 = reference, input dtype = eager) on the C++ backend (both ISA paths) and the reference, GQA/MQA,
causal (bottom-right), bool/additive masks, a value head dim of its own, non-contiguous and empty inputs. Tests of
a backend skip (with the reason) where it cannot run. Decode: test_attention_decode.py; NaN/Inf:
test_attention_nonfinite.py; bad inputs, torch.library, compile, determinism, memory: test_attention_ops.py;
the Triton kernels: test_attention_triton.py."""

import pytest
import torch
import torch.nn.functional as F
from attention_common import NAMES, check_attention, make_qkv, run_with_grads, torch_attention

import fastllm
from fastllm.testing import assert_equivalent

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
def test_equivalence(need_backend, dtype, case):
    check_attention(*case[:6], dtype, need_backend("cpp"), causal=case[6], mask_kind=case[7])


FP16_CASES = [
    (2, 4, 2, 17, 128, 64, True, None),
    (1, 4, 4, 128, 128, 80, False, "float4"),
    (3, 2, 1, 33, 65, 128, True, "keypad"),
]


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_equivalence_fp16(need_backend, case):
    check_attention(*case[:6], torch.float16, need_backend("cpp"), causal=case[6], mask_kind=case[7])


ISA_CASES = [
    (2, 4, 2, 17, 33, 64, True, None),
    (1, 4, 1, 65, 65, 40, True, "bool4"),
    (2, 2, 2, 70, 17, 96, False, "float4"),
    (1, 2, 1, 3, 130, 256, False, "keypad"),
]


@pytest.mark.parametrize("case", ISA_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_isa_paths(cpu_isa, dtype, case):
    check_attention(*case[:6], dtype, "cpp", causal=case[6], mask_kind=case[7])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_explicit_scale(need_backend, backend):
    need_backend(backend)
    check_attention(2, 4, 2, 17, 40, 64, torch.float32, backend, causal=True, scale=0.3)
    check_attention(1, 2, 2, 33, 33, 32, torch.bfloat16, backend, mask_kind="float4", scale=1.7)


REF_CASES = [
    (2, 4, 2, 17, 128, 64, True, "bool4"),
    (2, 4, 1, 128, 17, 40, True, "float4"),
    (3, 2, 2, 33, 65, 96, False, "keypad"),
]


@pytest.mark.parametrize("case", REF_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reference_backend(dtype, case):
    """The reference (the fallback and the kernels' spec) against torch's SDPA."""
    check_attention(*case[:6], dtype, "reference", causal=case[6], mask_kind=case[7])


def test_float64_and_large_head_dim_fall_back_to_reference(need_backend):
    """What the C++ kernels cannot take runs the reference, and fastllm.explain says why."""
    need_backend("cpp")
    check_attention(1, 2, 1, 9, 12, 16, torch.float64, "cpp", causal=True, mask_kind="bool4", expect="reference")
    check_attention(1, 2, 2, 9, 12, 264, torch.float32, "cpp", causal=True, expect="reference")
    with fastllm.backend("cpp"), fastllm.explain() as log:
        fastllm.flash_attention(*make_qkv(1, 2, 1, 3, 4, 8, torch.float64))
        fastllm.flash_attention(*make_qkv(1, 2, 1, 3, 4, 264, torch.float32))
    reasons = [d.reason for d in log]
    assert "float64" in reasons[0] and "head_dim 264 > 256" in reasons[1], reasons


# ---------------------------------------------------------------------------------------------- torch SDPA drop-in


def check_sdpa(backend, args, kwargs, dtype=torch.float32, grads=True, expect=None):
    """fastllm.scaled_dot_product_attention on `backend` vs torch's on the same arguments (float64 = reference)."""
    q, k, v = args[:3]
    dout = torch.randn((*q.shape[:-1], v.shape[-1]), dtype=dtype)

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
    with fastllm.backend(backend), fastllm.explain() as log:
        got = call(fastllm.scaled_dot_product_attention, lambda t: t.to(dtype))
    eager = call(F.scaled_dot_product_attention, lambda t: t.to(dtype))
    ref = call(F.scaled_dot_product_attention, lambda t: t.double())
    for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
        assert_equivalent(g, e, r, f"sdpa {kwargs} {name}")
    assert {d.backend for d in log} == {expect or backend}, [str(d) for d in log]
    return log


SDPA_BACKENDS = ["cpp", "reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_sdpa_top_left_causal(need_backend, backend, dtype):
    need_backend(backend)
    for Sq, Sk in [(17, 40), (40, 17), (33, 33)]:  # top-left: with Sq > Sk every row sees key 0
        q, k, v = make_qkv(2, 4, 4, Sq, Sk, 64, dtype)
        check_sdpa(backend, (q, k, v), {"is_causal": True}, dtype)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_sdpa_gqa_scale_and_masks(need_backend, backend):
    need_backend(backend)
    q, k, v = make_qkv(2, 8, 2, 17, 33, 32, torch.float32)
    check_sdpa(backend, (q, k, v), {"enable_gqa": True})
    check_sdpa(backend, (q, k, v), {"enable_gqa": True, "scale": 0.25, "is_causal": True})
    check_sdpa(backend, (q, k, v, torch.rand(17, 33) < 0.7), {"enable_gqa": True})
    check_sdpa(backend, (q, k, v), {"enable_gqa": True, "attn_mask": torch.randn(2, 1, 17, 33)})
    q, k, v = make_qkv(2, 4, 4, 17, 33, 32, torch.float32)
    check_sdpa(backend, (q, k, v, torch.randn(1, 4, 1, 33)), {"scale": 2.0})


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_sdpa_3d_inputs(need_backend, backend):
    need_backend(backend)
    q, k, v = (t[:, 0] for t in make_qkv(3, 1, 1, 17, 29, 48, torch.float32))  # (N, L, E)
    check_sdpa(backend, (q, k, v), {})
    check_sdpa(backend, (q, k, v), {"is_causal": True})
    check_sdpa(backend, (q, k, v, torch.rand(3, 17, 29) < 0.8), {})  # 3-D mask (N, L, S)
    check_sdpa(backend, (q, k, v, torch.randn(17, 29)), {})  # 2-D mask
    out = fastllm.scaled_dot_product_attention(q, k, v)
    assert out.shape == (3, 17, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_sdpa_value_head_dim_differs(need_backend, backend, dtype):
    """value (..., S, Ev) with Ev != E, as torch's SDPA takes it: out (..., L, Ev), forward and backward, through
    the reference whatever backend is asked for (fastllm.explain says why)."""
    need_backend(backend)
    q, k, _ = make_qkv(2, 4, 2, 17, 29, 32, dtype)
    v = torch.randn(2, 2, 29, 48, dtype=dtype)
    for kwargs in [{"enable_gqa": True}, {"enable_gqa": True, "is_causal": True, "scale": 0.3}]:
        log = check_sdpa(backend, (q, k, v), kwargs, dtype, expect="reference")
        if backend != "reference":
            assert all("value head_dim 48 != query/key head_dim 32" in d.reason for d in log), [str(d) for d in log]
    mask = torch.rand(2, 1, 17, 29) < 0.8
    check_sdpa(backend, (q, k, v, mask), {"enable_gqa": True}, dtype, expect="reference")
    q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]  # (N, L, E), (N, S, E), (N, S, Ev)
    check_sdpa(backend, (q3, k3, v3), {"is_causal": True}, dtype, expect="reference")
    meta = [t.to("meta") for t in (q, k, v)]
    assert fastllm.scaled_dot_product_attention(*meta, enable_gqa=True).shape == (2, 4, 17, 48)


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


# ---------------------------------------------------------------------------------------------- layouts, empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(need_backend, dtype):
    need_backend("cpp")
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 33, 45, 64
    q = torch.randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)  # (B, S, H, D) storage
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Sk, Hkv, 2 * D, dtype=dtype).transpose(1, 2)[..., ::2]  # strided head_dim as well
    mask = torch.randn(1, 1, Sq, Sk, dtype=dtype).expand(B, Hq, Sq, Sk)  # stride-0 dims
    bmask = (torch.rand(Sk, Sq) < 0.8).t().view(1, 1, Sq, Sk).expand(B, 1, Sq, Sk)  # transposed + expanded
    dout = torch.randn(B, Sq, Hq, D, dtype=dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, mask, bmask, dout))
    for kw in [{"attn_mask": mask}, {"attn_mask": bmask, "causal": True}, {}]:
        with fastllm.backend("cpp"), fastllm.explain() as log:
            got = run_with_grads(fastllm.flash_attention, q, k, v, dout, **kw)
        eager = run_with_grads(torch_attention, q, k, v, dout, **kw)
        ref = run_with_grads(torch_attention, q.double(), k.double(), v.double(), dout, **kw)
        for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
            assert_equivalent(g, e, r, f"noncontiguous {dtype} {list(kw)} {name}")
        assert {d.backend for d in log} == {"cpp"}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 0, 7, 16), (2, 4, 2, 5, 0, 16), (0, 4, 2, 5, 7, 16), (1, 2, 1, 0, 0, 8)])
def test_empty(need_backend, backend, shape):
    need_backend(backend)
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
