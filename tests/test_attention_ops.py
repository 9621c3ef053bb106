"""fastllm attention ops: bad inputs (validated before any kernel, on every backend), torch.library (opcheck, the
fakes' shapes and strides), torch.compile (fullgraph, compiled forward and backward against the float64
reference), determinism and thread count of the C++ kernels, and the C++ forward's memory (linear in the
sequence). Tests of a backend skip (with the reason) where it cannot run."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from attention_common import NAMES, decode_torch, make_qkv, run_with_grads, torch_attention

import fastllm
from fastllm.testing import assert_equivalent

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
    ("head_dim q vs k", lambda: FA(Q, _q(1, 2, 5, 16), _q(1, 2, 5, 16)), ValueError, "head_dim of k (16) differs"),
    ("k vs v seq", lambda: FA(Q, K, _q(1, 2, 6, 8)), ValueError, "k and v must agree in (batch, heads, seq)"),
    ("k vs v heads", lambda: FA(Q, K, _q(1, 1, 5, 8)), ValueError, "k and v must agree in (batch, heads, seq)"),
    ("v head_dim 0", lambda: FA(Q, K, _q(1, 2, 5, 0)), ValueError, "head_dim must be >= 1"),
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
    ("decode head_dim", lambda: DEC(Q, _q(1, 2, 5, 4), _q(1, 2, 5, 4), torch.tensor([5], dtype=I32)), ValueError, "head_dim of k_cache (4)"),
    ("decode 3-D", lambda: DEC(Q[0], K[0], K[0], torch.tensor([5], dtype=I32)), ValueError, "q must be 4-D"),
    ("sdpa dtype", lambda: fastllm.scaled_dot_product_attention(Q, Q.double(), Q.double()), TypeError, "key has dtype torch.float64"),
    ("sdpa head_dim", lambda: fastllm.scaled_dot_product_attention(Q, _q(1, 4, 5, 4), _q(1, 4, 5, 4)), ValueError, "head_dim of key (4)"),
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
    with pytest.raises(ValueError, match=r"dout/out must have shape \(1, 4, 3, 8\) \(B, Hq, Sq, Dv\)"):
        torch.ops.fastllm.attention_bwd(Q[:, :, :2], Q, K, K, Q, lse, None, False, True, 0.3)
    with pytest.raises(TypeError, match="dout has dtype"):
        torch.ops.fastllm.attention_bwd(Q.half(), Q, K, K, Q, lse, None, False, True, 0.3)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.fastllm.attention_fwd(Q, K, K, torch.ones(3, 5, dtype=torch.bool), None, False, True, 0.3)


# ---------------------------------------------------------------------------------------------- torch.library


def _fwd_args(mask=None, kv_len=None, causal=True, dtype=torch.float32, requires_grad=True):
    q, k, v = (t.requires_grad_(requires_grad) for t in make_qkv(2, 4, 2, 5, 9, 16, dtype))
    return (q, k, v, mask, kv_len, causal, True, 0.3)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(need_backend, backend):
    need_backend(backend)
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
        # a value head dim of its own (the reference on every backend): the fakes give out and dv v's head dim
        q, k, _ = make_qkv(2, 4, 2, 5, 9, 16, torch.float32)
        v = torch.randn(2, 2, 9, 24)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.library.opcheck(fwd, (*leaves, None, None, True, True, 0.3))
        out, lse = fwd(q, k, v, None, None, True, True, 0.3)
        torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, None, True, True, 0.3))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck_noncontiguous(need_backend, backend):
    """q/k/v as (B, S, H, D) storage viewed (B, H, S, D): the fakes must give the real outputs' strides."""
    need_backend(backend)
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    k, v = (torch.randn(2, 9, 2, 16).transpose(1, 2) for _ in range(2))
    mask = torch.rand(2, 1, 1, 9) < 0.7
    with fastllm.backend(backend):
        torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, (q, k, v, mask, None, False, True, 0.3))
        out, lse = torch.ops.fastllm.attention_fwd(q, k, v, mask, None, False, True, 0.3)
        dout = torch.randn(2, 5, 4, 16).transpose(1, 2)
        args = (dout, q, k, v, out, lse, mask, False, True, 0.3)
        torch.library.opcheck(torch.ops.fastllm.attention_bwd.default, args)


def _block(x, wq, wk, wv, mask, sdpa, flash):
    """A small attention block: q/k/v projections (4 query heads, 2 kv heads), causal flash attention plus masked
    SDPA. sdpa / flash: the two attention calls (fastllm's, or torch's SDPA written for the same semantics)."""
    B, S, _ = x.shape
    q = (x @ wq).view(B, S, 4, 16).transpose(1, 2)
    k = (x @ wk).view(B, S, 2, 16).transpose(1, 2)
    v = (x @ wv).view(B, S, 2, 16).transpose(1, 2)
    a = flash(q, k, v)
    b = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    return (a + b).transpose(1, 2).reshape(B, S, 64)


def fastllm_block(x, wq, wk, wv, mask):
    flash = lambda q, k, v: fastllm.flash_attention(q, k, v, causal=True)
    return _block(x, wq, wk, wv, mask, fastllm.scaled_dot_product_attention, flash)


def torch_block(x, wq, wk, wv, mask):
    """fastllm_block in eager PyTorch (Sq == Sk: bottom-right causal is is_causal's top-left)."""
    flash = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return _block(x, wq, wk, wv, mask, F.scaled_dot_product_attention, flash)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_fullgraph(need_backend, backend):
    """The ops are opaque to dynamo (no graph break), and the compiled forward and backward meet the criterion
    against the float64 reference (torch's SDPA in float64; eager = torch's SDPA in float32), and match eager
    fastllm."""
    need_backend(backend)
    torch._dynamo.reset()
    x = torch.randn(2, 11, 32)
    ws = [torch.randn(32, 64) * 0.2, torch.randn(32, 32) * 0.2, torch.randn(32, 32) * 0.2]
    mask = torch.rand(2, 1, 11, 11) < 0.8

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in [x, *ws]]
        out = fn(*leaves, mask)
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    with fastllm.backend(backend), fastllm.explain() as log:
        compiled = run(torch.compile(fastllm_block, fullgraph=True), torch.float32)
        eager_fastllm = run(fastllm_block, torch.float32)
    assert {d.backend for d in log} == {backend}, [str(d) for d in log]
    assert {d.op for d in log} == {"attention_fwd", "attention_bwd"}
    eager = run(torch_block, torch.float32)
    ref = run(torch_block, torch.float64)
    for name, c, f, e, r in zip(["out", "dx", "dwq", "dwk", "dwv"], compiled, eager_fastllm, eager, ref, strict=True):
        assert_equivalent(c, e, r, f"compiled {backend} {name}")
        torch.testing.assert_close(c, f, msg=lambda m, n=name: f"compiled vs eager fastllm {n}: {m}")


# ---------------------------------------------------------------------------------------------- determinism, memory


@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 90, 64), (1, 4, 1, 100, 300, 32)], ids=str)
def test_cpp_backward_deterministic(need_backend, shape):
    """Bit-identical gradients from two runs (the second shape has fewer kv heads than threads: split keys)."""
    need_backend("cpp")
    q, k, v = make_qkv(*shape, torch.float32)
    dout = torch.randn(q.shape)
    mask = torch.rand(shape[0], 1, shape[3], shape[4]) < 0.9
    runs = []
    for _ in range(2):
        with fastllm.backend("cpp"):
            runs.append(run_with_grads(fastllm.flash_attention, q, k, v, dout, causal=True, attn_mask=mask))
    for name, a, b in zip(NAMES, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_thread_count_does_not_change_the_result(need_backend):
    """C++ forward (and backward) on 1 and 2 threads both meet the criterion; so does split-K decode."""
    need_backend("cpp")
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
            with fastllm.backend("cpp"), fastllm.explain() as log:
                got = run_with_grads(fastllm.flash_attention, q, k, v, dout, causal=True)
                dec = fastllm.decode_attention(qd, kc, vc, lens)
            assert {d.backend for d in log} == {"cpp"}, [str(d) for d in log]
            for name, g, e, r in zip(NAMES, got, eager, ref, strict=True):
                assert_equivalent(g, e, r, f"{n} threads {name}")
            assert_equivalent(dec, dec_eager, dec_ref, f"{n} threads decode")
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


def test_cpu_forward_memory_is_linear_in_sequence(need_backend):
    """B=1, H=8, S=16384, D=64 fp32: peak RSS grows by less than 64 MB beyond the output and lse
    (the (S, S) scores would be 8.6 GB)."""
    need_backend("cpp")  # the reference would need ~8.6 GB
    r = subprocess.run([sys.executable, "-c", MEMORY_CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    backend, delta = r.stdout.split()
    assert backend == "cpp"
    B, H, S, D = 1, 8, 16384, 64
    extra = int(delta) - (B * H * S * D * 4 + B * H * S * 4)  # minus out (32 MiB) and lse (fp32)
    assert extra < 64 * 2**20, f"forward used {extra / 2**20:.1f} MiB beyond out and lse"


# ---------------------------------------------------------------------------------------------- merged heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lens", [None, [13, 1, 7]], ids=["full", "kv_len"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(6, 6), (6, 2)], ids=["mha", "gqa"])
def test_attention_merged_layout(dtype, lens, causal, heads):
    """attention_merged (the encoder's inference path) writes (B, S, H D) in the kernel (o_strides) instead of
    copying (B, H, S, D): the same values bit for bit, and on the direct path it is the C++ kernel that ran."""
    from fastllm.ops.attention import attention_fwd, attention_merged

    torch.manual_seed(0)
    Hq, Hkv = heads
    q, k, v = _q(3, Hq, 13, 24, dtype=dtype), _q(3, Hkv, 13, 24, dtype=dtype), _q(3, Hkv, 13, 24, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided q, as qkv_projection's views are not
    kv_len = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    with torch.inference_mode():
        want, _ = attention_fwd(q, k, v, None, kv_len, causal, False, 0.3)
        before = attention_fwd.direct_calls
        got = attention_merged(q, k, v, kv_len, causal, 0.3)
    assert got.shape == (3, 13, Hq * 24) and got.is_contiguous()
    assert torch.equal(got, want.transpose(1, 2).reshape(3, 13, Hq * 24))
    if fastllm._ext.C is not None:  # the C++ lane counts a direct call; the fallback runs the op (also direct here)
        assert attention_fwd.direct_calls == before + 1
    # with autograd the op runs (the registered path), and the gradient flows
    q.requires_grad_(True)
    out = attention_merged(q, k, v, None, causal, 0.3)
    assert out.requires_grad
    out.float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_decode_shaped_backward_recomputes_the_forwards_scores(cpu_isa):
    """Found by tests/test_fuzz.py: blocks of <= 8 query rows form their scores with dot products in the forward;
    the backward formed them with the GEMM (another summation order), so P differed from the forward's and, with one
    key (P = 1), dV came out as dO (1 + up to 6 ulp) where eager is exact. Now bit for bit: dV = dO."""
    torch.manual_seed(0)
    for D in (8, 13, 32):
        q, k, v = (torch.randn(2, 3, 1, D, requires_grad=True) for _ in range(3))
        out = fastllm.flash_attention(q, k, v)
        dout = torch.randn_like(out)
        out.backward(dout)
        assert torch.equal(out.detach(), v.detach()) and torch.equal(v.grad, dout), D
