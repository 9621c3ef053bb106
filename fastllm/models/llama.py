"""The Llama family on fastllm ops: Llama 2/3, Mistral, Qwen2 and SmolLM (a Llama with tied embeddings).

    x = embed_tokens[ids]                                    (B, S, d)
    for each layer:                                          pre-norm residual blocks
        h, r = add_rms_norm(x, r)                            (the residual add fused into the norm)
        x = o_proj(attn(rope(qkv_proj(h))))                  GQA, causal; fastllm.flash/decode_attention
        h, r = add_rms_norm(x, r)
        x = down(silu(gate(h)) * up(h))                      SwiGLU, one fused_gated_ffn
    logits = lm_head(rms_norm(x + r))                        (B, S, vocab); lm_head tied to embed_tokens or not

Config keys that change the math and are not implemented raise (never a silently different model): a
rope_type other than default / llama3, partial rotary, an activation other than silu, a sliding window shorter
than the sequences (Mistral: the window caps the supported length instead), Qwen2's use_sliding_window.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import Attention, GatedMLP, project, rope_inv_freq, rope_tables
from fastllm.nn.kv_cache import KVCache
from fastllm.ops.layer_norm import add_rms_norm, rms_norm

FAMILIES = ("llama", "mistral", "qwen2")


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
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    max_seq_len: int = 0  # longest sequence this model computes exactly (the sliding window, if shorter)
    hf: dict = field(default_factory=dict, repr=False)  # the Hugging Face config it came from (save_pretrained)

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"LlamaConfig: model_type {mt!r} is not a Llama-family model ({', '.join(FAMILIES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"LlamaConfig: hidden_act {act!r} is not supported (silu)")
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        if not rope:
            rope = dict(d.get("rope_scaling") or {})
            rope["rope_theta"] = d.get("rope_theta", 10000.0)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        kind = rope.get("rope_type", "default")
        if kind not in ("default", "llama3"):
            raise ValueError(f"LlamaConfig: rope_scaling type {kind!r} is not supported (default, llama3)")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("LlamaConfig: partial_rotary_factor != 1 is not supported")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        max_pos = d.get("max_position_embeddings", 2048)
        max_seq = max_pos
        window = d.get("sliding_window")
        if mt == "qwen2" and d.get("use_sliding_window", False):
            raise ValueError("LlamaConfig: use_sliding_window=True (Qwen2 sliding-window layers) is not supported")
        if mt == "mistral" and window is not None:
            max_seq = min(max_seq, int(window))  # exact up to the window; longer inputs are refused
        if d.get("pretraining_tp", 1) not in (1, None):
            pass  # (a training-time sharding hint; the math is the same)
        qkv_bias = True if mt == "qwen2" else bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=max_pos, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling=rope if kind == "llama3" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
            o_bias=mt != "qwen2" and bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=mt, max_seq_len=max_seq, hf=dict(d),
        )  # fmt: skip


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, rope, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size, **kw))
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   c.qkv_bias, c.o_bias, rope, **kw)  # fmt: skip
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size, **kw))
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.mlp_bias, **kw)
        self.eps = c.rms_norm_eps

    def forward(self, x, r, positions, layer: int, cache):
        """x: the last sublayer's output, r: the residual stream before it (None at the first layer)."""
        if r is None:
            h, r = rms_norm(x, self.input_layernorm, self.eps), x
        else:
            h, r = add_rms_norm(x, r, self.input_layernorm, self.eps)
        x = self.self_attn(h, positions, layer, cache)
        h, r = add_rms_norm(x, r, self.post_attention_layernorm, self.eps)
        return self.mlp(h), r


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        cos, sin = rope_tables(c.max_seq_len, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        self.register_buffer("rope_cos", cos if device is None else cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin if device is None else sin.to(device), persistent=False)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, **kw)
        rope = (self.rope_cos, self.rope_sin)
        self.layers = nn.ModuleList(Block(c, rope, **kw) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size, **kw))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .double() replace the rope buffers: the blocks hold the new ones (fp32 tables stay fp32)
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        for blk in self.layers:
            blk.self_attn.rope = (self.rope_cos, self.rope_sin)
        return self

    def new_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        c, w = self.config, self.embed_tokens.weight
        if max_seq_len > c.max_seq_len:
            raise ValueError(f"new_cache: max_seq_len {max_seq_len} > the model's limit {c.max_seq_len}")
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_seq_len, c.head_dim,
                       dtype or w.dtype, device or w.device)  # fmt: skip

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False):
        """input_ids (B, S) -> logits (B, S, vocab) (last_only: (B, 1, vocab), the next-token logits)."""
        positions = check_ids(self, input_ids, cache)
        x, r = self.embed_tokens(input_ids), None  # (B, S, d)
        for i, blk in enumerate(self.layers):
            x, r = blk(x, r, positions, i, cache)
        if cache is not None:
            cache.seqlens += input_ids.shape[1]
        if last_only:
            x, r = x[:, -1:], r[:, -1:]
        h, _ = add_rms_norm(x, r, self.norm, self.config.rms_norm_eps)
        return project(self.lm_head, h)  # (B, S, vocab)

    def generate(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate

        return generate(self, input_ids, attention_mask, **kw)

    def generate_stream(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate_stream

        return generate_stream(self, input_ids, attention_mask, **kw)


def check_ids(model, input_ids, cache) -> torch.Tensor:
    """Validate the token ids (and the cache room); return the positions (B, S) long."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}"
        raise ValueError(f"input_ids must be a 2-D int64/int32 tensor (B, S), got {got}")
    B, S = input_ids.shape
    if S == 0 or B == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    V = model.config.vocab_size
    lo, hi = (int(t) for t in input_ids.aminmax())
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids must lie in [0, {V}) (the vocabulary), got values in [{lo}, {hi}]")
    limit = model.config.max_seq_len
    if cache is None:
        if limit < S:
            raise ValueError(f"input of {S} tokens is longer than the model's limit ({limit})")
        return torch.arange(S, device=input_ids.device).expand(B, S)
    if cache.batch_size != B:
        raise ValueError(f"the cache holds {cache.batch_size} rows, input_ids has {B}")
    start = cache.seqlens.to(torch.int64)
    end = int(start.max()) + S
    if end > cache.max_seq_len:
        raise ValueError(f"the cache is full: {end} tokens > its max_seq_len ({cache.max_seq_len})")
    return start[:, None] + torch.arange(S, device=input_ids.device)  # (B, S)
