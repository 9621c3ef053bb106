"""The decode program (fastllm/models/_program.py): one Llama-family decode step as prebuilt C++ kernel calls.

It must be bit-identical to the model's forward on the direct path (same kernels, same arguments, same thread
counts): logits and the KV cache it writes, for fp32 / bf16, GQA and MHA, q/k/v bias, ragged rows, int8 and
int8_weight_only. generate() takes it when it applies and falls back to the forward otherwise (explain, another
backend, a model without a program); a weight changed in place between steps rebuilds it; a full cache raises."""

import pytest
import torch

import fastllm
from fastllm import _ext
from fastllm.models._program import DecodeProgram

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"C++ extension not loaded ({_ext.STATUS})")

V = 131


def _model(kind="llama", dtype=torch.float32, quant=None, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=96)  # fmt: skip
    cfg.update(kw)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    hf = model_cls(cfg_cls(**cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    m = fastllm.models.from_hf(hf, dtype=dtype)
    if quant:
        fastllm.quantize_(m, quant)
    return m


def _prefilled(m, lengths, max_seq_len=40):
    """Two caches holding the same ragged prompts (row b: lengths[b] tokens)."""
    caches = [m.new_cache(len(lengths), max_seq_len), m.new_cache(len(lengths), max_seq_len)]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for b, n in enumerate(lengths):
            ids = torch.randint(0, V, (1, n), generator=g)
            for c in caches:
                m(ids, c.row(b), last_only=True)
    return caches


CASES = {
    "llama-fp32-gqa": dict(),
    "llama-fp32-mha-tied": dict(num_key_value_heads=6, tie_word_embeddings=True),
    "llama-bf16": dict(dtype=torch.bfloat16),
    "qwen2-bias": dict(kind="qwen2", tie_word_embeddings=False),
    "llama-int8_weight_only": dict(quant="int8_weight_only"),
    "llama-int8": dict(quant="int8"),
    "llama-head_dim-16-bias": dict(head_dim=16, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [(5,), (7, 3, 12)], ids=["B1", "ragged3"])
def test_bit_identical_to_the_forward(case, lengths):
    m = _model(**CASES[case])
    c_fwd, c_prog = _prefilled(m, lengths)
    with torch.inference_mode():
        prog = DecodeProgram.build(m, c_prog)
        assert prog is not None, DecodeProgram.why_not(m, c_prog)
        tok = torch.randint(0, V, (len(lengths),), generator=torch.Generator().manual_seed(2))
        for _ in range(6):
            want = m(tok[:, None], c_fwd)[:, -1]
            got = prog(tok)
            assert torch.equal(got, want), (got - want).abs().max()
            assert torch.equal(c_prog.seqlens, c_fwd.seqlens)
            tok = want.float().argmax(-1)
        for a, b in zip(c_fwd.k + c_fwd.v, c_prog.k + c_prog.v, strict=True):
            assert torch.equal(a, b)


def test_generate_takes_the_program_and_matches_the_forward(monkeypatch):
    m = _model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: ragged cache lengths
    calls = []
    real = DecodeProgram.__call__

    def counted(self, tok):
        calls.append(1)
        return real(self, tok)

    monkeypatch.setattr(DecodeProgram, "__call__", counted)
    with_program = m.generate(ids, mask, max_new_tokens=12)
    assert len(calls) == 11  # every decode step (the first token comes from the prefill)
    monkeypatch.setattr(DecodeProgram, "build", classmethod(lambda cls, model, cache: None))
    calls.clear()
    without = m.generate(ids, mask, max_new_tokens=12)
    assert not calls
    assert torch.equal(with_program, without)


def test_explain_and_other_backends_run_the_forward():
    m = _model()
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    want = m.generate(ids, max_new_tokens=5)
    with fastllm.explain() as log:
        got = m.generate(ids, max_new_tokens=5)
    assert torch.equal(got, want)
    assert any(r.op == "decode_attention" or r.op == "attention_fwd" for r in log)  # the forward ran (recorded)
    c = m.new_cache(1, 16)
    with torch.inference_mode():
        assert DecodeProgram.build(m, c) is not None
        with fastllm.backend("reference"):
            assert "does not run its C++ kernel" in DecodeProgram.why_not(m, c)
            assert m.generate(ids, max_new_tokens=5).shape == want.shape  # runs (the reference rounds otherwise)
    assert DecodeProgram.why_not(m, c) == "grad mode is on"


def test_models_without_a_program():
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=6))
    g = fastllm.models.from_hf(hf.eval())
    with torch.inference_mode():
        assert "GPT2 has no decode program" in DecodeProgram.why_not(g, g.new_cache(1, 8))
    m = _model()
    with torch.inference_mode():
        inf = _model()
        fastllm.quantize_(inf, "int8_weight_only")  # quantized in inference mode: inference-tensor buffers
    with torch.inference_mode():
        assert "inference tensor" in DecodeProgram.why_not(inf, inf.new_cache(1, 8))
        assert DecodeProgram.why_not(m, m.new_cache(1, 8, dtype=torch.bfloat16)).startswith("the cache")


def test_a_weight_changed_between_steps_rebuilds():
    m = _model()
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(5))
    stream = m.generate_stream(ids, max_new_tokens=6)
    got = [next(stream), next(stream)]
    with torch.no_grad():
        m.layers[2].mlp.down_proj.weight.normal_(0, 2, generator=torch.Generator().manual_seed(6))  # packed: stale
    got += list(stream)
    # the same generation on the forward path, the weight changed at the same point
    m2 = _model()
    c = m2.new_cache(1, 12)
    with torch.inference_mode():
        logits = m2(ids, c, last_only=True)[:, -1]
        want = []
        for i in range(6):
            tok = logits.argmax(-1)
            want.append(tok)
            if i == 1:
                with torch.inference_mode(False), torch.no_grad():
                    m2.layers[2].mlp.down_proj.weight.normal_(0, 2, generator=torch.Generator().manual_seed(6))
            logits = m2(tok[:, None], c)[:, -1]
    assert torch.equal(torch.stack(got), torch.stack(want))
    assert not torch.equal(torch.stack(got), torch.stack(list(_model().generate_stream(ids, max_new_tokens=6))))


def test_a_full_cache_raises_and_writes_nothing():
    m = _model()
    (c,) = _prefilled(m, (4,), max_seq_len=5)[:1]
    with torch.inference_mode():
        prog = DecodeProgram.build(m, c)
        prog(torch.tensor([1]))  # position 4: the last slot
        assert c.seqlens.tolist() == [5]
        k = [t.clone() for t in c.k]
        with pytest.raises(ValueError, match="full"):
            prog(torch.tensor([2]))
        assert c.seqlens.tolist() == [5] and all(torch.equal(a, b) for a, b in zip(k, c.k, strict=True))
        with pytest.raises(IndexError):
            prog(torch.tensor([V]))  # a token id out of range: index_select raises
