"""Ops called from 8 Python threads at once (issue 15, item 3, first half): every result equals the serial one
(torch.equal), nothing deadlocks (each join has a timeout, so a hang fails the test instead of stalling the run),
the packed-weight cache holds up under contention (threads racing to pack one shared weight, and a thread clearing
the cache meanwhile), and a weight updated in place by another thread between calls is seen by the next call (the
cache compares the weight's version counter: fastllm/ops/_pack.py).

The kernels release the GIL, so the 8 threads really overlap in C++: one holds the thread pool, the others run
their tasks on their own threads (kernels/cpp/parallel.h). Results depend only on the shapes and the thread count
asked (torch.get_num_threads(), set in every thread), so every thread must reproduce the serial result bit for
bit. tests/test_threads.py covers two threads over every kernel family and 1 vs 2 pool threads.
"""

import threading
import time

import pytest
import torch

import fastllm
from fastllm.ops import _pack

NTHREADS = 8
JOIN_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _two_threads(need_backend):
    """The C++ backend with 2 threads per call (the shapes below give each call >= 2 threads' work)."""
    need_backend("cpp")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    with fastllm.backend("cpp"):
        yield
    torch.set_num_threads(prev)


def _run_threads(target, n: int = NTHREADS, barriers=()) -> None:
    """target(k) on n threads started together; re-raises the first error of any thread, and fails (never hangs) if
    one does not finish in JOIN_TIMEOUT_S. An error aborts `barriers` (the target's own), so that the other threads
    stop waiting for the failed one."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(k: int) -> None:
        try:
            torch.set_num_threads(2)  # (per thread: a new thread starts at torch's default)
            start.wait(timeout=JOIN_TIMEOUT_S)
            with fastllm.backend("cpp"):  # (the override is per thread: a ContextVar)
                target(k)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            for b in (start, *barriers):
                b.abort()

    threads = [threading.Thread(target=body, args=(k,), daemon=True, name=f"fastllm-{k}") for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0] if errors else None)
    if first is not None:
        raise first
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads {stuck} did not finish in {JOIN_TIMEOUT_S} s (deadlock?)"


def _assert_equal(got, want, what: str) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if not torch.equal(g, w):
            n = int((g != w).sum()) if g.shape == w.shape else -1
            raise AssertionError(f"{what}, output {i}: differs from the serial result ({n} elements)")


def _w8a8(x, w_q, w_scale):
    """The W8A8 linear: x quantized per row, then int8_matmul."""
    a_q, a_scale = fastllm.quantize_int8(x)
    return fastllm.int8_matmul(a_q, w_q, a_scale, w_scale)


def _calls() -> dict:
    """name -> a call of one op family, at shapes where each call gets 2 threads. The GEMMs share their weights
    across threads (one packed-cache entry each, under contention)."""
    g = torch.Generator().manual_seed(3)

    def rn(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(dtype)

    w = torch.nn.Parameter(rn(1000, 256))  # shared by every thread
    wg, wu, wd = rn(700, 256), rn(700, 256), rn(256, 700)
    wq, wsc = fastllm.quantize_int8(rn(515, 256))  # w8a16 (x: K = 256)
    wq8, wsc8 = fastllm.quantize_int8(rn(515, 512))  # int8_matmul (xq: K = 512)
    x, x1, xb = rn(37, 256), rn(1, 256), rn(20, 256, dtype=torch.bfloat16)
    wb = rn(600, 256, dtype=torch.bfloat16)
    q, k, v = rn(2, 4, 129, 64), rn(2, 2, 129, 64), rn(2, 2, 129, 64)
    kc, vc = rn(2, 4, 2048, 64), rn(2, 4, 2048, 64)
    lens = torch.tensor([2048, 1500], dtype=torch.int32)
    qd = rn(2, 8, 1, 64)
    xn, rr, wn, bn = rn(300, 777), rn(300, 777), rn(777), rn(777)
    xq = rn(64, 512)
    wqkv, xs = rn(64 * 6, 256), rn(2, 40, 256)

    def infer(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    return {
        "linear": infer(lambda: fastllm.linear(x, w, activation="gelu")),
        "linear decode": infer(lambda: fastllm.linear(x1, w)),
        "linear bf16": lambda: fastllm.linear(xb, wb, activation="silu"),
        "linear training (op path)": lambda: fastllm.linear(x, w),  # w requires grad: the registered op
        "fused_gated_ffn": lambda: fastllm.fused_gated_ffn(x, wg, wu, wd),
        "w8a16_linear": lambda: fastllm.w8a16_linear(x, wq, wsc),
        "int8_matmul": lambda: _w8a8(xq, wq8, wsc8),
        "flash_attention": lambda: fastllm.flash_attention(q, k, v, causal=True),
        "decode_attention": lambda: fastllm.decode_attention(qd, kc, vc, lens),
        "layer_norm": lambda: fastllm.layer_norm(xn, wn, bn),
        "add_rms_norm": lambda: fastllm.add_rms_norm(xn, rr, wn),
        "qkv_projection": lambda: fastllm.qkv_projection(xs, wqkv, num_heads=4, num_kv_heads=1),
    }


def test_eight_threads_give_the_serial_results():
    """8 threads x 6 rounds over every op family, each thread in its own order (so that different kernels
    overlap): every result equals the serial one. The packed-weight cache starts empty, so the threads race to
    pack the shared weights."""
    calls = _calls()
    names = list(calls)
    expected = {n: calls[n]() for n in names}
    _pack.clear_weight_cache()

    def target(k: int) -> None:
        for rnd in range(6):
            order = names[k % len(names) :] + names[: k % len(names)]
            for n in order if (k + rnd) % 2 == 0 else order[::-1]:
                _assert_equal(calls[n](), expected[n], f"thread {k} round {rnd}: {n}")

    _run_threads(target)


def test_cache_cleared_under_contention():
    """One thread keeps clearing the packed-weight cache while 7 call linear with shared and private weights:
    every call repacks or hits, never reads a half-made or freed entry (results equal the serial ones)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 384, generator=g)
    shared = torch.randn(512, 384, generator=g)
    private = [torch.randn(256, 384, generator=g) for _ in range(NTHREADS)]
    with torch.no_grad():
        want_shared = fastllm.linear(x, shared)
        want_private = [fastllm.linear(x, p) for p in private]
    readers_left = [NTHREADS - 1]
    lock = threading.Lock()
    clears = [0]

    def target(k: int) -> None:
        if k == 0:
            while readers_left[0]:
                _pack.clear_weight_cache()
                clears[0] += 1
            return
        try:
            with torch.no_grad():
                for i in range(60):
                    _assert_equal(fastllm.linear(x, shared), want_shared, f"thread {k} call {i}: shared weight")
                    _assert_equal(fastllm.linear(x, private[k]), want_private[k], f"thread {k} call {i}: own weight")
        finally:
            with lock:
                readers_left[0] -= 1

    _run_threads(target)
    assert clears[0] > 1, "the clearing thread never ran alongside the readers"


@pytest.mark.parametrize("path", ["direct (no_grad)", "op (grad mode)"])
def test_in_place_update_by_another_thread_is_seen(path):
    """A writer thread updates a shared weight in place between rounds (`with torch.no_grad(): w.add_(1)`, as an
    optimizer step does; it bumps w's version counter); after each update all 7 reader threads' next calls give the
    result for the new values: the cache never serves the stale packed copy. Rounds are separated by barriers, so
    no call overlaps a write (a read racing a write is the caller's race, as in torch)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 300, generator=g)
    w0 = torch.randn(400, 300, generator=g)
    wg0, wu0, wd = torch.randn(200, 300, generator=g), torch.randn(200, 300, generator=g), torch.randn(300, 200)
    rounds = 5
    want = []  # the serial results for each version of the weights (the same in-place steps), from fresh tensors
    cw, cg, cu = w0.clone(), wg0.clone(), wu0.clone()
    with torch.no_grad():
        for _ in range(rounds):
            want.append((fastllm.linear(x, cw.clone()), fastllm.fused_gated_ffn(x, cg.clone(), cu.clone(), wd)))
            cw.add_(1), cg.add_(1), cu.sub_(1)
    w = torch.nn.Parameter(w0.clone())
    wg, wu = torch.nn.Parameter(wg0.clone()), torch.nn.Parameter(wu0.clone())
    grad_mode = path.startswith("op")
    barrier = threading.Barrier(NTHREADS)

    def target(k: int) -> None:
        for r in range(rounds):
            if k != 0:
                with torch.set_grad_enabled(grad_mode):
                    for _ in range(3):  # the first call after an update repacks, the next ones hit the cache
                        got = (fastllm.linear(x, w), fastllm.fused_gated_ffn(x, wg, wu, wd))
                        _assert_equal([t.detach() for t in got], want[r], f"thread {k}, after {r} updates")
            barrier.wait(timeout=JOIN_TIMEOUT_S)  # every reader done with round r
            if k == 0:
                with torch.no_grad():
                    w.add_(1)
                    wg.add_(1)
                    wu.sub_(1)
            barrier.wait(timeout=JOIN_TIMEOUT_S)  # the update is done before round r + 1

    _run_threads(target, barriers=(barrier,))
