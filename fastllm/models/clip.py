"""CLIP on fastllm ops (Radford et al. 2021): Hugging Face's CLIPModel and open_clip's key layouts.

    vision tower (ViT with a pre-LN, quick_gelu MLPs):
        x = cat(class_embedding, patches @ W_patch^T) + pos     (B, N+1, dv)   the conv as one GEMM, no bias
        r = ln_pre(x)                                           HF: pre_layrnorm
        for each layer: r = r + o_proj(attn(ln_1(r)));  r = r + fc2(act(fc1(ln_2(r))))     bidirectional
        last_hidden_state = r;  pooled = ln_post(r[:, 0])       (B, dv)        HF: post_layernorm
    text tower (a causal Transformer):
        x = token_embedding[ids] + pos[0..S-1]                  (B, S, dt)
        for each layer: the same pre-norm layer, causal attention with the padding mask
        last_hidden_state = norm(r);  pooled = last_hidden_state[b, eos_b]      (B, dt)   HF: final_layer_norm
            eos_b = argmax(ids[b]) when the text config's eos_token_id == 2 (HF's legacy rule: the EOS token has the
            largest id, as open_clip assumes), else the first position of eos_token_id in row b (0 if none)
    image_embeds = visual_projection(pooled_v);  text_embeds = text_projection(pooled_t)   (no bias; encode_*)
    logits_per_text = normalize(text_embeds) @ normalize(image_embeds)^T * exp(logit_scale);  logits_per_image = ^T

Padding: padding keys are masked on top of the causal mask, so real tokens and the pooled embeddings never see
padding. With right padding (the tokenizer's) every padded query still sees key 0 and its last_hidden_state
matches HF's too; with left padding, a padded query that sees no real key returns zeros from the attention (HF:
an average over masked keys), so only those padded positions' own last_hidden_state differ.

Loading: HF CLIPModel checkpoints (from_pretrained / from_hf); open_clip state dicts through
from_open_clip(state_dict, ...) (their shapes give the sizes; heads default to width / 64 as open_clip's).
Config keys that change the math and are not implemented raise a ValueError naming the key: a hidden_act fused_ffn
lacks (per tower), a head_dim of its own, a non-square image or patch, a pre-quantized checkpoint. Position
interpolation is not implemented (the pixel size must be image_size). After fastllm.quantize_ the patch
embedding stays float.
"""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import hf_activation
from fastllm.nn.encoder import PatchEmbed, PreNormLayer, check_ids, check_pixels, padding_mask, project, stream_norm
from fastllm.nn.layer_norm import LayerNorm
from fastllm.ops.gemm import linear
from fastllm.ops.layer_norm import layer_norm

FAMILIES = ("clip",)
HF_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}


@dataclass
class Tower:
    """One CLIP tower: the Transformer sizes, and the text-only (vocab, positions, eos) or vision-only (image,
    patch, channels) fields."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"  # fastllm's activation name (fused_ffn)
    layer_norm_eps: float = 1e-5
    vocab_size: int = 0  # text
    max_position_embeddings: int = 0  # text
    eos_token_id: int = 2  # text; 2: pool at argmax(input_ids) (HF's legacy rule, open_clip's)
    image_size: int = 0  # vision
    patch_size: int = 0  # vision
    num_channels: int = 3  # vision

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict, which: str) -> "Tower":
        key = f"{which}_config"
        act = hf_activation("CLIPConfig", f"{key}.hidden_act", d.get("hidden_act", "quick_gelu"))
        hidden, heads = d.get("hidden_size", 512 if which == "text" else 768), d.get("num_attention_heads", 8)
        if not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"CLIPConfig: {key}.hidden_size ({hidden}) must be a multiple of num_attention_heads "
                             f"({heads})")  # fmt: skip
        if d.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"CLIPConfig: {key}.head_dim {d['head_dim']} != hidden_size / num_attention_heads is "
                             "not supported")  # fmt: skip
        t = cls(hidden_size=hidden, num_hidden_layers=d.get("num_hidden_layers", 12), num_attention_heads=heads,
                intermediate_size=d.get("intermediate_size", 4 * hidden), hidden_act=act,
                layer_norm_eps=d.get("layer_norm_eps", 1e-5))  # fmt: skip
        if which == "text":
            t.vocab_size, t.max_position_embeddings = d.get("vocab_size", 49408), d.get("max_position_embeddings", 77)
            t.eos_token_id = d.get("eos_token_id", 49407)
        else:
            for k in ("image_size", "patch_size"):
                if not isinstance(d.get(k, 0), int):
                    raise ValueError(f"CLIPConfig: {key}.{k} {d[k]!r} is not supported (only a square int size)")
            t.image_size, t.patch_size = d.get("image_size", 224), d.get("patch_size", 32)
            t.num_channels = d.get("num_channels", 3)
        return t

    def to_hf(self, which: str) -> dict:
        d = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                 hidden_act=HF_ACT_NAMES[self.hidden_act], layer_norm_eps=self.layer_norm_eps)  # fmt: skip
        if which == "text":
            d.update(vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                     eos_token_id=self.eos_token_id)  # fmt: skip
        else:
            d.update(image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels)
        return d


@dataclass
class CLIPConfig:
    text: Tower
    vision: Tower
    projection_dim: int = 512
    model_type: str = "clip"
    hf: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPConfig":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"CLIPConfig: model_type {mt!r} is not clip")
        if d.get("quantization_config"):
            raise ValueError("CLIPConfig: quantization_config (a pre-quantized checkpoint) is not supported; load "
                             "the float weights, then fastllm.quantize_")  # fmt: skip
        text = Tower.from_hf(d.get("text_config") or {}, "text")
        vision = Tower.from_hf(d.get("vision_config") or {}, "vision")
        return cls(text=text, vision=vision, projection_dim=d.get("projection_dim", 512), hf=dict(d))

    def to_hf(self) -> dict:
        d = dict(self.hf)
        d.pop("quantization_config", None)
        d.pop("torch_dtype", None)
        text, vision = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
        text.update(self.text.to_hf("text"), projection_dim=self.projection_dim)
        vision.update(self.vision.to_hf("vision"), projection_dim=self.projection_dim)
        d.update(model_type="clip", architectures=["CLIPModel"], projection_dim=self.projection_dim,
                 text_config=text, vision_config=vision)  # fmt: skip
        return d


def _layers(t: Tower, causal: bool, kw: dict) -> nn.ModuleList:
    args = (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.hidden_act, t.layer_norm_eps)
    return nn.ModuleList(PreNormLayer(*args, causal=causal, **kw) for _ in range(t.num_hidden_layers))


class CLIPVision(nn.Module):
    def __init__(self, t: Tower, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.config, d = t, t.hidden_size
        self.patch_embed = PatchEmbed(t.num_channels, (t.patch_size, t.patch_size), d, bias=False, **kw)
        self.class_embedding = nn.Parameter(torch.zeros(d, **kw))
        self.pos_embed = nn.Parameter(torch.zeros(t.num_patches + 1, d, **kw))
        self.ln_pre = LayerNorm(d, eps=t.layer_norm_eps, **kw)
        self.layers = _layers(t, False, kw)
        self.ln_post = LayerNorm(d, eps=t.layer_norm_eps, **kw)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, C, H, W) -> (last_hidden_state (B, N+1, dv), pooled (B, dv)) as HF's vision model."""
        t, w = self.config, self.class_embedding
        px = check_pixels("CLIP", pixel_values, t.num_channels, (t.image_size, t.image_size), w.dtype)
        x = self.patch_embed(px)  # (B, N, dv)
        x = torch.cat([w.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed  # (B, N+1, dv)
        n = self.ln_pre
        x, r = layer_norm(x, n.weight, n.bias, n.eps), None
        for layer in self.layers:
            x, r = layer(x, r)
        last = x if r is None else x + r
        n = self.ln_post
        return last, layer_norm(last[:, 0], n.weight, n.bias, n.eps)


class CLIPText(nn.Module):
    def __init__(self, t: Tower, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.config, d = t, t.hidden_size
        self.token_embedding = nn.Embedding(t.vocab_size, d, **kw)
        self.pos_embed = nn.Parameter(torch.zeros(t.max_position_embeddings, d, **kw))
        self.layers = _layers(t, True, kw)
        self.norm = LayerNorm(d, eps=t.layer_norm_eps, **kw)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) the position each row is pooled at (HF's rule, see the module docstring)."""
        if self.config.eos_token_id == 2:
            return input_ids.argmax(-1)
        return (input_ids == self.config.eos_token_id).int().argmax(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, S) -> (last_hidden_state (B, S, dt), pooled (B, dt)) as HF's text model."""
        t = self.config
        B, S = check_ids("CLIP", input_ids, t.vocab_size, t.max_position_embeddings)
        mask = padding_mask("CLIP", attention_mask, (B, S), input_ids.device)  # (B, 1, 1, S) or None
        x, r = self.token_embedding(input_ids) + self.pos_embed[:S], None  # (B, S, dt)
        for layer in self.layers:
            x, r = layer(x, r, mask)  # causal, and the padding keys masked
        last, _ = stream_norm(x, r, self.norm)
        return last, last[torch.arange(B, device=last.device), self.eos_positions(input_ids)]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        self.visual = CLIPVision(c.vision, **kw)
        self.text = CLIPText(c.text, **kw)
        self.visual_projection = nn.Linear(c.vision.hidden_size, c.projection_dim, bias=False, **kw)
        self.text_projection = nn.Linear(c.text.hidden_size, c.projection_dim, bias=False, **kw)
        self.logit_scale = nn.Parameter(torch.zeros((), **kw))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> image_embeds (B, projection_dim), projected, not normalized."""
        return project(self.visual_projection, self.visual(pixel_values)[1])

    def encode_text(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(B, S) -> text_embeds (B, projection_dim), projected, not normalized."""
        return project(self.text_projection, self.text(input_ids, attention_mask)[1])

    def forward(self, input_ids, pixel_values, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), as HF's CLIPModel."""
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits_per_text = linear(txt, img) * self.logit_scale.exp()  # txt @ img^T  (B_txt, B_img)
        return logits_per_text.t(), logits_per_text


# --------------------------------------------------------------------------------------------------
# Loading: Hugging Face and open_clip


def hf_layout(c: CLIPConfig) -> dict:
    """Our state-dict key -> (its CLIPModel keys, split sizes, transpose): q/k/v concatenated into qkv_proj."""
    one = {"logit_scale": "logit_scale", "visual_projection.weight": "visual_projection.weight",
           "text_projection.weight": "text_projection.weight",
           "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "text.pos_embed": "text_model.embeddings.position_embedding.weight",
           "text.norm.weight": "text_model.final_layer_norm.weight",
           "text.norm.bias": "text_model.final_layer_norm.bias",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.pos_embed": "vision_model.embeddings.position_embedding.weight"}  # fmt: skip
    for n in ("weight", "bias"):
        one[f"visual.ln_pre.{n}"] = f"vision_model.pre_layrnorm.{n}"
        one[f"visual.ln_post.{n}"] = f"vision_model.post_layernorm.{n}"
    out = {k: ((v,), None, False) for k, v in one.items()}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.o_proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for ours, hf, t in (("text", "text_model", c.text), ("visual", "vision_model", c.vision)):
        d = t.hidden_size
        for i in range(t.num_hidden_layers):
            o, h = f"{ours}.layers.{i}.", f"{hf}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                for a, b in names.items():
                    out[f"{o}{a}.{kind}"] = ((f"{h}{b}.{kind}",), None, False)
                qkv = tuple(f"{h}self_attn.{p}_proj.{kind}" for p in "qkv")
                out[f"{o}attn.qkv_proj.{kind}"] = (qkv, (d, d, d), False)
    return out


def hf_state(state: dict, config: CLIPConfig) -> dict:
    """CLIPModel checkpoints need no key normalisation."""
    return state


HF_IGNORED = r"(^|\.)position_ids$"


def open_clip_to_hf(state: dict, *, text_heads: int | None = None, vision_heads: int | None = None,
                    hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):  # fmt: skip
    """An open_clip CLIP state dict (visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre,
    visual.transformer.resblocks.{i}.ln_1 / attn.in_proj_weight / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj,
    visual.ln_post, visual.proj (dv, e), token_embedding, positional_embedding, transformer.resblocks..., ln_final,
    text_projection (dt, e), logit_scale) -> (HF config dict, CLIPModel state dict).

    Sizes come from the shapes; heads default to width / 64 (open_clip's head width). hidden_act: "quick_gelu" for
    OpenAI's weights, "gelu" for open_clip's own (not recorded in a state dict). The text tower pools at
    argmax(input_ids), as open_clip does (HF's eos_token_id == 2 rule). The projections x @ proj become
    nn.Linear weights proj^T. Keys of other open_clip variants (attentional pooler, text cls token, ...) keep their
    names, so loading reports them as unexpected."""
    for k in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
              "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"):  # fmt: skip
        if k not in state:
            raise ValueError(f"from_open_clip: the state dict has no {k} (not an open_clip CLIP with a ViT tower)")
    dv, C, p, _ = state["visual.conv1.weight"].shape
    n = state["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"from_open_clip: visual.positional_embedding has {n} patch positions, not a square grid")
    vocab, dt = state["token_embedding.weight"].shape

    def count(prefix):
        i = 0
        while f"{prefix}resblocks.{i}.ln_1.weight" in state:
            i += 1
        return i

    def tower(prefix, d, heads):
        layers = count(prefix)
        fc = state.get(f"{prefix}resblocks.0.mlp.c_fc.weight")
        return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads or d // 64,
                    intermediate_size=fc.shape[0] if fc is not None else 4 * d, hidden_act=hidden_act,
                    layer_norm_eps=layer_norm_eps)  # fmt: skip

    text = tower("transformer.", dt, text_heads)
    text.update(vocab_size=vocab, max_position_embeddings=state["positional_embedding"].shape[0], eos_token_id=2)
    vision = tower("visual.transformer.", dv, vision_heads)
    vision.update(image_size=grid * p, patch_size=p, num_channels=C)
    e = state["text_projection"].shape[1]
    cfg = {"model_type": "clip", "projection_dim": e, "text_config": text, "vision_config": vision}

    fixed = {"logit_scale": "logit_scale", "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
             "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "visual.ln_post.weight": "vision_model.post_layernorm.weight",
             "visual.ln_post.bias": "vision_model.post_layernorm.bias"}  # fmt: skip
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    out = {}
    for k, v in state.items():
        m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$", k)
        if k in fixed:
            out[fixed[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t()  # (dv, e) used as x @ proj -> (e, dv)
        elif k == "text_projection":
            out["text_projection.weight"] = v.t()
        elif k in ("input_resolution", "context_length", "vocab_size"):  # scalars in OpenAI's original files
            continue
        elif m:
            hf = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}."
            rest = m[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for p_, t in zip("qkv", v.chunk(3), strict=True):  # (3d, ...) -> q, k, v
                    out[f"{hf}self_attn.{p_}_proj.{kind}"] = t
                continue
            name, _, kind = rest.rpartition(".")
            out[hf + block[name] + "." + kind if name in block else k] = v
        else:
            out[k] = v  # unknown: reported by its open_clip name
    return cfg, out


def from_open_clip(state_dict: dict, *, text_heads: int | None = None, vision_heads: int | None = None,
                   hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5, dtype=None,
                   device=None) -> CLIP:  # fmt: skip
    """Our CLIP from an open_clip state dict (see open_clip_to_hf). dtype defaults to the weights' dtype.
    save_pretrained then writes it as an HF CLIPModel directory."""
    from fastllm.models._loading import _build, _check_dtype

    if not isinstance(state_dict, dict):
        raise TypeError(f"from_open_clip: expected a state dict, got {type(state_dict).__name__}")
    cfg, state = open_clip_to_hf(state_dict, text_heads=text_heads, vision_heads=vision_heads, hidden_act=hidden_act,
                                 layer_norm_eps=layer_norm_eps)  # fmt: skip
    dtype = dtype or state_dict["visual.class_embedding"].dtype
    _check_dtype("from_open_clip", dtype)
    return _build(cfg, state, dtype, device)
