"""The C++ kernels' thread pool (kernels/cpp/parallel.h) seen through the kernels: results do not depend on the
thread count (1 vs 2) in each kernel family, two Python threads calling kernels at once neither deadlock nor
change a result, and a call in a forked child works (the child builds its own pool)."""

import os
import sys
import threading
import time
import warnings

import pytest
import torch

import fastllm

# Shapes are large enough for _ext.num_threads to give each call 2 threads (work >= 2 * GRAIN), odd where the
# kernels tile.


@pytest.fixture
def threads():
    """set(n): torch.set_num_threads(n) for the test (the C++ kernels take their thread count from it)."""
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


def _run(fn, nt: int, set_threads) -> list[torch.Tensor]:
    set_threads(nt)
    with fastllm.backend("cpp"):
        return [t.detach().clone() for t in fn()]


def _assert_identical(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} outputs vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape and x.dtype == y.dtype, (
            f"{what}, output {i}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        )
        if not torch.equal(x, y):
            bad = (x != y).nonzero()
            raise AssertionError(f"{what}, output {i}: {len(bad)} elements differ, first at {tuple(bad[0].tolist())}")


def _grads(y: torch.Tensor, inputs) -> list[torch.Tensor]:
    return [y, *torch.autograd.grad((y.float() * y.float()).sum(), inputs)]


def _gemm_cases():
    def linear_bwd():
        x, w, b = (torch.randn(s, requires_grad=True) for s in ((37, 129), (1000, 129), (1000,)))
        res = torch.randn(37, 1000)
        return lambda: _grads(fastllm.linear(x, w, b, activation="gelu", residual=res), (x, w, b))

    def linear_decode():
        x, w = torch.randn(1, 1024), torch.randn(1000, 1024)
        return lambda: [fastllm.linear(x, w)]

    def linear_bf16():
        x, w = torch.randn(200, 257, dtype=torch.bfloat16), torch.randn(515, 257, dtype=torch.bfloat16)
        return lambda: [fastllm.linear(x, w, activation="silu")]

    def gated_ffn():
        x, wg, wu, wd = torch.randn(7, 512), torch.randn(1000, 512), torch.randn(1000, 512), torch.randn(512, 1000)
        return lambda: [fastllm.fused_gated_ffn(x, wg, wu, wd)]

    def ffn_bwd():
        x, w1, w2 = (torch.randn(s, requires_grad=True) for s in ((64, 300), (777, 300), (300, 777)))
        return lambda: _grads(fastllm.fused_ffn(x, w1, w2, activation="gelu_tanh"), (x, w1, w2))

    def int8_matmul():
        aq, asc = fastllm.quantize_int8(torch.randn(37, 1000))
        bq, bsc = fastllm.quantize_int8(torch.randn(515, 1000))
        bias = torch.randn(515)
        return lambda: [fastllm.int8_matmul(aq, bq, asc, bsc, bias=bias)]

    def w8a16():
        wq, wsc = fastllm.quantize_int8(torch.randn(1000, 1024))
        x1, x37 = torch.randn(1, 1024), torch.randn(37, 1024)
        return lambda: [fastllm.w8a16_linear(x1, wq, wsc), fastllm.w8a16_linear(x37, wq, wsc)]

    return {f.__name__: f for f in (linear_bwd, linear_decode, linear_bf16, gated_ffn, ffn_bwd, int8_matmul, w8a16)}


def _quant():
    x32, x16 = torch.randn(300, 1000), torch.randn(301, 999, dtype=torch.bfloat16)
    return lambda: [*fastllm.quantize_int8(x32), *fastllm.quantize_int8(x16)]


def _norm_fwd():
    x, r, w, b = torch.randn(1000, 777), torch.randn(1000, 777), torch.randn(777), torch.randn(777)
    xb, rb, wb = (torch.randn(s, dtype=torch.bfloat16) for s in ((513, 1024), (513, 1024), (1024,)))
    return lambda: [fastllm.layer_norm(x, w, b), *fastllm.add_layer_norm(x, r, w, b), *fastllm.add_rms_norm(xb, rb, wb)]


def _norm_bwd():
    # dx (and the residual's gradient) only: dw and db are sums of per-range partials over nt row ranges, whose
    # rounding depends on nt (layer_norm.h; as with OpenMP before)
    x, r, w, b = (torch.randn(s, requires_grad=True) for s in ((1000, 777), (1000, 777), (777,), (777,)))

    def run():
        y, h = fastllm.add_layer_norm(x, r, w, b)
        return torch.autograd.grad((y * y).sum() + h.sum(), (x, r))

    return run


def _attention():
    q, k, v = torch.randn(2, 4, 129, 64), torch.randn(2, 2, 129, 64), torch.randn(2, 2, 129, 64)
    for t in (q, k, v):
        t.requires_grad_(True)
    return lambda: _grads(fastllm.flash_attention(q, k, v, causal=True), (q, k, v))


def _decode():
    # 8 (b, kv head) groups: no key split at 1 or 2 threads (a split, and so its rounding, follows the thread count)
    q, kc, vc = torch.randn(2, 8, 1, 64), torch.randn(2, 4, 4096, 64), torch.randn(2, 4, 4096, 64)
    lens = torch.tensor([4096, 3001], dtype=torch.int32)
    return lambda: [fastllm.decode_attention(q, kc, vc, lens)]


@pytest.mark.parametrize("case", list(_gemm_cases()))
def test_gemm_same_at_1_and_2_threads(case, gemm_isa, need_backend, threads):
    need_backend("cpp")
    fn = _gemm_cases()[case]()
    _assert_identical(_run(fn, 1, threads), _run(fn, 2, threads), f"{case} ({gemm_isa})")


@pytest.mark.parametrize("family", ["quantize_int8", "norm_fwd", "norm_bwd", "attention", "decode_attention"])
def test_kernels_same_at_1_and_2_threads(family, cpu_isa, need_backend, threads):
    need_backend("cpp")
    make = {"quantize_int8": _quant, "norm_fwd": _norm_fwd, "norm_bwd": _norm_bwd, "attention": _attention,
            "decode_attention": _decode}[family]  # fmt: skip
    fn = make()
    _assert_identical(_run(fn, 1, threads), _run(fn, 2, threads), f"{family} ({cpu_isa})")


def _split_decode():
    # one (b, kv head) group against many keys: split over the keys and merged (a second parallel loop)
    q, kc, vc = torch.randn(1, 4, 1, 64), torch.randn(1, 1, 20000, 64), torch.randn(1, 1, 20000, 64)
    lens = torch.tensor([19999], dtype=torch.int32)
    return lambda: [fastllm.decode_attention(q, kc, vc, lens)]


def test_two_python_threads_at_once(need_backend, threads):
    """Two Python threads (the GIL released in the kernels) call kernels of every family at once: while one runs
    on the pool the other runs its tasks on its own thread. No deadlock, and every result equals the same call
    made alone (at the same thread count, so even the thread-count-dependent splits match)."""
    need_backend("cpp")
    fns = [
        make() for make in (*_gemm_cases().values(), _quant, _norm_fwd, _norm_bwd, _attention, _decode, _split_decode)
    ]
    threads(2)
    with fastllm.backend("cpp"):
        expected = [[t.detach().clone() for t in fn()] for fn in fns]
    errors: list[str] = []

    def caller(k: int) -> None:
        try:
            torch.set_num_threads(2)  # per Python thread under OpenMP: a new thread starts at the default
            with fastllm.backend("cpp"):
                for rep in range(4):
                    order = fns if (k + rep) % 2 == 0 else fns[::-1]  # different kernels overlap each round
                    for fn in order:
                        _assert_identical([t.detach() for t in fn()], expected[fns.index(fn)], f"thread {k}")
        except BaseException as e:  # reported by the main thread
            errors.append(f"thread {k}: {e!r}")

    ts = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in ts), "a kernel call did not return (deadlock?)"
    assert not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_call_after_fork(need_backend, threads):
    """A child forked after the parent's pool started (its workers do not exist in the child) gets right results
    from a 2-thread call, on a pool of its own (Linux: a worker thread appears in the child); the parent is fine."""
    need_backend("cpp")
    threads(2)
    x, w = torch.randn(8, 1024), torch.randn(1000, 1024)  # output < torch's grain: no torch OpenMP in the child
    with fastllm.backend("cpp"):
        expected = fastllm.linear(x, w)  # starts the parent's pool
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork of a multi-threaded process
            pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                tasks = lambda: len(os.listdir("/proc/self/task"))
                linux = sys.platform.startswith("linux") and (os.cpu_count() or 1) >= 2
                before = tasks() if linux else 0
                ok = torch.equal(fastllm.linear(x, w), expected)
                code = 0 if ok and (not linux or tasks() > before) else (2 if not ok else 3)
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's kernel call did not return")
            time.sleep(0.01)
        assert os.WIFEXITED(status), f"child died: status {status}"
        assert os.WEXITSTATUS(status) != 2, "the forked child's result differs from the parent's"
        assert os.WEXITSTATUS(status) != 3, "the forked child ran on one thread (its pool was not rebuilt)"
        assert os.WEXITSTATUS(status) == 0, f"child exit code {os.WEXITSTATUS(status)}"
        assert torch.equal(fastllm.linear(x, w), expected)
