"""BERT on fastllm ops (Devlin et al. 2019): the BertModel encoder, post-norm layers, an optional pooler.

    x = LN_emb(word[ids] + token_type[tt] + position[0..S-1])   (B, S, d)
    mask = attention_mask (B, S) -> (B, 1, 1, S) bool            keys of padding tokens are never attended
    for each layer:                                              post-norm residual blocks
        q, k, v = qkv_proj(x)                                    (B, H, S, D) each, one GEMM (HF: query/key/value)
        h = ln_1(x + o_proj(attn(q, k, v)))                      bidirectional; the add in the GEMM's epilogue
        x = ln_2(h + fc2(act(fc1(h))))                           one fused_ffn, then add_layer_norm
    last_hidden_state = x                                        (B, S, d)   forward(...)
    pooler_output = tanh(dense(x[:, 0]))                         (B, d)      pool(last_hidden_state)

Padded positions are computed too (as HF does: a padding token's query attends to the real tokens), so
last_hidden_state matches HF at every position, padding included.

Loading: BertModel checkpoints (keys without prefix, e.g. all-MiniLM-L6-v2) and BertFor* ones (keys under bert.;
their heads cls.* / classifier.* / qa_outputs.* are ignored). The pooler exists when the checkpoint has one
(BertModel saves it; BertForMaskedLM has none). Config keys that change the math and are not implemented raise a
ValueError naming the key: position_embedding_type other than "absolute", is_decoder, add_cross_attention, a
hidden_act fused_ffn lacks, a pre-quantized checkpoint. Dropouts only matter for training with dropout: the forward
is the eval-mode forward.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.nn.attention import hf_activation
from fastllm.nn.encoder import PostNormLayer, check_ids, padding_mask, project
from fastllm.nn.layer_norm import LayerNorm
from fastllm.ops.layer_norm import layer_norm

FAMILIES = ("bert",)
HF_PREFIX = "bert."  # BertFor* keys: bert.embeddings..., bert.encoder..., bert.pooler...
HF_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # fastllm's activation name (fused_ffn)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooler: bool = True  # a pooler (dense + tanh over the first token); loading sets it from the checkpoint
    model_type: str = "bert"
    hf: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"BertConfig: model_type {mt!r} is not bert")
        pe = d.get("position_embedding_type", "absolute")
        if pe != "absolute":
            raise ValueError(f"BertConfig: position_embedding_type {pe!r} is not supported (only 'absolute')")
        for key in ("is_decoder", "add_cross_attention"):
            if d.get(key, False):
                raise ValueError(f"BertConfig: {key}=True is not supported (fastllm's BERT is the encoder)")
        if d.get("quantization_config"):
            raise ValueError("BertConfig: quantization_config (a pre-quantized checkpoint) is not supported; load "
                             "the float weights, then fastllm.quantize_")  # fmt: skip
        act = hf_activation("BertConfig", "hidden_act", d.get("hidden_act", "gelu"))
        hidden, heads = d.get("hidden_size", 768), d.get("num_attention_heads", 12)
        if not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"BertConfig: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        return cls(
            vocab_size=d.get("vocab_size", 30522), hidden_size=hidden, num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=heads, intermediate_size=d.get("intermediate_size", 3072), hidden_act=act,
            max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12), hf=dict(d),
        )  # fmt: skip

    def to_hf(self) -> dict:
        d = dict(self.hf)
        d.pop("quantization_config", None)
        d.pop("torch_dtype", None)
        d.update(model_type="bert", architectures=["BertModel"], vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                 hidden_act=HF_ACT_NAMES[self.hidden_act], max_position_embeddings=self.max_position_embeddings,
                 type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
                 position_embedding_type="absolute")  # fmt: skip
        return d


class Bert(nn.Module):
    def __init__(self, config: BertConfig, dtype=None, device=None):
        super().__init__()
        c = self.config = config
        kw = {"dtype": dtype, "device": device}
        d = c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, d, **kw)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, d, **kw)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, d, **kw)
        self.ln_emb = LayerNorm(d, eps=c.layer_norm_eps, **kw)
        self.layers = nn.ModuleList(
            PostNormLayer(d, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps, **kw)
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(d, d, **kw) if c.pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """input_ids (B, S) -> last_hidden_state (B, S, hidden). attention_mask (B, S): 1 = token, 0 = padding;
        token_type_ids (B, S) in [0, type_vocab_size), default all 0."""
        c = self.config
        B, S = check_ids("Bert", input_ids, c.vocab_size, c.max_position_embeddings)
        x = self.word_embeddings(input_ids)  # (B, S, d)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            if isinstance(token_type_ids, torch.Tensor) and tuple(token_type_ids.shape) != (B, S):
                raise ValueError(f"Bert: token_type_ids must have the shape of input_ids {(B, S)}, got "
                                 f"{tuple(token_type_ids.shape)}")  # fmt: skip
            check_ids("Bert", token_type_ids, c.type_vocab_size, S, "token_type_ids")
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings.weight[:S]
        n = self.ln_emb
        x = layer_norm(x, n.weight, n.bias, n.eps)
        mask = padding_mask("Bert", attention_mask, (B, S), x.device)  # (B, 1, 1, S) or None
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """HF's pooler_output: tanh(dense(last_hidden_state[:, 0])) (B, hidden)."""
        if self.pooler is None:
            raise ValueError("Bert.pool: this model has no pooler (its checkpoint had no pooler.dense weights)")
        return torch.tanh(project(self.pooler, last_hidden_state[:, 0]))


def hf_state(state: dict, config: BertConfig) -> dict:
    """BertFor* keys (under bert.) as BertModel's; sets config.pooler from whether the checkpoint has one."""
    if any(k.startswith(HF_PREFIX) for k in state):
        state = {k.removeprefix(HF_PREFIX): v for k, v in state.items()}
    config.pooler = "pooler.dense.weight" in state
    return state


def hf_layout(c: BertConfig) -> dict:
    """Our state-dict key -> (its BertModel keys, split sizes, transpose): query / key / value are concatenated
    along dim 0 into our qkv_proj; nothing is transposed."""
    one = {"word_embeddings.weight": "embeddings.word_embeddings.weight",
           "position_embeddings.weight": "embeddings.position_embeddings.weight",
           "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
           "ln_emb.weight": "embeddings.LayerNorm.weight", "ln_emb.bias": "embeddings.LayerNorm.bias"}  # fmt: skip
    if c.pooler:
        one.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    names = {"attn.o_proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "ln_2": "output.LayerNorm"}  # fmt: skip
    d = c.hidden_size
    out = {k: ((v,), None, False) for k, v in one.items()}
    for i in range(c.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            for o, h in names.items():
                out[f"{ours}{o}.{t}"] = ((f"{hf}{h}.{t}",), None, False)
            qkv = tuple(f"{hf}attention.self.{p}.{t}" for p in ("query", "key", "value"))
            out[f"{ours}attn.qkv_proj.{t}"] = (qkv, (d, d, d), False)
    return out


# buffers some checkpoints saved (embeddings.position_ids in all-MiniLM-L6-v2) and BertFor* heads
HF_IGNORED = r"(^|\.)(position_ids|token_type_ids)$|^(cls|classifier|qa_outputs)\."
