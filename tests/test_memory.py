"""Memory (issue 15, item 6): resident memory stays steady over 10,000 calls of each op at small shapes, and a
packed-weight cache entry is freed when its weight is (a weak reference on the weight: fastllm/ops/_pack.py).

RSS is read from /proc/self/statm (Linux) after a gc.collect(), and beside it the bytes malloc has handed out
(glibc's mallinfo2), which sees a leak that reuses memory freed earlier and still resident. Each op runs 5,000 calls of warm-up (allocator
arenas, the packed-weight cache, autograd's first-use structures), then 5,000 more; growth over those last 5,000
must stay under LEAK_SLACK (2 MiB: a leak of ~420 bytes or more per call fails, while glibc's arena noise does not;
test_leak_is_measured shows that a 1 KiB-per-call leak is caught). The three training steps (forward + backward,
~1 ms each through autograd on the development machine) run 2,000 + 3,000 calls, to keep the module under a minute
(it takes ~45 s with 10,000 of them too: FASTLLM_LONG=1 runs them, and 10x the calls of every op, 50,000 + 50,000,
for a slower leak).
"""

import ctypes
import gc
import os
import sys
import weakref

import pytest
import torch

import fastllm
from fastllm.ops import _pack
from fastllm.ops.rope import rope_tables

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc/self/statm (Linux)")

LONG = os.environ.get("FASTLLM_LONG") == "1"
WARMUP = CALLS = 50_000 if LONG else 5_000
TRAIN_WARMUP, TRAIN_CALLS = (WARMUP, CALLS) if LONG else (2_000, 3_000)  # forward + backward steps
LEAK_SLACK = 2 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    """Resident bytes of this process, after collecting garbage (a cycle the GC frees is not a leak)."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (AttributeError, OSError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (every arena, mmapped chunks included; 0 without glibc's
    mallinfo2). RSS alone misses a leak that fits in memory freed earlier and still resident (a whole test run
    leaves plenty: found when the control below passed alone and failed in the full suite)."""
    if _MALLINFO2 is None:
        return 0
    gc.collect()
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


def _growth(call, warmup: int = WARMUP, calls: int = CALLS) -> int:
    """max(RSS growth, heap-in-use growth) over `calls` calls after `warmup`."""
    for _ in range(warmup):
        call()
    before, heap_before = rss(), heap_in_use()
    for _ in range(calls):
        call()
    return max(rss() - before, heap_in_use() - heap_before)


def _w8a8(x, w_q, w_scale):
    """The W8A8 linear: x quantized per row, then int8_matmul."""
    a_q, a_scale = fastllm.quantize_int8(x)
    return fastllm.int8_matmul(a_q, w_q, a_scale, w_scale)


def _ops() -> dict:
    g = torch.Generator().manual_seed(6)

    def rn(*s, grad=False):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    x, r, w, b = rn(4, 64), rn(4, 64), rn(64), rn(64)
    lw, lb = rn(96, 64), rn(96)
    w1, w2, wg, wu, wd = rn(128, 64), rn(64, 128), rn(128, 64), rn(128, 64), rn(64, 128)
    q, k, v = rn(1, 4, 8, 32), rn(1, 2, 8, 32), rn(1, 2, 8, 32)
    kc, vc, lens = rn(2, 2, 64, 32), rn(2, 2, 64, 32), torch.tensor([64, 17], dtype=torch.int32)
    qd = rn(2, 4, 1, 32)
    wq, wsc = fastllm.quantize_int8(lw)
    wqkv, xs = rn(32 * 6, 64), rn(1, 3, 64)
    cos, sin = rope_tables(16, 32)
    pos = torch.arange(8)[None]
    xg, lwg, lbg = rn(4, 64, grad=True), rn(96, 64, grad=True), rn(96, grad=True)
    qg, kg, vg = rn(1, 4, 8, 32, grad=True), rn(1, 2, 8, 32, grad=True), rn(1, 2, 8, 32, grad=True)

    def train_linear():
        fastllm.linear(xg, lwg, lbg, activation="gelu").sum().backward()

    def train_attention():
        fastllm.flash_attention(qg, kg, vg, causal=True).sum().backward()

    def train_norm():
        fastllm.add_layer_norm(xg, r, w, b)[0].sum().backward()

    return {
        "layer_norm": lambda: fastllm.layer_norm(x, w, b),
        "rms_norm": lambda: fastllm.rms_norm(x, w),
        "add_layer_norm": lambda: fastllm.add_layer_norm(x, r, w, b),
        "add_rms_norm": lambda: fastllm.add_rms_norm(x, r, w),
        "linear": lambda: fastllm.linear(x, lw, lb),
        "linear gelu residual": lambda: fastllm.linear(x, lw, lb, activation="gelu", residual=torch.zeros(4, 96)),
        "fused_ffn": lambda: fastllm.fused_ffn(x, w1, w2),
        "fused_gated_ffn": lambda: fastllm.fused_gated_ffn(x, wg, wu, wd),
        "flash_attention": lambda: fastllm.flash_attention(q, k, v, causal=True),
        "scaled_dot_product_attention": lambda: fastllm.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "decode_attention": lambda: fastllm.decode_attention(qd, kc, vc, lens),
        "quantize_int8": lambda: fastllm.quantize_int8(x),
        "int8_matmul": lambda: _w8a8(x, wq, wsc),
        "w8a16_linear": lambda: fastllm.w8a16_linear(x, wq, wsc),
        "qkv_projection": lambda: fastllm.qkv_projection(xs, wqkv, num_heads=4, num_kv_heads=1),
        "rotary_embedding": lambda: fastllm.rotary_embedding(q, k, cos, sin, pos),
        "linear fwd+bwd": train_linear,
        "flash_attention fwd+bwd": train_attention,
        "add_layer_norm fwd+bwd": train_norm,
    }


@pytest.fixture
def one_thread():
    """torch.set_num_threads(1) for the test: the shapes are small (fastllm's kernels run them on the calling thread
    anyway), and torch's own ops (the reference path) then skip OpenMP, whose barrier makes a loop of tiny ops
    10-100x slower when the other cores are busy."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("op", list(_ops()))
def test_rss_steady(op, one_thread):
    call = _ops()[op]
    warmup, calls = (TRAIN_WARMUP, TRAIN_CALLS) if op.endswith("fwd+bwd") else (WARMUP, CALLS)
    grew = _growth(call, warmup, calls)
    assert grew < LEAK_SLACK, f"{op}: RSS grew {grew / 2**20:.2f} MiB over {calls} calls (after {warmup} warm-up)"


def test_leak_is_measured():
    """The instrument: a call that keeps 1 KiB alive each time (a leak just above the slack's resolution) fails the
    bound that the ops pass."""
    kept = []
    grew = _growth(lambda: kept.append(torch.empty(256)), warmup=1000, calls=CALLS)
    assert grew >= LEAK_SLACK, f"a 1 KiB-per-call leak showed only {grew / 2**20:.2f} MiB of growth"


def _entries() -> int:
    return len(_pack._cache)


@pytest.mark.parametrize("kind", ["linear", "fused_gated_ffn", "w8a16_linear", "int8_matmul"])
def test_cache_entry_freed_with_its_weight(need_backend, kind):
    """The packed copy lives exactly as long as its weight: while the weight lives the entry is reused, and once the
    weight is dropped (the user's last reference) the entry and its buffer are gone (weak references)."""
    need_backend("cpp")
    x = torch.randn(3, 256)
    ws = {"linear": [torch.randn(300, 256)], "fused_gated_ffn": [torch.randn(300, 256), torch.randn(300, 256)],
          "w8a16_linear": [fastllm.quantize_int8(torch.randn(300, 256))[0]],
          "int8_matmul": [fastllm.quantize_int8(torch.randn(300, 256))[0]]}[kind]  # fmt: skip
    wd, scale = torch.randn(256, 300), torch.rand(300) + 0.5

    def call():
        with torch.no_grad(), fastllm.backend("cpp"):
            if kind == "linear":
                return fastllm.linear(x, ws[0])
            if kind == "fused_gated_ffn":
                return fastllm.fused_gated_ffn(x, ws[0], ws[1], wd)
            if kind == "w8a16_linear":
                return fastllm.w8a16_linear(x, ws[0], scale)
            return _w8a8(x, ws[0], scale)

    before = set(map(id, _pack._cache.values()))
    call()
    new = [p for p in _pack._cache.values() if id(p) not in before and any(r() is ws[0] for r in p.refs)]
    assert len(new) == 1, f"{kind}: expected one new cache entry for the weight, found {len(new)}"
    entry, buf = weakref.ref(new[0]), weakref.ref(new[0].buf)
    del new
    call()
    assert any(p is entry() for p in _pack._cache.values()), f"{kind}: the entry was not reused"
    n = _entries()
    ws.clear()  # the weights' last references (wd, fused_gated_ffn's down projection, has an entry of its own)
    gc.collect()
    assert entry() is None and buf() is None, f"{kind}: the packed copy outlived its weight"
    assert _entries() == n - 1, f"{kind}: cache entries {n} -> {_entries()}"


def test_cache_rss_back_after_weights_die(need_backend):
    """40 weights of 2 MiB, each used once then dropped: RSS does not keep their packed copies (a leak would grow
    it by 2 MiB per weight; the bound allows 4 copies of allocator slack)."""
    need_backend("cpp")
    x = torch.randn(2, 1024)

    def one():
        w = torch.randn(512, 1024)
        with torch.no_grad(), fastllm.backend("cpp"):
            fastllm.linear(x, w)

    n0 = _entries()
    for _ in range(5):
        one()
    before = rss()
    for _ in range(40):
        one()
    grew = rss() - before
    assert _entries() == n0, f"cache entries {n0} -> {_entries()}"
    assert grew < 8 << 20, f"RSS grew {grew / 2**20:.1f} MiB over 40 dropped 2 MiB weights"
