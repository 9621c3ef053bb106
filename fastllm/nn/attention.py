"""The attention of the decoder zoo: fused q/k/v projection, rotary embedding, GQA and a static KV cache.

q, k, v = qkv(x)                      one GEMM over the concatenated weight (B, S, (Hq + 2 Hkv) D)
q, k = rope(q, k, positions)          rotate_half convention (Llama, Mistral, Qwen2), fp32 math
write k, v into the cache at each row's own positions; attend:
    no cache:                 flash_attention(causal)                  (training / eval; autograd)
    cache, S <= 16 new tokens: decode_attention(q, k_cache, v_cache, seqlens + S)    (ragged lengths)
    cache, longer S:          flash_attention(causal, bottom-right aligned) per row on its cache prefix
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.nn.kv_cache import KVCache
from fastllm.ops.attention import decode_attention, flash_attention
from fastllm.ops.gemm import linear

DECODE_MAX_NEW = 16  # decode_attention takes up to this many new tokens per row


def project(mod: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """mod(x) (+ residual) through fastllm.linear for a float nn.Linear (the residual fused in the epilogue), or the
    module itself (fastllm.nn.Int8Linear after fastllm.quantize_)."""
    if type(mod) is nn.Linear:
        return linear(x, mod.weight, mod.bias, residual=residual)
    y = mod(x)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------------------------------
# Rotary embedding (RoFormer, Su et al. 2021), HF's rotate_half layout: pairs (i, i + D/2).


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (D/2,) in float64; scaling None / {"rope_type": "default"} or HF's "llama3" rule."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind != "llama3":
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (accepted: default, llama3)")
    # Llama 3.1: wavelengths longer than old_len / low_freq_factor are divided by `factor`, shorter than
    # old_len / high_freq_factor kept, and smoothly interpolated in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def rope_tables(max_positions: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_positions, D/2) float32, computed in float64 and rounded once."""
    freqs = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D); cos/sin (B, 1, S, D/2) float32 gathered at the positions. fp32 math, one rounding."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with GQA: qkv_proj (one nn.Linear over [Wq; Wk; Wv]) and o_proj."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
                 rope: tuple[torch.Tensor, torch.Tensor] | None, dtype=None, device=None):  # fmt: skip
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv_heads})"
            )
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        kw = {"dtype": dtype, "device": device}
        self.qkv_proj = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias, **kw)
        self.rope = rope  # (cos, sin) tables shared by the layers, or None (learned positions: GPT-2)

    def forward(self, x, positions, layer: int, cache: KVCache | None, residual=None):
        """x (B, S, hidden), positions (B, S) long -> (B, S, hidden) (+ residual, fused into o_proj)."""
        B, S, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = project(self.qkv_proj, x).view(B, S, Hq + 2 * Hkv, D).transpose(1, 2)  # (B, Hq + 2 Hkv, S, D)
        q, k, v = qkv.split((Hq, Hkv, Hkv), dim=1)
        if self.rope is not None:
            cos, sin = (t[positions].unsqueeze(1) for t in self.rope)  # (B, 1, S, D/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            o = flash_attention(q, k, v, causal=True)
        else:
            o = self._cached(q, k, v, positions, cache.k[layer], cache.v[layer], cache.seqlens)
        o = o.transpose(1, 2).reshape(B, S, Hq * D)
        return project(self.o_proj, o, residual)

    @staticmethod
    def _cached(q, k, v, positions, k_cache, v_cache, seqlens):
        B, _, S, _ = q.shape
        rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
        k_cache[rows, :, positions] = k.transpose(1, 2)  # (B, S, Hkv, D) at each row's own positions
        v_cache[rows, :, positions] = v.transpose(1, 2)
        lens = seqlens + S
        if S <= DECODE_MAX_NEW:
            return decode_attention(q, k_cache, v_cache, lens)
        # a long chunk: per row, its queries against its cache prefix (causal aligned bottom-right)
        out = [flash_attention(q[b : b + 1], k_cache[b : b + 1, :, : int(n)], v_cache[b : b + 1, :, : int(n)],
                               causal=True) for b, n in enumerate(lens.tolist())]  # fmt: skip
        return torch.cat(out)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): SwiGLU (Shazeer 2020), one fused op while the three are float nn.Linear."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, **kw)

    def forward(self, x):
        from fastllm.ops.gemm import fused_gated_ffn

        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if type(g) is nn.Linear and type(u) is nn.Linear and type(d) is nn.Linear:
            return fused_gated_ffn(x, g.weight, u.weight, d.weight, b_gate=g.bias, b_up=u.bias, b_down=d.bias)
        return project(d, F.silu(project(g, x)) * project(u, x))
