"""The benchmark harness shared by every suite: time fastllm against eager PyTorch and the strongest peers in one
process, judge every output against a float64 reference, record what ran, and print one table (rows also as JSON).

One pytest item per Case. For each case the harness
1. calls every implementation once on the first input set, under `fastllm.explain()` (which fastllm backend and
   ISA ran) and oneDNN's verbose mode (which torch library ran); a "fastllm..." implementation that ran the
   reference path, or no fastllm op at all, fails the item;
2. judges every output and gradient separately with fastllm.testing.judge_all (the 2x-eager criterion);
   a fastllm output that fails it fails the item (after its row is recorded);
3. times all implementations interleaved: pytest-benchmark's `pedantic` drives the rounds, and each round calls
   every implementation once, in an order that rotates from round to round, each call timed on its own
   (perf_counter, CUDA synchronize), so that load from other processes falls on all of them alike. Each call takes
   the next input set: the sets rotate through enough copies that the working set between two uses of one set
   exceeds twice the last-level cache (read from the system: machine.llc), so nothing is timed from a warm cache.
   25 rounds (5 for slow cases; 3-7 with --bench-quick), per-implementation medians.

Speedup is against eager (what users run); "vs best" against the fastest implementation that is not fastllm's.
"""

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import machine
import pytest
import torch

import fastllm
from fastllm.testing import judge_all, max_abs_err

ROUND_BUDGET_S = 4.0  # timed seconds per implementation and case; slow cases get fewer rounds
ROUNDS = (5, 25)  # (fewest, most) timed rounds
QUICK_ROUNDS = (3, 7)
QUICK_BUDGET_S = 0.5
ONEDNN_GEMMS = ("matmul", "inner_product", "convolution")  # oneDNN primitive kinds that do a GEMM


@dataclass
class Impl:
    """One implementation of a case. `context()` is entered around each call, outside the timed region (e.g. an
    ISA switch, or an empty packed-weight cache so that the call includes packing)."""

    fn: Callable
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Case:
    """One op at one shape/dtype/device, with its implementations and its float64 reference.

    make_inputs() -> a tuple of input tensors (fresh copies per rotation slot).
    impls: name -> fn(*inputs) or Impl; fn returns an output tensor or a tuple of tensors. The impl named "eager"
    (what a model runs today) is the speedup baseline and the criterion's eager; names starting with "fastllm" are
    fastllm's and must run fastllm kernels.
    reference(*inputs) -> the same outputs computed in float64.
    names: one name per output ("out", "dq", ...), for the verdicts.
    prewarm: impls called once on every input set before the timed rounds (their packed-weight cache is filled).
    reference_ok: fastllm impls that are expected to run the reference path (none in the suites).
    bytes / flops: what one call must move / compute, for GB/s and TFLOP/s.
    criterion False: quantized cases, whose error against the float reference is the quantization error, not a
    kernel's rounding (no verdict; the suite reports SQNR).
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
    criterion: bool = True
    names: tuple = ()
    prewarm: tuple = ()
    reference_ok: tuple = ()
    _inputs: list = field(default_factory=list, repr=False)
    _ref: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.impls = {k: v if isinstance(v, Impl) else Impl(v) for k, v in self.impls.items()}
        if "eager" not in self.impls:
            raise ValueError(f"{self.op}: a case needs an 'eager' implementation (the baseline)")

    def inputs(self) -> list:
        if not self._inputs:
            first = self.make_inputs()
            per = sum(t.nbytes for t in first if isinstance(t, torch.Tensor))
            llc_bytes = machine.llc(self.device)[0]
            copies = max(1, min(32, math.ceil(2 * llc_bytes / per))) if per else 1
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
    suite: str
    op: str
    shape: str
    dtype: str
    device: str
    impl: str  # "eager (oneDNN)" when torch ran oneDNN primitives
    ran: str  # fastllm: backend:isa of every op call ("cpp:avx2"); torch: "torch" or "torch+oneDNN"
    median_us: float
    rounds: int
    max_err: float | None  # the worst output's max |out - fp64 reference|
    worst: str  # that output's name
    equivalent: bool | None  # every output meets the criterion (None: criterion does not apply)
    outputs: list  # every output's verdict (asdict(Verdict)) or {"name", "max_err"}
    dispatch: list  # the distinct fastllm dispatch records of the checked call, or the oneDNN primitives
    speedup: float | None = None  # eager time / this time
    vs_best: float | None = None  # fastest non-fastllm time / this time
    gbps: float | None = None
    tflops: float | None = None
    pct_ceiling: float | None = None
    flops: int = 0
    bytes: int = 0


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def is_fastllm(impl: str) -> bool:
    return impl.startswith("fastllm")


def _ran(records, onednn) -> str:
    if records:
        kinds = []
        for d in records:
            k = "reference" if d.backend == "reference" else f"{d.backend}:{d.reason.split()[0]}"
            if k not in kinds:
                kinds.append(k)
        return ",".join(kinds)
    return "torch+oneDNN" if onednn else "torch"


class Harness:
    def __init__(self, quick: bool = False):
        self.quick = quick
        self.rows: list[Row] = []
        self.before: dict = {}  # device -> ceilings measured before its first row
        self.after: dict = {}  # device -> ceilings measured after the last row

    def ceilings(self, device: str) -> dict:
        """The better of the two measurements (only `before` until the run ends)."""
        b, a = self.before[device], self.after.get(device)
        if a is None:
            return b
        return {k: max(b[k], a[k]) for k in ("copy_gbps", "peak_tflops")}

    def remeasure(self) -> None:
        """Measure every used device's ceilings again, after the last row."""
        for device in self.before:
            self.after[device] = machine.measure_ceilings(device, self.quick)

    def noisy(self, device: str) -> bool:
        return device in self.after and machine.drift(self.before[device], self.after[device]) > machine.NOISY_DRIFT

    # ------------------------------------------------------------------------------------------ one case

    def run_case(self, benchmark, case: Case) -> list[Row]:
        if case.device not in self.before:
            self.before[case.device] = machine.measure_ceilings(case.device, self.quick)
        slots = case.inputs()
        outs, ran, records, onednn = {}, {}, {}, {}
        for name, impl in case.impls.items():  # the checked call: also the warm-up (and compile) call
            probe = machine.onednn_primitives() if case.device == "cpu" else contextlib.nullcontext([])
            with impl.context(), fastllm.explain() as log, probe as prims:
                outs[name] = _as_tuple(impl.fn(*slots[0]))
                machine.sync(case.device)
            records[name], onednn[name] = list(log), prims
            ran[name] = _ran(log, prims)
        failures = [self._what_ran_failure(case, name, records[name]) for name in case.impls]
        verdicts = self._judge(case, outs)
        del outs
        for name in case.prewarm:
            impl = case.impls[name]
            for slot in slots[1:]:
                with impl.context():
                    impl.fn(*slot)
        medians, rounds = self._time(benchmark, case)

        suite = benchmark.fullname.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("bench_")
        rows = []
        for name in case.impls:
            vs = verdicts[name]
            worst = max(vs, key=lambda v: (v.get("ok") is False, v["max_err"] / max(v.get("tol", 1.0), 1e-300)))
            # "eager (oneDNN)" where torch ran its GEMMs on oneDNN (an oneDNN eltwise such as GELU does not count)
            gemm = any(p.split()[0] in ONEDNN_GEMMS for p in onednn[name])
            label = f"{name} (oneDNN)" if gemm and not is_fastllm(name) else name
            dispatch = list(dict.fromkeys(str(d) for d in records[name])) or onednn[name]
            equivalent = all(v["ok"] for v in vs) if case.criterion else None
            rows.append(Row(suite, case.op, "x".join(map(str, case.shape)), str(case.dtype).replace("torch.", ""),
                            case.device, label, ran[name], medians[name] * 1e6, rounds, worst["max_err"],
                            worst["name"], equivalent, vs, dispatch, flops=case.flops, bytes=case.bytes))  # fmt: skip
            if is_fastllm(name) and equivalent is False:
                bad = "; ".join(v["message"] for v in vs if not v["ok"])
                failures.append(f"{name} is not equivalent to the float64 reference: {bad}")
        self.rows.extend(rows)
        failures = [f for f in failures if f]
        if failures:
            pytest.fail(f"{case.op} {case.shape} {case.dtype}:\n" + "\n".join(failures), pytrace=False)
        return rows

    @staticmethod
    def _what_ran_failure(case: Case, name: str, records) -> str | None:
        if not is_fastllm(name) or name in case.reference_ok:
            return None
        if not records:
            return f"{name} called no fastllm op (the row would time something else under fastllm's name)"
        ref = [str(d) for d in records if d.backend == "reference"]
        if ref:
            return f"{name} ran the reference path, not a fastllm kernel: " + "; ".join(dict.fromkeys(ref))
        return None

    @staticmethod
    def _judge(case: Case, outs: dict) -> dict:
        """impl -> one dict per output: the Verdict's fields, or only name and max_err without a criterion."""
        ref = case.reference_outputs()
        names = case.names or tuple(f"output {i}" for i in range(len(ref)))
        if case.criterion:
            judged = {k: [asdict(v) for v in judge_all(o, outs["eager"], ref, names)]
                      for k, o in outs.items() if k != "eager" or len(outs) == 1}  # fmt: skip
            # eager meets its own bar by definition (err <= 2 err + floor); judging a large output takes seconds
            judged["eager"] = judged.get("eager") or [
                {**v, "ok": True, "max_err": v["eager_err"], "rel_err": None, "rel_tol": None, "message": ""}
                for v in next(iter(judged.values()))
            ]
            return judged
        return {k: [{"name": n, "max_err": max_abs_err(x, r)} for x, r, n in zip(o, ref, names, strict=True)]
                for k, o in outs.items()}  # fmt: skip

    def _time(self, benchmark, case: Case) -> tuple[dict, int]:
        """Interleaved rounds: per-implementation median seconds and the number of timed rounds."""
        names, slots = list(case.impls), case.inputs()
        times: dict = {k: [] for k in names}
        state = {"round": 0, "call": 0}

        def one_round():
            r = state["round"]
            state["round"] += 1
            for j in range(len(names)):
                name = names[(r + j) % len(names)]  # rotating order: no impl always runs right after another
                impl = case.impls[name]
                args = slots[state["call"] % len(slots)]
                state["call"] += 1
                with impl.context():
                    machine.sync(case.device)
                    t0 = time.perf_counter()
                    out = impl.fn(*args)
                    machine.sync(case.device)
                    times[name].append(time.perf_counter() - t0)
                del out  # freed outside the timed region

        # one warm-up round, which also sizes the timed rounds (the checked call may have compiled)
        one_round()
        round_s = sum(v[0] for v in times.values())
        for v in times.values():
            v.clear()
        lo, hi = QUICK_ROUNDS if self.quick else ROUNDS
        budget = (QUICK_BUDGET_S if self.quick else ROUND_BUDGET_S) * len(names)
        rounds = int(min(hi, max(lo, budget / max(round_s, 1e-9))))
        benchmark.group = f"{case.op} {case.shape} {str(case.dtype).replace('torch.', '')} {case.device}"
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
        medians = {k: statistics.median(v) for k, v in times.items()}
        benchmark.extra_info["median_us"] = {k: t * 1e6 for k, t in medians.items()}
        return medians, len(times[names[0]])

    # ------------------------------------------------------------------------------------------ the table

    def finalize(self) -> None:
        """Speedup vs eager, vs the best non-fastllm impl, and roofline numbers against the ceilings."""
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r.suite, r.op, r.shape, r.dtype, r.device), []).append(r)
        for rows in groups.values():
            eager = next((r for r in rows if r.impl.split(" (")[0] == "eager"), None)
            peers = [r.median_us for r in rows if not is_fastllm(r.impl)]
            for r in rows:
                t = r.median_us * 1e-6
                r.speedup = eager.median_us / r.median_us if eager else None
                r.vs_best = min(peers) / r.median_us if peers else None
                ceil = self.ceilings(r.device)
                r.gbps = r.bytes / t / 1e9 if r.bytes else None
                r.tflops = r.flops / t / 1e12 if r.flops else None
                pct = (r.gbps / ceil["copy_gbps"]) if r.gbps else (r.tflops / ceil["peak_tflops"] if r.tflops else None)
                r.pct_ceiling = 100 * pct if pct is not None else None

    def header(self) -> list[str]:
        lines = []
        for device, b in self.before.items():
            size, where = machine.llc(device)
            noisy = " NOISY" if self.noisy(device) else ""
            lines.append(f"{device}{noisy}: {machine.describe(device)}; last-level cache {size / 2**20:.0f} MiB "
                         f"({where}); torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
            line = f"  ceilings before: {_ceil_str(b)}"
            if device in self.after:
                a = self.after[device]
                d = machine.drift(b, a)
                line += f"; after: {_ceil_str(a)}; drift {100 * d:.0f}%"
                if d > machine.NOISY_DRIFT:
                    line += f" > {100 * machine.NOISY_DRIFT:.0f}%: NOISY (the machine was busy; ratios may be off)"
            lines.append(line)
        return lines

    def table(self, markdown: bool = False) -> str:
        self.finalize()
        head = ["op", "shape", "dtype", "device", "impl", "ran", "median", "speedup", "vs best", "GB/s", "TFLOP/s",
                "% ceil", "max err", "equiv"]  # fmt: skip
        body = [[
            r.op, r.shape, r.dtype, r.device, r.impl, r.ran,
            f"{r.median_us / 1e3:.3f} ms" if r.median_us >= 1000 else f"{r.median_us:.1f} us",
            f"{r.speedup:.2f}x" if r.speedup else "-",
            f"{r.vs_best:.2f}x" if r.vs_best else "-",
            f"{r.gbps:.1f}" if r.gbps else "-",
            f"{r.tflops:.3f}" if r.tflops else "-",
            f"{r.pct_ceiling:.0f}%" if r.pct_ceiling else "-",
            "-" if r.max_err is None else f"{r.max_err:.1e}" + (f" ({r.worst})" if len(r.outputs) > 1 else ""),
            {True: "yes", False: "NO", None: "-"}[r.equivalent],
        ] for r in self.rows]  # fmt: skip
        lines = self.header()
        if markdown:
            lines = [ln + "  " for ln in lines] + [""]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines.extend("| " + " | ".join(b) + " |" for b in body)
            return "\n".join(lines)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*head))
        lines.append("-+-".join("-" * w for w in widths))
        lines.extend(fmt.format(*b) for b in body)
        return "\n".join(lines)

    def to_json(self) -> str:
        self.finalize()
        devices = {
            d: {
                "machine": machine.describe(d),
                "llc_bytes": machine.llc(d)[0],
                "llc_source": machine.llc(d)[1],
                "ceilings_before": b,
                "ceilings_after": self.after.get(d),
                "noisy": self.noisy(d),
            }
            for d, b in self.before.items()
        }
        return json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "devices": devices,
                           "rows": [asdict(r) for r in self.rows]}, indent=1)  # fmt: skip


def _ceil_str(c: dict) -> str:
    return (f"copy {c['copy_gbps']:.1f} GB/s ({c['copy_how']}), "
            f"compute {c['peak_tflops'] * 1e3:.0f} GFLOP/s ({c['peak_how']})")  # fmt: skip


@contextlib.contextmanager
def isa(name: str):
    """Run fastllm's C++ kernels on the `name` ISA path ("avx2", "avx512", ...), then restore the previous one."""
    C = fastllm._ext.C
    prev = C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa(prev)


def avx512_cpu() -> bool:
    """Whether fastllm runs its AVX-512 path here (then an AVX2 row gives a same-ISA comparison with peers)."""
    C = fastllm._ext.C
    return C is not None and C.isa() == "avx512"
