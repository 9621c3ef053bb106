"""Transformer MLPs: fastllm.fused_ffn / fused_gated_ffn against eager PyTorch (F.linear -> activation ->
F.linear, what a model runs today) and, where it runs, torch.compile of the same eager code.

CPU: BERT-base MLP (768 -> 3072 -> 768, gelu, biases) and a SmolLM-size SwiGLU MLP (576 -> 1536 -> 576, silu,
no biases) at T = 512 tokens (prefill) and T in {1, 8} (decode); fp32 and bf16; forward, and forward+backward
(T = 512) with gradients for x and every weight. The forward rows use the cached packed weights (inference);
the forward+backward rows clear the cache every step, as an optimizer step would (every training step repacks).
GPU: bf16, T = 8192 tokens, the same shapes scaled to Llama-7B size (4096 -> 11008 gated).

Saved activation memory (bytes autograd keeps for the backward, beyond the inputs) is printed by
bench_saved_activation_memory and written into the results note.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import devices
from harness import Case

import fastllm
from fastllm.ops.ffn import act_ref
from fastllm.testing import saved_activation_bytes

CPU_TOKENS = [512, 8, 1]


def eager_ffn(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def eager_gated(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def ours_ffn(x, w1, b1, w2, b2):
    return fastllm.fused_ffn(x, w1, b1, w2, b2, activation="gelu")


def ours_gated(x, wg, wu, wd):
    return fastllm.fused_gated_ffn(x, wg, wu, wd, activation="silu")


def _fwd_bwd(fn, clear_cache):
    def run(*args):
        if clear_cache:
            fastllm.clear_weight_cache()
        *ins, dy = args
        leaves = [t.detach().requires_grad_(True) for t in ins]
        out = fn(*leaves)
        out.backward(dy)
        return (out.detach(), *[t.grad for t in leaves])

    return run


def make_case(device, dtype, kind, T, backward, compile_ok):
    if kind == "bert":
        d, n_mid = 768, 3072
        shapes = [(T, d), (n_mid, d), (n_mid,), (d, n_mid), (d,)]
        ours, eager, flops = ours_ffn, eager_ffn, 4 * T * d * n_mid
    else:
        d, n_mid = (576, 1536) if device == "cpu" else (4096, 11008)
        shapes = [(T, d), (n_mid, d), (n_mid, d), (d, n_mid)]
        ours, eager, flops = ours_gated, eager_gated, 6 * T * d * n_mid

    def make_inputs():
        ts = []
        for s in shapes:
            t = torch.randn(s, dtype=dtype, device=device)
            ts.append(t / s[1] ** 0.5 if len(s) == 2 and ts else t)
        if backward:
            ts.append(torch.randn(T, d, dtype=dtype, device=device))
        return tuple(ts)

    impls = {"fastllm": ours, "eager": eager}
    if compile_ok:
        impls["compile"] = torch.compile(eager, dynamic=False)
    reference = eager
    if backward:
        impls = {name: _fwd_bwd(f, name == "fastllm") for name, f in impls.items()}
        reference = _fwd_bwd(eager, False)
        flops *= 3
    op = ("ffn gelu" if kind == "bert" else "gated ffn silu") + (" fwd+bwd" if backward else "")
    return Case(op, (T, d, n_mid), dtype, device, make_inputs, impls, reference, flops=flops)


def _params():
    out = []
    for device in devices():
        if device == "cpu":
            for kind in ("bert", "gated"):
                for dtype in (torch.float32, torch.bfloat16):
                    for T in CPU_TOKENS:
                        out.append((device, dtype, kind, T, False))
                    out.append((device, dtype, kind, 512, True))
        else:
            for kind in ("bert", "gated"):
                out += [(device, torch.bfloat16, kind, 8192, False), (device, torch.bfloat16, kind, 8192, True)]
    return out


def _id(p):
    device, dtype, kind, T, backward = p
    return f"{device}-{str(dtype).replace('torch.', '')}-{kind}-T{T}-{'fwdbwd' if backward else 'fwd'}"


_cases: dict = {}


def _case(p, use_compile):
    key = (p, use_compile)
    if key not in _cases:
        _cases.clear()
        _cases[key] = make_case(*p, compile_ok=use_compile)
    return _cases[key]


@pytest.mark.parametrize("impl", ["fastllm", "eager", "compile"])
@pytest.mark.parametrize("p", _params(), ids=_id)
def bench_ffn(benchmark, harness, use_compile, p, impl):
    case = _case(p, use_compile)
    if impl not in case.impls:
        pytest.skip(f"no {impl} row for this case")
    if impl == "fastllm" and not p[-1]:
        for slot in case.inputs():  # pack every rotation slot's weights once, outside the timed rounds
            case.impls[impl](*slot)
    harness.run(benchmark, case, impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def bench_saved_activation_memory(dtype):
    T, d, n_mid = 512, 576, 1536
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    ws = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((n_mid, d), (n_mid, d), (d, n_mid))]
    ours = saved_activation_bytes(ours_gated, x, *ws)
    eager = saved_activation_bytes(eager_gated, x, *ws)
    w1, w2 = torch.randn(3072, 768, dtype=dtype), torch.randn(768, 3072, dtype=dtype)
    xb = torch.randn(512, 768, dtype=dtype, requires_grad=True)
    w1.requires_grad_(True), w2.requires_grad_(True)
    ours_b = saved_activation_bytes(lambda x, a, b: fastllm.fused_ffn(x, a, None, b, None), xb, w1, w2)
    eager_b = saved_activation_bytes(lambda x, a, b: F.linear(act_ref("gelu", F.linear(x, a)), b), xb, w1, w2)
    mib = 2**20
    print(
        f"\nsaved activations, {dtype}: gated T={T} {d}->{n_mid}: fastllm {ours / mib:.2f} MiB, eager "
        f"{eager / mib:.2f} MiB ({100 * (1 - ours / eager):.0f}% less); BERT ffn T=512: fastllm "
        f"{ours_b / mib:.2f} MiB, eager {eager_b / mib:.2f} MiB ({100 * (1 - ours_b / eager_b):.0f}% less)"
    )
    assert ours <= 0.7 * eager
