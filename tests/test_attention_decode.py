"""fastllm.decode_attention: a few new tokens against a KV cache with ragged lengths, against torch's SDPA per
sequence (float64 = reference, input dtype = eager) on the C++ backend (both ISA paths, split-K over long caches)
and the reference; garbage and NaN past the lengths are never read; no backward (the refusal is tested)."""

import pytest
import torch
from attention_common import check_equivalent, decode_torch

import fastllm
from fastllm.testing import assert_equivalent


def check_decode(B, Hq, Hkv, Sn, S_max, D, lens, dtype, backend, scale=None, expect=None):
    q = torch.randn(B, Hq, Sn, D, dtype=dtype)
    k_cache = torch.randn(B, Hkv, S_max, D, dtype=dtype)
    v_cache = torch.randn(B, Hkv, S_max, D, dtype=dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    for b in range(B):  # garbage (finite, large) past each sequence's length
        k_cache[b, :, int(lens[b]) :] = 1e3
        v_cache[b, :, int(lens[b]) :] = -1e3
    with fastllm.backend(backend), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k_cache, v_cache, lens, scale=scale)
    eager = decode_torch(q, k_cache, v_cache, lens, scale)
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens, scale)
    what = f"decode {backend} {dtype} B{B} Hq{Hq} Hkv{Hkv} Sn{Sn} S_max{S_max} D{D} lens={lens.tolist()}"
    assert out.dtype == dtype
    check_equivalent(out, eager, ref, what)
    assert (out[lens == 0] == 0).all(), f"{what}: an empty cache must give zeros"
    assert {d.backend for d in log} == {expect or backend}, [str(d) for d in log]


DECODE_CASES = [
    # (B, Hq, Hkv, Sn, S_max, D, lens)
    (3, 32, 8, 1, 77, 32, [0, 77, 40]),  # ragged incl. empty and full
    (3, 32, 8, 4, 130, 64, [130, 4, 57]),
    (3, 8, 8, 16, 200, 16, [16, 200, 0]),
    (1, 32, 8, 1, 3000, 64, [3000]),  # long cache, one sequence: split-K
    (1, 32, 8, 4, 3000, 32, [2777]),
    (1, 8, 1, 16, 3000, 128, [3000]),  # MQA
    (4, 4, 2, 1, 1, 8, [1, 0, 1, 1]),
]


def _decode_id(c):
    B, Hq, Hkv, Sn, S_max, D, _lens = c
    return f"B{B}-H{Hq}/{Hkv}-Sn{Sn}-S{S_max}-D{D}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode(need_backend, dtype, case):
    check_decode(*case, dtype, need_backend("cpp"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_isa_paths(cpu_isa, dtype):
    check_decode(3, 32, 8, 4, 300, 64, [0, 300, 123], dtype, "cpp")
    check_decode(1, 8, 2, 1, 2000, 40, [1999], dtype, "cpp")


def test_decode_reference_backend_and_scale():
    check_decode(3, 8, 2, 4, 60, 32, [60, 0, 17], torch.float32, "reference")
    check_decode(2, 8, 2, 16, 60, 32, [60, 33], torch.float64, "reference", scale=0.2)
    check_decode(2, 4, 4, 1, 50, 64, [50, 20], torch.float32, "reference", scale=0.5)


def test_decode_cpp_scale_and_float64(need_backend):
    check_decode(2, 4, 4, 1, 50, 64, [50, 20], torch.float32, need_backend("cpp"), scale=0.5)
    check_decode(2, 8, 2, 16, 60, 32, [60, 33], torch.float64, "cpp", scale=0.2, expect="reference")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_decode_shorter_than_new_tokens_is_refused(need_backend, backend):
    """0 < len < Sn: the Sn new tokens cannot be the last ones of a sequence of len tokens; a ValueError naming
    cache_seqlens on every backend (before issue 15: zero rows for the first Sn - len tokens, silently). len = 0
    still returns zeros (test_decode's cases)."""
    need_backend(backend)
    q, kc, vc = torch.randn(2, 4, 8, 32), torch.randn(2, 2, 20, 32), torch.randn(2, 2, 20, 32)
    lens = torch.tensor([3, 20], dtype=torch.int32)
    with fastllm.backend(backend), pytest.raises(ValueError, match=r"cache_seqlens must count the 8 new tokens.*\[3\]"):
        fastllm.decode_attention(q, kc, vc, lens)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_decode_ignores_nan_past_cache_length(need_backend, backend):
    """A cache allocated with torch.empty may hold NaN past each sequence's length: it must not be read."""
    need_backend(backend)
    q = torch.randn(2, 8, 2, 32)
    k_cache, v_cache = torch.randn(2, 2, 50, 32), torch.randn(2, 2, 50, 32)
    lens = torch.tensor([20, 50], dtype=torch.int32)
    k_cache[0, :, 20:] = float("nan")
    v_cache[0, :, 20:] = float("nan")
    with fastllm.backend(backend), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k_cache, v_cache, lens)
    assert [d.backend for d in log] == [backend], [str(d) for d in log]
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens)
    assert not torch.isnan(out).any(), f"{backend}: NaN from the cache past cache_seqlens leaked into the output"
    assert_equivalent(out, decode_torch(q, k_cache, v_cache, lens), ref, f"decode nan tail {backend}")


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_kv_len_backward_is_refused(need_backend, backend):
    """attention_fwd with kv_len (decode_attention) is inference-only: asking for its gradients raises this error
    on every backend (the refusal is the op's backward, before any kernel), never returns wrong ones."""
    need_backend(backend)
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, requires_grad=True)
    lens = torch.tensor([4], dtype=torch.int32)
    with fastllm.backend(backend), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k, v, lens)
        with pytest.raises(RuntimeError, match=r"decode_attention \(kv_len\) has no backward; it is an inference op"):
            torch.autograd.grad(out.sum(), (q, k, v))
    assert [(d.op, d.backend) for d in log] == [("attention_fwd", backend)], [str(d) for d in log]


def test_noncontiguous_decode_cache(need_backend):
    """A cache stored (B, S_max, H, D) and viewed as (B, H, S_max, D)."""
    need_backend("cpp")
    q = torch.randn(2, 1, 8, 32).transpose(1, 2)
    k_cache = torch.randn(2, 100, 2, 32).transpose(1, 2)
    v_cache = torch.randn(2, 100, 2, 32).transpose(1, 2)
    lens = torch.tensor([100, 61], dtype=torch.int32)
    with fastllm.backend("cpp"), fastllm.explain() as log:
        out = fastllm.decode_attention(q, k_cache, v_cache, lens)
    assert [d.backend for d in log] == ["cpp"], [str(d) for d in log]
    eager = decode_torch(q, k_cache, v_cache, lens)
    ref = decode_torch(q.double(), k_cache.double(), v_cache.double(), lens)
    assert_equivalent(out, eager, ref, "noncontiguous decode")
