"""fastllm.profile(model, inputs): a model as eager, SDPA, torch.compile and fastllm side by side, timed and profiled.

    result = fastllm.profile(hf_model, {"input_ids": ids, "attention_mask": mask}, compile=True, trace_dir="traces")
    print(result)                        # the tables below
    result.variant("fastllm.accelerate").speedup

Variants (default_variants): for a Hugging Face model, copies sharing its weights under attn_implementation
"eager" and "sdpa", torch.compile of the sdpa copy (compile=True), and fastllm.accelerate of a copy (accelerate=
True); for another nn.Module, the model itself ("eager"), its torch.compile and its accelerate'd copy. Or pass
`variants={name: callable}` (each called like the model, with the same inputs; "eager" is the baseline).

What is measured, in this order, all under torch.inference_mode():
1. first call: each variant's first call, timed on its own (includes torch.compile's compile, Triton's autotune,
   fastllm's weight packing): `first_call_ms`.
2. max difference: each variant's first output tensor (a ModelOutput's first field: last_hidden_state, logits)
   against eager's: `max_diff` (max |out - eager|, in float32).
3. time: interleaved rounds, each round calls every variant once in an order that rotates from round to round,
   each call timed on its own (perf_counter; CUDA synchronized); `median_ms` is the median over the rounds and
   `speedup` is eager's median over this one. No profiler is active here: its overhead distorts small ops.
4. profile: one more call per variant under torch.profiler, inside a "fastllm.profile.step" range, with a range
   per nn.Module ("module: BertLayer (encoder.layer.0)"; not for compiled variants, dynamo would trace the hooks)
   and a range per fastllm op call ("fastllm::linear"), so that a trace reads as the model. The op ranges exist
   only inside fastllm.profile: `op_ranges()` wraps the op entry points for the profiled call (a record_function
   costs ~1-2 us per call even with no profiler running, see notes) and turns off the ops' lean C++ lanes, which
   would skip the entry point. `profiled_ms` is that call's wall time; `categories_ms` splits it:
     attention    fastllm attention ops, SDPA / flash / softmax, and everything in an attention module's own code
                  (eager attention's QK^T and PV matmuls included: they are the attention, not the projections);
     GEMM         mm / addmm / bmm / matmul / linear / convolution and fastllm linear, FFN, QKV and int8 matmuls
                  (outside attention code);
     norms        layer / RMS norm ops and everything in a *Norm module's own code (HF's RMSNorm is elementwise
                  aten ops);
     elementwise  pointwise aten ops (add, mul, gelu, silu, casts, ...), Inductor's fused kernels, fastllm rope;
     Python/dispatch overhead  time inside the step and module ranges that is in no op: Python, hooks, dispatch;
     other        every other op (embedding, cat, copies, reductions, ...).
   An op counts with everything under it (an aten::linear with its addmm). On CPU the times are the profiler's
   CPU times, so the categories sum to the step range's duration (tested), which is the profiled call's wall time
   less the range's own enter / exit (~25 us; more when the OS deschedules the process in between). On CUDA they
   are device times of the kernels each op launched, and the overhead is the rest of the wall time (the GPU idle
   while Python launches).
5. fallbacks: one call of each fastllm variant under fastllm.explain: every fastllm call that ran the reference
   path, with why (`fallbacks`).
Chrome traces of the profiled calls go to trace_dir/<variant>.json.
"""

import contextlib
import copy
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CATEGORIES = ("attention", "GEMM", "norms", "elementwise", "Python/dispatch overhead", "other")
STEP = "fastllm.profile.step"
OVERHEAD = "Python/dispatch overhead"

_GEMM = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_int_mm", "mv", "addmv", "dot", "einsum",
         "convolution", "_convolution", "conv1d", "conv2d", "mkldnn_convolution", "mkldnn_linear", "_addmm_activation",
         "fbgemm_linear_int8_weight", "linear_dynamic", "_weight_int8pack_mm"}  # fmt: skip
_ELEMENTWISE = re.compile(
    r"^(add|sub|mul|div|neg|pow|sqrt|rsqrt|exp|log|tanh|sigmoid|relu|gelu|silu|erf|clamp|where|masked_fill|"
    r"to|_to_copy|copy|fill|zero|rsub|reciprocal|abs|maximum|minimum|cos|sin|mish|hardtanh|dropout)_?$"
)
_FASTLLM_GEMM = ("linear", "ffn", "qkv", "matmul", "w8a16")
_BATCHED = {"bmm", "baddbmm", "matmul", "einsum"}  # in an attention module's own code: QK^T and PV


def category_of_op(name: str) -> str | None:
    """The category of a profiler event by its name alone, or None (then its module decides, else "other")."""
    ns, _, op = name.rpartition("::")
    op = op.lower()
    if ns == "fastllm" or name.startswith("fastllm."):
        op = op or name.split(".", 1)[1]
        if "attention" in op:
            return "attention"
        if "norm" in op:
            return "norms"
        if any(k in op for k in _FASTLLM_GEMM):
            return "GEMM"
        return "elementwise"
    if "attention" in op or "sdpa" in op or "flash" in op or "softmax" in op:
        return "attention"
    if op in _GEMM or "quantized" in ns:
        return "GEMM"
    if "norm" in op:
        return "norms"
    if _ELEMENTWISE.match(op) or "fused" in name.lower() or name.startswith("triton_"):
        return "elementwise"
    return None


def _category_of_module(class_name: str) -> str | None:
    n = class_name.lower()
    if "norm" in n:
        return "norms"
    if "attention" in n or n.endswith("attn"):
        return "attention"
    if "linear" in n or n.startswith("conv"):
        return "GEMM"
    return None


# ---------------------------------------------------------------------------------------------- results


@dataclass
class VariantResult:
    name: str
    median_ms: float | None = None
    first_call_ms: float | None = None
    rounds: int = 0
    speedup: float | None = None  # eager's median / this median
    max_diff: float | None = None  # max |output - eager's output|
    profiled_ms: float | None = None  # wall time of the profiled call
    categories_ms: dict = field(default_factory=dict)  # CATEGORIES -> ms of the profiled call
    fallbacks: list = field(default_factory=list)  # fastllm calls that ran the reference path, with why
    trace: str | None = None
    error: str | None = None  # why this variant could not run (then no numbers)


@dataclass
class GenerateResult:
    """One variant generating: time to first token and per-token decode, measured apart (profile_generate)."""

    name: str
    ttft_ms: float | None = None  # median time of generate(max_new_tokens=1): prefill + the first token
    decode_ms: float | None = None  # per decode token: (median time of generate(n) - ttft) / (n - 1)
    tokens_per_s: float | None = None  # batch x (n - 1) / decode time
    agreement: float | None = None  # fraction of the generated tokens equal to eager's (greedy)
    error: str | None = None


@dataclass
class ProfileResult:
    variants: list
    device: str
    description: str = ""
    generation: list = field(default_factory=list)  # GenerateResult per variant (profile_generate), if measured
    new_tokens: int = 0

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}")

    def table(self) -> str:
        ok = [v for v in self.variants if v.error is None]
        eager = next((v for v in ok if v.name == "eager"), None)
        lines = [f"fastllm.profile: {self.description}".rstrip(": ")]
        rounds = max((v.rounds for v in ok), default=0)
        lines.append(f"time: medians of {rounds} interleaved rounds; categories: one more call per variant under "
                     "torch.profiler")  # fmt: skip
        lines.append("first call: " + ", ".join(f"{v.name} {_ms(v.first_call_ms)}" for v in ok))
        head = ["variant", "median", "speedup", "max diff vs eager", "profiled call"]
        body = [[v.name, _ms(v.median_ms), _x(v.speedup), "-" if v.max_diff is None else f"{v.max_diff:.1e}",
                 _ms(v.profiled_ms)] for v in ok]  # fmt: skip
        lines += _grid(head, body)
        head = ["category (ms)", *[v.name for v in ok]]
        body = []
        for c in CATEGORIES:
            row = [c]
            for v in ok:
                t = v.categories_ms.get(c, 0.0)
                base = eager.categories_ms.get(c, 0.0) if eager else 0.0
                cell = f"{t:.2f}"
                # (no ratio for a category this variant has all but fused away: 0.1 ms of 500 is not "1000x")
                if v is not eager and t > 0.01 * sum(v.categories_ms.values()) and base > 0:
                    cell += f" ({base / t:.2f}x)"
                row.append(cell)
            body.append(row)
        body.append(["sum", *[f"{sum(v.categories_ms.values()):.2f}" for v in ok]])
        lines += ["", *_grid(head, body)]
        for v in ok:
            if v.name != "eager" and v.name.startswith("fastllm"):
                fb = "; ".join(v.fallbacks) if v.fallbacks else "none (every fastllm call ran a fastllm kernel)"
                lines.append(f"fallbacks to the reference, {v.name}: {fb}")
        for v in self.variants:
            if v.error is not None:
                lines.append(f"{v.name}: not run ({v.error})")
        if self.generation:
            lines += ["", f"generation, greedy, {self.new_tokens} new tokens (medians of interleaved rounds; time to "
                      "first token and decode measured apart)"]  # fmt: skip
            head = ["variant", "time to first token", "decode per token", "decode tokens/s", "tokens = eager's"]
            body = [[g.name, _ms(g.ttft_ms), _ms(g.decode_ms), "-" if g.tokens_per_s is None else
                     f"{g.tokens_per_s:.1f}", "-" if g.agreement is None else f"{100 * g.agreement:.0f}%"]
                    for g in self.generation if g.error is None]  # fmt: skip
            lines += _grid(head, body)
            lines += [f"{g.name}: not run ({g.error})" for g in self.generation if g.error is not None]
        traces = [v.trace for v in ok if v.trace]
        if traces:
            lines.append("Chrome traces (chrome://tracing, ui.perfetto.dev): " + ", ".join(traces))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _ms(t) -> str:
    return "-" if t is None else f"{t:.2f} ms" if t < 1000 else f"{t / 1000:.2f} s"


def _x(s) -> str:
    return "-" if s is None else f"{s:.2f}x"


def _grid(head, body) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), "-+-".join("-" * w for w in widths), *(fmt.format(*b) for b in body)]


# ---------------------------------------------------------------------------------------------- variants


def _is_hf(model) -> bool:
    return hasattr(model, "set_attn_implementation") and hasattr(model, "config")


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree sharing the parameters and buffers (no weight memory)."""
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


def default_variants(model, *, compile: bool = False, accelerate: bool = True) -> dict:
    """name -> callable: eager, sdpa (HF models), torch.compile (compile=True), fastllm.accelerate (accelerate=True)."""
    import fastllm

    out: dict = {}
    if _is_hf(model):
        for attn in ("eager", "sdpa"):
            m = _shared_copy(model)
            m.set_attn_implementation(attn)
            out[attn] = m
    else:
        out["eager"] = model
    if compile:
        out["torch.compile"] = torch.compile(_shared_copy(out.get("sdpa", out["eager"])))
    if accelerate:
        out["fastllm.accelerate"] = fastllm.accelerate(_shared_copy(model))
    return out


def _call(fn, inputs):
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def first_tensor(out) -> torch.Tensor | None:
    """The output compared across variants: a tensor, a tuple's first tensor, a ModelOutput's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict of its non-None fields
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for x in out:
            t = first_tensor(x)
            if t is not None:
                return t
    return None


# ---------------------------------------------------------------------------------------------- ranges


@contextlib.contextmanager
def op_ranges():
    """While active: every fastllm op call is inside a record_function range named fastllm::<op>, and the ops'
    lean C++ lanes are off (they call the kernel without passing the op's entry point). Process-wide."""
    from fastllm._op import Op

    call, pre, lane = Op.__call__, Op.prevalidated, Op.cpp_lane
    rf = torch.profiler.record_function

    def ranged_call(self, *args):
        with rf(f"fastllm::{self.name}"):
            return call(self, *args)

    def ranged_pre(self, *args):
        with rf(f"fastllm::{self.name}"):
            return pre(self, *args)

    Op.__call__, Op.prevalidated, Op.cpp_lane = ranged_call, ranged_pre, lambda self, args: False
    try:
        yield
    finally:
        Op.__call__, Op.prevalidated, Op.cpp_lane = call, pre, lane


@contextlib.contextmanager
def module_ranges(model):
    """While active: each submodule's forward is inside a range "module: <Class> (<path>)", except below a module that
    fastllm.accelerate fused (its children do not run as modules on its fast path; a hook on one would make it take
    its original forward, engine.hooks_below, and the profiled call would not be the one timed)."""
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        yield
        return
    handles, stacks = [], {}
    for path, m in _ranged_modules(model):
        name = f"module: {type(m).__name__} ({path or 'model'})"

        def pre(mod, args, _name=name):
            r = torch.profiler.record_function(_name)
            r.__enter__()
            stacks.setdefault(id(mod), []).append(r)

        def post(mod, args, out):
            stack = stacks.get(id(mod))
            if stack:
                stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ranged_modules(model) -> list:
    """(path, module) of model and its submodules, each once, not descending into a fused accelerated module."""
    from fastllm.integrations.engine import is_accelerated

    out, seen, stack = [], set(), [("", model)]
    while stack:
        path, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((path, m))
        if is_accelerated(m) and not getattr(type(m), "_fastllm_children_as_modules", False):
            continue
        stack.extend((f"{path}.{n}" if path else n, c) for n, c in reversed(m._modules.items()) if c is not None)
    return out


# ---------------------------------------------------------------------------------------------- categories


def _module_class(range_name: str) -> str:
    return range_name[len("module: ") :].split(" (", 1)[0]


def categorize(events, device: str, wall_ms: float) -> dict:
    """CATEGORIES -> ms of the (last) STEP range in the profiler's events (see the module docstring)."""
    steps = [e for e in events if e.name == STEP]
    if not steps:
        raise RuntimeError("the profiled call has no fastllm.profile.step range")
    step = steps[-1]
    cats = dict.fromkeys(CATEGORIES, 0.0)
    cuda = device == "cuda"

    def dev_us(e) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))

    def walk(e, hint: str | None) -> None:
        is_range = e.name == STEP or e.name.startswith("module: ") or e.name.startswith("Torch-Compiled Region")
        if is_range:
            if not cuda:
                cats[OVERHEAD] += e.self_cpu_time_total / 1e3
            if e.name.startswith("module: "):
                hint = _category_of_module(_module_class(e.name))
            for c in e.cpu_children:
                walk(c, hint)
            return
        cat = category_of_op(e.name)
        if hint == "attention" and (cat in (None, "elementwise") or e.name.split("::")[-1] in _BATCHED):
            cat = "attention"  # the attention module's own code: QK^T, PV, scaling, masking (not projections)
        elif cat is None or (hint == "norms" and cat == "elementwise"):
            cat = hint or "other"
        cats[cat] += (dev_us(e) if cuda else e.cpu_time_total) / 1e3

    walk(step, None)
    if cuda:
        cats[OVERHEAD] = max(0.0, wall_ms - sum(cats.values()))
    return cats


# ---------------------------------------------------------------------------------------------- profile


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto writes a line to file descriptor 2 when a profile starts and when it stops ("USDT: ... profiler_start"):
    silenced around those two moments only (not around the profiled call)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_of(inputs) -> str:
    ts = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for t in ts:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def profile(
    model,
    inputs,
    *,
    variants: dict | None = None,
    compile: bool = False,
    accelerate: bool = True,
    extra_variants: dict | None = None,
    rounds: int | None = None,
    budget_s: float = 2.0,
    trace_dir: str | Path | None = None,
    description: str = "",
) -> ProfileResult:
    """Time and profile `model` on `inputs` (a tuple of positional arguments, a dict of keyword arguments, or one
    tensor) as several variants side by side; see the module docstring. variants: name -> callable (default:
    default_variants(model, compile=compile, accelerate=accelerate)); extra_variants are added to them (e.g. a
    fastllm zoo model behind an adapter taking the same inputs). rounds: timed rounds (default: as many as fit
    budget_s per variant, 3 to 25)."""
    import fastllm

    if not isinstance(model, torch.nn.Module) and not (variants is not None and "eager" in variants):
        raise TypeError(f"fastllm.profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"fastllm.profile: rounds must be an int >= 1 or None, got {rounds!r}")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"fastllm.profile: budget_s must be a number > 0, got {budget_s!r}")
    variants = dict(variants) if variants is not None else default_variants(model, compile=compile,
                                                                             accelerate=accelerate)  # fmt: skip
    variants.update(extra_variants or {})
    if "eager" not in variants:
        raise ValueError("fastllm.profile: the variants need an 'eager' one (the baseline)")
    device = _device_of(inputs)
    results = {name: VariantResult(name) for name in variants}
    live: dict = {}
    outs: dict = {}
    with torch.inference_mode():
        for name, fn in variants.items():  # 1. first calls (compile, autotune, packing)
            try:
                _sync(device)
                t0 = time.perf_counter()
                out = _call(fn, inputs)
                _sync(device)
                results[name].first_call_ms = (time.perf_counter() - t0) * 1e3
            except Exception as e:  # one variant that cannot run does not hide the others
                if name == "eager":
                    raise
                results[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                continue
            live[name] = fn
            outs[name] = first_tensor(out)
        ref = outs["eager"]
        for name, t in outs.items():  # 2. max difference from eager
            if name != "eager" and t is not None and ref is not None and t.shape == ref.shape:
                results[name].max_diff = (t.float() - ref.float()).abs().max().item()
        del outs

        names = list(live)
        times: dict = {n: [] for n in names}

        def one_round(r: int) -> None:
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                _sync(device)
                t0 = time.perf_counter()
                out = _call(live[n], inputs)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
                del out

        one_round(0)  # warm-up (a second call still settles caches and allocators); sizes the rounds
        first = {n: v.pop() for n, v in times.items()}
        if rounds is None:
            rounds = int(min(25, max(3, budget_s / max(max(first.values()), 1e-9))))
        for r in range(rounds):  # 3. time
            one_round(r)
        for n in names:
            results[n].median_ms = statistics.median(times[n]) * 1e3
            results[n].rounds = rounds
        base = results["eager"].median_ms
        for n in names:
            results[n].speedup = base / results[n].median_ms

        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        for n in names:  # 4. profile
            with op_ranges(), module_ranges(live[n]):
                _call(live[n], inputs)  # the ranges' own first call (hooks, op entry points) outside the profile
                _sync(device)
                prof = torch.profiler.profile(activities=acts)
                with _quiet_fd2():
                    prof.__enter__()
                try:
                    t0 = time.perf_counter()
                    with torch.profiler.record_function(STEP):
                        out = _call(live[n], inputs)
                        _sync(device)
                    wall = (time.perf_counter() - t0) * 1e3
                finally:
                    with _quiet_fd2():
                        prof.__exit__(None, None, None)
                del out
            results[n].profiled_ms = wall
            results[n].categories_ms = categorize(prof.events(), device, wall)
            if trace_dir is not None:
                path = Path(trace_dir) / f"{re.sub(r'[^A-Za-z0-9_.+-]+', '_', n).strip('_')}.json"
                prof.export_chrome_trace(str(path))
                results[n].trace = str(path)
        for n in names:  # 5. fallbacks
            if n.startswith("fastllm"):
                with fastllm.explain() as log:
                    _call(live[n], inputs)
                results[n].fallbacks = list(dict.fromkeys(str(d) for d in log if d.backend == "reference"))
    return ProfileResult(list(results.values()), device, description)


def profile_generate(variants: dict, batch: int, new_tokens: int, rounds: int = 3, device: str = "cpu") -> list:
    """Time generation per variant: variants are name -> gen(n) returning (B, S + n) token ids (greedy, exactly n
    new tokens; "eager" first, the reference for token agreement). Rounds interleave the variants as in profile;
    time to first token is gen(1), decode per token (gen(n) - gen(1)) / (n - 1), each a median over the rounds."""
    if new_tokens < 2:
        raise ValueError("profile_generate: new_tokens must be at least 2 (one prefill token, one decode step)")
    out = {name: GenerateResult(name) for name in variants}
    live, tokens = {}, {}
    for name, gen in variants.items():  # first calls: compile, packing, warm-up; the tokens
        try:
            tokens[name] = gen(new_tokens)[:, -new_tokens:]
            live[name] = gen
        except Exception as e:
            if name == "eager":
                raise
            out[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    names = list(live)
    first, full = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            for n_new, acc in ((1, first), (new_tokens, full)):
                _sync(device)
                t0 = time.perf_counter()
                live[n](n_new)
                _sync(device)
                acc[n].append(time.perf_counter() - t0)
    for n in names:
        g = out[n]
        g.ttft_ms = statistics.median(first[n]) * 1e3
        decode = max(statistics.median(full[n]) * 1e3 - g.ttft_ms, 0.0)
        g.decode_ms = decode / (new_tokens - 1)
        g.tokens_per_s = batch * (new_tokens - 1) / (decode / 1e3) if decode > 0 else None
        ref, mine = tokens["eager"], tokens[n]
        g.agreement = (mine == ref).float().mean().item() if mine.shape == ref.shape else None
    return list(out.values())
