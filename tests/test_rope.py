"""fastllm.rotary_embedding and rope_tables: equivalence (forward and backward) on the C++ (both ISA paths), Triton
(interpreter) and reference backends, strided layouts, GQA, ragged positions, NaN/Inf, opcheck, torch.compile, bad
inputs, and the tables against transformers' LlamaRotaryEmbedding (default and llama3)."""

import math

import pytest
import torch

import fastllm
from fastllm.ops import rope
from fastllm.ops.rope import rope_inv_freq, rope_tables
from fastllm.testing import assert_equivalent, assert_same_nonfinite

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ON_GPU = torch.cuda.is_available()
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write fails the NaN-pattern check."""

    def poisoned(t):
        return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)

    monkeypatch.setattr(rope, "_new", poisoned)


# ---------------------------------------------------------------------------------------------- helpers


def eager_rope(q, k, cos, sin, positions):
    """What a user writes in eager PyTorch (HF's apply_rotary_pos_emb on the first R dims, cos/sin cast to x's dtype,
    as LlamaRotaryEmbedding returns them); in float64 it is the reference."""
    half = cos.shape[1]
    r = 2 * half
    pos = positions.long()
    c = torch.cat([cos, cos], dim=-1)[pos].to(q.dtype).unsqueeze(1)  # (B or 1, 1, S, R)
    s = torch.cat([sin, sin], dim=-1)[pos].to(q.dtype).unsqueeze(1)

    def apply(x):
        xr, xp = x[..., :r], x[..., r:]
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)  # rotate_half
        return torch.cat([xr * c + rotated * s, xp], dim=-1)

    return apply(q), apply(k)


def make_inputs(B, Hq, Hkv, S, D, R, dtype, pos_dtype=torch.int64, P=None, device="cpu", layout="contiguous"):
    """q, k, cos, sin, positions. Positions are random in [0, P) per (b, s): ragged rows, unsorted.
    layout: "contiguous"; "fused" (q and k are head slices of one (B, S, Hq + 2 Hkv, D) qkv projection, transposed);
    "strided" (last-dim stride 2: the kernels copy); "tables" (cos/sin a column slice of wider tables, positions a
    transposed (S, B) tensor)."""
    P = P or S + 17
    if layout == "fused":
        qkv = torch.randn(B, S, Hq + 2 * Hkv, D, dtype=dtype, device=device)
        q, k = qkv[:, :, :Hq].transpose(1, 2), qkv[:, :, Hq : Hq + Hkv].transpose(1, 2)
    elif layout == "strided":
        q = torch.randn(B, Hq, S, 2 * D, dtype=dtype, device=device)[..., ::2]
        k = torch.randn(B, Hkv, S, 2 * D, dtype=dtype, device=device)[..., 1::2]
    else:
        q = torch.randn(B, Hq, S, D, dtype=dtype, device=device)
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    if layout == "tables":
        cos_w, sin_w = rope_tables(P, 2 * R + 6)
        cos, sin = cos_w[:, : R // 2], sin_w[:, : R // 2]
        positions = torch.randint(0, P, (S, B), dtype=pos_dtype).t()
    else:
        cos, sin = rope_tables(P, R, theta=10000.0)
        positions = torch.randint(0, P, (B, S), dtype=pos_dtype)
    return q, k, cos.to(device), sin.to(device), positions.to(device)


def run_with_grads(fn, q, k, cos, sin, positions, gq, gk):
    """Forward and backward; [q_rot, k_rot, dq, dk]."""
    ql, kl = (t.detach().clone().requires_grad_(True) for t in (q, k))
    qo, ko = fn(ql, kl, cos, sin, positions)
    ((qo.double() * gq.double()).sum() + (ko.double() * gk.double()).sum()).backward()
    return [qo, ko, ql.grad, kl.grad]


NAMES = ["q_rot", "k_rot", "dq", "dk"]


def check(backend, shape, dtype, pos_dtype=torch.int64, layout="contiguous", device="cpu"):
    B, Hq, Hkv, S, D, R = shape
    q, k, cos, sin, positions = make_inputs(B, Hq, Hkv, S, D, R, dtype, pos_dtype, device=device, layout=layout)
    gq = torch.randn(B, Hq, S, D, dtype=dtype, device=device)
    gk = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    with fastllm.backend(backend), fastllm.explain() as log:
        got = run_with_grads(fastllm.rotary_embedding, q, k, cos, sin, positions, gq, gk)
    eager = run_with_grads(eager_rope, q, k, cos, sin, positions, gq, gk)
    ref = run_with_grads(eager_rope, q.double(), k.double(), cos, sin, positions, gq, gk)
    for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
        assert g.is_contiguous() or name in ("dq", "dk"), f"{name} is not contiguous"
        assert_equivalent(g, e, r, f"{backend} {dtype} {shape} {layout} {name}")
    assert {d.backend for d in log} == {backend}, [str(d) for d in log]


# (B, Hq, Hkv, S, D, R): odd sizes, GQA (Hq != Hkv), partial rotary (R < D) with half = R / 2 not a multiple of 8
SHAPES = [
    (1, 1, 1, 1, 8, 8),
    (3, 5, 1, 7, 64, 64),
    (1, 5, 5, 33, 80, 80),
    (3, 1, 1, 7, 128, 128),
    (3, 5, 5, 1, 128, 64),
    (1, 3, 1, 33, 80, 40),
    (3, 1, 1, 7, 8, 6),
    (1, 4, 2, 7, 64, 2),
]
CPP_SHAPES = [*SHAPES, (2, 8, 2, 100, 128, 128)]  # 2 threads, the split inside q's rows and across q/k


@pytest.mark.parametrize("shape", CPP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_equivalence(cpu_isa, dtype, shape):
    check("cpp", shape, dtype, torch.int64 if shape[3] % 2 else torch.int32)


@pytest.mark.parametrize("layout", ["fused", "strided", "tables"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_layouts(cpu_isa, dtype, pos_dtype, layout):
    check("cpp", (3, 5, 1, 7, 80, 64), dtype, pos_dtype, layout)


TRITON_SHAPES = [(1, 1, 1, 1, 8, 8), (3, 5, 1, 7, 64, 64), (1, 5, 5, 33, 80, 80), (1, 3, 1, 7, 128, 40)]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_equivalence(need_backend, dtype, shape):
    need_backend("triton")
    check("triton", shape, dtype, torch.int32 if shape[0] == 3 else torch.int64, device="cuda" if ON_GPU else "cpu")


@pytest.mark.parametrize("layout", ["fused", "strided", "tables"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
def test_triton_layouts(need_backend, pos_dtype, layout):
    need_backend("triton")
    check("triton", (3, 2, 1, 5, 80, 64), torch.bfloat16, pos_dtype, layout, device="cuda" if ON_GPU else "cpu")


@pytest.mark.parametrize("shape", [(3, 5, 1, 7, 64, 64), (1, 3, 1, 7, 80, 40)], ids=str)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_reference_equivalence(dtype, shape):
    if dtype == torch.float64:  # the reference is float64 itself: check it against the HF formula exactly
        q, k, cos, sin, positions = make_inputs(*shape, dtype)
        got = fastllm.rotary_embedding(q, k, cos, sin, positions)
        for g, e in zip(got, eager_rope(q, k, cos, sin, positions), strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=4 * torch.finfo(torch.float64).eps)
    else:
        check("reference", shape, dtype)


def test_float64_and_empty_take_the_reference():
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 5, 16, 16, torch.float64)
    with fastllm.explain() as log:
        fastllm.rotary_embedding(q, k, cos, sin, positions)
    # float64 is the reason when the C++ extension is there (FASTLLM_NO_CPP=1 gives that reason first)
    assert log[0].backend == "reference", log[0]
    assert "float64" in log[0].reason or "C++ extension not available" in log[0].reason, log[0].reason
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 0, 16, 16, torch.float32)
    qo, ko = fastllm.rotary_embedding(q, k, cos, sin, positions)
    assert qo.shape == q.shape and ko.shape == k.shape
    q, k, _, _, positions = make_inputs(2, 3, 1, 5, 16, 16, torch.float32)
    empty = torch.empty(22, 0)  # R = 0: nothing rotates, the output is x
    qo, ko = fastllm.rotary_embedding(q, k, empty, empty, positions)
    assert torch.equal(qo, q) and torch.equal(ko, k)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_shared_positions_row_and_decode_positions(need_backend, backend):
    """positions (1, S) applies to every row; decode-style positions seqlens[b] + arange(S) per row."""
    need_backend(backend)
    device = "cuda" if ON_GPU and backend == "triton" else "cpu"
    q, k, cos, sin, _ = make_inputs(3, 4, 2, 5, 64, 64, torch.float32, P=40, device=device)
    for positions in (torch.arange(5)[None] + 30, torch.tensor([[0], [17], [33]]) + torch.arange(5)):
        positions = positions.to(device)
        with fastllm.backend(backend):
            got = fastllm.rotary_embedding(q, k, cos, sin, positions)
        ref = eager_rope(q.double(), k.double(), cos, sin, positions)
        for g, e, r in zip(got, eager_rope(q, k, cos, sin, positions), ref, strict=True):
            assert_equivalent(g, e, r, f"{backend} positions {positions.shape}")


def test_direct_path_matches_op_path(need_backend):
    """Inference calls (no grad, no explain) skip the registered op; same kernel, same bits."""
    need_backend("cpp")
    q, k, cos, sin, positions = make_inputs(2, 4, 2, 9, 64, 48, torch.bfloat16)
    before = rope._rope.direct_calls
    direct = fastllm.rotary_embedding(q, k, cos, sin, positions)
    assert rope._rope.direct_calls == before + 1
    with fastllm.explain():
        via_op = fastllm.rotary_embedding(q, k, cos, sin, positions)
    assert rope._rope.direct_calls == before + 1
    for a, b in zip(direct, via_op, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- gradients


def test_gradcheck_float64_reference():
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 4, 10, 6, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)

    def fn(q, k):
        return fastllm.rotary_embedding(q, k, cos, sin, positions)

    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_grad_of_one_output_only(need_backend, backend):
    """Only q_rot in the loss: dk is zero, dq is the inverse rotation of the output gradient."""
    need_backend(backend)
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 5, 32, 32, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    with fastllm.backend(backend):
        qo, _ = fastllm.rotary_embedding(q, k, cos, sin, positions)
        qo.square().sum().backward()
    qd = q.detach().double().requires_grad_(True)
    eager_rope(qd, k.detach().double(), cos, sin, positions)[0].square().sum().backward()
    torch.testing.assert_close(q.grad, qd.grad.float(), rtol=1e-5, atol=1e-5)
    assert k.grad is not None and not k.grad.any()
    k.grad = None
    with fastllm.backend(backend):  # a k that needs no gradient gets none (and costs no backward work)
        q.grad = None
        qo, _ = fastllm.rotary_embedding(q, k.detach(), cos, sin, positions)
        qo.square().sum().backward()
    torch.testing.assert_close(q.grad, qd.grad.float(), rtol=1e-5, atol=1e-5)
    assert k.grad is None


# ---------------------------------------------------------------------------------------------- non-finite


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate_like_torch(need_backend, backend, dtype):
    need_backend(backend)
    device = "cuda" if ON_GPU and backend == "triton" else "cpu"
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 4, 24, 16, dtype, device=device)
    positions[0, 0] = 0  # sin = 0 there: inf * 0 = NaN in the partner element, as in eager
    q[0, 0, 0, 1] = float("inf")
    q[0, 1, 2, 9] = float("nan")
    q[1, 2, 3, 20] = float("-inf")  # pass-through dims keep it
    k[1, 0, 1, 3] = float("-inf")
    k[0, 0, 3, 17] = float("nan")
    with fastllm.backend(backend):
        got = fastllm.rotary_embedding(q, k, cos, sin, positions)
    for g, e, name in zip(got, eager_rope(q, k, cos, sin, positions), ["q_rot", "k_rot"], strict=True):
        assert_same_nonfinite(g, e, f"{backend} {dtype} {name}")
        assert torch.isfinite(g[1, 0, 0]).all()  # untouched rows stay finite


# ---------------------------------------------------------------------------------------------- torch.library


def _op_args(dtype=torch.float32, inverse=False, requires_grad=True):
    q, k, cos, sin, positions = make_inputs(2, 3, 1, 5, 24, 16, dtype)
    return [q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), cos, sin, positions, inverse]


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_opcheck(need_backend, backend):
    if backend != "auto":
        need_backend(backend)
    with fastllm.backend(backend):
        torch.library.opcheck(torch.ops.fastllm.rotary_embedding.default, _op_args())
        torch.library.opcheck(torch.ops.fastllm.rotary_embedding.default, _op_args(inverse=True))
        torch.library.opcheck(torch.ops.fastllm.rotary_embedding.default, _op_args(torch.bfloat16, False, False))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_torch_compile_fullgraph(need_backend, backend):
    """The op is opaque to dynamo: no graph break; compiled forward and backward meet the criterion against the
    float64 reference (eager torch in fp32 as the bar)."""
    need_backend(backend)
    torch._dynamo.reset()
    q64, k64, cos, sin, positions = make_inputs(2, 4, 2, 9, 32, 24, torch.float64)

    def block(q, k, cos, sin, positions):
        qr, kr = fastllm.rotary_embedding(q * 2, k, cos, sin, positions)
        return qr @ kr.repeat_interleave(2, dim=1).transpose(-1, -2)  # (B, Hq, S, S) scores

    def eager(q, k, cos, sin, positions):
        qr, kr = eager_rope(q * 2, k, cos, sin, positions)
        return qr @ kr.repeat_interleave(2, dim=1).transpose(-1, -2)

    leaves_c, leaves_e = ([t.float().requires_grad_(True) for t in (q64, k64)] for _ in range(2))
    leaves_r = [t.clone().requires_grad_(True) for t in (q64, k64)]
    compiled = torch.compile(block, fullgraph=True)
    with fastllm.backend(backend), fastllm.explain() as log:
        out_c = compiled(*leaves_c, cos, sin, positions)
        out_c.square().sum().backward()
    out_e, out_r = eager(*leaves_e, cos, sin, positions), eager(*leaves_r, cos, sin, positions)
    out_e.square().sum().backward()
    out_r.square().sum().backward()
    assert {d.backend for d in log} == {backend}
    assert_equivalent(out_c, out_e, out_r, "compiled out")
    for name, c, e, r in zip(["q", "k"], leaves_c, leaves_e, leaves_r, strict=True):
        assert_equivalent(c.grad, e.grad, r.grad, f"compiled grad {name}")


# ---------------------------------------------------------------------------------------------- bad input


def _qk(dtype=torch.float32, D=16):
    return torch.randn(2, 4, 5, D, dtype=dtype), torch.randn(2, 2, 5, D, dtype=dtype)


def _tab(P=9, half=8):
    return rope_tables(P, 2 * half)


POS = torch.zeros(2, 5, dtype=torch.int64)
BAD = [
    ("q int", lambda: fastllm.rotary_embedding(torch.ones(2, 4, 5, 16, dtype=torch.int32), _qk()[1], *_tab(), POS), TypeError, "q must be a floating"),
    ("q not tensor", lambda: fastllm.rotary_embedding([1.0], _qk()[1], *_tab(), POS), TypeError, "q must be a tensor"),
    ("k dtype", lambda: fastllm.rotary_embedding(_qk()[0], _qk()[1].half(), *_tab(), POS), TypeError, "k has dtype"),
    ("q 3-D", lambda: fastllm.rotary_embedding(torch.randn(4, 5, 16), _qk()[1], *_tab(), POS), ValueError, "q must be 4-D"),
    ("k seq", lambda: fastllm.rotary_embedding(_qk()[0], torch.randn(2, 2, 6, 16), *_tab(), POS), ValueError, "k must have shape"),
    ("k head dim", lambda: fastllm.rotary_embedding(_qk()[0], torch.randn(2, 2, 5, 8), *_tab(), POS), ValueError, "k must have shape"),
    ("cos dtype", lambda: fastllm.rotary_embedding(*_qk(), _tab()[0].double(), _tab()[1], POS), TypeError, "cos must be a float32"),
    ("sin bf16", lambda: fastllm.rotary_embedding(*_qk(torch.bfloat16), _tab()[0], _tab()[1].bfloat16(), POS), TypeError, "sin must be a float32"),
    ("cos 1-D", lambda: fastllm.rotary_embedding(*_qk(), torch.ones(8), torch.ones(8), POS), ValueError, "cos must be 2-D"),
    ("sin shape", lambda: fastllm.rotary_embedding(*_qk(), _tab()[0], _tab(10)[1], POS), ValueError, "sin must have cos's shape"),
    ("R > D", lambda: fastllm.rotary_embedding(*_qk(D=8), *_tab(), POS), ValueError, "exceeds the head dim"),
    ("odd head dim R > D", lambda: fastllm.rotary_embedding(*_qk(D=7), *_tab(half=4), POS), ValueError, "exceeds the head dim"),
    ("positions float", lambda: fastllm.rotary_embedding(*_qk(), *_tab(), POS.float()), TypeError, "positions must be int32 or int64"),
    ("positions shape", lambda: fastllm.rotary_embedding(*_qk(), *_tab(), torch.zeros(2, 4, dtype=torch.int64)), ValueError, "positions must have shape"),
    ("positions 1-D", lambda: fastllm.rotary_embedding(*_qk(), *_tab(), torch.zeros(5, dtype=torch.int64)), ValueError, "positions must have shape"),
    ("positions device", lambda: fastllm.rotary_embedding(*_qk(), *_tab(), POS.to("meta")), ValueError, "positions is on meta"),
    ("cos device", lambda: fastllm.rotary_embedding(*_qk(), _tab()[0].to("meta"), _tab()[1], POS), ValueError, "cos is on meta"),
    ("cos requires grad", lambda: fastllm.rotary_embedding(*_qk(), _tab()[0].requires_grad_(True), _tab()[1], POS), ValueError, "cos requires grad"),
]  # fmt: skip


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("bad", [9, -1, 1 << 40])
def test_positions_out_of_range(need_backend, backend, bad):
    """Every backend raises a ValueError naming positions, on the direct path and through the op."""
    need_backend(backend)
    q, k = _qk()
    cos, sin = _tab(P=9)
    for dtype in (torch.int32, torch.int64):
        if dtype == torch.int32 and bad > 2**31:
            continue
        positions = torch.zeros(2, 5, dtype=dtype)
        positions[1, 3] = bad
        with fastllm.backend(backend):
            with pytest.raises(ValueError, match=r"positions must be in \[0, P\) = \[0, 9\)"):
                fastllm.rotary_embedding(q, k, cos, sin, positions)
            with pytest.raises(ValueError, match=r"positions must be in \[0, P\)"):
                fastllm.rotary_embedding(q.requires_grad_(True), k, cos, sin, positions)
            q.requires_grad_(False)


def test_cos_requiring_grad_is_fine_without_grad_mode():
    q, k = _qk()
    cos, sin = _tab()
    with torch.no_grad():
        fastllm.rotary_embedding(q, k, cos.requires_grad_(True), sin, POS)
    with pytest.raises(ValueError, match="cos requires grad"):  # through the op directly too
        torch.ops.fastllm.rotary_embedding(q.requires_grad_(True), k, cos, sin, POS, False)


# ---------------------------------------------------------------------------------------------- tables


def _hf_rotary(head_dim, max_pos, theta, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=params)  # fmt: skip
    return LlamaRotaryEmbedding(cfg)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}  # fmt: skip


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (80, 1e6)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "default"}, LLAMA3], ids=["none", "default", "llama3"])
def test_rope_tables_match_transformers(head_dim, theta, scaling):
    pytest.importorskip("transformers")
    P = 1024
    hf = _hf_rotary(head_dim, P, theta, scaling)
    # the frequencies: transformers computes them in fp32 (a few roundings), ours in float64
    f64 = rope_inv_freq(head_dim, theta, scaling)
    torch.testing.assert_close(hf.inv_freq.double(), f64, rtol=8 * EPS32, atol=0)
    if scaling is LLAMA3:  # the three bands are all present at this theta / length
        f_plain = rope_inv_freq(head_dim, theta)
        assert (f64 == f_plain).any() and (f64 == f_plain / 8).any() and ((f64 < f_plain) & (f64 > f_plain / 8)).any()
    cos, sin = rope_tables(P, head_dim, theta, scaling)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (P, head_dim // 2)
    hf_cos, hf_sin = hf(torch.zeros(1), torch.arange(P)[None])  # (1, P, head_dim): [freqs, freqs] layout
    half = head_dim // 2
    # transformers' fp32 angle p * f carries ~p * f * (a few eps) of error: the bound grows with the angle
    angle = torch.arange(P, dtype=torch.float64)[:, None] * f64[None, :]
    tol = EPS32 * (8 * angle + 2)
    for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        for part in (theirs[:, :half], theirs[:, half:]):
            bad = (ours.double() - part.double()).abs() > tol
            assert not bad.any(), f"{int(bad.sum())} entries differ beyond fp32 angle error, first {bad.nonzero()[0]}"
    # and ours are the float64 values rounded once: spot-check with Python's math
    for p, i in [(0, 0), (1, 0), (P - 1, 0), (P - 1, half - 1), (517, half // 2), (999, 3)]:
        a = p * float(f64[i])
        for got, want in ((float(cos[p, i]), math.cos(a)), (float(sin[p, i]), math.sin(a))):
            assert abs(got - want) <= EPS32 / 2 * abs(want), (p, i, got, want)  # within half an ulp


def test_rotary_embedding_matches_transformers_apply():
    """End to end at small positions: fastllm.rotary_embedding with rope_tables == HF apply_rotary_pos_emb with
    LlamaRotaryEmbedding's cos/sin, to fp32 rounding."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = _hf_rotary(64, 64, 10000.0, LLAMA3 | {"original_max_position_embeddings": 16})
    q, k = torch.randn(2, 4, 7, 64), torch.randn(2, 2, 7, 64)
    positions = torch.randint(0, 64, (2, 7))
    hf_cos, hf_sin = hf(q, positions)
    eq, ek = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = rope_tables(64, 64, 10000.0, LLAMA3 | {"original_max_position_embeddings": 16})
    gq, gk = fastllm.rotary_embedding(q, k, cos, sin, positions)
    torch.testing.assert_close(gq, eq, rtol=0, atol=1e-4)
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-4)


BAD_TABLES = [
    ("odd R", lambda: rope_tables(8, 7), ValueError, "rotary_dim must be even"),
    ("R zero", lambda: rope_tables(8, 0), ValueError, "rotary_dim must be >= 2"),
    ("R float", lambda: rope_tables(8, 8.0), TypeError, "rotary_dim must be an int"),
    ("P zero", lambda: rope_tables(0, 8), ValueError, "max_positions must be >= 1"),
    ("theta", lambda: rope_tables(8, 8, theta=-1.0), ValueError, "theta must be a positive"),
    ("theta str", lambda: rope_tables(8, 8, theta="1e4"), TypeError, "theta must be a number"),
    ("yarn", lambda: rope_tables(8, 8, scaling={"rope_type": "yarn", "factor": 4.0}), ValueError, "'yarn'"),
    ("linear", lambda: rope_tables(8, 8, scaling={"type": "linear", "factor": 4.0}), ValueError, "'linear'"),
    ("scaling type", lambda: rope_tables(8, 8, scaling="llama3"), TypeError, "scaling must be None or a dict"),
    ("llama3 missing", lambda: rope_tables(8, 8, scaling={"rope_type": "llama3", "factor": 8.0}), ValueError, "needs the key"),
    ("llama3 bands", lambda: rope_tables(8, 8, scaling=LLAMA3 | {"high_freq_factor": 1.0}), ValueError, "high_freq_factor > low_freq_factor"),
    ("unknown key", lambda: rope_tables(8, 8, scaling=LLAMA3 | {"beta_fast": 32}), ValueError, "beta_fast"),
    ("theta mismatch", lambda: rope_tables(8, 8, 1e4, scaling={"rope_type": "default", "rope_theta": 5e5}), ValueError, "differs from theta"),
]  # fmt: skip


@pytest.mark.parametrize("name,call,exc,msg", BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_rope_tables_bad_input(name, call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value), str(info.value)


def test_rope_tables_accepts_hf_rope_parameters():
    """A transformers config's rope_parameters dict (rope_theta inside, or the legacy "type" key) works as is."""
    cos, sin = rope_tables(16, 8, 5e5, scaling=LLAMA3 | {"rope_theta": 5e5})
    cos2, sin2 = rope_tables(16, 8, 5e5, scaling={k if k != "rope_type" else "type": v for k, v in LLAMA3.items()})
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)
    plain = rope_tables(16, 8)
    default = rope_tables(16, 8, scaling={"rope_type": "default"})
    assert all(torch.equal(a, b) for a, b in zip(plain, default, strict=True))
