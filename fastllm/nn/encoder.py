"""The blocks of the encoder zoo (BERT, ViT, CLIP): bidirectional (or causal) self-attention with a padding mask,
the post-norm and pre-norm Transformer layers built on it, and the patch embedding of the image towers; each
usable before and after fastllm.quantize_.

    q, k, v = qkv_projection(x, W_qkv, b_qkv)       one GEMM over [Wq; Wk; Wv], written in the (B, H, S, D) layout
    o = flash_attention(q, k, v, attn_mask)          mask (B, 1, 1, S) bool, True = attend (broadcast by strides)
    y = o_proj(o) + residual                         the residual add fused into the GEMM's epilogue

    post-norm (BERT):    h = LN1(x + o_proj(attn(x)))         out = LN2(h + fc2(act(fc1(h))))
    pre-norm (ViT, CLIP): r = r + o_proj(attn(LN1(r)))         r = r + fc2(act(fc1(LN2(r))))

The pre-norm layer carries (x, r) as GPT-2's blocks do: x is the last MLP's output and r the residual stream
before it, so the add of x into r is fused into the next layer's LN1 (add_layer_norm) and the model's last norm.

B batch, S sequence, H heads, D head dim, d = H * D the hidden size.

After quantize_, qkv_proj / o_proj / fc1 / fc2 are fastllm.nn.Int8Linear: the blocks then call the submodules
(q/k/v split by a view of the projection's output, the residual added after) instead of the fused float ops.
"""

import torch
from torch import nn

from fastllm.nn.attention import MLP
from fastllm.nn.layer_norm import LayerNorm
from fastllm.ops.attention import attention_merged, flash_attention
from fastllm.ops.gemm import linear
from fastllm.ops.layer_norm import add_layer_norm, layer_norm
from fastllm.ops.qkv import qkv_projection

__all__ = ["MLP", "PatchEmbed", "PostNormLayer", "PreNormLayer", "SelfAttention", "check_ids", "check_pixels",
           "key_lengths", "padding_mask", "project", "stream_norm"]  # fmt: skip


def project(mod: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """mod(x) + residual: one fastllm.linear (residual in the epilogue) for a float nn.Linear, else the module
    itself (Int8Linear after quantize_) and an add."""
    if type(mod) is nn.Linear:
        return linear(x, mod.weight, mod.bias, residual=residual)
    y = mod(x)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------------------------------
# Input validation shared by the text encoders (one host read each: a device sync on a GPU)


def check_ids(owner: str, input_ids, vocab_size: int, max_len: int, arg: str = "input_ids") -> tuple[int, int]:
    """(B, S) of a 2-D int64/int32 tensor of ids in [0, vocab_size), S <= max_len; ValueError / TypeError naming
    `arg` otherwise."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{owner}: {arg} must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}"
        raise ValueError(f"{owner}: {arg} must be a 2-D int64/int32 tensor (B, S), got {got}")
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"{owner}: {arg} is empty: shape {tuple(input_ids.shape)}")
    if max_len < S:
        raise ValueError(f"{owner}: {arg} has {S} tokens, longer than max_position_embeddings ({max_len})")
    lo, hi = (int(t) for t in input_ids.aminmax())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{owner}: {arg} must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return B, S


def padding_mask(owner: str, attention_mask, shape: tuple[int, int], device) -> torch.Tensor | None:
    """HF's (B, S) attention_mask (1 = token, 0 = padding; bool, int or float) -> a (B, 1, 1, S) bool key mask
    (True = attend), or None when every token is attended (no mask: the faster kernel path).

    Refused (ValueError): another shape, values other than 0 / 1, a row with no token at all (HF's eager softmax
    then averages every key, a value with no meaning; the kernels return zeros)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{owner}: attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"{owner}: attention_mask must have the shape of input_ids (B, S) = {tuple(shape)}, got "
                         f"{tuple(attention_mask.shape)}")  # fmt: skip
    m = attention_mask
    if m.dtype != torch.bool:
        if m.is_complex():
            raise ValueError(f"{owner}: attention_mask must be bool, integer or float, got {m.dtype}")
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(f"{owner}: attention_mask must hold only 0 (padding) and 1 (token)")
        m = m != 0
    empty = ~m.any(-1)
    if empty.any():
        raise ValueError(f"{owner}: attention_mask row {int(empty.nonzero()[0, 0])} has no token (all 0)")
    if m.all():
        return None
    return m.to(device)[:, None, None, :]  # (B, 1, 1, S)


def key_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """(B,) int32 key lengths when the (B, 1, 1, S) bool key mask of padding_mask is a prefix in every row (right
    padding, what tokenizers write), else None.

    Inference only (the kernels' kv_len has no backward): attention then stops at each row's length instead of
    masking the padding keys block by block. The outputs are bit-identical for finite inputs (a masked key adds an
    exact 0); the one difference is a non-finite value (NaN / Inf) in a padding position's key or value, which the
    masked path multiplies by 0 (NaN, as torch's SDPA) and this path never reads. Decision: padding positions are
    not part of the input, so what they hold does not reach the real tokens (MiniLM B8 S256: attention 11.9 ->
    5.5 ms a layer on Zen 3, torch SDPA 7.4)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    m = mask[:, 0, 0]  # (B, S)
    lens = m.sum(-1, dtype=torch.int32)
    if not torch.equal(m, torch.arange(m.shape[-1], device=m.device) < lens[:, None]):
        return None
    return lens


# --------------------------------------------------------------------------------------------------
# Images: the patch embedding and the pixel check (ViT, CLIP)


class PatchEmbed(nn.Module):
    """A conv with kernel = stride = patch (weight (d, C, p, p), as HF and timm store it) as one GEMM over the
    unfolded patches. Not an nn.Linear: fastllm.quantize_ leaves it float."""

    def __init__(self, channels: int, patch: tuple[int, int], hidden: int, bias: bool = True, dtype=None,
                 device=None):  # fmt: skip
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(hidden, channels, *patch, **kw))
        self.bias = nn.Parameter(torch.empty(hidden, **kw)) if bias else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d), patches in row-major order (as the conv's flatten(2))."""
        B, C, H, W = pixels.shape
        ph, pw = self.patch
        gh, gw = H // ph, W // pw
        x = pixels.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        return linear(x, self.weight.view(self.weight.shape[0], -1), self.bias)  # (B, N, d)


def check_pixels(owner: str, pixel_values, channels: int, size: tuple[int, int], dtype) -> torch.Tensor:
    """pixel_values (B, C, H, W) float of the model's channels and image size, cast to the model's dtype."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{owner}: pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or not pixel_values.is_floating_point() or pixel_values.shape[0] == 0:
        got = f"{pixel_values.dtype} {tuple(pixel_values.shape)}"
        raise ValueError(f"{owner}: pixel_values must be a non-empty 4-D float tensor (B, C, H, W), got {got}")
    _, C, H, W = pixel_values.shape
    if channels != C:
        raise ValueError(f"{owner}: pixel_values has {C} channels, the model takes {channels} (num_channels)")
    if tuple(size) != (H, W):
        raise ValueError(f"{owner}: pixel_values is {H}x{W}, the model takes {size[0]}x{size[1]} (image_size); "
                         "position-embedding interpolation is not supported")  # fmt: skip
    return pixel_values.to(dtype)


# --------------------------------------------------------------------------------------------------
# Attention and the two layer kinds


class SelfAttention(nn.Module):
    """Multi-head self-attention over the whole sequence (causal=True: CLIP's text tower): qkv_proj (one nn.Linear
    over [Wq; Wk; Wv]) and o_proj. `scale` defaults to head_dim ** -0.5."""

    def __init__(self, hidden: int, num_heads: int, *, qkv_bias: bool = True, o_bias: bool = True,
                 causal: bool = False, scale: float | None = None, dtype=None, device=None):  # fmt: skip
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({num_heads})")
        self.num_heads, self.head_dim, self.causal, self.scale = num_heads, hidden // num_heads, causal, scale
        kw = {"dtype": dtype, "device": device}
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(hidden, hidden, bias=o_bias, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """x (B, S, d), mask (B, 1, 1, S) bool or None -> o_proj(attention) + residual (B, S, d)."""
        B, S, _ = x.shape
        H, D = self.num_heads, self.head_dim
        p = self.qkv_proj
        if type(p) is nn.Linear:
            q, k, v = qkv_projection(x, p.weight, p.bias, num_heads=H, num_kv_heads=H)  # (B, H, S, D) each
        else:  # quantized: the module, then the heads by a view
            q, k, v = p(x).view(B, S, 3 * H, D).transpose(1, 2).split(H, dim=1)
        kv_len = key_lengths(mask) if mask is not None and not torch.is_grad_enabled() else None
        if mask is None or kv_len is not None:  # right padding: keys past each row's length skipped (bit-identical)
            scale = D**-0.5 if self.scale is None else self.scale
            o = attention_merged(q, k, v, kv_len, self.causal, scale)  # (B, S, H D), written in place by the kernel
        else:
            o = flash_attention(q, k, v, causal=self.causal, attn_mask=mask, scale=self.scale)  # (B, H, S, D)
            o = o.transpose(1, 2).reshape(B, S, H * D)
        return project(self.o_proj, o, residual)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}"


class PostNormLayer(nn.Module):
    """BERT's layer: h = ln_1(x + o_proj(attn(x))), out = ln_2(h + fc2(act(fc1(h))))."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, activation: str, eps: float, dtype=None,
                 device=None):  # fmt: skip
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.attn = SelfAttention(hidden, num_heads, **kw)
        self.ln_1 = LayerNorm(hidden, eps=eps, **kw)
        self.mlp = MLP(hidden, intermediate, activation=activation, **kw)
        self.ln_2 = LayerNorm(hidden, eps=eps, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n1, n2 = self.ln_1, self.ln_2
        h = layer_norm(self.attn(x, mask, residual=x), n1.weight, n1.bias, n1.eps)  # (B, S, d)
        out, _ = add_layer_norm(self.mlp(h), h, n2.weight, n2.bias, n2.eps)
        return out


class PreNormLayer(nn.Module):
    """ViT's and CLIP's layer: r = r + o_proj(attn(ln_1(r))), r = r + fc2(act(fc1(ln_2(r)))).

    forward(x, r) -> (x, r): x is the previous layer's MLP output, r the residual stream before it (None at the
    first layer, where x is the stream itself); the stream after this layer is x + r (see the module docstring)."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, activation: str, eps: float, *,
                 causal: bool = False, qkv_bias: bool = True, dtype=None, device=None):  # fmt: skip
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.ln_1 = LayerNorm(hidden, eps=eps, **kw)
        self.attn = SelfAttention(hidden, num_heads, qkv_bias=qkv_bias, causal=causal, **kw)
        self.ln_2 = LayerNorm(hidden, eps=eps, **kw)
        self.mlp = MLP(hidden, intermediate, activation=activation, **kw)

    def forward(self, x: torch.Tensor, r: torch.Tensor | None, mask: torch.Tensor | None = None):
        n1, n2 = self.ln_1, self.ln_2
        if r is None:
            h, r = layer_norm(x, n1.weight, n1.bias, n1.eps), x
        else:
            h, r = add_layer_norm(x, r, n1.weight, n1.bias, n1.eps)  # h = ln_1(x + r), r = x + r
        r = self.attn(h, mask, residual=r)  # the stream after attention
        h = layer_norm(r, n2.weight, n2.bias, n2.eps)
        return self.mlp(h), r


def stream_norm(x: torch.Tensor, r: torch.Tensor | None, norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + r), x + r) after the last PreNormLayer (r None: x is the stream)."""
    if r is None:
        return layer_norm(x, norm.weight, norm.bias, norm.eps), x
    return add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)
