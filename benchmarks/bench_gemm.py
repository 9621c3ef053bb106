"""GEMM family: fastllm.linear and the transformer MLPs fastllm.fused_ffn / fused_gated_ffn (the C++ GEMM engine on
CPU, Triton on CUDA) against eager PyTorch (F.linear: MKL for fp32 and oneDNN for bf16 where torch uses it, shown
as "eager (oneDNN)"; cuBLAS on CUDA; the MLPs as F.linear -> activation -> F.linear) and torch.compile of the same
eager MLP code ("torch.compile").

linear: y = x W^T with W in nn.Linear layout (out, in). CPU: M x N x K in {2048^3, 512 x 3072 x 768 (BERT fc1),
512 x 768 x 3072 (BERT fc2)}, fp32 and bf16. The weight is packed once and cached (as oneDNN's prepacked weights;
fastllm.linear's cache, fastllm/ops/gemm.py); the row "fastllm-pack" runs with an empty cache, so it includes
packing the weight. GPU: bf16 at 4096^3 and 8192^3.

MLPs: CPU: BERT-base (768 -> 3072 -> 768, gelu, biases) and a SmolLM-size SwiGLU (576 -> 1536 -> 576, silu, no
biases) at T = 512 tokens (prefill) and T in {1, 8} (decode); fp32 and bf16; forward, and forward+backward
(T = 512) with gradients for x and every weight and bias. Forward rows use the cached packed weights (inference);
forward+backward rows run with an empty cache, as after an optimizer step (every training step repacks). GPU:
bf16, T = 8192 tokens, the gated MLP at Llama-7B size (4096 -> 11008).

On a CPU where fastllm runs AVX-512, "fastllm-avx2" runs the same calls on fastllm's AVX2 path: the same-ISA
comparison with MKL, whose code on AMD CPUs is AVX2. FLOPs: GEMM 2 M N K; MLP 4 T d I (gated 6 T d I); forward +
backward 3x that. Saved activation memory (bytes autograd keeps for the backward, beyond the inputs) is printed by
bench_saved_activation_memory.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, devices, dtype_name
from harness import Case, Impl, avx512_cpu, isa

import fastllm
from fastllm.ops import _pack
from fastllm.ops.gemm import act_ref
from fastllm.testing import saved_activation_bytes

CPU_SHAPES = [(2048, 2048, 2048), (512, 3072, 768), (512, 768, 3072)]
GPU_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192)]
CPU_TOKENS = [512, 8, 1]


@contextlib.contextmanager
def empty_weight_cache():
    """Calls inside see an empty packed-weight cache, so they pack their weights (as after an optimizer step); the
    cache the case's other implementations use is set aside and restored (clear_weight_cache() would make them
    repack too)."""
    saved = _pack._cache
    _pack._cache = {}
    try:
        yield
    finally:
        _pack._cache = saved


def _same_isa_peer(impls: dict, device: str, fn, prewarm: list) -> None:
    """Add "fastllm-avx2" (fastllm on its AVX2 path) where fastllm runs AVX-512."""
    if device == "cpu" and avx512_cpu():
        impls["fastllm-avx2"] = Impl(fn, lambda: isa("avx2"))
        prewarm.append("fastllm-avx2")


# ---------------------------------------------------------------------------------------------- linear


def make_linear_case(device, dtype, M, N, K):
    def make_inputs():
        x = torch.randn(M, K, dtype=dtype, device=device)
        w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
        return x, w

    def ours(x, w):
        return fastllm.linear(x, w)

    impls, prewarm = {"fastllm": ours}, ["fastllm"]
    if device == "cpu":
        impls["fastllm-pack"] = Impl(ours, empty_weight_cache)
    _same_isa_peer(impls, device, ours, prewarm)
    impls["eager"] = eager = lambda x, w: F.linear(x, w)  # also the reference, called on float64 copies
    return Case("linear (GEMM)", (M, N, K), dtype, device, make_inputs, impls, eager, flops=2 * M * N * K,
                names=("y",), prewarm=tuple(prewarm))  # fmt: skip


def _linear_params():
    out = []
    for device in devices():
        if device == "cpu":
            out += [(device, dt, *s) for s in CPU_SHAPES for dt in (torch.float32, torch.bfloat16)]
        else:
            out += [(device, torch.bfloat16, *s) for s in GPU_SHAPES]
    return out


def _linear_id(p):
    device, dtype, M, N, K = p
    return f"{device}-{dtype_name(dtype)}-{M}x{N}x{K}"


@pytest.mark.parametrize(
    "p", cases(_linear_params(), _linear_id, lambda p: p[2:] in {(512, 768, 3072), (4096, 4096, 4096)})
)
def bench_linear(benchmark, harness, p):
    harness.run_case(benchmark, make_linear_case(*p))


# ---------------------------------------------------------------------------------------------- MLPs


def eager_ffn(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def eager_gated(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


# optional arguments by keyword: the same call works with the old and the new argument order
def ours_ffn(x, w1, b1, w2, b2):
    return fastllm.fused_ffn(x, w1, w2=w2, b1=b1, b2=b2, activation="gelu")


def ours_gated(x, wg, wu, wd):
    return fastllm.fused_gated_ffn(x, wg, wu, wd, activation="silu")


def _fwd_bwd(fn):
    def run(*args):
        *ins, dy = args
        leaves = [t.detach().requires_grad_(True) for t in ins]
        out = fn(*leaves)
        out.backward(dy)
        return (out.detach(), *[t.grad for t in leaves])

    return run


def make_ffn_case(device, dtype, kind, T, backward, use_compile):
    if kind == "bert":
        d, n_mid = 768, 3072
        shapes = [(T, d), (n_mid, d), (n_mid,), (d, n_mid), (d,)]
        ours, eager, flops = ours_ffn, eager_ffn, 4 * T * d * n_mid
        names = ("y", "dx", "dw1", "db1", "dw2", "db2")
    else:
        d, n_mid = (576, 1536) if device == "cpu" else (4096, 11008)
        shapes = [(T, d), (n_mid, d), (n_mid, d), (d, n_mid)]
        ours, eager, flops = ours_gated, eager_gated, 6 * T * d * n_mid
        names = ("y", "dx", "dw_gate", "dw_up", "dw_down")

    def make_inputs():
        ts = []
        for s in shapes:
            t = torch.randn(s, dtype=dtype, device=device)
            ts.append(t / s[1] ** 0.5 if len(s) == 2 and ts else t)
        if backward:
            ts.append(torch.randn(T, d, dtype=dtype, device=device))
        return tuple(ts)

    reference, prewarm = eager, []
    if backward:
        impls = {"fastllm": Impl(_fwd_bwd(ours), empty_weight_cache)}
        reference, flops = _fwd_bwd(eager), 3 * flops
    else:
        impls, names, prewarm = {"fastllm": ours}, names[:1], ["fastllm"]
        _same_isa_peer(impls, device, ours, prewarm)
    impls["eager"] = _fwd_bwd(eager) if backward else eager
    if use_compile:
        compiled = torch.compile(eager, dynamic=False)
        impls["torch.compile"] = _fwd_bwd(compiled) if backward else compiled
    op = ("ffn gelu" if kind == "bert" else "gated ffn silu") + (" fwd+bwd" if backward else "")
    return Case(op, (T, d, n_mid), dtype, device, make_inputs, impls, reference, flops=flops, names=names,
                prewarm=tuple(prewarm))  # fmt: skip


def _ffn_params():
    out = []
    for device in devices():
        if device == "cpu":
            for kind in ("bert", "gated"):
                for dtype in (torch.float32, torch.bfloat16):
                    out += [(device, dtype, kind, T, False) for T in CPU_TOKENS] + [(device, dtype, kind, 512, True)]
        else:
            for kind in ("bert", "gated"):
                out += [(device, torch.bfloat16, kind, 8192, False), (device, torch.bfloat16, kind, 8192, True)]
    return out


def _ffn_id(p):
    device, dtype, kind, T, backward = p
    return f"{device}-{dtype_name(dtype)}-{kind}-T{T}-{'fwdbwd' if backward else 'fwd'}"


def _ffn_quick(p):
    device, dtype, kind, T, backward = p
    if device != "cpu":
        return kind == "gated" and not backward
    return (kind, dtype, T, backward) in {("gated", torch.float32, 512, True), ("bert", torch.bfloat16, 8, False)}


@pytest.mark.parametrize("p", cases(_ffn_params(), _ffn_id, _ffn_quick))
def bench_ffn(benchmark, harness, use_compile, p):
    backward = p[-1]
    # compiling a backward takes ~30 s on 2 cores: the quick subset has compile rows for forward cases only
    harness.run_case(benchmark, make_ffn_case(*p, use_compile=use_compile and not (backward and harness.quick)))


@pytest.mark.quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def bench_saved_activation_memory(dtype):
    T, d, n_mid = 512, 576, 1536
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    ws = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((n_mid, d), (n_mid, d), (d, n_mid))]
    ours = saved_activation_bytes(ours_gated, x, *ws)
    eager = saved_activation_bytes(eager_gated, x, *ws)
    w1, w2 = torch.randn(3072, 768, dtype=dtype), torch.randn(768, 3072, dtype=dtype)
    xb = torch.randn(512, 768, dtype=dtype, requires_grad=True)
    w1.requires_grad_(True), w2.requires_grad_(True)
    ours_b = saved_activation_bytes(lambda x, a, b: fastllm.fused_ffn(x, a, w2=b, activation="gelu"), xb, w1, w2)
    eager_b = saved_activation_bytes(lambda x, a, b: F.linear(act_ref("gelu", F.linear(x, a)), b), xb, w1, w2)
    mib = 2**20
    print(
        f"\nsaved activations, {dtype}: gated T={T} {d}->{n_mid}: fastllm {ours / mib:.2f} MiB, eager "
        f"{eager / mib:.2f} MiB ({100 * (1 - ours / eager):.0f}% less); BERT ffn T=512: fastllm "
        f"{ours_b / mib:.2f} MiB, eager {eager_b / mib:.2f} MiB ({100 * (1 - ours_b / eager_b):.0f}% less)"
    )
    assert ours <= 0.7 * eager
