"""Sizes at the limits each path claims (issue 15): a norm and a linear over more than 2^31 elements (64-bit
indexing: a 32-bit index would wrap and write the last rows over the first ones, or crash), the int32 limit of
the int8 GEMM's exact accumulation, the largest head dim of the attention kernels, and a long decode cache.

The two > 2^31 cases need ~9 GiB of free memory (bf16 keeps them there); where a machine has less they skip with
that reason. Correctness is checked on the rows past the 2^31st element and on the first rows, against float64."""

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.testing import assert_equivalent

GIB = 1 << 30


def _need_memory(gib: float):
    if fastllm._ext.C is None:  # (the reference path is torch's own ops: the indexing under test is the kernels')
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS}): the > 2^31 cases test its 64-bit indexing")
    psutil = pytest.importorskip("psutil", reason="psutil is not installed (the test extra installs it)")
    free = psutil.virtual_memory().available / GIB
    if free < gib:
        pytest.skip(f"needs {gib:.0f} GiB of free memory, {free:.1f} GiB available")


def _backend_of(fn):
    with fastllm.explain() as log:
        out = fn()
    return out, [d.backend for d in log]


def test_layer_norm_over_2_31_elements():
    _need_memory(10)
    n = 1024
    rows = (1 << 31) // n + 3  # 2^31 + 3 n elements: the last 3 rows lie past int32's range
    g = torch.Generator().manual_seed(0)
    head = torch.randn(4, n, generator=g).to(torch.bfloat16)
    tail = torch.randn(3, n, generator=g).to(torch.bfloat16)
    x = torch.empty(rows, n, dtype=torch.bfloat16)
    x[:-3] = head[0]  # every other row the same (cheap to fill)
    x[:4] = head
    x[-3:] = tail
    w, b = torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        out, used = _backend_of(lambda: fastllm.layer_norm(x, w, b))
    assert out.shape == x.shape and x.numel() > 2**31
    for name, rows_in, rows_out in (("first rows", head, out[:4]), ("rows past 2^31", tail, out[-3:])):
        ref = F.layer_norm(rows_in.double(), (n,), w.double(), b.double())
        eager = F.layer_norm(rows_in, (n,), w, b)
        assert_equivalent(rows_out, eager, ref, f"layer_norm {name} ({used})")


def test_linear_over_2_31_elements():
    _need_memory(6)
    K, N = 16, 256
    M = (1 << 31) // N + 7  # output 2^31 + 7 N elements
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / 4).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        out, used = _backend_of(lambda: fastllm.linear(x, w, b))
    assert out.shape == (M, N) and out.numel() > 2**31
    for name, sl in (("first rows", slice(0, 5)), ("rows past 2^31", slice(M - 7, M))):
        xs = x[sl]
        ref = F.linear(xs.double(), w.double(), b.double())
        assert_equivalent(out[sl], F.linear(xs, w, b), ref, f"linear {name} ({used})")


@pytest.mark.parametrize("K", [131071, 131072])
def test_int8_matmul_int32_accumulation_limit(K):
    """|a b| <= 2^14 per product: K = 131071 worst-case products sum to 2^31 - 2^14 (int32: the kernel, exact);
    K = 131072 could reach 2^31 (it would wrap): the exact reference runs, and explain says so."""
    a = torch.full((2, K), -128, dtype=torch.int8)
    b = torch.full((3, K), -128, dtype=torch.int8)
    a_s, b_s = torch.ones(2), torch.ones(3)
    with torch.inference_mode():
        out, used = _backend_of(lambda: fastllm.int8_matmul(a, b, a_s, b_s))
    assert torch.equal(out, torch.full((2, 3), float(K * 16384)))  # exact in fp32 (a multiple of 2^14 below 2^32)
    if fastllm._ext.C is not None:
        assert used == (["cpp"] if K < 131072 else ["reference"]), used


@pytest.mark.parametrize("D", [256, 257])
def test_attention_largest_head_dim(D):
    """256 is the kernels' largest head dim (MAX_KERNEL_HEAD_DIM); 257 runs the reference (explain says so)."""
    from fastllm.ops.attention import MAX_KERNEL_HEAD_DIM

    assert MAX_KERNEL_HEAD_DIM == 256
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, s, D, generator=g) for s in (5, 9, 9))
    with torch.inference_mode():
        out, used = _backend_of(lambda: fastllm.flash_attention(q, k, v, causal=True))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=False,
                                             attn_mask=torch.ones(5, 9, dtype=torch.bool).tril(4))  # fmt: skip
        eager = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 9, dtype=torch.bool).tril(4))
    assert_equivalent(out, eager, ref, f"head_dim {D} ({used})")
    if fastllm._ext.C is not None:
        assert used == (["cpp"] if D <= 256 else ["reference"]), used


def test_decode_attention_long_cache():
    """One new token against a 2^20 + 3 long cache (bf16), ragged lengths; split over the keys."""
    S = (1 << 20) + 3
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 64, generator=g).to(torch.bfloat16)
    kc = torch.randn(2, 2, S, 64, generator=g).to(torch.bfloat16)
    vc = torch.randn(2, 2, S, 64, generator=g).to(torch.bfloat16)
    lens = torch.tensor([S, S - 1000], dtype=torch.int32)
    with torch.inference_mode():
        out = fastllm.decode_attention(q, kc, vc, lens)
    for bi in range(2):
        n = int(lens[bi])
        qb, kb, vb = q[bi : bi + 1], kc[bi : bi + 1, :, :n], vc[bi : bi + 1, :, :n]
        ref = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double(), enable_gqa=True)
        eager = F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)
        assert_equivalent(out[bi : bi + 1], eager, ref, f"decode sequence {bi} of {n} keys")
