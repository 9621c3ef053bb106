"""Attention: fastllm.flash_attention / scaled_dot_product_attention / decode_attention against torch's SDPA
("eager": what a model calls today, F.scaled_dot_product_attention, the speedup baseline) and, on CPU, the
explicit math attention (softmax(q k^T * scale) v with the (S, S) scores in memory).

CPU: B=1, H=12, S in {512, 1024, 2048, 4096}, D in {64, 128}, causal and not, fp32 and bf16, forward and
forward+backward; decode: one new token against a full 8192-long cache, Hq=32, Hkv=8, D=128, B in {1, 8}
(GB/s = the cache bytes read, against the copy ceiling), against SDPA with enable_gqa ("eager"), SDPA on k/v
expanded to Hq heads with repeat_interleave ("sdpa-expand", what HF's repeat_kv does) and, for bf16, torch's
fp32 SDPA on upcast inputs ("sdpa-fp32"), each of which torch may run faster than the eager call. GPU: bf16,
16k tokens per batch (B * S = 16384), D in {64, 128} (H = 2048 / D), S from 1k to 16k, TFLOP/s.

FLOPs: forward 4 * B * H * S^2 * D (halved when causal); forward+backward 3.5x that (FlashAttention's
convention: the backward is 2.5 forwards).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, devices, dtype_name
from harness import Case

import fastllm
from fastllm.ops.attention import attention_ref

CPU_SEQS = [512, 1024, 2048, 4096]
HEAD_DIMS = [64, 128]
GPU_SEQS = [1024, 2048, 4096, 8192, 16384]


def math_attention(q, k, v, causal):
    """Eager math attention: the scores materialized (what a from-scratch model writes)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        S = q.shape[-2]
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1).to(q.dtype) @ v


def _fwd_bwd(fn):
    def run(q, k, v, dout):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        return (out.detach(), *[t.grad for t in leaves])

    return run


def make_case(device, dtype, B, H, S, D, causal, backward):
    def make_inputs():
        ins = [torch.randn(B, H, S, D, dtype=dtype, device=device) for _ in range(3)]
        if backward:
            ins.append(torch.randn(B, H, S, D, dtype=dtype, device=device))
        return tuple(ins)

    impls = {
        "fastllm": lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "eager": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    # the math path materializes B*H*S^2 fp32 scores (3 GB at S=4096 on 12 heads): CPU rows up to 2048
    if device == "cpu" and S <= 2048:
        impls["math"] = lambda q, k, v: math_attention(q, k, v, causal)
    reference = impls["eager"]  # called on float64 copies
    if device != "cpu":  # float64 SDPA materializes the scores: use the query-chunked reference on the GPU

        def reference(q, k, v):
            return attention_ref(q, k, v, None, None, causal, True, D**-0.5)[0]

    flops = 4 * B * H * S * S * D // (2 if causal else 1)
    if backward:
        impls = {name: _fwd_bwd(f) for name, f in impls.items()}
        reference = _fwd_bwd(reference)
        flops = int(3.5 * flops)
    op = ("attention causal" if causal else "attention") + (" fwd+bwd" if backward else "")
    names = ("out", "dq", "dk", "dv") if backward else ("out",)
    return Case(op, (B, H, S, D), dtype, device, make_inputs, impls, reference, flops=flops, names=names)


def make_decode_case(device, dtype, B):
    Hq, Hkv, S, D = 32, 8, 8192, 128

    def make_inputs():
        q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
        kc = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
        vc = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
        return q, kc, vc

    lens = {}

    def ours(q, kc, vc):
        if q.device not in lens:
            lens[q.device] = torch.full((B,), S, dtype=torch.int32, device=q.device)
        return fastllm.decode_attention(q, kc, vc, lens[q.device])

    def eager(q, kc, vc):
        return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    def expand(q, kc, vc):  # what HF's repeat_kv does: the kv heads copied out to Hq heads
        g = Hq // Hkv
        return F.scaled_dot_product_attention(q, kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1))

    impls = {"fastllm": ours, "eager": eager, "sdpa-expand": expand}
    if dtype != torch.float32:  # torch's fp32 kernels can beat its 16-bit ones: upcast, attend, cast back
        impls["sdpa-fp32"] = lambda q, kc, vc: eager(q.float(), kc.float(), vc.float()).to(dtype)
    elem = torch.finfo(dtype).bits // 8
    return Case("decode_attention", (B, Hq, Hkv, S, D), dtype, device, make_inputs, impls, eager,
                bytes=2 * B * Hkv * S * D * elem, names=("out",))  # fmt: skip


def _params():
    out = []
    for device in devices():
        if device == "cpu":
            for S in CPU_SEQS:
                for D in HEAD_DIMS:
                    for dtype in (torch.float32, torch.bfloat16):
                        for causal in (False, True):
                            out.append((device, dtype, 1, 12, S, D, causal))
        else:
            for S in GPU_SEQS:
                for D in HEAD_DIMS:
                    for causal in (False, True):
                        out.append((device, torch.bfloat16, 16384 // S, 2048 // D, S, D, causal))
    return [(*p, backward) for backward in (False, True) for p in out]


def _id(p):
    device, dtype, B, H, S, D, causal, backward = p
    return (f"{device}-{dtype_name(dtype)}-B{B}H{H}S{S}D{D}-{'causal' if causal else 'full'}"
            f"-{'fwdbwd' if backward else 'fwd'}")  # fmt: skip


def _quick(p):
    device, dtype, _, _, S, D, causal, backward = p
    if device != "cpu":
        return S == 1024 and D == 128 and causal
    return S == 512 and D == 64 and (dtype, causal, backward) in {(torch.float32, True, False),
                                                                 (torch.bfloat16, False, True)}  # fmt: skip


@pytest.mark.parametrize("p", cases(_params(), _id, _quick))
def bench_attention(benchmark, harness, p):
    harness.run_case(benchmark, make_case(*p))


def _decode_id(p):
    device, dtype, B = p
    return f"{device}-{dtype_name(dtype)}-B{B}"


_DECODE = [(device, dtype, B) for device in devices() for dtype in (torch.float32, torch.bfloat16) for B in (1, 8)]


@pytest.mark.parametrize("p", cases(_DECODE, _decode_id, lambda p: p[1] == torch.bfloat16 and p[2] == 1))
def bench_decode_attention(benchmark, harness, p):
    harness.run_case(benchmark, make_decode_case(*p))
