"""The blocks of the decoder zoo: attention with a fused q/k/v projection, rotary embedding, GQA and a static KV
cache, and the two MLPs, each usable before and after fastllm.quantize_.

    q, k, v = qkv_projection(x, W_qkv, b_qkv)       one GEMM over [Wq; Wk; Wv], written in the (B, H, S, D) layout
    q, k = rotary_embedding(q, k, cos, sin, pos)    HF rotate_half convention, fp32 math (Llama, Mistral, Qwen2)
    o = attend(q, k, v)                             GQA: query head h reads kv head h // (Hq / Hkv)
    y = o_proj(o)

How a forward attends (`plan` decides once per forward, every layer follows):
    no cache                     flash_attention(causal)   positions 0..S-1 (training / eval; autograd)
    a cache, all rows empty      flash_attention(causal)   on the new tokens (the prefill), K/V also written
    a cache, S <= 16 new tokens  decode_attention(q, k_cache, v_cache, seqlens + S)   (ragged lengths)
    a cache, longer S            flash_attention with an explicit (B, 1, S, end) bool mask over the cache prefix
With a cache, row b's new tokens take positions seqlens[b] .. seqlens[b] + S - 1 and their K/V are written there
before attending; the model advances seqlens by S after its last layer.

After quantize_, qkv_proj / o_proj / the MLP linears are fastllm.nn.Int8Linear modules: the blocks then call the
submodules (q/k/v split by a view of the projection's output) instead of the fused float ops.
"""

from typing import NamedTuple

import torch
from torch import nn

from fastllm.nn.gemm import FusedFFN, FusedGatedFFN
from fastllm.nn.kv_cache import KVCache
from fastllm.ops.attention import decode_attention, flash_attention
from fastllm.ops.gemm import act_ref, fused_ffn, fused_gated_ffn, linear
from fastllm.ops.qkv import qkv_projection
from fastllm.ops.rope import rope_tables, rotary_embedding

DECODE_MAX_NEW = 16  # decode_attention takes up to this many new tokens per row

# Hugging Face activation names -> fastllm's (fused_ffn / fused_gated_ffn). gelu_new / gelu_fast are the tanh
# approximation written out (equal to torch's approximate="tanh" up to the rounding of sqrt(2 / pi)).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu",
                  "relu": "relu"}  # fmt: skip


def hf_activation(owner: str, key: str, name) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{owner}: {key} {name!r} is not supported (accepted: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------------


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x) through fastllm.linear for a float nn.Linear, else the module itself (Int8Linear after quantize_)."""
    if type(mod) is nn.Linear:
        return linear(x, mod.weight, mod.bias)
    return mod(x)


class Rotary(nn.Module):
    """The cos / sin tables (max_positions, rotary_dim / 2) of a rotary embedding, float32 non-persistent buffers.

    One per model, shared by its attention layers. The tables stay float32 whatever the model's dtype: .to(device)
    moves them, .to(bfloat16) / .half() / .double() leave them as they are (rounding them would shift every angle).
    """

    def __init__(self, max_positions: int, rotary_dim: int, theta: float = 10000.0, scaling=None, device=None):
        super().__init__()
        self.max_positions, self.rotary_dim, self.theta, self.scaling = max_positions, rotary_dim, theta, scaling
        with torch.device("cpu"):  # real tables even when the model is built on the meta device (loading)
            cos, sin = rope_tables(max_positions, rotary_dim, theta, scaling)
        if device is not None and torch.device(device).type != "meta":
            cos, sin = cos.to(device), sin.to(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        device = fn(self.cos[:0]).device  # where the model is going; the dtype is ignored
        if device != self.cos.device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, rotary_dim={self.rotary_dim}, theta={self.theta}"


# --------------------------------------------------------------------------------------------------
# One forward's plan: validated once, shared by every layer.


class Step(NamedTuple):
    positions: torch.Tensor  # (B, S) int64: each new token's position
    cache: KVCache | None
    mode: str  # "causal" (no cache, or an empty one), "decode" (S <= 16 on a cache), "masked" (longer S on one)
    start: int | None  # every row's cache holds `start` tokens (K/V written by a slice), None: ragged rows
    rows: torch.Tensor | None  # ragged rows: (B, 1) int64, the cache rows the new K/V go to (at `positions`)
    lens: torch.Tensor | None  # "decode": (B,) int32 = seqlens + S
    mask: torch.Tensor | None  # "masked": (B, 1, S, end) bool, True = attend
    end: int  # the cache prefix 0..end-1 that holds every row's tokens after this forward


def plan(input_ids, cache: KVCache | None, *, vocab_size: int, max_seq_len: int, num_layers: int,
         limit_note: str = "") -> Step:  # fmt: skip
    """Validate the token ids and the cache (ValueError / TypeError naming them); the positions and how to attend.

    Two small host reads per forward (the ids' range, the cache's shortest and longest row): a device sync each
    on a GPU."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}"
        raise ValueError(f"input_ids must be a 2-D int64/int32 tensor (B, S), got {got}")
    B, S = input_ids.shape
    if S == 0 or B == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    lo, hi = (int(t) for t in input_ids.aminmax())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary), got values in [{lo}, {hi}]")
    dev = input_ids.device
    if cache is None:
        if max_seq_len < S:
            raise ValueError(f"input of {S} tokens is longer than the model's limit ({max_seq_len}{limit_note})")
        return Step(torch.arange(S, device=dev).expand(B, S), None, "causal", 0, None, None, None, S)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a fastllm.nn.kv_cache.KVCache or None, got {type(cache).__name__}")
    if cache.batch_size != B:
        raise ValueError(f"cache: it holds {cache.batch_size} rows, input_ids has {B}")
    if len(cache.k) != num_layers:
        raise ValueError(f"cache: it has {len(cache.k)} layers, the model {num_layers}")
    first, last = (int(t) for t in cache.seqlens.aminmax())  # (B,) int32: the shortest and longest row
    end = last + S
    if end > cache.max_seq_len:
        raise ValueError(f"cache: it is full: {end} tokens > its max_seq_len ({cache.max_seq_len})")
    if end > max_seq_len:
        raise ValueError(f"cache: {end} tokens are longer than the model's limit ({max_seq_len}{limit_note})")
    if first == last:  # every row at the same length: K/V go in by a slice
        positions, start, rows = torch.arange(first, end, device=dev).expand(B, S), first, None
    else:
        positions = cache.seqlens.to(torch.int64)[:, None] + torch.arange(S, device=dev)  # (B, S)
        start, rows = None, torch.arange(B, device=dev)[:, None]
    if last == 0:
        return Step(positions, cache, "causal", start, rows, None, None, end)
    if S <= DECODE_MAX_NEW:
        return Step(positions, cache, "decode", start, rows, cache.seqlens + S, None, end)
    mask = torch.arange(end, device=dev)[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, S, end)
    return Step(positions, cache, "masked", start, rows, None, mask, end)


def attend(q, k, v, step: Step, layer: int, scale=None) -> torch.Tensor:
    """q (B, Hq, S, D), k / v (B, Hkv, S, D) of the new tokens -> (B, Hq, S, D); writes k / v into the cache."""
    c = step.cache
    if c is not None:
        kc, vc = c.k[layer], c.v[layer]  # (B, Hkv, S_max, D)
        if step.start is not None:
            kc[:, :, step.start : step.end].copy_(k)
            vc[:, :, step.start : step.end].copy_(v)
        else:  # (B, S, Hkv, D) at each row's own positions
            kc[step.rows, :, step.positions] = k.transpose(1, 2)
            vc[step.rows, :, step.positions] = v.transpose(1, 2)
        if step.mode == "decode":
            return decode_attention(q, kc, vc, step.lens, scale=scale)
        if step.mode == "masked":
            e = step.end
            return flash_attention(q, kc[:, :, :e], vc[:, :, :e], attn_mask=step.mask, scale=scale)
    return flash_attention(q, k, v, causal=True, scale=scale)


class Attention(nn.Module):
    """Causal multi-head attention with GQA: qkv_proj (one nn.Linear over [Wq; Wk; Wv]), o_proj, optional rotary.

    `rotary` is the model's shared Rotary (held by reference, not as a submodule: the model owns and moves it);
    None for learned positions (GPT-2). `scale` defaults to head_dim ** -0.5."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 o_bias: bool, rotary: Rotary | None = None, scale: float | None = None, dtype=None,
                 device=None):  # fmt: skip
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")  # fmt: skip
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        kw = {"dtype": dtype, "device": device}
        self.qkv_proj = nn.Linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias, **kw)
        self.__dict__["rotary"] = rotary  # (not registered: one table for all layers, moved by the model)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        """x (B, S, hidden) -> (B, S, hidden)."""
        B, S, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        p = self.qkv_proj
        if type(p) is nn.Linear:
            q, k, v = qkv_projection(x, p.weight, p.bias, num_heads=Hq, num_kv_heads=Hkv)  # (B, H, S, D) each
        else:  # quantized: the module, then the heads by a view
            q, k, v = p(x).view(B, S, Hq + 2 * Hkv, D).transpose(1, 2).split((Hq, Hkv, Hkv), dim=1)
        r = self.rotary
        if r is not None:
            q, k = rotary_embedding(q, k, r.cos, r.sin, step.positions)
        o = attend(q, k, v, step, layer, self.scale)  # (B, Hq, S, D)
        return project(self.o_proj, o.transpose(1, 2).reshape(B, S, Hq * D))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"


# --------------------------------------------------------------------------------------------------
# MLPs: fastllm.nn's fused modules (same submodules and state-dict keys) that still run after quantize_.


class MLP(FusedFFN):
    """fc2(act(fc1(x))): one fused_ffn while fc1 and fc2 are float nn.Linear, the submodules otherwise."""

    def forward(self, x):
        fc1, fc2 = self.fc1, self.fc2
        if type(fc1) is nn.Linear and type(fc2) is nn.Linear:
            return fused_ffn(x, fc1.weight, fc2.weight, b1=fc1.bias, b2=fc2.bias, activation=self.activation)
        return project(fc2, act_ref(self.activation, project(fc1, x)))


class GatedMLP(FusedGatedFFN):
    """down(act(gate(x)) * up(x)) (SwiGLU with silu): one fused_gated_ffn while the three are float nn.Linear."""

    def forward(self, x):
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if type(g) is nn.Linear and type(u) is nn.Linear and type(d) is nn.Linear:
            return fused_gated_ffn(x, g.weight, u.weight, d.weight, b_gate=g.bias, b_up=u.bias, b_down=d.bias,
                                   activation=self.activation)  # fmt: skip
        return project(d, act_ref(self.activation, project(g, x)) * project(u, x))
