"""fastllm.accelerate / fastllm.restore: torch.nn and Hugging Face transformers models, swapped in place.

Criterion (fastllm.testing): the unpatched model in float64 is the reference (transformers: torch's SDPA, which is
float64 math, and for the Llama family an RMSNorm and rotary tables in float64, because HF computes those in fp32
even in a float64 model), the unpatched model in the same dtype the eager baseline; the accelerated model in fp32
and bf16 must stay within 2x the baseline's error (+ a floor). Norms and biases are perturbed (HF initializes them
to 1 / 0), sizes odd, paddings ragged / left / right. Exactness where it is owed: the fallback calls (need_weights,
output_attentions), restore, greedy generate (token-identical), state-dict keys and tensors.
"""

import copy
import functools
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastllm
from fastllm.integrations import engine, hf, torch_nn
from fastllm.testing import assert_equivalent

V = 131  # odd vocabulary


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _classes(model):
    return [type(m) for m in model.modules()]


# ==================================================================================================
# torch.nn


def _mha(batch_first=True, **kw):
    torch.manual_seed(0)
    return _perturb(nn.MultiheadAttention(48, 6, batch_first=batch_first, **kw).eval())


def _three(module):
    """(accelerated in fp32, unpatched fp32, unpatched float64) copies of an unpatched module."""
    return fastllm.accelerate(copy.deepcopy(module)), module, copy.deepcopy(module).double()


MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn3d_float", "kpm_bool+attn2d_float", "causal_hint"]


def _mha_masks(kind, B=3, L=13, S=13, H=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 9:], kpm[2, 4:] = True, True  # ragged padding (True = ignore, torch's convention)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)  # True above the diagonal: not allowed
    if kind == "none":
        return {}
    if kind == "kpm_bool":
        return {"key_padding_mask": kpm}
    if kind == "kpm_float":
        return {"key_padding_mask": torch.zeros(B, S, dtype=dtype).masked_fill(kpm, float("-inf"))}
    if kind == "attn2d_bool":
        return {"attn_mask": causal}
    if kind == "attn3d_float":
        return {"attn_mask": torch.randn(B * H, L, S, generator=g).to(dtype)}
    if kind == "kpm_bool+attn2d_float":
        return {"key_padding_mask": kpm, "attn_mask": torch.randn(L, S, generator=g).to(dtype)}
    assert kind == "causal_hint"
    return {"attn_mask": causal, "is_causal": True}


def _cast_masks(masks, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in masks.items()}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", MASKS)
def test_mha_criterion(batch_first, masks):
    """Self-attention through qkv_projection + flash attention + linear, with every mask form torch takes."""
    ours, eager, ref = _three(_mha(batch_first))
    assert type(ours).__name__ == "FastMultiheadAttention" and isinstance(ours, nn.MultiheadAttention)
    x = torch.randn(3, 13, 48) if batch_first else torch.randn(13, 3, 48)
    kw = _mha_masks(masks)
    with torch.no_grad():
        out = ours(x, x, x, need_weights=False, **kw)[0]
        e = eager(x, x, x, need_weights=False, **kw)[0]
        r = ref(x.double(), x.double(), x.double(), need_weights=False, **_cast_masks(kw, torch.float64))[0]
    assert_equivalent(out, e, r, f"mha {masks} batch_first={batch_first}")


def test_mha_without_bias_criterion():
    """bias=False (no in_proj_bias, no out_proj.bias), self-attention with a key_padding_mask."""
    ours, eager, ref = _three(_mha(bias=False))
    x = torch.randn(3, 13, 48)
    kw = _mha_masks("kpm_bool")
    with torch.no_grad():
        args = [(m, x.to(dt)) for m, dt in ((ours, torch.float32), (eager, torch.float32), (ref, torch.float64))]
        out, e, r = (m(xi, xi, xi, need_weights=False, **kw)[0] for m, xi in args)
    assert_equivalent(out, e, r, "mha bias=False")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mha_cross_attention_criterion(dtype):
    """query != key (S 9 vs L 13), key_padding_mask: three fastllm.linear projections; fp32 and bf16."""
    ours, eager, ref = _three(_mha())
    ours, eager = ours.to(dtype), copy.deepcopy(eager).to(dtype)
    q, kv = torch.randn(3, 13, 48), torch.randn(3, 9, 48)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    with torch.no_grad():
        out = ours(q.to(dtype), kv.to(dtype), kv.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
        e = eager(q.to(dtype), kv.to(dtype), kv.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
        r = ref(q.double(), kv.double(), kv.double(), key_padding_mask=kpm, need_weights=False)[0]
    assert out.dtype == dtype
    assert_equivalent(out, e, r, f"mha cross {dtype}")


def test_mha_need_weights_is_the_original_call():
    """need_weights=True (nn.MultiheadAttention's default) runs torch's own forward: bit-identical, weights given."""
    ours, eager, _ = _three(_mha())
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        out, w = ours(x, x, x)
        e, we = eager(x, x, x)
    assert w is not None and torch.equal(out, e) and torch.equal(w, we)


def test_mha_gradients_and_optimizer_step():
    """Gradients of the input and of every parameter meet the criterion; after an SGD step the next forward reads
    the updated Parameters (it equals torch's forward of the same module)."""
    ours, eager, ref = _three(_mha())
    x = torch.randn(3, 13, 48)
    kw = _mha_masks("kpm_bool")
    grads = []
    for m, dt in ((ours, torch.float32), (eager, torch.float32), (ref, torch.float64)):
        xi = x.to(dt).detach().clone().requires_grad_()
        w = torch.randn(3, 13, 48, generator=torch.Generator().manual_seed(5)).to(dt)
        (m(xi, xi, xi, need_weights=False, **kw)[0] * w).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for i, (g, ge, gr) in enumerate(zip(*grads, strict=True)):
        assert_equivalent(g, ge, gr, f"mha grad {i}")
    with torch.no_grad():
        before = ours(x, x, x, need_weights=False, **kw)[0]
    torch.optim.SGD(ours.parameters(), lr=0.5).step()
    stepped64 = fastllm.restore(copy.deepcopy(ours)).double()
    with torch.no_grad():
        out = ours(x, x, x, need_weights=False, **kw)[0]
        e = engine.original_forward(ours, x, x, x, need_weights=False, **kw)[0]
        r = stepped64(x.double(), x.double(), x.double(), need_weights=False, **kw)[0]
    assert (out - before).abs().max() > 0.1
    assert_equivalent(out, e, r, "mha after an optimizer step")


def _encoder(norm_first, batch_first=True, layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(48, 6, 72, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return _perturb(nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval())


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_criterion(norm_first, batch_first):
    """nn.TransformerEncoder of two layers with key_padding_mask and a causal src mask, under no_grad (where torch
    would take its nested-tensor / native fast path, which leaves zeros at the padded positions; the baseline and
    the reference run torch's slow path, the same function, which computes every position, as ours does)."""
    ours, eager, ref = _three(_encoder(norm_first, batch_first))
    assert ours.use_nested_tensor is False and ours.__dict__["use_nested_tensor"] == eager.use_nested_tensor
    B, S = 3, 13
    x = torch.randn(B, S, 48)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 9:], kpm[2, 4:] = True, True
    src_mask = nn.Transformer.generate_square_subsequent_mask(S)  # float, -inf above the diagonal
    xs = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        out = ours(xs, mask=src_mask, src_key_padding_mask=kpm)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            e = eager(xs, mask=src_mask, src_key_padding_mask=kpm)
            r = ref(xs.double(), mask=src_mask.double(), src_key_padding_mask=kpm)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    if not batch_first:
        out, e, r = (t.transpose(0, 1) for t in (out, e, r))
    assert_equivalent(out, e, r, f"encoder norm_first={norm_first} batch_first={batch_first}")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_gradients(norm_first):
    ours, eager, ref = _three(_encoder(norm_first, layers=1).layers[0])
    assert type(ours).__name__ == "FastTransformerEncoderLayer"
    x = torch.randn(2, 11, 48)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 6:] = True
    grads = []
    for m, dt in ((ours, torch.float32), (eager, torch.float32), (ref, torch.float64)):
        xi = x.to(dt).detach().clone().requires_grad_()
        m(xi, src_key_padding_mask=kpm)[~kpm].sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for (name, _), g, ge, gr in zip([("x", 0), *ours.named_parameters()], *grads, strict=True):
        assert_equivalent(g, ge, gr, f"encoder layer grad {name}")


@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_no_affine", "layer_norm_no_bias", "rms_norm",
                                  "rms_norm_eps_none"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_criterion(kind, dtype):
    torch.manual_seed(0)
    m = {
        "layer_norm": lambda: nn.LayerNorm(37),
        "layer_norm_no_affine": lambda: nn.LayerNorm(37, elementwise_affine=False),
        "layer_norm_no_bias": lambda: nn.LayerNorm(37, bias=False),
        "rms_norm": lambda: nn.RMSNorm(37, eps=1e-5),
        "rms_norm_eps_none": lambda: nn.RMSNorm(37),  # eps = finfo(x.dtype).eps, as torch
    }[kind]()
    m = _perturb(m)
    ours, eager, ref = fastllm.accelerate(copy.deepcopy(m).to(dtype)), m.to(dtype), copy.deepcopy(m).double()
    assert type(ours).__name__.startswith("Fast")
    x = torch.randn(5, 7, 37) * 3 + 1
    with torch.no_grad():
        assert_equivalent(ours(x.to(dtype)), eager(x.to(dtype)), ref(x.double()), f"{kind} {dtype}")


def test_declined_modules_are_kept_with_reasons():
    model = nn.ModuleDict({
        "bias_kv": nn.MultiheadAttention(16, 2, add_bias_kv=True),
        "kdim": nn.MultiheadAttention(16, 2, kdim=8, vdim=8),
        "zero_attn": nn.MultiheadAttention(16, 2, add_zero_attn=True),
        "ln2d": nn.LayerNorm((4, 16)),
        "ok": nn.LayerNorm(16),
        "head": nn.Linear(16, 3),
    })  # fmt: skip
    report = fastllm.accelerate(model).fastllm_report
    kept = {n: r for n, _, r in report.kept}
    assert [n for n, _, _ in report.replaced] == ["ok"]
    assert "add_bias_kv" in kept["bias_kv"] and "kdim" in kept["kdim"] and "add_zero_attn" in kept["zero_attn"]
    assert "normalized_shape" in kept["ln2d"] and "head" not in kept
    text = str(report)
    assert "replaced" in text and "kept" in text and "add_bias_kv" in text and "torch" in text
    mha = nn.MultiheadAttention
    assert {n: type(m) for n, m in model.items()} == {"bias_kv": mha, "kdim": mha, "zero_attn": mha,
                                                      "ln2d": nn.LayerNorm, "ok": engine._FAST[nn.LayerNorm],
                                                      "head": nn.Linear}  # fmt: skip


def test_nothing_to_accelerate():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    before = _classes(model)
    assert fastllm.accelerate(model) is model and _classes(model) == before
    assert model.fastllm_report.replaced == [] and "nothing to accelerate" in str(model.fastllm_report)


def test_flags_keep_modules():
    model = nn.ModuleDict({"ln": nn.LayerNorm(16), "attn": nn.MultiheadAttention(16, 2)})
    report = fastllm.accelerate(model, norm=False).fastllm_report
    assert [n for n, _, _ in report.replaced] == ["attn"] and report.kept == [("ln", "LayerNorm", "norm=False")]


def test_idempotent_and_restore_torch_nn():
    model = _encoder(norm_first=True)
    keys = list(model.state_dict())
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        before = model(x)
        fastllm.accelerate(model)
        classes = _classes(model)
        again = fastllm.accelerate(model)
        assert again is model and _classes(model) == classes
        assert model.fastllm_report.replaced == [] and len(model.fastllm_report.already) == 9
        assert "already accelerated" in str(model.fastllm_report)
        assert list(model.state_dict()) == keys and [t.data_ptr() for t in model.state_dict().values()] == ptrs
        fastllm.restore(model)
        assert not any(engine.is_accelerated(m) for m in model.modules()) and not hasattr(model, "fastllm_report")
        assert torch.equal(model(x), before)


def test_pickle_and_deepcopy_of_accelerated():
    import pickle

    model = fastllm.accelerate(_encoder(False))
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        out = model(x)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(other.layers[0].self_attn) is type(model.layers[0].self_attn)
            assert torch.equal(other(x), out)


def test_quantize_composes():
    """quantize='int8_weight_only' after the swaps: the encoder's nn.Linear layers become Int8Linear, except the
    attention's out_proj (torch's fallback forward reads it as a float matrix); the output stays close."""
    model = _encoder(norm_first=False)
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        ref = model(x)
        fastllm.accelerate(model, quantize="int8_weight_only")
        out = model(x)
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules() if n.endswith(("linear1",
                                                                                                   "out_proj"))}  # fmt: skip
    assert kinds == {"linear1": "Int8Linear", "out_proj": "NonDynamicallyQuantizableLinear"}
    assert "quantize_" in str(model.fastllm_report)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


def test_bad_input():
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        fastllm.accelerate(nn.LayerNorm(8), quantize="int4")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        fastllm.accelerate("model")
    with pytest.raises(TypeError, match="norm must be a bool"):
        fastllm.accelerate(nn.LayerNorm(8), norm=1)
    qlinear = torch.ao.nn.quantized.Linear(8, 8)
    with pytest.raises(ValueError, match="quantized by another library"):
        fastllm.accelerate(nn.Sequential(nn.LayerNorm(8), qlinear))

    class Linear8bitLt(nn.Linear):  # the bitsandbytes class name
        pass

    model = nn.Sequential(nn.LayerNorm(8), Linear8bitLt(8, 8))
    with pytest.raises(ValueError, match="Linear8bitLt, quantized by another library"):
        fastllm.accelerate(model)
    assert type(model[0]) is nn.LayerNorm  # refused before anything was swapped


# ==================================================================================================
# transformers


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def test_import_registers_lazily():
    """`import fastllm` does not import transformers; importing transformers' modeling_utils afterwards registers
    "fastllm" in both interfaces (the import hook), so from_config(attn_implementation="fastllm") works."""
    pytest.importorskip("transformers")
    code = (
        "import sys, fastllm\n"
        "assert 'transformers' not in sys.modules\n"
        "from fastllm.testing import import_torchvision\n"
        "import_torchvision()\n"  # (PyPI's CUDA torchvision beside a CPU torch: see tests/conftest.py)
        "import transformers\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "assert 'fastllm' in ALL_ATTENTION_FUNCTIONS.valid_keys()\n"
        "assert 'fastllm' in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
        "cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,"
        " intermediate_size=8)\n"
        "m = transformers.AutoModel.from_config(cfg, attn_implementation='fastllm')\n"
        "assert m.config._attn_implementation == 'fastllm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _tables64(config):
    rope = config.rope_parameters
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(config.max_position_embeddings, dtype=torch.float64)[:, None] * inv
    return torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (P, D): HF's layout


def _rms_norm64(mod, x):
    return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))


def _hf64(model):
    """The unpatched model in float64 throughout (SDPA attention; Llama-family RMSNorm and rotary in float64)."""
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("sdpa")
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = functools.partial(_rms_norm64, mod)
    if hasattr(getattr(m, "model", None), "rotary_emb"):
        cos, sin = _tables64(m.config)
        m.model.rotary_emb.forward = lambda x, position_ids: (cos[position_ids], sin[position_ids])
    return m


def _decoder(transformers, kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=6, n_positions=96,
                                      attn_implementation="sdpa")  # fmt: skip
        return _perturb(transformers.GPT2LMHeadModel(cfg).eval())
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=96, attn_implementation="sdpa")  # fmt: skip
    if kind == "llama":
        return _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval())
    if kind == "mistral":  # a sliding window of 5 (in the mask), a head dim of its own (16, not 48 / 6)
        cfg = transformers.MistralConfig(**common, sliding_window=5, head_dim=16)
        return _perturb(transformers.MistralForCausalLM(cfg).eval())
    # Qwen2: q/k/v biases; layer 0 full attention, layer 1 a sliding window of 5
    cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    return _perturb(transformers.Qwen2ForCausalLM(cfg).eval())


def _padded(B, S, lengths, side):
    m = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            m[b, S - n :] = 1
        else:
            m[b, :n] = 1
    return m


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_logits_criterion(transformers, kind, dtype, side):
    """Logits of a padded batch (lengths 13, 8, 3), at every position; Llama / Qwen2 / Mistral with GQA (6 query
    heads, 2 kv heads); Qwen2 and Mistral with sliding-window layers (the window is in the mask, as for SDPA)."""
    model = _decoder(transformers, kind)
    ref = _hf64(model)
    eager = copy.deepcopy(model).to(dtype)
    ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
    assert ours.config._attn_implementation == "fastllm"
    ids = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 8, 3), side)
    with torch.inference_mode():
        out = ours(ids, attention_mask=mask).logits
        e = eager(ids, attention_mask=mask).logits
        r = ref(ids, attention_mask=mask).logits
    assert out.dtype == dtype
    assert_equivalent(out, e, r, f"{kind} {dtype} {side}")  # (padded positions included: both compute them alike)


def test_attention_goes_through_fastllm(transformers, monkeypatch):
    calls = []
    real = hf.scaled_dot_product_attention
    monkeypatch.setattr(hf, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fastllm.accelerate(_decoder(transformers, "llama"))
    with torch.inference_mode():
        model(torch.randint(0, V, (2, 5)), attention_mask=_padded(2, 5, (5, 3), "left"))
    assert len(calls) == 2  # one per layer


def test_generate_left_padded_token_identical(transformers):
    """Greedy generate, 32 new tokens, a left-padded batch of 2 (DynamicCache: prefill, then 1-token decode steps
    against the longer cache under the padding mask): the same tokens as the unpatched model."""
    model = _decoder(transformers, "llama")
    ours = fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = _padded(2, 9, (9, 4), "left")
    kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.shape == (2, 41) and torch.equal(got, want)


def test_generate_static_cache_token_identical(transformers):
    """The same with transformers' StaticCache (keys padded to the cache length, the mask slicing them): 8 tokens."""
    model = _decoder(transformers, "llama")
    ours = fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=_padded(2, 9, (9, 4), "left"), max_new_tokens=8, min_new_tokens=8, do_sample=False,
              pad_token_id=0, cache_implementation="static")  # fmt: skip
    with torch.inference_mode():
        want = model.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.shape == (2, 17) and torch.equal(got, want)


def _grads(model, ids, mask, weight):
    model.zero_grad()
    out = model(ids, attention_mask=mask)
    h = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (h * weight.to(h.dtype)).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradients_criterion(transformers, kind):
    """Gradients of every parameter through an accelerated Llama / BERT (padded batch) meet the criterion."""
    model = _decoder(transformers, "llama") if kind == "llama" else _bert(transformers)
    ref, ours = _hf64(model), fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = _padded(2, 11, (11, 6), "right")
    out_dim = V if kind == "llama" else 48
    weight = torch.randn(2, 11, out_dim, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    g_ours, g_eager, g_ref = (_grads(m, ids, mask, weight) for m in (ours, model, ref))
    assert g_ours.keys() == g_eager.keys() and len(g_ours) > 10
    for name in g_ours:
        assert_equivalent(g_ours[name], g_eager[name], g_ref[name], f"{kind} grad {name}")


def _bert(transformers, **kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                  intermediate_size=88, max_position_embeddings=64, attn_implementation="sdpa", **kw)  # fmt: skip
    return _perturb(transformers.BertModel(cfg).eval())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoders_criterion(transformers, dtype):
    """BERT (ragged padding), ViT, CLIP text (ragged padding, causal) and vision towers: last_hidden_state at every
    position."""
    vit, clip = _vit_clip(transformers, "quick_gelu")
    ids = torch.randint(3, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 7, 2), "right")
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    for name, model, run in (
        ("bert", _bert(transformers), lambda m, dt: m(ids, attention_mask=mask).last_hidden_state),
        ("vit", vit, lambda m, dt: m(pixels.to(dt)).last_hidden_state),
        ("clip text", clip, lambda m, dt: m.text_model(ids, attention_mask=mask).last_hidden_state),
        ("clip vision", clip, lambda m, dt: m.vision_model(pixels.to(dt)).last_hidden_state),
    ):
        ref, eager = _hf64(model), copy.deepcopy(model).to(dtype)
        ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
        assert all(c._attn_implementation == "fastllm" for c in hf._configs(ours.config))
        with torch.inference_mode():
            out, e, r = run(ours, dtype), run(eager, dtype), run(ref, torch.float64)
        assert_equivalent(out, e, r, f"{name} {dtype}")  # (padded positions included)


def test_hf_rms_norm_bf16_criterion(transformers):
    """HF's Llama RMSNorm rounds the normalized x to bf16 and then multiplies by the weight (two roundings);
    fastllm.rms_norm rounds once: within the criterion (and closer to float64 than HF's)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    m = _perturb(LlamaRMSNorm(37, eps=1e-6))
    ours, eager = fastllm.accelerate(copy.deepcopy(m).bfloat16()), copy.deepcopy(m).bfloat16()
    assert type(ours).__name__ == "FastLlamaRMSNorm"
    x = torch.randn(6, 37) * 4
    with torch.no_grad():
        ref = _rms_norm64(copy.deepcopy(m).double(), x.double())
        out, e = ours(x.bfloat16()), eager(x.bfloat16())
    assert_equivalent(out, e, ref, "LlamaRMSNorm bf16")


@pytest.mark.parametrize("case", ["bool_mask", "float_mask", "causal", "decode_gqa", "bidirectional_scaled"])
def test_attention_function_vs_sdpa(transformers, case):
    """fastllm_attention_forward against transformers' sdpa_attention_forward on the same arguments (float64 =
    the reference): bool / float 4-D masks, None + causal, a decode step (1 query, 17 keys, GQA, left-padded)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 2, 6, 2, 8
    Sq, Sk = (1, 17) if case == "decode_gqa" else (11, 11)
    hkv = Hkv if case == "decode_gqa" else Hq
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = case != "bidirectional_scaled", Hq // hkv
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((Hq, Sq), (hkv, Sk), (hkv, Sk)))
    mask = None
    if case in ("bool_mask", "decode_gqa"):
        mask = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
        mask[1, ..., :4] = False  # left padding of row 1
        if case == "bool_mask":
            mask &= torch.ones(Sq, Sk, dtype=torch.bool).tril()
    elif case == "float_mask":
        mask = torch.randn(B, 1, Sq, Sk, generator=g)
    scaling = 0.3 if case == "bidirectional_scaled" else D**-0.5

    def run(fn, dt):
        m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dt))
        return fn(module, q.to(dt), k.to(dt), v.to(dt), m, scaling=scaling)[0]

    out = run(hf.fastllm_attention_forward, torch.float32)
    assert out.shape == (B, Sq, Hq, D)
    assert_equivalent(out, run(sdpa_attention_forward, torch.float32), run(sdpa_attention_forward, torch.float64),
                      f"attention {case}")  # fmt: skip


def test_attention_function_fallbacks(transformers):
    """output_attentions -> the model's eager attention (weights returned); dropout > 0 -> transformers' SDPA."""
    model = fastllm.accelerate(_decoder(transformers, "llama"))
    ids = torch.randint(0, V, (2, 7))
    with torch.inference_mode():
        out = model(ids, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (2, 6, 7, 7)
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    attn.num_key_value_groups = 3
    torch.manual_seed(7)
    got = hf.fastllm_attention_forward(attn, q, k, v, None, dropout=0.5)[0]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(7)
    assert torch.equal(got, sdpa_attention_forward(attn, q, k, v, None, dropout=0.5)[0])


def test_hf_state_dict_idempotent_restore(transformers, tmp_path):
    model = _decoder(transformers, "llama")
    ids = torch.randint(0, V, (2, 7))
    sd = model.state_dict()
    with torch.inference_mode():
        before = model(ids).logits
    fastllm.accelerate(model)
    report = model.fastllm_report
    assert ("", "LlamaForCausalLM", "attn_implementation='fastllm'") in report.replaced
    assert sum(r == "rms_norm" for _, _, r in report.replaced) == 5 and "transformers" in report.versions
    assert list(model.state_dict()) == list(sd) and all(model.state_dict()[k] is not None for k in sd)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    classes = _classes(model)
    fastllm.accelerate(model)
    assert _classes(model) == classes and model.fastllm_report.replaced == []
    assert "already accelerated" in str(model.fastllm_report)
    model.save_pretrained(tmp_path)  # keeps working
    fastllm.restore(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(engine.is_accelerated(m) for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, before)


def test_hf_version_outside_range_keeps_attention(transformers, monkeypatch):
    """A transformers version outside hf.SUPPORTED: the model-level rule declines (attention kept, reported)."""
    monkeypatch.setattr(hf, "SUPPORTED", ">=4.0,<5")  # (the installed 5.x is then outside it)
    model = fastllm.accelerate(_decoder(transformers, "llama"))
    assert model.config._attn_implementation == "sdpa"
    assert any("outside the supported range" in r for _, _, r in model.fastllm_report.kept)


def test_hf_quantize_composes(transformers):
    """quantize='int8_weight_only' after the swaps: every nn.Linear (projections, MLP, lm_head) becomes Int8Linear
    under the fastllm attention; logits stay close (int8 is outside the criterion)."""
    model = _decoder(transformers, "llama")
    ids = torch.randint(0, V, (2, 9))
    with torch.inference_mode():
        ref = model(ids).logits
        fastllm.accelerate(model, quantize="int8_weight_only")
        out = model(ids).logits
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.config._attn_implementation == "fastllm" and "quantize_" in str(model.fastllm_report)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_hf_quantized_model_refused(transformers):
    model = _decoder(transformers, "llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quantization_config"):
        fastllm.accelerate(model)


def test_hf_attention_off_keeps_attention(transformers):
    model = fastllm.accelerate(_decoder(transformers, "qwen2"), attention=False)
    assert model.config._attn_implementation == "sdpa"
    assert ("", "Qwen2ForCausalLM", "attention=False") in model.fastllm_report.kept
    assert {r for _, _, r in model.fastllm_report.replaced} == {"rms_norm", "fused_gated_ffn"}


def test_mha_bad_mask_shape_raises_torchs_error():
    ours, eager, _ = _three(_mha())
    x = torch.randn(2, 5, 48)
    for m in (ours, eager):
        with pytest.raises(RuntimeError, match="attn_mask"):
            m(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool), need_weights=False)


def test_hf_report_kept_when_norm_off(transformers):
    model = fastllm.accelerate(_bert(transformers), norm=False)
    kept = model.fastllm_report.kept
    assert kept and all(r == "norm=False" and c == "LayerNorm" for _, c, r in kept)
    replaced = [c for _, c, _ in model.fastllm_report.replaced]
    layer = ["BertSelfAttention", "Linear", "Linear", "Linear", "BertSelfOutput", "BertIntermediate", "BertOutput"]
    assert replaced == ["BertModel"] + layer * 2  # (q / k / v on fastllm.linear with their parent; the mlp rules)


def test_torch_compile_accelerated_llama(transformers):
    """torch.compile of an accelerated tiny Llama runs (aot_eager: dynamo traces the Fast modules and the attention
    function, the fastllm ops' fakes and autograd formulas are used) and gives the eager accelerated logits."""
    model = fastllm.accelerate(_decoder(transformers, "llama"))
    ids = torch.randint(0, V, (2, 7))
    mask = _padded(2, 7, (7, 5), "left")
    compiled = torch.compile(model, backend="aot_eager")  # (inductor works too: ~20 s of C++ compile)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_nn_quantize_filter_names():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    f = torch_nn.quantize_filter(model)
    assert not f(None, "0.out_proj") and f(None, "1")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_projections_and_lm_head_on_fastllm_linear(transformers, kind):
    """The Llama-family rules put the attention projections and the LM head on fastllm.linear (no torch GEMM left in
    a decode step): listed as replaced, the logits unchanged within the criterion (the tests above), the exact
    nn.Linear class back after restore()."""
    from fastllm.integrations.torch_nn import FastLinearMixin

    model = _decoder(transformers, kind)
    ids = torch.randint(0, V, (2, 7))
    with torch.inference_mode():
        before = model(ids).logits
    fastllm.accelerate(model)
    attn = model.model.layers[0].self_attn
    swapped = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, model.lm_head]
    assert all(isinstance(m, FastLinearMixin) and isinstance(m, torch.nn.Linear) for m in swapped)
    names = {n for n, _, rule in model.fastllm_report.replaced if rule == FastLinearMixin._fastllm_rule_name}
    assert {"lm_head", "model.layers.1.self_attn.o_proj"} <= names
    with torch.inference_mode(), fastllm.explain() as log:
        after = model(ids).logits
    assert any(d.op.startswith("linear") for d in log), [str(d) for d in log][:5]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # (the float64 criterion: the tests above)
    fastllm.restore(model)
    assert all(type(m) is torch.nn.Linear for m in swapped)


@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_hf_padding_mask_as_key_lengths(transformers, side, monkeypatch):
    """An encoder's right-padding mask becomes key lengths (read once per forward: cached per mask object) and
    the kernel writes the merged-heads layout; a left-padded mask is not a prefix and keeps the masked path; no
    padding runs without a mask. Each within the criterion against float64 (padded positions included)."""
    model = _bert(transformers)
    ref, ours = _hf64(model), fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(3, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 7, 2) if side != "none" else (13, 13, 13), "left" if side == "left" else "right")
    merged, masked = [], []
    monkeypatch.setattr(
        hf, "attention_merged", lambda *a: merged.append(a[3]) or fastllm.ops.attention.attention_merged(*a)
    )
    monkeypatch.setattr(
        hf,
        "scaled_dot_product_attention",
        lambda *a, **k: masked.append(1) or fastllm.ops.attention.scaled_dot_product_attention(*a, **k),
    )
    with torch.inference_mode():
        out, e, r = (m(ids, attention_mask=mask).last_hidden_state for m in (ours, model, ref))
    assert_equivalent(out, e, r, f"bert {side} padding")
    if side == "right":
        assert len(merged) == 2 and not masked and merged[0].tolist() == [13, 7, 2]
    elif side == "left":
        assert not merged and len(masked) == 2
    else:
        assert len(merged) == 2 and all(lens is None for lens in merged)


@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_hf_causal_padding_mask_as_key_lengths(transformers, side, monkeypatch):
    """A causal mask with right padding (CLIP's text tower on a padded batch; a decoder's right-padded prefill)
    becomes key lengths + causal in the kernel; left padding keeps the masked path. Within the criterion against
    float64 at every position (padded rows included: row i >= len sees the keys j < len, as the mask says)."""
    _, clip = _vit_clip(transformers)
    llama = _decoder(transformers, "llama")
    ids = torch.randint(3, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 6, 1) if side != "none" else (13, 13, 13), "left" if side == "left" else "right")
    merged, masked = [], []
    real = fastllm.ops.attention.attention_merged
    monkeypatch.setattr(hf, "attention_merged", lambda *a: merged.append((a[3], a[4])) or real(*a))
    monkeypatch.setattr(
        hf,
        "scaled_dot_product_attention",
        lambda *a, **k: masked.append(1) or fastllm.ops.attention.scaled_dot_product_attention(*a, **k),
    )
    for name, model, run in (
        ("clip text", clip, lambda m: m.text_model(ids, attention_mask=mask).last_hidden_state),
        ("llama", llama, lambda m: m(ids, attention_mask=mask).logits),
    ):
        ref, ours = _hf64(model), fastllm.accelerate(copy.deepcopy(model))
        merged.clear(), masked.clear()
        with torch.inference_mode():
            out, e, r = run(ours), run(model), run(ref)
        assert_equivalent(out, e, r, f"{name} causal {side} padding")
        if side == "right":
            assert len(merged) == 2 and not masked, name
            assert all(lens.tolist() == [13, 6, 1] and causal for lens, causal in merged), merged
        elif side == "left":
            assert not merged and len(masked) == 2, name
        else:
            assert len(merged) == 2 and all(lens is None and causal for lens, causal in merged), merged


def test_accelerate_after_torch_compile_recompiles_with_fastllm_ops():
    """accelerate on a torch.compile'd model that already ran: the report says so, and the next call recompiles
    (dynamo guards on the module classes) into a graph that calls fastllm's ops, with the accelerated result."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), _mha_block()).eval()
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(m, backend=backend)
    with torch.no_grad():
        before = compiled(x)
    assert len(graphs) == 1 and not any("fastllm" in t for t in graphs[0])
    fastllm.accelerate(compiled)
    assert "torch.compile wrapper" in str(compiled.fastllm_report)
    with torch.no_grad():
        after = compiled(x)
        want = m(x)  # (the accelerated modules, eager)
    assert len(graphs) >= 2 and any("fastllm" in t for g in graphs[1:] for t in g), graphs[1:]
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _mha_block():
    return _SelfAttention()


def _count_fast(monkeypatch, name: str):
    """Wrap hf.<name> (a fast function that returns None to decline): (calls it took, calls it declined), filled as
    the model runs."""
    fast, fallbacks = [], []
    real = getattr(hf, name)

    def counted(*args):
        y = real(*args)
        (fast if y is not None else fallbacks).append(1)
        return y

    monkeypatch.setattr(hf, name, counted)
    return fast, fallbacks


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoder_layer_fast_path_in_generate(transformers, kind, cache, monkeypatch):
    """The fused decoder layer (hf._decoder_layer_fast) runs every layer of prefill and decode in generate (counted)
    and gives the unpatched model's tokens (left-padded batch, GQA, Qwen2's biases and sliding window, Mistral's
    head dim); with a forward hook on one layer's MLP (output capturing) that layer takes its original forward."""
    model = _decoder(transformers, kind)
    ours = fastllm.accelerate(copy.deepcopy(model))
    assert sum(r == "decoder_layer" for _, _, r in ours.fastllm_report.replaced) == 2, ours.fastllm_report
    fast, fallbacks = _count_fast(monkeypatch, "_decoder_layer_fast")
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=_padded(2, 9, (9, 4), "left"), max_new_tokens=12, min_new_tokens=12, do_sample=False,
              pad_token_id=0, cache_implementation=cache)  # fmt: skip
    with torch.inference_mode():
        want = model.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want) and len(fast) == 2 * 12 and not fallbacks
    seen = []
    ours.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fast.clear()
    with torch.inference_mode():
        assert torch.equal(ours.generate(ids, **kw), want)
    assert not fallbacks and len(fast) == 12 and len(seen) == 12  # (the hooked layer: its original forward, whole)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_layer_one_qkv_gemm(transformers, kind, monkeypatch):
    """At inference the fused layer computes q / k / v in one GEMM over the packed [Wq; Wk; Wv] (hf._qkv_heads; Qwen2:
    with the three biases): logits bit-identical to the three linears' (explain runs those: same kernel per column),
    the packed operand kept once per layer, repacked after an in-place update, dropped by restore; the model still
    pickles; weights that are inference tensors take the three linears."""
    if fastllm._ext.C is None:
        pytest.skip("the one-GEMM q/k/v is the C++ kernel's path (FASTLLM_NO_CPP=1: the three linears, tested above)")
    model = _decoder(transformers, kind)
    ours = fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    taken, declined = _count_fast(monkeypatch, "_qkv_heads")
    with torch.inference_mode():
        got = ours(ids).logits
        with fastllm.explain():  # (no lane under explain: the three linears)
            three = ours(ids).logits
        want = model(ids).logits
    assert len(taken) == 2 and len(declined) == 2 and torch.equal(got, three), (taken, declined)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # (the float64 criterion: the tests above)
    attn = ours.model.layers[0].self_attn
    packed = hf._QKV[attn][4]
    with torch.inference_mode():
        ours(ids)
    assert hf._QKV[attn][4] is packed  # (kept)
    with torch.no_grad():
        attn.k_proj.weight.mul_(0.5)
        model.model.layers[0].self_attn.k_proj.weight.mul_(0.5)
    with torch.inference_mode():
        got, want = ours(ids).logits, model(ids).logits
    assert hf._QKV[attn][4] is not packed  # (repacked)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    pickle.loads(pickle.dumps(ours))
    fastllm.restore(ours)
    assert attn not in hf._QKV
    with torch.inference_mode():
        inf = fastllm.accelerate(copy.deepcopy(model))
        for m in inf.modules():
            for n, p in list(m.named_parameters(recurse=False)):
                setattr(m, n, nn.Parameter(p.detach().clone(), requires_grad=False))  # (inference tensors)
        taken.clear(), declined.clear()
        torch.testing.assert_close(inf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert declined and not taken, (taken, declined)


def test_decoder_layer_fast_path_logits_bf16(transformers):
    """bf16 logits of a padded batch through the fused layer: within the criterion (float64 reference)."""
    model = _decoder(transformers, "llama")
    ref, eager = _hf64(model), copy.deepcopy(model).bfloat16()
    ours = fastllm.accelerate(copy.deepcopy(model).bfloat16())
    ids = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 8, 3), "left")
    with torch.inference_mode():
        out, e, r = (m(ids, attention_mask=mask).logits for m in (ours, eager, ref))
    assert_equivalent(out, e, r, "llama bf16 fused layer")


def _vit_clip(transformers, vision_act: str = "gelu"):
    torch.manual_seed(0)
    vit = _perturb(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=88, image_size=20,
        patch_size=4, attn_implementation="sdpa")).eval())  # fmt: skip
    text = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=88, vocab_size=V,
                max_position_embeddings=40, eos_token_id=2, bos_token_id=0, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=72, image_size=20,
                  patch_size=5, hidden_act=vision_act)  # fmt: skip
    clip = _perturb(transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=24, attn_implementation="sdpa")).eval())  # fmt: skip
    return vit, clip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_layer_fast_path(transformers, dtype, monkeypatch):
    """The pre-norm encoder layer (hf._encoder_layer_fast) runs every ViT and CLIP layer (text: causal, ragged
    padding; vision: quick_gelu and gelu) at inference (counted), within the criterion of the float64 model; a
    hook on a submodule, grad mode and training each make the layer take its original forward."""
    vit, clip = _vit_clip(transformers)
    fast, fallbacks = _count_fast(monkeypatch, "_encoder_layer_fast")
    ids = torch.randint(3, V, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = _padded(3, 13, (13, 6, 1), "right")
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    for name, model, run in (
        ("vit", vit, lambda m, dt: m(pixels.to(dt)).last_hidden_state),
        ("clip text", clip, lambda m, dt: m.text_model(ids, attention_mask=mask).last_hidden_state),
        ("clip vision", clip, lambda m, dt: m.vision_model(pixels.to(dt)).last_hidden_state),
    ):
        ref, eager = _hf64(model), copy.deepcopy(model).to(dtype)
        ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
        assert sum(r == "encoder_layer" for _, _, r in ours.fastllm_report.replaced) >= 2, ours.fastllm_report
        fast.clear()
        with torch.inference_mode():
            out, e, r = run(ours, dtype), run(eager, dtype), run(ref, torch.float64)
        assert len(fast) == 2 and not fallbacks, name
        assert_equivalent(out, e, r, f"{name} {dtype} encoder layer")
        tower = ours if name == "vit" else ours.text_model if name == "clip text" else ours.vision_model
        mlp = next(m for m in tower.modules() if type(m).__name__.endswith("MLP"))
        with torch.no_grad():  # the original forwards (through the accelerated submodules): within the criterion too
            handle = mlp.register_forward_hook(lambda m, i, o: None)
            assert_equivalent(run(ours, dtype), e, r, f"{name} {dtype} hooked")
            handle.remove()
            assert not fallbacks and len(fast) == 3, name  # (the hooked layer: its original forward, whole)
            ours.train()  # (dropout p = 0: the same values; the original forward all the same)
            assert_equivalent(run(ours, dtype), e, r, f"{name} {dtype} train mode")
            ours.eval()
            assert len(fallbacks) == 2 and len(fast) == 3, name
        run(ours, dtype).float().sum().backward()  # grad mode: the original forwards; gradients reach the weights
        assert len(fallbacks) == 4 and len(fast) == 3, name
        assert mlp.fc1.weight.grad is not None and torch.isfinite(mlp.fc1.weight.grad).all()
        fallbacks.clear()


ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.mark.parametrize("norm_first", [False, True])
def test_accelerate_triton_path_torch_nn(norm_first):
    """The accelerated torch.nn encoder on fastllm's Triton kernels (on CUDA when there is one, else the Triton
    interpreter on CPU tensors): every fastllm call runs Triton (explain), the output within the criterion. This is
    the CUDA-model check of issue 13 that benchmarks/gpu_check.sh runs (-k triton)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = _perturb(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval())
    ref = copy.deepcopy(model).double()
    ours = fastllm.accelerate(copy.deepcopy(model).to(DEVICE))
    x = torch.randn(2, 7, 32)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad(), fastllm.backend("triton"), fastllm.explain() as log:
        out = ours(x.to(DEVICE), src_key_padding_mask=kpm.to(DEVICE)).cpu()
    with torch.no_grad():
        e, r = model(x, src_key_padding_mask=kpm), ref(x.double(), src_key_padding_mask=kpm)
    assert log and all(d.backend == "triton" for d in log), [str(d) for d in log if d.backend != "triton"]
    valid = ~kpm  # (torch's own fast path may zero padded rows; compare the real tokens)
    assert_equivalent(out[valid], e[valid], r[valid], f"torch.nn encoder on triton norm_first={norm_first}")


def test_accelerate_triton_path_llama(transformers):
    """A tiny accelerated Llama (fused decoder layer, rotary, RMSNorm, gated MLP, linear) on the Triton kernels:
    logits of a left-padded batch within the criterion; every fastllm call runs Triton."""
    model = _decoder(transformers, "llama")
    ref = _hf64(model)
    ours = fastllm.accelerate(copy.deepcopy(model).to(DEVICE))
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = _padded(2, 6, (6, 4), "left")
    with torch.inference_mode(), fastllm.backend("triton"), fastllm.explain() as log:
        out = ours(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits.cpu()
    with torch.inference_mode():
        e, r = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert log and all(d.backend == "triton" for d in log), [str(d) for d in log if d.backend != "triton"]
    assert_equivalent(out, e, r, "llama on triton")


def test_accelerate_triton_path_vit_clip(transformers):
    """The HF encoder layers (ViT, CLIP text with padding + causal, CLIP vision) through the fused encoder-layer path on
    the Triton kernels (CUDA when there is one, else the interpreter): every fastllm call runs Triton, the outputs
    within the criterion. Named *triton*: benchmarks/gpu_check.sh runs it."""
    vit, clip = _vit_clip(transformers)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = _padded(2, 9, (9, 5), "right")
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    for name, model, run in (
        ("vit", vit, lambda m, dev: m(pixels.to(dev)).last_hidden_state),
        ("clip text", clip, lambda m, dev: m.text_model(ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state),
        ("clip vision", clip, lambda m, dev: m.vision_model(pixels.to(dev)).last_hidden_state),
    ):
        ref = _hf64(model)
        ours = fastllm.accelerate(copy.deepcopy(model).to(DEVICE))
        with torch.inference_mode(), fastllm.backend("triton"), fastllm.explain() as log:
            out = run(ours, DEVICE).cpu()
        with torch.inference_mode():
            e, r = run(model, "cpu"), run(ref, "cpu")
        assert log and all(d.backend == "triton" for d in log), [str(d) for d in log if d.backend != "triton"]
        assert_equivalent(out, e, r, f"{name} on triton")


def test_decoder_layer_follows_weight_updates(transformers):
    """The fused layer reads the projections' current weights (the packed copies are rebuilt when a weight is
    updated in place or replaced): the logits follow the unpatched model's after each change."""
    model = _decoder(transformers, "qwen2")  # (q/k/v biases)
    ours = fastllm.accelerate(copy.deepcopy(model))
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    a, b = ours.model.layers[0].self_attn, model.model.layers[0].self_attn
    for change in ("none", "in_place", "bias_in_place", "replaced"):
        with torch.no_grad():
            if change == "in_place":
                a.q_proj.weight.add_(0.25)
                b.q_proj.weight.add_(0.25)
            elif change == "bias_in_place":
                a.v_proj.bias.mul_(-1.0)
                b.v_proj.bias.mul_(-1.0)
            elif change == "replaced":
                w = torch.randn_like(a.k_proj.weight)
                a.k_proj.weight = nn.Parameter(w.clone())
                b.k_proj.weight = nn.Parameter(w.clone())
        with torch.inference_mode():
            got, want = ours(ids).logits, model(ids).logits
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4, msg=change)
