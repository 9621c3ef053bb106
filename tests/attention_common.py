"""Shared by the attention tests (test_attention*.py): the torch oracle (what a user writes with torch's own SDPA),
input makers, and the check of fastllm.flash_attention against it (float64 = reference, input dtype = eager)."""

import torch
import torch.nn.functional as F

import fastllm
from fastllm.testing import assert_equivalent

NEG_INF = float("-inf")

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


def check_attention(B, Hq, Hkv, Sq, Sk, D, dtype, backend, causal=False, mask_kind=None, expect=None, scale=None):
    """flash_attention on `backend` (forward and gradients) against torch's SDPA: float64 = reference, the input
    dtype = eager; the dispatch must be `expect` (default: backend itself)."""
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
