"""The Llama family on fastllm ops: Llama 2/3, Mistral, Qwen2 and SmolLM (a Llama with tied embeddings).

    x = embed_tokens[ids]                                    (B, S, d)
    for each layer:                                          pre-norm residual blocks
        h, r = add_rms_norm(x, r)                            (the residual add fused into the norm)
        q, k, v = qkv_proj(h)                                (B, Hq | Hkv | Hkv, S, D), one GEMM; Qwen2: + bias
        q, k = rope(q, k, positions)                         rope_theta, rope_scaling None / default / llama3
        x = o_proj(attn(q, k, v))                            GQA, causal; flash_attention / decode_attention
        h, r = add_rms_norm(x, r)
        x = down(silu(gate(h)) * up(h))                      SwiGLU, one fused_gated_ffn
    logits = lm_head(rms_norm(x + r))                        (B, S, vocab); lm_head tied to embed_tokens or not

Config keys that change the math and are not implemented raise a ValueError naming the key (never a silently
different model): a rope type other than default / llama3, partial rotary, an activation fused_gated_ffn lacks,
a pre-quantized checkpoint (quantization_config). Decisions:
  - sliding window (Mistral's sliding_window, Qwen2's use_sliding_window on some layer): attention over windows
    is not implemented, but for sequences no longer than the window it equals full causal attention (HF's window
    keeps keys j > i - window). So the window caps the model's length (config.max_seq_len): exact up to it,
    longer inputs and caches are refused with a ValueError naming sliding_window.
  - attention_dropout (and any dropout): only matters for training with dropout, which this model does not do;
    the forward is the eval-mode forward (autograd works).
  - pretraining_tp: a training-time sharding hint of the same math; ignored.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import Attention, GatedMLP, Rotary, hf_activation, plan, project
from fastllm.nn.kv_cache import KVCache
from fastllm.nn.layer_norm import RMSNorm
from fastllm.ops.layer_norm import add_rms_norm, rms_norm

FAMILIES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_PREFIX = "model."  # HF keys: model.layers.{i}..., model.embed_tokens.weight, model.norm.weight, lm_head.weight


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or HF's llama3 dict
    hidden_act: str = "silu"  # fastllm's activation name (fused_gated_ffn)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
    o_bias: bool = False  # Llama: attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # a window shorter than max_position_embeddings caps the length
    model_type: str = "llama"
    hf: dict = field(default_factory=dict, repr=False)  # the Hugging Face config it came from (save_pretrained)

    @property
    def max_seq_len(self) -> int:
        """The longest sequence this model computes exactly."""
        w = self.sliding_window
        return self.max_position_embeddings if w is None else min(w, self.max_position_embeddings)

    @property
    def limit_note(self) -> str:
        w = self.sliding_window
        return ", its sliding_window" if w is not None and w < self.max_position_embeddings else ""

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face config dict (config.json, or transformers' config.to_dict())."""
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"LlamaConfig: model_type {mt!r} is not a Llama-family model ({', '.join(FAMILIES)})")
        if d.get("quantization_config"):
            raise ValueError("LlamaConfig: quantization_config (a pre-quantized checkpoint) is not supported; load "
                             "the float weights, then fastllm.quantize_")  # fmt: skip
        act = hf_activation("LlamaConfig", "hidden_act", d.get("hidden_act", "silu"))
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        if not rope:
            rope = dict(d.get("rope_scaling") or {})
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"LlamaConfig: rope_scaling / rope_parameters: rope_type {kind!r} is not supported "
                             "(default, llama3)")  # fmt: skip
        for where in (rope, d):
            if where.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
                raise ValueError("LlamaConfig: partial_rotary_factor != 1 (partial rotary) is not supported")
        scaling = None
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"LlamaConfig: rope_scaling llama3 lacks {', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        heads = d["num_attention_heads"]
        max_pos = d.get("max_position_embeddings", 2048)
        window = None
        if mt == "mistral" or (mt == "qwen2" and d.get("use_sliding_window", False)):
            window = d.get("sliding_window")
            if mt == "qwen2" and window is not None:  # only the layers layer_types (or i >= max_window_layers) name
                types = d.get("layer_types")
                n = d["num_hidden_layers"]
                slides = ("sliding_attention" in types) if types else n > d.get("max_window_layers", n)
                window = window if slides else None
        if window is not None and int(window) >= max_pos:
            window = None
        bias = bool(d.get("attention_bias", False)) and mt == "llama"
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, max_position_embeddings=max_pos,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling, hidden_act=act, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bias, o_bias=bias, mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)),
            sliding_window=None if window is None else int(window), model_type=mt, hf=dict(d),
        )  # fmt: skip

    def to_hf(self) -> dict:
        """A Hugging Face config dict (the one it came from, with this config's values written over it)."""
        d = dict(self.hf)
        for k in ("rope_parameters", "rope_scaling", "quantization_config", "torch_dtype"):
            d.pop(k, None)
        act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
               "relu": "relu"}[self.hidden_act]  # fmt: skip
        d.update(model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                 rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, hidden_act=act,
                 tie_word_embeddings=self.tie_word_embeddings)  # fmt: skip
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2" and self.sliding_window is None:
            d["use_sliding_window"] = False
        return d


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, rotary: Rotary, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   qkv_bias=c.qkv_bias, o_bias=c.o_bias, rotary=rotary, **kw)  # fmt: skip
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, bias=c.mlp_bias, **kw)

    def forward(self, x, r, step, layer: int):
        """x: the last sublayer's output, r: the residual stream before it (None at the first layer)."""
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if r is None:
            h, r = rms_norm(x, n1.weight, n1.eps), x
        else:
            h, r = add_rms_norm(x, r, n1.weight, n1.eps)  # h = norm(x + r), r = x + r
        x = self.self_attn(h, step, layer)
        h, r = add_rms_norm(x, r, n2.weight, n2.eps)
        return self.mlp(h), r


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, **kw)
        self.rotary = Rotary(c.max_seq_len, c.head_dim, c.rope_theta, c.rope_scaling, device=device)
        self.layers = nn.ModuleList(Block(c, self.rotary, **kw) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, **kw)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache for up to max_seq_len tokens per row (in the model's dtype and device by default)."""
        c, w = self.config, self.embed_tokens.weight
        if max_seq_len > c.max_seq_len:
            limit = f"{c.max_seq_len}{c.limit_note}"
            raise ValueError(f"new_cache: max_seq_len {max_seq_len} > the model's limit ({limit})")
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_seq_len, c.head_dim,
                       dtype or w.dtype, device or w.device)  # fmt: skip

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False):
        """input_ids (B, S) -> logits (B, S, vocab) (last_only: (B, 1, vocab), the next-token logits).

        With a cache, row b's tokens take positions cache.seqlens[b] + 0..S-1; afterwards seqlens += S."""
        c = self.config
        step = plan(input_ids, cache, vocab_size=c.vocab_size, max_seq_len=c.max_seq_len,
                    num_layers=c.num_hidden_layers, limit_note=c.limit_note)  # fmt: skip
        x, r = self.embed_tokens(input_ids), None  # (B, S, d)
        for i, blk in enumerate(self.layers):
            x, r = blk(x, r, step, i)
        if cache is not None:
            cache.seqlens += input_ids.shape[1]
        if last_only:
            x, r = x[:, -1:], r[:, -1:]
        h, _ = add_rms_norm(x, r, self.norm.weight, self.norm.eps)
        return project(self.lm_head, h)  # (B, S, vocab)

    def generate(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate

        return generate(self, input_ids, attention_mask, **kw)

    def generate_stream(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate_stream

        return generate_stream(self, input_ids, attention_mask, **kw)


def hf_layout(c: LlamaConfig) -> dict:
    """Our state-dict key -> (its HF keys, split sizes, transpose): q/k/v are three HF tensors concatenated along
    dim 0 into our qkv_proj (split back by the sizes on saving); nothing is transposed. A tied lm_head has none."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    out = {"embed_tokens.weight": (("model.embed_tokens.weight",), None, False),
           "norm.weight": (("model.norm.weight",), None, False)}  # fmt: skip
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head.weight",), None, False)
    kinds = ["weight"] + (["bias"] if c.qkv_bias else [])
    for i in range(c.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):  # fmt: skip
            out[ours + name] = ((hf + name,), None, False)
        for t in kinds:
            qkv = tuple(f"{hf}self_attn.{p}_proj.{t}" for p in "qkv")
            out[f"{ours}self_attn.qkv_proj.{t}"] = (qkv, (q, kv, kv), False)
        if c.o_bias:
            out[ours + "self_attn.o_proj.bias"] = ((hf + "self_attn.o_proj.bias",), None, False)
        if c.mlp_bias:
            for p in ("gate", "up", "down"):
                out[f"{ours}mlp.{p}_proj.bias"] = ((f"{hf}mlp.{p}_proj.bias",), None, False)
    return out


HF_IGNORED = r"rotary_emb\.inv_freq$"  # (a buffer some versions saved; recomputed from the config)
