"""Models: the zoo's Llama generating at the SmolLM2-135M shape against Hugging Face's `generate`, and the per-call
overhead and thread-count rows that decide what one decode step costs (a 30-layer step makes ~300 op calls).

Llama rows (CPU). transformers.LlamaConfig: vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads / 3 kv
heads, head_dim 64, tied embeddings, rope_theta 1e5; random weights (seed 0, std 0.1: see SMOLLM2). B in {1, 8}, a
32-token prompt, 128 new tokens (--bench-quick: 16), greedy; fp32, bf16 and int8_weight_only (ours:
fastllm.quantize_(model, "int8_weight_only"); the peers stay HF fp32, plus "fbgemm": HF sdpa after torch's dynamic
int8 quantization).
Implementations: "fastllm" (fastllm.models.generate on fastllm.models.from_hf of the HF model), "eager" (HF
generate, attn_implementation="eager"), "sdpa" (HF, "sdpa"), "torch.compile" (HF generate with its static cache
and its compiled decode forward, CompileConfig(mode="default", fullgraph=True), decode rows only: HF compiles the
decode step, not the prefill). HF runs with eos disabled and min_new_tokens = max_new_tokens, so every
implementation generates the same number of tokens.

- "llama prefill+1st" rows: time to first token. Ours: what generate does before its first token (validation,
  cache allocation, the batched prefill with the lm_head on the last position, the argmax); HF:
  generate(max_new_tokens=1). Output: the next-token logits (B, V) (HF's: captured by a logits processor), judged
  under the criterion against HF's forward in float64 on the same weights (bf16: the bf16-rounded weights); int8
  rows: max err only. TFLOP/s: 2 x (linear weights) x B x S (+ the lm_head once per row and the attention).
- "llama decode" rows: the other N - 1 tokens (N - 1 decode steps). The first token is produced before the timed
  call: ours by pulling it from generate_stream; HF's generate runs in a worker thread whose streamer holds it
  after its first token until the timed call lets it go on. GB/s: the weight bytes one decode step reads (every
  linear weight, the tied embedding once as the lm_head; the KV cache, under 1% here, is not counted) x steps /
  time, and "% ceil" of the copy ceiling the harness measures. The impl column adds decode tokens/s
  (B x (N - 1) / time). "max err" of these rows is the fraction of the N generated tokens that differ from HF fp32
  eager greedy ("token mismatch"; the second output, "token count", checks that all generated B x N tokens).

Per-call overhead rows (fp32, in inference_mode): fastllm.layer_norm on 1x64, fastllm.linear 64 -> 64 (1 row),
fastllm.decode_attention (B=1, H=1, S=64, D=64) against torch's own op (F.layer_norm, F.linear,
F.scaled_dot_product_attention), 100 calls per timed call (the median column is per 100 calls).

Thread rows: the decode-shaped calls fastllm.linear 1 x 4096 -> 4096 fp32 and Int8Linear w8a16 at that shape, and
F.linear, at torch.set_num_threads(1) ("-1t") and 2 (the default here), cycling through enough layers that every
call reads its weights from DRAM.

The CPU the table came from is in its header; on 2 shared cores, compare ratios measured in the same run.
"""

import contextlib
import copy
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, devices, dtype_name
from harness import Case, Impl

import fastllm
from fastllm.models.generate import _check_prompt, prefill, sample

PROMPT = 32
NEW, QUICK_NEW = 128, 16
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
               max_position_embeddings=2048, initializer_range=0.1)  # fmt: skip
# initializer_range: at HF's default std 0.02 the random model (tied embeddings) repeats its last prompt token forever,
# which would make the token agreement of the decode rows trivially 100%; at 0.1 every step's token varies
INT8 = "int8_weight_only"
OVERHEAD_CALLS = 100


def _cpu_only():
    if "cpu" not in devices():
        pytest.skip("CPU suite")


# --------------------------------------------------------------------------------------------------
# the models, built once per session


class _Models:
    """HF fp32 (eager, sdpa and compile variants sharing one set of weights), its bf16 copy, ours from each, ours
    int8_weight_only, HF + dynamic int8; built on first use."""

    def __init__(self):
        self._m: dict = {}
        self._ref_tokens: dict = {}
        self._ref_logits: dict = {}

    def hf(self, dtype, attn: str = "eager"):
        key = ("hf", dtype, attn)
        if key not in self._m:
            if attn != "eager":  # the same weights under another attention implementation (shared, not copied)
                base = self.hf(dtype)
                m = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
                m.set_attn_implementation("sdpa")
            elif dtype == torch.float32:
                transformers = pytest.importorskip("transformers")
                torch.manual_seed(0)
                cfg = transformers.LlamaConfig(**SMOLLM2, attn_implementation="eager")
                m = transformers.LlamaForCausalLM(cfg).eval()
                m.generation_config.eos_token_id = None  # every implementation generates the same count
                m.generation_config.pad_token_id = 0
            else:
                m = copy.deepcopy(self.hf(torch.float32)).to(dtype)
            self._m[key] = m
        return self._m[key]

    def ours(self, dtype):
        key = ("ours", dtype)
        if key not in self._m:
            if dtype == INT8:
                self._m[key] = fastllm.quantize_(fastllm.models.from_hf(self.hf(torch.float32)), INT8)
            else:
                self._m[key] = fastllm.models.from_hf(self.hf(dtype))
        return self._m[key]

    def hf_fbgemm(self):
        if "fbgemm" not in self._m:
            hf = self.hf(torch.float32, "sdpa")
            self._m["fbgemm"] = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
        return self._m["fbgemm"]

    def ref_tokens(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """HF fp32 eager greedy: the tokens every decode row is compared with."""
        key = (ids.shape[0], n)
        if key not in self._ref_tokens:
            self._ref_tokens[key] = _hf_generate(self.hf(torch.float32), ids, n)
        return self._ref_tokens[key]

    def ref_logits(self, dtype, ids: torch.Tensor) -> torch.Tensor:
        """HF's forward in float64 on the case's weights (int8: the float ones): next-token logits (B, V)."""
        key = (dtype, ids.shape[0])
        if key not in self._ref_logits:
            src = self.hf(torch.float32 if dtype == INT8 else dtype)
            f64 = copy.deepcopy(src).double()
            with torch.inference_mode():
                self._ref_logits[key] = f64(ids).logits[:, -1]
            del f64
        return self._ref_logits[key]


_MODELS = _Models()


def _op(name, dtype):
    return f"{name} {INT8}" if dtype == INT8 else name  # (int8 rows are fp32 rows in the table's dtype column)


def _prompt(B: int) -> torch.Tensor:
    return torch.randint(0, SMOLLM2["vocab_size"], (B, PROMPT), generator=torch.Generator().manual_seed(B))


class _Prompt:  # not a tensor: the harness neither clones nor converts it to float64
    def __init__(self, ids):
        self.ids = ids


def _hf_kwargs(ids, n):
    return dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0)  # fmt: skip


def _hf_generate(hf, ids, n, **kw):
    with torch.inference_mode():
        return hf.generate(ids, **_hf_kwargs(ids, n), **kw)


def _compile_kwargs() -> dict:
    from transformers import CompileConfig

    cc = CompileConfig(mode="default", fullgraph=True)  # (reduce-overhead: CUDA graphs, nothing on CPU)
    cc._compile_all_devices = True  # HF auto-compiles on CUDA only unless told
    return dict(cache_implementation="static", compile_config=cc)


def _step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter (Int8Linear: its int8 weight, scales and bias),
    except an embedding table that is only gathered from (a tied one is read in full as the lm_head, counted once).
    Buffers such as the rotary tables are gathered from too and not counted."""
    seen, total = set(), 0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for mod in model.modules():
        if isinstance(mod, fastllm.nn.Int8Linear):
            ts = [t for t in (mod.weight, mod.weight_scale, mod.bias) if t is not None]
        elif isinstance(mod, torch.ao.nn.quantized.dynamic.Linear):  # (unpacked copies: counted, not deduplicated)
            w, b = mod._packed_params._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
            continue
        elif isinstance(mod, torch.nn.Embedding) and id(mod.weight) not in linear_weights:
            continue
        else:
            ts = list(mod.parameters(recurse=False))
        for t in ts:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _prefill_flops(B: int) -> int:
    c = SMOLLM2
    d, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    hq, hkv, D, inter = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]
    per_layer = d * (hq + 2 * hkv) * D + hq * D * d + 3 * d * inter
    attn = L * hq * 4 * D * PROMPT * (PROMPT + 1) // 2  # QK^T and PV: 2 D flops each per causal (query, key) pair
    return 2 * B * PROMPT * L * per_layer + 2 * B * d * V + B * attn


# --------------------------------------------------------------------------------------------------
# time to first token


def _ours_first(model, ids, n):
    """What generate does before it yields its first token; the next-token logits (B, V)."""
    spans = _check_prompt(model, ids, None, n)
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
        logits = prefill(model, ids, spans, cache)
        sample(logits, False, 1.0, None, None, None)
    return logits


def _hf_first(hf, dtype):
    """HF generate(max_new_tokens=1); its next-token logits captured by a logits processor (one (B, V) clone; the
    call is otherwise the plain one a user makes)."""
    from transformers import LogitsProcessorList

    def run(p):
        seen = []

        def capture(input_ids, scores):
            seen.append(scores.clone())
            return scores

        with torch.inference_mode():
            hf.generate(p.ids, **_hf_kwargs(p.ids, 1), logits_processor=LogitsProcessorList([capture]))
        return seen[0].to(dtype)  # (HF upcasts the logits to fp32 before the processors: exact, cast back)

    return run


def make_ttft_case(B, dtype, n):
    ids = _prompt(B)
    m = _MODELS
    model_dtype = torch.float32 if dtype == INT8 else dtype
    ours = m.ours(dtype)
    impls = {"fastllm": lambda p: _ours_first(ours, p.ids, n), "eager": _hf_first(m.hf(model_dtype), model_dtype),
             "sdpa": _hf_first(m.hf(model_dtype, "sdpa"), model_dtype)}  # fmt: skip
    if dtype == INT8:
        impls["fbgemm"] = _hf_first(m.hf_fbgemm(), torch.float32)
    return Case(_op("llama prefill+1st", dtype), (B, PROMPT), torch.float32 if dtype == INT8 else dtype, "cpu",
                lambda: (_Prompt(ids),), impls, lambda p: m.ref_logits(dtype, ids), flops=_prefill_flops(B),
                criterion=dtype != INT8, names=("next-token logits",))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# decode: the tokens after the first


class _Split:
    """Split one generate call at its first token: `context()` runs it up to the first token (outside the timed
    region) and `fn()` lets it finish. The result is the (B, N) new tokens."""

    def __init__(self, start):
        self.start = start  # () -> (first tokens (B,), finish: () -> the other tokens (B, N - 1))
        self.first, self.finish = None, None

    @contextlib.contextmanager
    def context(self):
        self.first, self.finish = self.start()
        try:
            yield
        finally:
            self.first = self.finish = None

    def fn(self, _prompt):
        return torch.cat([self.first[:, None], self.finish()], dim=1)


def _ours_start(model, ids, n):
    def start():
        it = fastllm.models.generate_stream(model, ids, max_new_tokens=n)
        first = next(it)
        return first, lambda: torch.stack(list(it), dim=1)

    return start


def _hf_start(hf, ids, n, **kw):
    """HF generate in a worker thread; its streamer (put: the prompt, then one (B,) token per step) holds the
    thread after the first new token until finish() releases it."""
    from transformers.generation.streamers import BaseStreamer

    class Gate(BaseStreamer):
        def __init__(self):
            self.calls, self.first, self.go = 0, threading.Event(), threading.Event()
            self.token = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first new token
                self.token = value.reshape(-1).clone()
                self.first.set()
                self.go.wait()

        def end(self):
            self.first.set()

    def start():
        gate, box = Gate(), {}

        def work():
            try:
                box["out"] = _hf_generate(hf, ids, n, streamer=gate, **kw)
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e
                gate.first.set()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        gate.first.wait()

        def finish():
            gate.go.set()
            t.join()
            if "err" in box:
                raise box["err"]
            return box["out"][:, ids.shape[1] + 1 :]

        if "err" in box:
            finish()
        return gate.token, finish

    return start


def _judged(split, ref):
    """The split's fn, returning (fraction of tokens that differ from ref, number of tokens) as float64 scalars."""

    def run(p):
        toks = split.fn(p)  # (B, N)
        differ = (toks != ref).double().mean() if toks.shape == ref.shape else torch.tensor(1.0, dtype=torch.float64)
        return differ, torch.tensor(float(toks.numel()), dtype=torch.float64)

    return Impl(run, split.context)


def make_decode_case(B, dtype, n, with_compile):
    ids = _prompt(B)
    m = _MODELS
    ref = m.ref_tokens(ids, n)[:, PROMPT:]  # (B, n)
    model_dtype = torch.float32 if dtype == INT8 else dtype
    starts = {"fastllm": _ours_start(m.ours(dtype), ids, n), "eager": _hf_start(m.hf(model_dtype), ids, n),
              "sdpa": _hf_start(m.hf(model_dtype, "sdpa"), ids, n)}  # fmt: skip
    if dtype == INT8:
        starts["fbgemm"] = _hf_start(m.hf_fbgemm(), ids, n)
    if with_compile:
        starts["torch.compile"] = _hf_start(_hf_compiled(model_dtype), ids, n, **_compile_kwargs())
    impls = {k: _judged(_Split(s), ref) for k, s in starts.items()}
    case = Case(_op("llama decode", dtype), (B, PROMPT, n), torch.float32 if dtype == INT8 else dtype, "cpu",
                lambda: (_Prompt(ids),), impls, lambda p: (torch.tensor(0.0, dtype=torch.float64),
                                                           torch.tensor(float(B * n), dtype=torch.float64)),
                bytes=(n - 1) * _step_bytes(m.ours(dtype)), criterion=False,
                names=("token mismatch", "token count"))  # fmt: skip
    # per-row weight bytes where an implementation reads other weights than ours (int8 rows: HF reads fp32)
    row_bytes = {"eager": _step_bytes(m.hf(model_dtype)), "sdpa": _step_bytes(m.hf(model_dtype)),
                 "torch.compile": _step_bytes(m.hf(model_dtype))}  # fmt: skip
    if dtype == INT8:
        row_bytes["fbgemm"] = _step_bytes(m.hf_fbgemm())
    return case, {k: (n - 1) * v for k, v in row_bytes.items()}


def _hf_compiled(dtype):
    """A third HF instance on the same weights: generate compiles and caches its decode forward on the instance."""
    key = ("hf", dtype, "compile")
    if key not in _MODELS._m:
        base = _MODELS.hf(dtype, "sdpa")
        _MODELS._m[key] = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
    return _MODELS._m[key]


# --------------------------------------------------------------------------------------------------
# per-call overhead and threads


def make_overhead_case(op):
    def loop(f):
        def run(*args):
            for _ in range(OVERHEAD_CALLS - 1):
                f(*args)
            return f(*args)

        return Impl(run, torch.inference_mode)

    if op == "layer_norm":

        def make_inputs():
            return torch.randn(1, 64), 1 + 0.5 * torch.randn(64), torch.randn(64)

        fast = lambda x, w, b: fastllm.layer_norm(x, weight=w, bias=b, eps=1e-5)
        eager = lambda x, w, b: F.layer_norm(x, (64,), w, b, 1e-5)
        shape = (1, 64)
    elif op == "linear":

        def make_inputs():
            return torch.randn(1, 64), torch.randn(64, 64) / 8, torch.randn(64)

        fast = lambda x, w, b: fastllm.linear(x, w, b)
        eager = F.linear
        shape = (1, 64, 64)
    else:
        lens = torch.full((1,), 64, dtype=torch.int32)

        def make_inputs():
            return torch.randn(1, 1, 1, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)

        fast = lambda q, k, v: fastllm.decode_attention(q, k, v, lens)
        eager = F.scaled_dot_product_attention
        shape = (1, 1, 64, 64)
    return Case(f"{op} x{OVERHEAD_CALLS} calls", shape, torch.float32, "cpu", make_inputs,
                {"fastllm": loop(fast), "eager": loop(eager)}, eager, names=("out",))  # fmt: skip


@contextlib.contextmanager
def _threads(n):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def make_threads_case(kind):
    import machine

    K = N = 4096
    elem = 4 if kind == "fp32" else 1
    # enough layers that the weights cycled through exceed twice the last-level cache: each call reads from DRAM
    layers = max(2, math.ceil(2 * machine.llc("cpu")[0] / (N * K * elem)) + 1)
    torch.manual_seed(0)
    lins = [torch.nn.Linear(K, N, bias=False).requires_grad_(False) for _ in range(layers)]
    x0 = torch.randn(1, K)
    if kind == "fp32":
        mods = [lambda x, w=lin.weight: fastllm.linear(x, w) for lin in lins]
        for f in mods:  # the packed weights are cached on the first call: here, outside the timed rounds
            f(x0)
    else:
        mods = [fastllm.nn.Int8Linear.from_float(lin, "w8a16") for lin in lins]
        for f in mods:
            f(x0)

    def cycled(fs):
        state = {"i": 0}

        def run(x):  # the next layer on every call; the first (checked) call: layer 0
            f = fs[state["i"] % len(fs)]
            state["i"] += 1
            return f(x)

        return run

    eager = [lambda x, w=lin.weight: F.linear(x, w) for lin in lins]
    impls = {}
    for t in (2, 1):
        sfx = "" if t == 2 else "-1t"
        impls[f"fastllm{sfx}"] = Impl(cycled(mods), lambda t=t: _threads(t))
        impls[f"eager{sfx}"] = Impl(cycled(eager), lambda t=t: _threads(t))
    w0 = lins[0].weight.double()
    op = "linear" if kind == "fp32" else "linear w8a16"
    case = Case(f"{op} 1/2 threads ({layers} layers cycled)", (1, K, N), torch.float32, "cpu",
                lambda: (torch.randn(1, K),), impls, lambda x: x @ w0.t(), bytes=N * K * elem,
                criterion=kind == "fp32", names=("y",))  # fmt: skip
    return case, {"eager": N * K * 4, "eager-1t": N * K * 4}  # (F.linear reads the fp32 weight)


# --------------------------------------------------------------------------------------------------
# the items


def _llama_params():
    return [(kind, B, dtype) for kind in ("prefill+1st", "decode") for dtype in (torch.float32, torch.bfloat16, INT8)
            for B in (1, 8)]  # fmt: skip


def _llama_id(p):
    kind, B, dtype = p
    return f"cpu-{kind}-B{B}-{dtype if dtype == INT8 else dtype_name(dtype)}"


def _llama_quick(p):
    return p in {("prefill+1st", 1, torch.float32), ("decode", 1, torch.float32), ("decode", 1, INT8)}


@pytest.mark.parametrize("p", cases(_llama_params(), _llama_id, _llama_quick))
def bench_llama(benchmark, harness, use_compile, p):
    _cpu_only()
    kind, B, dtype = p
    n = QUICK_NEW if harness.quick else NEW
    if kind == "prefill+1st":
        harness.run_case(benchmark, make_ttft_case(B, dtype, n))
        return
    why = _no_compile_why(use_compile, harness, dtype)
    if why:  # compiling HF's 30-layer decode step took 150 s on 2 cores (Zen 3), again for every dtype and batch
        warnings.warn(f"{_llama_id(p)}: no HF torch.compile row ({why}; it compiles for minutes per dtype and batch "
                      "on a 2-core CPU)", stacklevel=1)  # fmt: skip
    with_compile = why is None
    case, row_bytes = make_decode_case(B, dtype, n, with_compile)
    try:
        harness.run_case(benchmark, case)
    finally:  # (also when the item fails: its rows are in the table)
        _annotate(harness, case, row_bytes, tokens=B * (n - 1))


def _annotate(harness, case, row_bytes, tokens=None):
    """The case's rows: per-row weight bytes where an implementation reads other weights than the case's bytes say,
    and (decode rows) tokens/s in the impl label."""
    for r in harness.rows:
        name = r.impl.split(" (")[0]
        if (r.op, r.shape, r.dtype) != (case.op, "x".join(map(str, case.shape)), dtype_name(case.dtype)):
            continue
        r.bytes = row_bytes.get(name, r.bytes)
        if tokens:
            tps = tokens / (r.median_us * 1e-6)
            r.impl = f"{r.impl[:-1]}, {tps:.1f} tok/s)" if r.impl.endswith(")") else f"{r.impl} ({tps:.1f} tok/s)"


@pytest.mark.parametrize("op", cases(["layer_norm", "linear", "decode_attention"], str, lambda op: True))
def bench_overhead(benchmark, harness, op):
    _cpu_only()
    harness.run_case(benchmark, make_overhead_case(op))


@pytest.mark.parametrize("kind", cases(["fp32", "w8a16"], str, lambda k: True))
def bench_threads(benchmark, harness, kind):
    _cpu_only()
    case, row_bytes = make_threads_case(kind)
    try:
        harness.run_case(benchmark, case)
    finally:
        _annotate(harness, case, row_bytes)


# --------------------------------------------------------------------------------------------------
# encoders: BERT (MiniLM and BERT-base shapes), ViT-B/16, CLIP ViT-B/32, random weights (HF's init, seed 0)

ENC_B, BERT_S = 8, 256
CLIP_TEXT_S = 77
ENCODERS = {  # name -> (HF config class, its arguments)
    "minilm": ("BertConfig", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536)),
    "bert-base": ("BertConfig", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072)),
    "vit-b16": ("ViTConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, image_size=224, patch_size=16)),
    "clip-b32": ("CLIPConfig", dict(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=32), projection_dim=512)),
}  # fmt: skip


class _Enc:
    """The encoder models, built on first use: HF fp32 eager, the same weights under sdpa and compiled, bf16 copies,
    ours from each, float64 references."""

    def __init__(self):
        self._m: dict = {}

    def hf(self, name, dtype, attn="eager"):
        key = (name, dtype, attn)
        if key not in self._m:
            if attn != "eager":
                base = self.hf(name, dtype)
                m = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
                if attn == "compile":  # (CLIP: each tower; get_*_features of a compiled CLIPModel would run eager)
                    m.set_attn_implementation("sdpa")
                    if name == "clip-b32":
                        m.vision_model, m.text_model = torch.compile(m.vision_model), torch.compile(m.text_model)
                    else:
                        m = torch.compile(m)
                else:
                    m.set_attn_implementation(attn)
            elif dtype == torch.float32:
                transformers = pytest.importorskip("transformers")
                cls_name, kw = ENCODERS[name]
                torch.manual_seed(0)
                cfg = getattr(transformers, cls_name)(**kw, attn_implementation="eager")
                model_cls = {"BertConfig": "BertModel", "ViTConfig": "ViTModel", "CLIPConfig": "CLIPModel"}[cls_name]
                extra = {} if cls_name == "CLIPConfig" else {"add_pooling_layer": False}
                m = getattr(transformers, model_cls)(cfg, **extra).eval()
            else:
                m = copy.deepcopy(self.hf(name, torch.float32)).to(dtype)
            self._m[key] = m
        return self._m[key]

    def ours(self, name, dtype):
        key = (name, dtype, "ours")
        if key not in self._m:
            self._m[key] = fastllm.models.from_hf(self.hf(name, dtype))
        return self._m[key]


_ENC = _Enc()


class _EncInputs:  # not tensors: the harness neither clones nor converts them to float64
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _ragged_mask(B, S, lo, seed):
    lengths = torch.randint(lo, S + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = S  # one full row: the padded length is the batch's longest
    return (torch.arange(S)[None, :] < lengths[:, None]).long()


def _enc_inputs(name, dtype):
    g = torch.Generator().manual_seed(3)
    if name in ("minilm", "bert-base"):
        ids = torch.randint(0, 30522, (ENC_B, BERT_S), generator=g)
        return _EncInputs(ids=ids, mask=_ragged_mask(ENC_B, BERT_S, BERT_S // 2, 4))
    px = torch.randn(ENC_B, 3, 224, 224, generator=g)
    if name == "vit-b16":
        return _EncInputs(px=px)
    mask = _ragged_mask(ENC_B, CLIP_TEXT_S, 5, 5)
    ids = torch.randint(0, 49405, (ENC_B, CLIP_TEXT_S), generator=g)
    eos = 49407  # CLIPTextConfig's eos_token_id: HF and ours pool at its first occurrence
    for b, n in enumerate(mask.sum(1).tolist()):
        ids[b, n - 1], ids[b, n:] = eos, eos
    return _EncInputs(ids=ids, mask=mask, px=px)


def _hf_enc(name, model, dtype):
    def run(p):
        with torch.inference_mode():
            if name in ("minilm", "bert-base"):
                return model(input_ids=p.ids, attention_mask=p.mask).last_hidden_state
            if name == "vit-b16":
                return model(pixel_values=p.px.to(dtype)).last_hidden_state
            img = model.get_image_features(pixel_values=p.px.to(dtype)).pooler_output
            txt = model.get_text_features(input_ids=p.ids, attention_mask=p.mask).pooler_output
            return img, txt

    return run


def _ours_enc(name, model):
    def run(p):
        with torch.inference_mode():
            if name in ("minilm", "bert-base"):
                return model(p.ids, p.mask)
            if name == "vit-b16":
                return model(p.px)
            return model.encode_image(p.px), model.encode_text(p.ids, p.mask)

    return run


def _layer_flops(T, B, S, d, inter, causal=False):
    """One Transformer layer over T = B * S tokens: q/k/v/o and the two FFN GEMMs, and QK^T + PV (half if causal)."""
    attn = 4 * B * S * S * d
    return 2 * T * (4 * d * d + 2 * d * inter) + (attn // 2 if causal else attn)


def _enc_flops(name) -> int:
    _, kw = ENCODERS[name]
    if name in ("minilm", "bert-base"):
        d, L, inter = kw["hidden_size"], kw["num_hidden_layers"], kw["intermediate_size"]
        return L * _layer_flops(ENC_B * BERT_S, ENC_B, BERT_S, d, inter)
    total = 0
    v = kw if name == "vit-b16" else kw["vision_config"]
    n = (v["image_size"] // v["patch_size"]) ** 2
    total += 2 * ENC_B * n * 3 * v["patch_size"] ** 2 * v["hidden_size"]  # the patch embedding
    total += v["num_hidden_layers"] * _layer_flops(ENC_B * (n + 1), ENC_B, n + 1, v["hidden_size"],
                                                   v["intermediate_size"])  # fmt: skip
    if name == "clip-b32":
        t = kw["text_config"]
        total += t["num_hidden_layers"] * _layer_flops(ENC_B * CLIP_TEXT_S, ENC_B, CLIP_TEXT_S, t["hidden_size"],
                                                       t["intermediate_size"], causal=True)  # fmt: skip
    return total


def make_encoder_case(name, dtype, with_compile):
    p = _enc_inputs(name, dtype)
    impls = {"fastllm": _ours_enc(name, _ENC.ours(name, dtype)), "eager": _hf_enc(name, _ENC.hf(name, dtype), dtype),
             "sdpa": _hf_enc(name, _ENC.hf(name, dtype, "sdpa"), dtype)}  # fmt: skip
    if with_compile:
        impls["torch.compile"] = _hf_enc(name, _ENC.hf(name, dtype, "compile"), dtype)

    def reference(_p):
        f64 = copy.deepcopy(_ENC.hf(name, dtype)).double()  # (bf16: the bf16-rounded weights, exactly)
        out = _hf_enc(name, f64, torch.float64)(p)
        del f64
        return out

    names = ("image_embeds", "text_embeds") if name == "clip-b32" else ("last_hidden_state",)
    shape = (ENC_B, BERT_S) if name in ("minilm", "bert-base") else (ENC_B, 3, 224, 224)
    what = {"minilm": "MiniLM (BERT) padded", "bert-base": "BERT-base padded", "vit-b16": "ViT-B/16",
            "clip-b32": "CLIP ViT-B/32 image+text"}[name]  # fmt: skip
    return Case(f"{what}", shape, dtype, "cpu", lambda: (p,), impls, reference, flops=_enc_flops(name),
                names=names)  # fmt: skip


def _no_compile_why(use_compile, harness, dtype):
    """Why a case has no HF torch.compile row (None: it has one): fp32 rows only, not under --bench-quick."""
    return ("--no-compile" if not use_compile else "--bench-quick" if harness.quick
            else None if dtype == torch.float32 else "fp32 rows only")  # fmt: skip


def _encoder_id(p):
    name, dtype = p
    return f"cpu-{name}-{dtype_name(dtype)}"


@pytest.mark.parametrize("p", cases([(n, dt) for n in ENCODERS for dt in (torch.float32, torch.bfloat16)],
                                    _encoder_id, lambda p: p == ("minilm", torch.float32)))  # fmt: skip
def bench_encoder(benchmark, harness, use_compile, p):
    _cpu_only()
    name, dtype = p
    why = _no_compile_why(use_compile, harness, dtype)
    if why:
        warnings.warn(f"{_encoder_id(p)}: no HF torch.compile row ({why})", stacklevel=1)
    harness.run_case(benchmark, make_encoder_case(name, dtype, why is None))


# --------------------------------------------------------------------------------------------------
# fastllm.accelerate on the HF encoders (issue 13): the same HF models, the same weights, accelerated in place
#
# Rows: "fastllm.accelerate" (a copy of the HF fp32 eager model sharing its Parameters, after fastllm.accelerate:
# attention through attn_implementation "fastllm", the MLPs / BERT's post-norm outputs / LayerNorms swapped),
# "fastllm zoo" (fastllm.models.from_hf on the same weights), HF "eager" (the baseline), "sdpa" and (fp32, not
# --bench-quick) "torch.compile". Targets (issue 13): accelerated fp32 >= 1.25x HF SDPA, within 15% of the zoo.

ACCEL_ENCODERS = ("minilm", "vit-b16", "clip-b32")
_ACCEL: dict = {}


def _accelerated(name, dtype):
    key = (name, dtype)
    if key not in _ACCEL:
        base = _ENC.hf(name, dtype)
        m = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
        _ACCEL[key] = fastllm.accelerate(m)
    return _ACCEL[key]


def make_accelerate_case(name, dtype, with_compile):
    case = make_encoder_case(name, dtype, with_compile)
    zoo = case.impls.pop("fastllm")
    accel = _hf_enc(name, _accelerated(name, dtype), dtype)
    case.impls = {"fastllm.accelerate": Impl(accel), "fastllm zoo": zoo, **case.impls}
    case.op = f"{case.op} accelerate"
    return case


@pytest.mark.parametrize("p", cases([(n, dt) for n in ACCEL_ENCODERS for dt in (torch.float32, torch.bfloat16)],
                                    _encoder_id, lambda p: p == ("minilm", torch.float32)))  # fmt: skip
def bench_accelerate(benchmark, harness, use_compile, p):
    _cpu_only()
    name, dtype = p
    why = _no_compile_why(use_compile, harness, dtype)
    if why:
        warnings.warn(f"{_encoder_id(p)}: no HF torch.compile row ({why})", stacklevel=1)
    harness.run_case(benchmark, make_accelerate_case(name, dtype, why is None))


# Llama decode accelerated (issue 13): HF generate on a copy of the HF SDPA model sharing its Parameters, after
# fastllm.accelerate (attention "fastllm", rotary, RMSNorm, gated MLP, q/k/v/o and lm_head on fastllm.linear),
# against the rows of bench_llama's decode case ("fastllm zoo" = fastllm.models.generate).
# Target (issue 13): fp32 B=1 >= 2x HF SDPA.


def _llama_accelerated(dtype):
    key = ("accelerate", dtype)
    if key not in _MODELS._m:
        base = _MODELS.hf(dtype, "sdpa")
        m = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
        _MODELS._m[key] = fastllm.accelerate(m)
    return _MODELS._m[key]


def make_accelerate_decode_case(B, dtype, n, with_compile):
    case, row_bytes = make_decode_case(B, dtype, n, with_compile)
    ids = _prompt(B)
    ref = _MODELS.ref_tokens(ids, n)[:, PROMPT:]  # (B, n)
    accel = _judged(_Split(_hf_start(_llama_accelerated(dtype), ids, n)), ref)
    zoo = case.impls.pop("fastllm")
    case.impls = {"fastllm.accelerate": accel, "fastllm zoo": zoo, **case.impls}
    case.op = f"{case.op} accelerate"
    row_bytes["fastllm.accelerate"] = row_bytes["sdpa"]  # (HF's weights, as the SDPA row)
    return case, row_bytes


@pytest.mark.parametrize("p", cases([(1, torch.float32), (1, torch.bfloat16)], lambda p: f"cpu-decode-B{p[0]}-"
                                    f"{dtype_name(p[1])}", lambda p: p == (1, torch.float32)))  # fmt: skip
def bench_accelerate_llama(benchmark, harness, use_compile, p):
    _cpu_only()
    B, dtype = p
    n = QUICK_NEW if harness.quick else NEW
    why = _no_compile_why(use_compile, harness, dtype)
    if why:
        warnings.warn(f"accelerate llama B{B} {dtype_name(dtype)}: no HF torch.compile row ({why})", stacklevel=1)
    case, row_bytes = make_accelerate_decode_case(B, dtype, n, why is None)
    try:
        harness.run_case(benchmark, case)
    finally:
        _annotate(harness, case, row_bytes, tokens=B * (n - 1))
