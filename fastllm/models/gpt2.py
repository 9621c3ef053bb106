"""GPT-2 on fastllm ops (Radford et al. 2019): learned positions, pre-norm LayerNorm blocks, a gelu_tanh MLP.

    x = wte[ids] + wpe[positions]                            (B, S, d)
    for each layer:                                          pre-norm residual blocks
        h, r = add_layer_norm(x, r)                          ln_1 (the residual add fused into the norm)
        q, k, v = qkv_proj(h)                                (B, H, S, D) each, one GEMM (HF: attn.c_attn)
        x = o_proj(attn(q, k, v))                            causal; flash_attention / decode_attention (HF: c_proj)
        h, r = add_layer_norm(x, r)                          ln_2
        x = fc2(gelu_tanh(fc1(h)))                           one fused_ffn (HF: mlp.c_fc, mlp.c_proj)
    logits = lm_head(layer_norm(x + r))                      ln_f; lm_head tied to wte (unless tie_word_embeddings
                                                             is false)

HF's Conv1D stores weights as (in, out); they are transposed once at load into nn.Linear's (out, in) (and back on
save_pretrained). Config keys that change the math and are not implemented raise a ValueError naming the key:
add_cross_attention (the decoder of an encoder-decoder), an activation_function fused_ffn lacks. Supported:
scale_attn_weights and scale_attn_by_inverse_layer_idx (the attention scale), reorder_and_upcast_attn (only
HF's mixed-precision softmax; ours is fp32 inside anyway). Dropouts (attn_pdrop, resid_pdrop, embd_pdrop) only
matter for training with dropout, which this model does not do: the forward is the eval-mode forward.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import MLP, Attention, hf_activation, plan, project
from fastllm.nn.kv_cache import KVCache
from fastllm.nn.layer_norm import LayerNorm
from fastllm.ops.layer_norm import add_layer_norm, layer_norm

FAMILIES = ("gpt2",)
HF_PREFIX = "transformer."  # HF keys: transformer.h.{i}..., transformer.wte.weight, ..., lm_head.weight


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # the MLP width; None: 4 * n_embd
    activation_function: str = "gelu_tanh"  # fastllm's activation name (fused_ffn); HF's gelu_new
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer + 1)
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    hf: dict = field(default_factory=dict, repr=False)

    @property
    def max_seq_len(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def attn_scale(self, layer: int) -> float:
        s = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        return s / (layer + 1) if self.scale_attn_by_inverse_layer_idx else s

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"GPT2Config: model_type {mt!r} is not gpt2")
        if d.get("add_cross_attention", False):
            raise ValueError("GPT2Config: add_cross_attention=True (cross-attention layers) is not supported")
        if d.get("quantization_config"):
            raise ValueError("GPT2Config: quantization_config (a pre-quantized checkpoint) is not supported; load "
                             "the float weights, then fastllm.quantize_")  # fmt: skip
        act = hf_activation("GPT2Config", "activation_function", d.get("activation_function", "gelu_new"))
        n_embd, n_head = d.get("n_embd", 768), d.get("n_head", 12)
        if n_embd % n_head:
            raise ValueError(f"GPT2Config: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        return cls(
            vocab_size=d.get("vocab_size", 50257), n_positions=d.get("n_positions", 1024), n_embd=n_embd,
            n_layer=d.get("n_layer", 12), n_head=n_head, n_inner=d.get("n_inner"), activation_function=act,
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), hf=dict(d),
        )  # fmt: skip

    def to_hf(self) -> dict:
        d = dict(self.hf)
        d.pop("quantization_config", None)
        d.pop("torch_dtype", None)
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu",
               "silu": "silu"}[self.activation_function]  # fmt: skip
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                 n_positions=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head,
                 n_inner=self.n_inner, activation_function=act, layer_norm_epsilon=self.layer_norm_epsilon,
                 scale_attn_weights=self.scale_attn_weights,
                 scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
                 tie_word_embeddings=self.tie_word_embeddings)  # fmt: skip
        return d


class Block(nn.Module):
    def __init__(self, c: GPT2Config, layer: int, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.ln_1 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, **kw)
        self.attn = Attention(c.n_embd, c.n_head, c.n_head, c.head_dim, qkv_bias=True, o_bias=True,
                              scale=c.attn_scale(layer), **kw)  # fmt: skip
        self.ln_2 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, **kw)
        self.mlp = MLP(c.n_embd, c.inner, activation=c.activation_function, **kw)

    def forward(self, x, r, step, layer: int):
        """x: the last sublayer's output, r: the residual stream before it (None at the first layer)."""
        n1, n2 = self.ln_1, self.ln_2
        if r is None:
            h, r = layer_norm(x, n1.weight, n1.bias, n1.eps), x
        else:
            h, r = add_layer_norm(x, r, n1.weight, n1.bias, n1.eps)  # h = ln(x + r), r = x + r
        x = self.attn(h, step, layer)
        h, r = add_layer_norm(x, r, n2.weight, n2.bias, n2.eps)
        return self.mlp(h), r


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, **kw)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd, **kw)
        self.h = nn.ModuleList(Block(c, i, **kw) for i in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, **kw)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False, **kw)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def new_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache for up to max_seq_len tokens per row (in the model's dtype and device by default)."""
        c, w = self.config, self.wte.weight
        if max_seq_len > c.n_positions:
            raise ValueError(f"new_cache: max_seq_len {max_seq_len} > the model's limit ({c.n_positions})")
        return KVCache(c.n_layer, batch_size, c.n_head, max_seq_len, c.head_dim, dtype or w.dtype, device or w.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False):
        """input_ids (B, S) -> logits (B, S, vocab) (last_only: (B, 1, vocab), the next-token logits).

        With a cache, row b's tokens take positions cache.seqlens[b] + 0..S-1; afterwards seqlens += S."""
        c = self.config
        step = plan(input_ids, cache, vocab_size=c.vocab_size, max_seq_len=c.n_positions, num_layers=c.n_layer)
        x, r = self.wte(input_ids) + self.wpe(step.positions), None  # (B, S, d)
        for i, blk in enumerate(self.h):
            x, r = blk(x, r, step, i)
        if cache is not None:
            cache.seqlens += input_ids.shape[1]
        if last_only:
            x, r = x[:, -1:], r[:, -1:]
        h, _ = add_layer_norm(x, r, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        return project(self.lm_head, h)  # (B, S, vocab)

    def generate(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate

        return generate(self, input_ids, attention_mask, **kw)

    def generate_stream(self, input_ids, attention_mask=None, **kw):
        from fastllm.models.generate import generate_stream

        return generate_stream(self, input_ids, attention_mask, **kw)


def hf_layout(c: GPT2Config) -> dict:
    """Our state-dict key -> (its HF keys, split sizes, transpose): HF's Conv1D weights (in, out) are transposed
    into nn.Linear's (out, in); c_attn is already one [q | k | v] tensor. A tied lm_head has none."""
    p = HF_PREFIX
    out = {k: ((p + k,), None, False) for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head.weight",), None, False)
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in range(c.n_layer):
        for ours, hf in names.items():
            for t in ("weight", "bias"):
                conv = t == "weight" and not ours.startswith("ln")
                out[f"h.{i}.{ours}.{t}"] = ((f"{p}h.{i}.{hf}.{t}",), None, conv)
    return out


HF_IGNORED = r"\.attn\.(masked_)?bias$"  # (the causal-mask buffers old checkpoints saved)
