"""ViT on fastllm ops (Dosovitskiy et al. 2021): Hugging Face's ViTModel and timm's vit_base_patch16_224 layouts.

    patches = unfold(pixel_values)                      (B, N, C*p*p)   N = (H / p) * (W / p)
    x = patches @ W_patch^T + b                         (B, N, d)       the conv weight (d, C, p, p) viewed as
                                                                        (d, C*p*p): the conv is ONE GEMM
    x = cat(cls_token, x) + pos_embed                   (B, N+1, d)
    for each layer:                                     pre-norm residual blocks (fastllm.nn.encoder.PreNormLayer)
        r = r + o_proj(attn(ln_1(r)))                   bidirectional, no mask; q/k/v one GEMM
        r = r + fc2(gelu(fc1(ln_2(r))))                 one fused_ffn
    last_hidden_state = norm(r)                         (B, N+1, d)     forward(pixel_values)
    pooler_output = tanh(pooler(last_hidden_state[:, 0]))   (B, pooler_output_size)   pool(last_hidden_state)

Loading: HF checkpoints in transformers 5's layout (layers.{i}.attention.q_proj ...) and the classic one
(encoder.layer.{i}.attention.attention.query ..., which transformers 5 renames on load), ViTModel or ViTFor* (keys
under vit.; the classifier is ignored); the pooler exists when the checkpoint has one. timm state dicts load
through from_timm(state_dict, num_heads=...) (their shapes give every other size). Config keys that change the
math and are not implemented raise a ValueError naming the key: a hidden_act fused_ffn lacks, a pooler_act other
than tanh, a head_dim other than hidden_size / num_attention_heads, a pre-quantized checkpoint. Position-embedding
interpolation (HF's interpolate_pos_encoding) is not implemented: the pixel size must be the config's image_size.
After fastllm.quantize_ the patch embedding stays float (it is a conv weight, not an nn.Linear).
"""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import hf_activation
from fastllm.nn.encoder import PatchEmbed, PreNormLayer, check_pixels, project, stream_norm
from fastllm.nn.layer_norm import LayerNorm

FAMILIES = ("vit",)
HF_PREFIX = "vit."  # ViTFor* keys: vit.embeddings..., vit.layers..., classifier.*
HF_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}


def _pair(key: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(t, int) for t in v):
        return (v[0], v[1])
    raise ValueError(f"ViTConfig: {key} must be an int or a pair of ints, got {v!r}")


@dataclass
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # fastllm's activation name (fused_ffn)
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)  # (H, W)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler: bool = True  # loading sets it from the checkpoint
    pooler_output_size: int | None = None  # None: hidden_size
    model_type: str = "vit"
    hf: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_hf(cls, d: dict) -> "ViTConfig":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"ViTConfig: model_type {mt!r} is not vit")
        if d.get("quantization_config"):
            raise ValueError("ViTConfig: quantization_config (a pre-quantized checkpoint) is not supported; load "
                             "the float weights, then fastllm.quantize_")  # fmt: skip
        act = hf_activation("ViTConfig", "hidden_act", d.get("hidden_act", "gelu"))
        if d.get("pooler_act", "tanh") != "tanh":
            raise ValueError(f"ViTConfig: pooler_act {d['pooler_act']!r} is not supported (only 'tanh')")
        hidden, heads = d.get("hidden_size", 768), d.get("num_attention_heads", 12)
        if not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"ViTConfig: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        if d.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"ViTConfig: head_dim {d['head_dim']} != hidden_size / num_attention_heads is not "
                             "supported")  # fmt: skip
        image, patch = _pair("image_size", d.get("image_size", 224)), _pair("patch_size", d.get("patch_size", 16))
        return cls(
            hidden_size=hidden, num_hidden_layers=d.get("num_hidden_layers", 12), num_attention_heads=heads,
            intermediate_size=d.get("intermediate_size", 3072), hidden_act=act,
            layer_norm_eps=d.get("layer_norm_eps", 1e-12), image_size=image, patch_size=patch,
            num_channels=d.get("num_channels", 3), qkv_bias=bool(d.get("qkv_bias", True)),
            pooler_output_size=d.get("pooler_output_size") or hidden, hf=dict(d),
        )  # fmt: skip

    def to_hf(self) -> dict:
        d = dict(self.hf)
        d.pop("quantization_config", None)
        d.pop("torch_dtype", None)
        sq = lambda t: t[0] if t[0] == t[1] else list(t)
        d.update(model_type="vit", architectures=["ViTModel"], hidden_size=self.hidden_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 intermediate_size=self.intermediate_size, hidden_act=HF_ACT_NAMES[self.hidden_act],
                 layer_norm_eps=self.layer_norm_eps, image_size=sq(self.image_size), patch_size=sq(self.patch_size),
                 num_channels=self.num_channels, qkv_bias=self.qkv_bias, pooler_output_size=self.pooler_output_size,
                 pooler_act="tanh")  # fmt: skip
        return d


class ViT(nn.Module):
    def __init__(self, config: ViTConfig, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        d = c.hidden_size
        self.patch_embed = PatchEmbed(c.num_channels, c.patch_size, d, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **kw))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, d, **kw))
        args = (d, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps)
        self.layers = nn.ModuleList(PreNormLayer(*args, qkv_bias=c.qkv_bias, **kw) for _ in range(c.num_hidden_layers))
        self.norm = LayerNorm(d, eps=c.layer_norm_eps, **kw)
        self.pooler = nn.Linear(d, c.pooler_output_size or d, **kw) if c.pooler else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> last_hidden_state (B, N+1, hidden), the class token first."""
        c = self.config
        px = check_pixels("ViT", pixel_values, c.num_channels, c.image_size, self.cls_token.dtype)
        x = self.patch_embed(px)  # (B, N, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N+1, d)
        r = None
        for layer in self.layers:
            x, r = layer(x, r)
        h, _ = stream_norm(x, r, self.norm)
        return h

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """HF's pooler_output: tanh(pooler(last_hidden_state[:, 0]))."""
        if self.pooler is None:
            raise ValueError("ViT.pool: this model has no pooler (its checkpoint had no pooler.dense weights)")
        return torch.tanh(project(self.pooler, last_hidden_state[:, 0]))


# --------------------------------------------------------------------------------------------------
# Loading: Hugging Face (both key layouts) and timm

_LEGACY = [  # the classic ViT keys -> transformers 5's (what its conversion_mapping does on load)
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


def hf_state(state: dict, config: ViTConfig) -> dict:
    """ViTFor* keys (under vit.) and the classic layout as ViTModel's in transformers 5; sets config.pooler from
    whether the checkpoint has one."""
    if any(k.startswith(HF_PREFIX) for k in state):
        state = {k.removeprefix(HF_PREFIX): v for k, v in state.items()}
    if any(k.startswith("encoder.layer.") for k in state):
        out = {}
        for k, v in state.items():
            if k.startswith("encoder.layer."):
                for pat, rep in _LEGACY:
                    k = re.sub(pat, rep, k)
            out[k] = v
        state = out
    config.pooler = "pooler.dense.weight" in state
    return state


def hf_layout(c: ViTConfig) -> dict:
    """Our state-dict key -> (its ViTModel keys, split sizes, transpose): q/k/v concatenated into qkv_proj."""
    one = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}  # fmt: skip
    if c.pooler:
        one.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    out = {k: ((v,), None, False) for k, v in one.items()}
    names = {"ln_1": "layernorm_before", "ln_2": "layernorm_after", "attn.o_proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    d = c.hidden_size
    for i in range(c.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            for o, h in names.items():
                out[f"{ours}{o}.{t}"] = ((f"{hf}{h}.{t}",), None, False)
            if t == "weight" or c.qkv_bias:
                qkv = tuple(f"{hf}attention.{p}_proj.{t}" for p in "qkv")
                out[f"{ours}attn.qkv_proj.{t}"] = (qkv, (d, d, d), False)
    return out


HF_IGNORED = r"^classifier\.|^embeddings\.mask_token$|(^|\.)position_ids$"


def timm_to_hf(state: dict, *, num_heads: int, layer_norm_eps: float = 1e-6, hidden_act: str = "gelu"):
    """A timm VisionTransformer state dict (vit_base_patch16_224 layout: patch_embed.proj, cls_token, pos_embed,
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, head) -> (HF config dict, ViTModel
    state dict). Sizes come from the shapes; num_heads cannot (timm's default eps is 1e-6, HF ViT's 1e-12). The
    classifier head is dropped; any other key timm may have (layer scale, register tokens, fc_norm) keeps its name,
    so loading reports it as unexpected."""
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if k not in state:
            why = " (a model without a class token or with fc_norm / average pooling is not supported)"
            raise ValueError(f"from_timm: the state dict has no {k}{why if k in ('cls_token', 'norm.weight') else ''}")
    w = state["patch_embed.proj.weight"]  # (d, C, p, p)
    d, C, ph, pw = w.shape
    n = state["pos_embed"].shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"from_timm: pos_embed has {n} patch positions, not a square grid")
    layers = 0
    while f"blocks.{layers}.norm1.weight" in state:
        layers += 1
    cfg = {"model_type": "vit", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": num_heads,
           "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0] if layers else 4 * d,
           "hidden_act": hidden_act, "layer_norm_eps": layer_norm_eps, "image_size": [g * ph, g * pw],
           "patch_size": [ph, pw], "num_channels": C, "qkv_bias": "blocks.0.attn.qkv.bias" in state}  # fmt: skip
    fixed = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}  # fmt: skip
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    out = {}
    for k, v in state.items():
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if k in fixed:
            out[fixed[k]] = v
        elif k in ("head.weight", "head.bias"):
            continue
        elif m and m[2] == "attn.qkv":
            for p, t in zip("qkv", v.chunk(3), strict=True):  # (3d, ...) -> q, k, v
                out[f"layers.{m[1]}.attention.{p}_proj.{m[3]}"] = t
        elif m and m[2] in block:
            out[f"layers.{m[1]}.{block[m[2]]}.{m[3]}"] = v
        else:
            out[k] = v  # unknown: reported by its timm name
    return cfg, out


def from_timm(state_dict: dict, *, num_heads: int, layer_norm_eps: float = 1e-6, hidden_act: str = "gelu",
              dtype=None, device=None) -> ViT:  # fmt: skip
    """Our ViT from a timm VisionTransformer state dict (see timm_to_hf). dtype defaults to the weights' dtype.
    save_pretrained then writes it as an HF ViTModel directory."""
    from fastllm.models._loading import _build, _check_dtype

    if not isinstance(state_dict, dict):
        raise TypeError(f"from_timm: expected a state dict, got {type(state_dict).__name__}")
    cfg, state = timm_to_hf(state_dict, num_heads=num_heads, layer_norm_eps=layer_norm_eps, hidden_act=hidden_act)
    dtype = dtype or state_dict["cls_token"].dtype
    _check_dtype("from_timm", dtype)
    return _build(cfg, state, dtype, device)
