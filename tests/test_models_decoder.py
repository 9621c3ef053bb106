"""The decoder zoo against Hugging Face: tiny random configs of GPT-2 (tied and untied, layer-scaled attention),
Llama (GQA, tied embeddings, llama3 rope scaling, attention / mlp bias), Mistral (head_dim of its own, sliding
window) and Qwen2 (q/k/v bias), built in transformers (eager attention) and in fastllm (from_hf).

Criterion (fastllm.testing): HF in float64 is the reference, HF in fp32 / bf16 the eager baseline; ours in fp32 and
bf16 must stay within 2x HF's error in the same dtype (+ a floor). Ours in float64 against HF in float64 is tight
(1e-12 relative) once both use the same rotary tables. The cached forward (prefill, 1-token steps, a small chunk,
a long chunk) and a ragged batch through cache.row(b) meet the same criterion against HF's full forward. Loading
and saving round-trip bit for bit with transformers. int8 is outside the criterion (see test_quantized). The
generation loop itself is tested in tests/test_generate.py."""

import copy
import functools
import json
import math

import pytest
import torch

import fastllm
from fastllm.testing import assert_equivalent, max_abs_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

V = 131  # odd vocabulary; hidden 48, 6 heads of 8, MLP 88 (GPT-2: 4 * 48 or 72)


def _perturb(model):
    """Non-trivial norms and biases (HF initializes them to 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = dict(vocab_size=V, n_embd=48, n_layer=2, n_head=6, n_positions=96, bos_token_id=0, eos_token_id=0)
        cfg.update(kw)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="eager"))
        return _perturb(model.eval())
    cfg = dict(vocab_size=V, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=96)  # fmt: skip
    cfg.update(kw)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    return _perturb(model_cls(cfg_cls(**cfg, attn_implementation="eager")).eval())


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}  # fmt: skip
# fmt: off
CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied-layerscale": ("gpt2", dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                                            n_inner=72, activation_function="gelu")),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mha-llama3-bias": ("llama", dict(num_key_value_heads=6, rope_parameters=LLAMA3, attention_bias=True,
                                            mlp_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
}
# fmt: on


@pytest.fixture(scope="module", params=list(CASES))
def hf(request):
    kind, kw = CASES[request.param]
    return _hf(kind, **kw)


def _ids(B=2, S=13, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _tables64(config):
    """cos, sin (max_position_embeddings, D/2) in float64: HF's rotary frequencies (default, llama3), written out
    here and computed in float64 (HF computes them, and the angles, in fp32 even in a float64 model)."""
    rope = config.rope_parameters
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    if rope.get("rope_type") == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    angle = torch.arange(config.max_position_embeddings, dtype=torch.float64)[:, None] * inv
    return angle.cos(), angle.sin()


def _rms_norm64(mod, x):
    return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))


def _hf64(hf, tables=None):
    """HF's model in float64 throughout: the reference. A plain .double() is not: HF's Llama-family RMSNorm and
    eager softmax compute in fp32, and its rotary angles too. So the copy gets torch's SDPA (float64 math), an
    RMSNorm in float64 and rotary tables `tables` ((P, D/2) cos, sin; default: _tables64, the exact ones)."""
    m = copy.deepcopy(hf).double()
    if m.config.model_type == "gpt2":  # (LayerNorm and GPT-2's eager softmax run in the input's dtype)
        return m
    m.set_attn_implementation("sdpa")
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = functools.partial(_rms_norm64, mod)
    cos, sin = (torch.cat([t, t], dim=-1).double() for t in (tables or _tables64(m.config)))  # (P, D): HF's layout
    m.model.rotary_emb.forward = lambda x, position_ids: (cos[position_ids], sin[position_ids])
    return m


def _hf_logits(hf, ids, dtype):
    with torch.inference_mode():
        model = _hf64(hf) if dtype == torch.float64 else copy.deepcopy(hf).to(dtype)
        return model(ids).logits


# --------------------------------------------------------------------------------------------------
# Logits under the criterion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_criterion(hf, dtype):
    ids = _ids()
    cast = copy.deepcopy(hf).to(dtype)
    with torch.inference_mode():
        ref, eager = _hf_logits(hf, ids, torch.float64), cast(ids).logits
        ours = fastllm.models.from_hf(cast)(ids)  # (built from the dtype-cast HF weights)
    assert type(ours) is torch.Tensor and ours.dtype == dtype and ours.shape == (2, 13, V)
    assert_equivalent(ours, eager, ref, f"logits {dtype}")


def test_float64_tight(hf):
    """Ours in float64 against HF in float64 with the same rotary tables (ours: float64 angles rounded once to the
    fp32 tables the op takes): everything else (norms, GQA, biases, MLP, residuals, attention) agrees to float64
    rounding."""
    ids = _ids(2, 11)
    ours = fastllm.models.from_hf(copy.deepcopy(hf).double())
    rot = getattr(ours, "rotary", None)
    hf64 = _hf64(hf, None if rot is None else (rot.cos, rot.sin))
    with torch.inference_mode():
        ref, out = hf64(ids).logits, ours(ids)
    assert out.dtype == torch.float64
    assert max_abs_err(out, ref) <= 1e-12 * max(1.0, ref.abs().max().item())


def test_rope_tables(hf):
    """Our fp32 tables are the float64 ones rounded once (<= 1 fp32 ulp); HF's own fp32 tables agree with those
    up to HF's fp32 angle error, p * ulp(inv_freq) (<= ~1e-5 here; the llama3 case checks the scaled
    frequencies against HF's)."""
    ours = fastllm.models.from_hf(hf)
    if not hasattr(ours, "rotary"):
        pytest.skip("learned positions")
    cos64, sin64 = _tables64(hf.config)
    for t, t64 in ((ours.rotary.cos, cos64), (ours.rotary.sin, sin64)):
        assert t.dtype == torch.float32 and t.shape == t64.shape
        torch.testing.assert_close(t.double(), t64, rtol=0, atol=6e-8)
    cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(96)[None])  # (1, 96, D) fp32
    half = cos64.shape[1]
    torch.testing.assert_close(cos[0, :, :half].double(), cos64, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin[0, :, :half].double(), sin64, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# The KV cache: every attention mode against HF's full forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_forward_criterion(hf, dtype):
    """Prefill 5 (a fresh cache: flash causal), two 1-token steps and a 3-token chunk (decode_attention), an
    18-token chunk (> 16: the masked flash path), two more 1-token steps; the concatenated logits meet the
    criterion against HF's no-cache forward of all 30 tokens."""
    ids = _ids(2, 30, seed=2)
    cast = copy.deepcopy(hf).to(dtype)
    ours = fastllm.models.from_hf(cast)
    with torch.inference_mode():
        ref, eager = _hf_logits(hf, ids, torch.float64), cast(ids).logits
        cache = ours.new_cache(2, 40)
        parts, i = [], 0
        for n in (5, 1, 1, 3, 18, 1, 1):
            parts.append(ours(ids[:, i : i + n], cache))
            i += n
        assert cache.seqlens.tolist() == [30, 30]
    assert_equivalent(torch.cat(parts, 1), eager, ref, f"cached logits {dtype}")


def test_ragged_batch_via_cache_rows(hf):
    """Rows of 4, 9 and 6 prompt tokens prefilled one by one through cache.row(b) (each row's cache holds only
    its own tokens), then three batched 1-token steps (decode_attention, ragged lengths) and a batched 17-token
    chunk (the masked path), each row at its own positions; every row's logits meet the criterion against HF's
    forward of that row alone."""
    ours = fastllm.models.from_hf(hf)
    lengths, chunks = (4, 9, 6), (1, 1, 1, 17)
    seqs = [_ids(1, n + sum(chunks), seed=10 + b)[0] for b, n in enumerate(lengths)]
    with torch.inference_mode():
        cache = ours.new_cache(3, 32)
        out = [[ours(s[None, :n], cache.row(b))[0]] for b, (s, n) in enumerate(zip(seqs, lengths, strict=True))]
        assert cache.seqlens.tolist() == list(lengths)
        done = 0
        for m in chunks:
            new = torch.stack([s[n + done : n + done + m] for s, n in zip(seqs, lengths, strict=True)])  # (3, m)
            logits = ours(new, cache)  # (3, m, V)
            for b in range(3):
                out[b].append(logits[b])
            done += m
        assert cache.seqlens.tolist() == [n + done for n in lengths]
        for b, s in enumerate(seqs):
            ref, eager = _hf_logits(hf, s[None], torch.float64)[0], hf(s[None]).logits[0]
            assert_equivalent(torch.cat(out[b]), eager, ref, f"row {b}")


def test_kv_cache():
    c = fastllm.models.KVCache(3, 2, 4, 10, 8, torch.float32)
    assert c.k[0].shape == (2, 4, 10, 8) and len(c.v) == 3 and c.seqlens.dtype == torch.int32
    r = c.row(1)
    assert r.batch_size == 1 and r.max_seq_len == 10
    r.k[2][0, 1, 3] = 5.0
    r.seqlens += 4
    assert c.k[2][1, 1, 3].eq(5.0).all() and c.seqlens.tolist() == [0, 4]  # views: writes land in c
    c.reset()
    assert c.seqlens.tolist() == [0, 0]
    with pytest.raises(ValueError, match="row"):
        c.row(2)
    with pytest.raises(ValueError, match="max_seq_len"):
        fastllm.models.KVCache(1, 1, 1, 0, 8)
    with pytest.raises(ValueError, match="dtype"):
        fastllm.models.KVCache(1, 1, 1, 4, 8, torch.int8)
    assert c.num_layers == 3


# --------------------------------------------------------------------------------------------------
# Training and dtype moves


def test_autograd_matches_hf(hf):
    """The no-cache forward is differentiable: gradients of the token embedding and of layer 0's q/k/v weight
    meet the criterion against HF's (float64 reference, fp32 eager)."""
    ids = _ids(2, 9, seed=3)
    w = torch.randn(2, 9, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gpt2 = hf.config.model_type == "gpt2"

    def hf_grads(model):
        model.zero_grad()
        (model(ids).logits * w.to(model.dtype)).sum().backward()
        base = model.transformer if gpt2 else model.model
        emb = (base.wte if gpt2 else base.embed_tokens).weight.grad
        if gpt2:
            qkv = base.h[0].attn.c_attn.weight.grad.t()
        else:
            a = base.layers[0].self_attn
            qkv = torch.cat([a.q_proj.weight.grad, a.k_proj.weight.grad, a.v_proj.weight.grad])
        return emb, qkv

    ref = hf_grads(_hf64(hf))
    eager = hf_grads(copy.deepcopy(hf))
    ours = fastllm.models.from_hf(hf).train()
    (ours(ids) * w.float()).sum().backward()
    layer0 = ours.h[0].attn if gpt2 else ours.layers[0].self_attn
    emb = (ours.wte if gpt2 else ours.embed_tokens).weight.grad
    for name, g, e, r in zip(("embedding grad", "qkv grad"), (emb, layer0.qkv_proj.weight.grad), eager, ref,
                             strict=True):  # fmt: skip
        assert_equivalent(g, e, r, name)


def test_to_dtype_keeps_rope_tables_fp32(hf):
    ours = fastllm.models.from_hf(hf).to(torch.bfloat16)
    if hasattr(ours, "rotary"):
        assert ours.rotary.cos.dtype == torch.float32
        assert ours.layers[0].self_attn.rotary is ours.rotary  # one table, shared by the layers
    direct = fastllm.models.from_hf(copy.deepcopy(hf).to(torch.bfloat16))
    ids = _ids(1, 7)
    with torch.inference_mode():
        assert torch.equal(ours(ids), direct(ids))


# --------------------------------------------------------------------------------------------------
# int8


@pytest.mark.parametrize("mode", ["int8_weight_only", "int8"])
def test_quantized(hf, mode):
    """int8 is not under the 2x criterion (it changes the weights). What is checked: every linear of the blocks
    and the LM head became an Int8Linear, so the blocks run the submodules instead of the fused float ops; the
    next-token choice (argmax) agrees with the float model on >= 75% of positions; the largest logit error stays
    under 10% of the largest logit (+0.05); the cached forward of the quantized model equals its full forward
    (allclose 1e-4: the same int8 weights, different GEMM shapes)."""
    ours = fastllm.models.from_hf(hf)
    ids = _ids(2, 12, seed=7)
    with torch.inference_mode():
        ref = ours(ids)
    fastllm.quantize_(ours, mode)
    kinds = {type(m).__name__ for n, m in ours.named_modules() if n.endswith(("_proj", "fc1", "fc2", "lm_head"))}
    assert kinds == {"Int8Linear"}, kinds
    with torch.inference_mode():
        q = ours(ids)
        cache = ours.new_cache(2, 16)
        cached = torch.cat([ours(ids[:, :5], cache)] + [ours(ids[:, i : i + 1], cache) for i in range(5, 12)], 1)
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree
    assert (q - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    torch.testing.assert_close(cached, q, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Loading and saving


def test_save_load_round_trip(hf, tmp_path):
    ours = fastllm.models.from_hf(hf)
    fastllm.models.save_pretrained(ours, tmp_path)
    again = fastllm.models.from_pretrained(tmp_path)
    assert type(again) is type(ours)
    ids = _ids(1, 7)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.inference_mode():
        assert torch.equal(again(ids), ours(ids))
        assert torch.equal(back(ids).logits, hf(ids).logits)  # transformers loads the same weights, bit for bit
        assert torch.equal(fastllm.models.from_hf(back)(ids), ours(ids))


def test_dtype_defaults(tmp_path):
    hf = _hf("llama").to(torch.bfloat16)
    ours = fastllm.models.from_hf(hf)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16  # from_hf: the HF model's dtype
    assert fastllm.models.from_hf(hf, dtype=torch.float32).lm_head.weight.dtype == torch.float32
    fastllm.models.save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert fastllm.models.from_pretrained(tmp_path).norm.weight.dtype == torch.bfloat16  # the config's dtype
    d = json.loads((tmp_path / "config.json").read_text())
    del d["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert fastllm.models.from_pretrained(tmp_path).norm.weight.dtype == torch.float32  # none given: float32
    assert fastllm.models.from_pretrained(tmp_path, dtype=torch.float64).norm.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        fastllm.models.from_pretrained(tmp_path, dtype=torch.int8)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sharded_index(kind, tmp_path):
    from safetensors.torch import load_file, save_file

    ours = fastllm.models.from_hf(_hf(kind))
    fastllm.models.save_pretrained(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fn, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / fn)
    index = {"metadata": {}, "weight_map": {k: fn for fn, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    again = fastllm.models.from_pretrained(tmp_path)
    ids = _ids(1, 5)
    with torch.inference_mode():
        assert torch.equal(again(ids), ours(ids))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="00002"):
        fastllm.models.from_pretrained(tmp_path)


def test_base_model_checkpoint(tmp_path):
    """A GPT2Model checkpoint (keys without transformer., HF's old causal-mask buffers beside them) loads, its LM
    head tied to wte."""
    from safetensors.torch import load_file, save_file

    ours = fastllm.models.from_hf(_hf("gpt2"))
    fastllm.models.save_pretrained(ours, tmp_path)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 96, 96)
    save_file(sd, tmp_path / "model.safetensors")
    ids = _ids(1, 5)
    with torch.inference_mode():
        assert torch.equal(fastllm.models.from_pretrained(tmp_path)(ids), ours(ids))


# --------------------------------------------------------------------------------------------------
# Bad configs, weights and inputs


def _saved(kind, tmp_path, **kw):
    fastllm.models.save_pretrained(fastllm.models.from_hf(_hf(kind, **kw)), tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(("kind", "change", "match"), [
    ("llama", dict(model_type="gpt_neox"), "model_type"),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "low_freq_factor"),
    ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("llama", dict(hidden_act="tanh"), "hidden_act"),
    ("qwen2", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
    ("gpt2", dict(activation_function="tanh"), "activation_function"),
])  # fmt: skip
def test_bad_configs(tmp_path, kind, change, match):
    d = _saved(kind, tmp_path)
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        fastllm.models.from_pretrained(tmp_path)


def test_sliding_window_caps_the_length():
    """Decision: a sliding window shorter than max_position_embeddings caps the model's length at the window (for
    sequences that fit in it, HF's windowed attention is full causal attention); longer inputs raise."""
    hf = _hf("mistral", sliding_window=16)
    ours = fastllm.models.from_hf(hf)
    assert ours.config.max_seq_len == 16
    ids = _ids(1, 16)
    with torch.inference_mode():
        ref, eager = _hf_logits(hf, ids, torch.float64), hf(ids).logits
        assert_equivalent(ours(ids), eager, ref, "mistral, 16 tokens, window 16")
        with pytest.raises(ValueError, match="sliding_window"):
            ours(_ids(1, 17))
        with pytest.raises(ValueError, match="sliding_window"):
            ours.new_cache(1, 17)
    # Qwen2: only when use_sliding_window and some layer slides (layers >= max_window_layers)
    caps = {mw: fastllm.models.from_hf(_hf("qwen2", use_sliding_window=True, sliding_window=16,
                                           max_window_layers=mw)).config.max_seq_len for mw in (1, 2)}  # fmt: skip
    assert caps == {1: 16, 2: 96}
    assert fastllm.models.from_hf(_hf("qwen2", use_sliding_window=False, sliding_window=16)).config.max_seq_len == 96


def test_missing_mismatched_unexpected_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)

    def load_with(**edit):
        bad = dict(sd)
        for k, v in edit.items():
            if v is None:
                del bad[k.replace("__", ".")]
            else:
                bad[k.replace("__", ".")] = v
        save_file(bad, f)
        return fastllm.models.from_pretrained(tmp_path)

    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_with(model__layers__1__mlp__up_proj__weight=None)
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_with(model__layers__0__self_attn__k_proj__weight=None)
    with pytest.raises(ValueError, match=r"wrong shape: model\.norm\.weight \(7,\)"):
        load_with(model__norm__weight=torch.ones(7))
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.0\.self_attn\.v_proj\.weight"):
        load_with(model__layers__0__self_attn__v_proj__weight=torch.ones(8, 48))
    with pytest.raises(ValueError, match=r"unexpected weights .*model\.layers\.0\.extra\.weight"):
        load_with(model__layers__0__extra__weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"not float: model\.norm\.weight"):
        load_with(model__norm__weight=torch.ones(48, dtype=torch.int32))
    f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ValueError, match="safetensors"):
        fastllm.models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json"):
        fastllm.models.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bad_inputs(kind):
    ours = fastllm.models.from_hf(_hf(kind))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="vocabulary"):
            ours(torch.tensor([[1, V]]))
        with pytest.raises(ValueError, match="vocabulary"):
            ours(torch.tensor([[-1, 2]]))
        with pytest.raises(ValueError, match="empty"):
            ours(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="2-D"):
            ours(torch.tensor([[1.0, 2.0]]))
        with pytest.raises(ValueError, match="2-D"):
            ours(torch.tensor([1, 2]))
        with pytest.raises(TypeError, match="input_ids"):
            ours([[1, 2]])
        with pytest.raises(ValueError, match="limit"):
            ours(_ids(1, 97))
        with pytest.raises(ValueError, match="limit"):
            ours.new_cache(1, 97)
        cache = ours.new_cache(1, 8)
        ours(_ids(1, 6), cache)
        with pytest.raises(ValueError, match="full"):
            ours(_ids(1, 3), cache)
        assert cache.seqlens.tolist() == [6]  # a refused call changes nothing
        with pytest.raises(ValueError, match="rows"):
            ours(_ids(2, 1), cache)
        with pytest.raises(TypeError, match="cache"):
            ours(_ids(1, 1), "cache")
    with pytest.raises(TypeError):
        fastllm.models.from_hf(object())
    with pytest.raises(TypeError):
        fastllm.models.save_pretrained(torch.nn.Linear(2, 2), "unused")
    fastllm.quantize_(ours, "int8_weight_only")
    with pytest.raises(ValueError, match="quantized"):
        fastllm.models.save_pretrained(ours, "unused")
