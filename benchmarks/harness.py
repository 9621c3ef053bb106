"""The benchmark harness shared by every suite: time fastllm against eager PyTorch (and torch.compile)
in one process, measure this machine's ceilings, check each result against a float64 reference, and
print one table (rows also as JSON).

Timing: pytest-benchmark runs each implementation (warm-up rounds, then 25 rounds, or as few as 5 for calls
slower than ROUND_BUDGET_S / 25; the median). Inputs
rotate through enough copies that the working set of consecutive rounds exceeds twice the last-level
cache, so nothing is timed from a warm cache. On CUDA each round ends with a synchronize.

Ceilings, measured here, not quoted: memory bandwidth = the best large copy (torch copy_, and on CPU the
multi-threaded memcpy and non-temporal copy of fastllm._C), counting read + write bytes; compute = the best of an FMA
loop (fastllm._C) and a large fp32 GEMM (CPU) or a bf16 GEMM (CUDA).
"""

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import fastllm._ext
from fastllm.testing import floor, max_abs_err

LLC_BYTES = 32 << 20  # last-level cache of the development machine (AMD EPYC, 32 MiB L3); H100 L2 is 50 MiB
ROUND_BUDGET_S = 4.0  # rows whose call takes longer than ROUND_BUDGET_S / 25 get fewer rounds (>= 5)


@dataclass
class Case:
    """One op at one shape/dtype/device, with its implementations and its float64 reference.

    make_inputs() -> a tuple of input tensors (fresh copies per rotation slot).
    impls: name -> fn(*inputs) -> output tensor or tuple of tensors. "eager" is the baseline for speedup.
    reference(*inputs) -> the same outputs computed in float64.
    bytes / flops: what one call must move / compute, for GB/s and TFLOP/s.
    """

    op: str
    shape: tuple
    dtype: torch.dtype
    device: str
    make_inputs: Callable[[], tuple]
    impls: dict
    reference: Callable
    bytes: int = 0
    flops: int = 0
    # False for quantized cases: their error against the float reference is the quantization error, not a
    # kernel's rounding, so the 2x-eager criterion does not apply (equiv shows "-"; the suite reports SQNR)
    criterion: bool = True
    _inputs: list = field(default_factory=list, repr=False)
    _ref: tuple | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple:
        return (self.op, self.shape, str(self.dtype), self.device)

    def inputs(self) -> list:
        if not self._inputs:
            first = self.make_inputs()
            per = sum(t.nbytes for t in first if isinstance(t, torch.Tensor))
            copies = max(1, min(8, math.ceil(2 * LLC_BYTES / max(per, 1))))
            self._inputs = [first] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in first)
                                      for _ in range(copies - 1)]  # fmt: skip
        return self._inputs

    def reference_outputs(self) -> tuple:
        if self._ref is None:
            # float64 on the case's device (a GPU computes a large reference in seconds)
            args = tuple(t.double() if isinstance(t, torch.Tensor) else t for t in self.inputs()[0])
            self._ref = _as_tuple(self.reference(*args))
        return self._ref


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    device: str
    impl: str
    median_us: float
    speedup: float | None  # eager time / this time
    gbps: float | None
    tflops: float | None
    pct_ceiling: float | None
    max_err: float | None  # max |out - fp64 reference| over all outputs
    equivalent: bool | None  # fastllm's criterion: err <= 2 * eager err + floor


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- ceilings


def _median_time(fn, device: str, reps: int = 15) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_ceilings(device: str) -> dict:
    """{'copy_gbps', 'copy_how', 'peak_tflops', 'peak_how'} measured on this machine now."""
    nbytes = 256 << 20 if device == "cpu" else 1 << 30
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copies = {"torch copy_": _median_time(lambda: dst.copy_(src), device)}
    C = fastllm._ext.C
    if device == "cpu" and C is not None:
        nt = fastllm._ext.num_threads()
        copies["parallel memcpy"] = _median_time(
            lambda: C.copy_bytes(dst.data_ptr(), src.data_ptr(), nbytes, nt, False), device
        )
        copies["non-temporal copy"] = _median_time(
            lambda: C.copy_bytes(dst.data_ptr(), src.data_ptr(), nbytes, nt, True), device
        )
    copy_how = min(copies, key=copies.get)
    copy_gbps = 2 * nbytes / copies[copy_how] / 1e9

    peaks = {}
    if device == "cpu":
        a = torch.randn(2048, 2048)
        peaks["fp32 GEMM 2048^3 (MKL)"] = 2 * 2048**3 / _median_time(lambda: a @ a, device, reps=5) / 1e12
        if C is not None and C.avx2_available():
            iters, nt = 20_000_000, fastllm._ext.num_threads()
            t = _median_time(lambda: C.fma_loop(iters, nt, True), device, reps=3)
            peaks["AVX2 FMA loop"] = C.fma_loop(1, nt, True) * iters * nt / t / 1e12
        if C is not None and C.avx512_available():
            iters, nt = 10_000_000, fastllm._ext.num_threads()
            t = _median_time(lambda: C.fma_loop_avx512(iters, nt), device, reps=3)
            peaks["AVX-512 FMA loop"] = C.fma_loop_avx512(1, nt) * iters * nt / t / 1e12
    else:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        peaks["bf16 GEMM 8192^3 (cuBLAS)"] = 2 * 8192**3 / _median_time(lambda: a @ a, device, reps=10) / 1e12
    peak_how = max(peaks, key=peaks.get)
    return {"copy_gbps": copy_gbps, "copy_how": copy_how, "peak_tflops": peaks[peak_how], "peak_how": peak_how}


# ---------------------------------------------------------------------------------------------- running


class Harness:
    def __init__(self):
        self.rows: list[Row] = []
        self._ceilings: dict = {}
        self._times: dict = {}  # (case key, impl) -> seconds
        self._errs: dict = {}
        self._criterion: dict = {}  # case key -> whether the equivalence criterion applies

    def ceilings(self, device: str) -> dict:
        if device not in self._ceilings:
            self._ceilings[device] = measure_ceilings(device)
        return self._ceilings[device]

    def run(self, benchmark, case: Case, impl: str) -> Row:
        """Time case.impls[impl] with pytest-benchmark, check it against float64, record a row."""
        fn = case.impls[impl]
        self._criterion[case.key] = case.criterion
        slots = case.inputs()
        state = {"i": 0}

        def setup():
            state["i"] = (state["i"] + 1) % len(slots)
            return slots[state["i"]], {}

        def target(*args):
            out = fn(*args)
            _sync(case.device)
            return out

        # error vs float64 on the first input set (also the warm-up / compile call)
        outs = _as_tuple(fn(*slots[0]))
        ref = case.reference_outputs()
        err = max(max_abs_err(o, r) for o, r in zip(outs, ref, strict=True))
        tol_floor = max(floor(o.dtype, r) for o, r in zip(outs, ref, strict=True))
        self._errs[(case.key, impl)] = (err, tol_floor)
        del outs

        # rounds: 25, fewer for slow calls (at least 5, about ROUND_BUDGET_S seconds of rounds per row)
        t0 = time.perf_counter()
        target(*slots[-1])
        one = time.perf_counter() - t0
        rounds = int(min(25, max(5, ROUND_BUDGET_S / max(one, 1e-9))))
        benchmark.group = f"{case.op} {case.shape} {str(case.dtype).replace('torch.', '')} {case.device}"
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1 if rounds < 25 else 3, iterations=1)
        t = benchmark.stats.stats.median
        self._times[(case.key, impl)] = t
        ceil = self.ceilings(case.device)
        gbps = case.bytes / t / 1e9 if case.bytes else None
        tflops = case.flops / t / 1e12 if case.flops else None
        pct = 100 * gbps / ceil["copy_gbps"] if gbps else (100 * tflops / ceil["peak_tflops"] if tflops else None)
        row = Row(case.op, "x".join(map(str, case.shape)), str(case.dtype).replace("torch.", ""), case.device, impl,
                  t * 1e6, None, gbps, tflops, pct, err, None)  # fmt: skip
        self.rows.append(row)
        return row

    def finalize(self) -> None:
        """Fill speedup (vs eager of the same case) and the equivalence verdict (vs eager's error)."""
        for row in self.rows:
            key = (row.op, tuple(int(s) for s in row.shape.split("x")), "torch." + row.dtype, row.device)
            eager_t = self._times.get((key, "eager"))
            row.speedup = eager_t / (row.median_us * 1e-6) if eager_t else None
            eager_err = self._errs.get((key, "eager"))
            err, tol_floor = self._errs[(key, row.impl)]
            row.equivalent = err <= 2 * eager_err[0] + tol_floor if eager_err and self._criterion[key] else None

    def table(self) -> str:
        self.finalize()
        lines = []
        for device, c in self._ceilings.items():
            lines.append(f"ceilings on {device}: copy {c['copy_gbps']:.1f} GB/s ({c['copy_how']}), "
                         f"compute {c['peak_tflops'] * 1e3:.0f} GFLOP/s ({c['peak_how']})")  # fmt: skip
        head = ["op", "shape", "dtype", "device", "impl", "median", "speedup", "GB/s", "TFLOP/s", "% ceil", "max err",
                "equiv"]  # fmt: skip
        body = []
        for r in self.rows:
            body.append([
                r.op, r.shape, r.dtype, r.device, r.impl,
                f"{r.median_us / 1e3:.3f} ms" if r.median_us >= 1000 else f"{r.median_us:.1f} us",
                f"{r.speedup:.2f}x" if r.speedup else "-",
                f"{r.gbps:.1f}" if r.gbps else "-",
                f"{r.tflops:.3f}" if r.tflops else "-",
                f"{r.pct_ceiling:.0f}%" if r.pct_ceiling else "-",
                f"{r.max_err:.1e}" if r.max_err is not None else "-",
                {True: "yes", False: "NO", None: "-"}[r.equivalent],
            ])  # fmt: skip
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*head))
        lines.append("-+-".join("-" * w for w in widths))
        lines.extend(fmt.format(*b) for b in body)
        return "\n".join(lines)

    def to_json(self) -> str:
        self.finalize()
        return json.dumps({"ceilings": self._ceilings, "rows": [asdict(r) for r in self.rows]}, indent=1)
