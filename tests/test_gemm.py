"""fastllm.linear / fused_ffn / fused_gated_ffn: outputs and every gradient vs float64 under DESIGN.md's
criterion (2x torch eager's error in the same dtype), on the C++ paths (AVX2 and portable) and the reference;
weight-cache staleness, opcheck, torch.compile, saved-activation memory and bad inputs. The Triton kernels
have their own interpreter tests (test_gemm_triton.py)."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastllm
import fastllm._ext
from fastllm.ops import _pack
from fastllm.ops import gemm as L
from fastllm.testing import assert_equivalent, saved_activation_bytes

ACTS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")


def _act(name, x):
    return L.act_ref(name, x)


def eager_linear(x, w, b, act, res):
    y = _act(act, F.linear(x, w, b)) if act else F.linear(x, w, b)
    return y + res if res is not None else y


def eager_ffn(x, w1, b1, w2, b2, act):
    return F.linear(_act(act, F.linear(x, w1, b1)), w2, b2)


def eager_gated(x, wg, wu, wd, act, bg=None, bu=None, bd=None):
    return F.linear(_act(act, F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def _params(shapes, dtype, names):
    """fp64 masters (random normal, weights scaled by 1/sqrt(fan_in)), then (ours, eager, ref) leaf copies."""
    masters = []
    for name, shape in zip(names, shapes, strict=True):
        if shape is None:
            masters.append(None)
            continue
        t = torch.randn(shape, dtype=torch.float64)
        if name.startswith("w"):
            t = t / math.sqrt(shape[1])
        masters.append(t)

    def copies(dt):
        return [None if m is None else m.to(dt).requires_grad_(True) for m in masters]

    return copies(dtype), copies(dtype), copies(torch.float64)


def _check_all(fn_ours, fn_eager, shapes, names, dtype, grads=True):
    ours, eager, ref = _params(shapes, dtype, names)
    y_o, y_e, y_r = fn_ours(*ours), fn_eager(*eager), fn_eager(*ref)
    assert y_o.dtype == dtype and y_o.shape == y_r.shape
    assert_equivalent(y_o, y_e, y_r, "output")
    if not grads:
        return
    dy = torch.randn(y_r.shape, dtype=torch.float64)
    y_o.backward(dy.to(dtype))
    y_e.backward(dy.to(dtype))
    y_r.backward(dy)
    for name, o, e, r in zip(names, ours, eager, ref, strict=True):
        if o is None:
            continue
        assert o.grad is not None, f"no gradient for {name}"
        assert_equivalent(o.grad, e.grad, r.grad, f"grad {name}")


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, *ACTS])
@pytest.mark.parametrize("T,n_in,n_out", [(1, 7, 5), (3, 100, 333), (64, 33, 17), (257, 100, 48)])
def test_linear(gemm_isa, T, n_in, n_out, act, dtype):
    _check_all(
        lambda x, w, b: fastllm.linear(x, w, b, activation=act),
        lambda x, w, b: eager_linear(x, w, b, act, None),
        [(T, n_in), (n_out, n_in), (n_out,)],
        ["x", "w", "b"],
        dtype,
    )


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "w8a16"])
def test_skinny_rows(gemm_isa, kind):
    """Decode-sized GEMMs (1 and 2 rows: the skinny micro-kernels, several B panels a call) over K of three k blocks
    and N of 10 panels, the last partial: equivalent to float64, and each row bit-identical to the same row computed
    in a taller batch (a row's sums do not depend on M)."""
    K, N = 600, 149
    torch.manual_seed(1)
    dt = torch.float32 if kind == "w8a16" else getattr(torch, kind)
    x = torch.randn(9, K).to(dt)
    bias = torch.randn(N).to(dt)
    if kind == "w8a16":
        w, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N) * 1e-2
        run = lambda a: fastllm.w8a16_linear(a, w, s, bias)
        ref = lambda a: (a.double() @ w.double().t()) * s.double() + bias.double()
        eager = lambda a: F.linear(a, w.to(dt)) * s + bias
    else:
        w = (torch.randn(N, K) / math.sqrt(K)).to(dt)
        run = lambda a: fastllm.linear(a, w, bias)
        ref = lambda a: F.linear(a.double(), w.double(), bias.double())
        eager = lambda a: F.linear(a, w, bias)
    with torch.inference_mode():
        tall = run(x)
        for M in (1, 2):
            out = run(x[:M])
            assert_equivalent(out, eager(x[:M]), ref(x[:M]), f"{kind} M={M}")
            assert torch.equal(out, tall[:M]), f"{kind}: rows computed with M={M} differ from the same rows at M=9"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear_residual_and_batch_dims(gemm_isa, dtype):
    _check_all(
        lambda x, w, b, r: fastllm.linear(x, w, b, activation="gelu", residual=r),
        lambda x, w, b, r: eager_linear(x, w, b, "gelu", r),
        [(2, 5, 40), (24, 40), (24,), (2, 5, 24)],
        ["x", "w", "b", "r"],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("T", [1, 3, 64, 257])
def test_ffn_odd(gemm_isa, T, act, dtype):
    _check_all(
        lambda x, w1, b1, w2, b2: fastllm.fused_ffn(x, w1, w2, b1=b1, b2=b2, activation=act),
        lambda x, w1, b1, w2, b2: eager_ffn(x, w1, b1, w2, b2, act),
        [(T, 100), (333, 100), (333,), (100, 333), (100,)],
        ["x", "w1", "b1", "w2", "b2"],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 64, 257])
def test_ffn_bert_size(T, dtype):
    _check_all(
        lambda x, w1, b1, w2, b2: fastllm.fused_ffn(x, w1, w2, b1=b1, b2=b2),
        lambda x, w1, b1, w2, b2: eager_ffn(x, w1, b1, w2, b2, "gelu"),
        [(T, 768), (3072, 768), (3072,), (768, 3072), (768,)],
        ["x", "w1", "b1", "w2", "b2"],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("T", [1, 3, 64, 257])
def test_gated_odd(gemm_isa, T, act, dtype):
    _check_all(
        lambda x, wg, wu, wd: fastllm.fused_gated_ffn(x, wg, wu, wd, activation=act),
        lambda x, wg, wu, wd: eager_gated(x, wg, wu, wd, act),
        [(T, 100), (333, 100), (333, 100), (100, 333)],
        ["x", "wg", "wu", "wd"],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 64, 257])
def test_gated_smollm_size(T, dtype):
    _check_all(
        lambda x, wg, wu, wd: fastllm.fused_gated_ffn(x, wg, wu, wd),
        lambda x, wg, wu, wd: eager_gated(x, wg, wu, wd, "silu"),
        [(T, 576), (1536, 576), (1536, 576), (576, 1536)],
        ["x", "wg", "wu", "wd"],
        dtype,
    )


def test_gated_biases(gemm_isa):
    _check_all(
        lambda x, wg, wu, wd, bg, bu, bd: fastllm.fused_gated_ffn(
            x, wg, wu, wd, b_gate=bg, b_up=bu, b_down=bd, activation="gelu"
        ),
        lambda x, wg, wu, wd, bg, bu, bd: eager_gated(x, wg, wu, wd, "gelu", bg, bu, bd),
        [(9, 40), (21, 40), (21, 40), (13, 21), (21,), (21,), (13,)],
        ["x", "wg", "wu", "wd", "bg", "bu", "bd"],
        torch.float32,
    )


def test_fp16_ffn(gemm_isa):
    _check_all(
        lambda x, w1, b1, w2, b2: fastllm.fused_ffn(x, w1, w2, b1=b1, b2=b2, activation="quick_gelu"),
        lambda x, w1, b1, w2, b2: eager_ffn(x, w1, b1, w2, b2, "quick_gelu"),
        [(17, 64), (100, 64), (100,), (64, 100), (64,)],
        ["x", "w1", "b1", "w2", "b2"],
        torch.float16,
    )


def test_non_contiguous_inputs(gemm_isa):
    x = torch.randn(40, 30).t()  # (30, 40) transposed view
    w = torch.randn(50, 40)[::2]  # row stride 80
    ref = F.linear(x.double(), w.double())
    assert_equivalent(fastllm.linear(x, w), F.linear(x, w), ref)
    wt = torch.randn(40, 25).t()  # weight as a transposed view: column stride != 1
    assert_equivalent(fastllm.linear(x, wt), F.linear(x, wt), F.linear(x.double(), wt.double()))


def test_float64_runs_reference():
    x, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    with fastllm.explain() as log:
        y = fastllm.linear(x, w, activation="silu")
    assert log[-1].backend == "reference"
    torch.testing.assert_close(y, F.silu(F.linear(x, w)))


def test_zero_tokens_and_zero_features():
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    x = torch.randn(0, 8, requires_grad=True)
    y = fastllm.fused_ffn(x, w1, w2)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert fastllm.fused_gated_ffn(torch.randn(2, 0, 8), w1, w1, w2).shape == (2, 0, 8)
    # in_features = 0: x W^T = 0, the epilogue still adds the bias and applies the activation
    b = torch.randn(5)
    y = fastllm.linear(torch.randn(3, 0), torch.randn(5, 0), b, activation="gelu")
    torch.testing.assert_close(y, F.gelu(b).expand(3, 5))


def test_weight_cache_sees_in_place_updates(gemm_isa):
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    y0 = fastllm.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an optimizer-style in-place update: bumps the version counter
    y1 = fastllm.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(y1, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y0, y1)
    # an optimizer step on a module
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    fastllm.linear(x, lin.weight, lin.bias).sum().backward()
    opt.step()
    torch.testing.assert_close(fastllm.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # a freed weight whose memory is reused by a new tensor of the same shape must not hit the old entry
    for _ in range(3):
        w = torch.randn(48, 64)
        torch.testing.assert_close(fastllm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        del w
    # gated weights: updating only the up projection must repack the interleaved panels
    wg, wu, wd = torch.randn(32, 64) / 8, torch.randn(32, 64) / 8, torch.randn(16, 32) / 6
    fastllm.fused_gated_ffn(x, wg, wu, wd)
    wu.add_(1.0)
    torch.testing.assert_close(fastllm.fused_gated_ffn(x, wg, wu, wd), eager_gated(x, wg, wu, wd, "silu"),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.skipif(fastllm._ext.C is None, reason="the packed-weight cache belongs to the C++ path")
def test_weight_cache_is_dropped_with_the_weight():
    fastllm.clear_weight_cache()
    w = torch.randn(48, 64)
    fastllm.linear(torch.randn(2, 64), w)
    assert len(_pack._cache) == 1
    del w
    assert len(_pack._cache) == 0


def test_inference_tensor_weights(monkeypatch):
    """A weight that is an inference tensor: the right result, repacked on every call (never cached: an in-place
    write under inference_mode would go unseen), and a warning that says so, once per process."""
    monkeypatch.setattr(_pack, "_warned_inference", False)
    with torch.inference_mode():
        w = torch.randn(24, 40)
        x = torch.randn(3, 40)
        packs = fastllm._ext.C is not None  # (FASTLLM_NO_CPP=1: the reference, nothing packed, no warning)
        with pytest.warns(UserWarning, match="inference tensor") if packs else contextlib.nullcontext():
            torch.testing.assert_close(fastllm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        w.mul_(2.0)  # (in place, no version counter: the next call must see it)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (once per process: no second warning)
            torch.testing.assert_close(fastllm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert not any(k[0][0] == w.data_ptr() for k in _pack._cache)


def test_saved_activation_memory():
    T, d, n_mid = 128, 64, 256
    x = torch.randn(T, d, requires_grad=True)
    wg, wu, wd = (torch.randn(n_mid, d, requires_grad=True), torch.randn(n_mid, d, requires_grad=True),
                  torch.randn(d, n_mid, requires_grad=True))  # fmt: skip
    ours = saved_activation_bytes(lambda *a: fastllm.fused_gated_ffn(*a), x, wg, wu, wd)
    eager = saved_activation_bytes(lambda *a: eager_gated(*a, "silu"), x, wg, wu, wd)
    assert ours == 2 * T * n_mid * 4  # g and u only
    assert ours <= 0.7 * eager, (ours, eager)
    w1, w2 = torch.randn(n_mid, d, requires_grad=True), torch.randn(d, n_mid, requires_grad=True)
    ours = saved_activation_bytes(lambda *a: fastllm.fused_ffn(*a, activation="gelu"), x, w1, w2)
    eager = saved_activation_bytes(lambda x, w1, w2: eager_ffn(x, w1, None, w2, None, "gelu"), x, w1, w2)
    assert ours == T * n_mid * 4 and ours <= 0.7 * eager, (ours, eager)


def test_no_saved_pre_activation_without_grad():
    x, w1, w2 = torch.randn(8, 16), torch.randn(32, 16), torch.randn(16, 32)
    with fastllm.explain() as log:
        fastllm.fused_ffn(x, w1, w2)
    assert log[-1].op == "fused_ffn_fwd"
    _, pre = torch.ops.fastllm.fused_ffn_fwd(x, w1, None, w2, None, "gelu", False)
    assert pre.numel() == 0


def test_opcheck():
    x = torch.randn(5, 12, requires_grad=True)
    w1, b1 = torch.randn(20, 12, requires_grad=True), torch.randn(20, requires_grad=True)
    w2, b2 = torch.randn(7, 20, requires_grad=True), torch.randn(7, requires_grad=True)
    r = torch.randn(5, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.linear_fwd, (x, w1, b1, r, "gelu", True))
    torch.library.opcheck(torch.ops.fastllm.fused_ffn_fwd, (x, w1, b1, w2, b2, "silu", True))
    w2 = torch.randn(20, 12, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fastllm.fused_gated_ffn_fwd, (x, w1, w2, torch.randn(7, 20), None, b1, b2, "silu", True)
    )
    a, b, aux = torch.randn(6, 5), torch.randn(5, 9), torch.randn(6, 9)
    torch.library.opcheck(torch.ops.fastllm.gemm_bwd, (a, b, aux, aux, "dgated", "gelu"))


def test_torch_compile_fullgraph():
    """Compiled fastllm (fullgraph) against the float64 reference, with eager torch in fp32 as the bar."""
    torch._dynamo.reset()
    mlp = fastllm.nn.FusedGatedFFN(32, 48)
    ffn = fastllm.nn.FusedFFN(32, 40, activation="gelu_tanh")

    def f(x):
        return ffn(mlp(x)) + fastllm.linear(x, ffn.fc1.weight[:32], activation="relu")

    def eager(x, dt):
        p = {k: v.detach().to(dt) for k, v in {**mlp.state_dict(), **ffn.state_dict()}.items()}
        h = eager_gated(x, p["gate_proj.weight"], p["up_proj.weight"], p["down_proj.weight"], "silu")
        y = eager_ffn(h, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"], "gelu_tanh")
        return y + F.relu(F.linear(x, p["fc1.weight"][:32]))

    x64 = torch.randn(3, 7, 32, dtype=torch.float64)
    x, xe, xr = (x64.float().requires_grad_(), x64.float().requires_grad_(), x64.clone().requires_grad_())
    y = torch.compile(f, fullgraph=True)(x)
    ye, yr = eager(xe, torch.float32), eager(xr, torch.float64)
    assert_equivalent(y, ye, yr, "compiled output")
    dy = torch.randn_like(yr)
    for out in (y, ye, yr):
        out.backward(dy.to(out.dtype))
    assert_equivalent(x.grad, xe.grad, xr.grad, "compiled grad x")


def test_modules_match_hf_style_state_dicts():
    ffn = fastllm.nn.FusedFFN(24, 40, activation="gelu")
    assert set(ffn.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    mlp = fastllm.nn.FusedGatedFFN(24, 40)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = torch.randn(2, 5, 24)
    sd = ffn.state_dict()
    torch.testing.assert_close(
        ffn(x), F.linear(F.gelu(F.linear(x, sd["fc1.weight"], sd["fc1.bias"])), sd["fc2.weight"], sd["fc2.bias"]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    sd = mlp.state_dict()
    torch.testing.assert_close(
        mlp(x), eager_gated(x, sd["gate_proj.weight"], sd["up_proj.weight"], sd["down_proj.weight"], "silu"),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    clone = fastllm.nn.FusedGatedFFN(24, 40)
    clone.load_state_dict(sd)
    torch.testing.assert_close(clone(x), mlp(x))


def test_reference_backend_matches():
    x, w1, w2 = torch.randn(9, 16), torch.randn(30, 16), torch.randn(16, 30)
    with fastllm.backend("reference"):
        r = fastllm.fused_ffn(x, w1, w2, activation="silu")
    torch.testing.assert_close(fastllm.fused_ffn(x, w1, w2, activation="silu"), r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors, never a crash.


def test_bad_inputs():
    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="do not chain"):
        fastllm.fused_ffn(x, w1, torch.randn(8, 15))
    with pytest.raises(ValueError, match="one shape"):
        fastllm.fused_gated_ffn(x, w1, torch.randn(17, 8), w2)
    with pytest.raises(ValueError, match="do not chain"):
        fastllm.fused_gated_ffn(x, w1, w1, torch.randn(8, 12))
    with pytest.raises(ValueError, match="in_features"):
        fastllm.linear(torch.randn(4, 9), w1)
    with pytest.raises(ValueError, match="accepted: gelu, gelu_tanh, quick_gelu, relu, silu"):
        fastllm.fused_ffn(x, w1, w2, activation="swish")
    with pytest.raises(ValueError, match="unknown activation"):
        fastllm.linear(x, w1, activation="tanh")
    with pytest.raises(TypeError, match="floating"):
        fastllm.linear(x.to(torch.int32), w1.to(torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        fastllm.linear(x, w1.double())
    with pytest.raises(ValueError, match="device"):
        fastllm.linear(x, w1.to("meta"))
    with pytest.raises(ValueError, match="bias"):
        fastllm.linear(x, w1, torch.randn(3))
    with pytest.raises(ValueError, match="residual"):
        fastllm.linear(x, w1, residual=torch.randn(4, 3))
    with pytest.raises(TypeError, match="tensor"):
        fastllm.fused_ffn(x, w1, None)
    with pytest.raises(ValueError, match="2-D"):
        fastllm.linear(x, torch.randn(16))
    with pytest.raises(ValueError, match="activation=None"):
        fastllm.linear(x, w1, activation="none")
    with pytest.raises(ValueError, match="needs an activation"):
        fastllm.fused_ffn(x, w1, w2, activation="none")
    with pytest.raises(TypeError, match="positional"):
        fastllm.fused_ffn(x, w1, w2, None, None)  # biases are keyword-only


@pytest.mark.skipif(not L._op_triton_ready(), reason="needs triton with TRITON_INTERPRET=1 (or a GPU)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backend_through_the_ops(dtype):
    """The op layer's Triton path (interpreter on CPU tensors): forward and every gradient of both MLPs."""
    with fastllm.backend("triton"), fastllm.explain() as log:
        _check_all(
            lambda x, wg, wu, wd: fastllm.fused_gated_ffn(x, wg, wu, wd, activation="gelu"),
            lambda x, wg, wu, wd: eager_gated(x, wg, wu, wd, "gelu"),
            [(7, 24), (40, 24), (40, 24), (17, 40)],
            ["x", "wg", "wu", "wd"],
            dtype,
        )
        _check_all(
            lambda x, w1, b1, w2, b2, r: fastllm.linear(
                fastllm.fused_ffn(x, w1, w2, b1=b1, b2=b2, activation="quick_gelu"), w2.t(), activation="silu", residual=r
            ),
            lambda x, w1, b1, w2, b2, r: eager_linear(eager_ffn(x, w1, b1, w2, b2, "quick_gelu"), w2.t(), None,
                                                      "silu", r),
            [(5, 24), (33, 24), (33,), (24, 33), (24,), (5, 33)],
            ["x", "w1", "b1", "w2", "b2", "r"],
            dtype,
        )  # fmt: skip
    assert {d.backend for d in log} == {"triton"}


def test_bf16_kernels_of_each_isa_level(gemm_isa):
    """bf16 through the kernel of each ISA level (avx512_dot: vdpbf16ps where the CPU has AVX512-BF16; avx512:
    the fp32-FMA kernel on bf16), odd K, fwd + bwd."""
    with fastllm.explain() as log:
        fastllm.linear(torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16))
    dot = gemm_isa == "avx512_dot" and fastllm._ext.C.avx512bf16_available()
    assert log[0].reason == f"{'avx512_dot' if dot else gemm_isa} kernel", log[0].reason
    _check_all(
        lambda x, wg, wu, wd: fastllm.fused_gated_ffn(x, wg, wu, wd, activation="gelu_tanh"),
        lambda x, wg, wu, wd: eager_gated(x, wg, wu, wd, "gelu_tanh"),
        [(37, 101), (75, 101), (75, 101), (33, 75)],
        ["x", "wg", "wu", "wd"],
        torch.bfloat16,
    )
