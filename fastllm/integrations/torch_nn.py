"""torch.nn rules: LayerNorm, RMSNorm, MultiheadAttention, TransformerEncoderLayer / DecoderLayer, TransformerEncoder.

    nn.LayerNorm          -> fastllm.layer_norm(x, weight, bias, eps)     normalized_shape of one dim (the op's)
    nn.RMSNorm            -> fastllm.rms_norm(x, weight, eps)             eps None = finfo(x.dtype).eps (torch's)
    nn.MultiheadAttention -> qkv_projection (self-attention) or three fastllm.linear (cross), then
                             fastllm.scaled_dot_product_attention, then fastllm.linear (out_proj)
    nn.TransformerEncoderLayer -> torch's own "slow path" (its self_attn and norms are the rows above), never the
                             native fused kernel (torch._transformer_encoder_layer_fwd reads the weights itself and
                             would bypass the swapped submodules); its feed-forward block one fastllm.fused_ffn
                             (relu / gelu; torch's block otherwise)
    nn.TransformerDecoderLayer -> the feed-forward block as fastllm.fused_ffn (kind "mlp": torch's decoder layer has
                             no native path; its attentions and norms are the rows above, swapped on their own)
    nn.TransformerEncoder -> the nested-tensor ("sparsity") fast path off: it would hand the layers nested tensors

MultiheadAttention masks, as F.multi_head_attention_forward reads them: key_padding_mask (N, S) and attn_mask
(L, S) or (N * H, L, S), bool (True = *not* allowed, the opposite of SDPA's) or float (added to the scores). Two
bool masks are merged as one bool mask (True = attend, fastllm's convention); a float one makes both float, with
-inf where a bool mask was True, summed in the query's dtype: what torch computes. is_causal is torch's hint: with
no key_padding_mask the attention is causal and attn_mask is not read; otherwise the masks are used.
A call the fast path cannot take exactly (need_weights=True, which is nn.MultiheadAttention's default; dropout in
training; unbatched or nested input; autocast; a dtype mix) runs the original forward for that call.
Declined at accelerate time (kept and reported): add_bias_kv, add_zero_attn, kdim/vdim != embed_dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fastllm.integrations.engine import Rule, hooks_below, original_forward, swap
from fastllm.ops.attention import attention_merged, scaled_dot_product_attention
from fastllm.ops.gemm import fused_ffn, linear
from fastllm.ops.layer_norm import layer_norm, rms_norm
from fastllm.ops.qkv import qkv_projection


def _same_dtype(x: torch.Tensor, *params) -> bool:
    """The fast path's common condition: no autocast and every parameter in the input's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    return all(p is None or p.dtype == x.dtype for p in params)


# --------------------------------------------------------------------------------------------------
# Norms.


def _one_dim_norm(m: nn.Module) -> str | None:
    if len(m.normalized_shape) != 1:
        return f"normalized_shape {tuple(m.normalized_shape)} spans more than the last dim"
    return None


class _FastLayerNorm:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.normalized_shape[0] or not _same_dtype(x, self.weight, self.bias):
            return original_forward(self, x)
        return layer_norm(x, self.weight, self.bias, self.eps)


class FastLinearMixin:
    """nn.Linear -> fastllm.linear (its C++ / Triton GEMM on the weight's packed copy). Not a rule of its own (a model's
    every nn.Linear is not ours to take: the MLP rules read their layers' weights, and a linear alone gains little);
    the transformers decoder rules swap the attention projections and the LM head with it, so that a decode step
    runs on fastllm's thread pool from norm to logits: a torch GEMM between two fastllm ops woke torch's OpenMP
    workers, which then competed with fastllm's for the second core (issue 13: ~1 ms per torch linear in the model
    against 55-110 us alone, on 2 cores)."""

    _fastllm_rule_name = "linear (with its parent)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features or not _same_dtype(x, self.weight, self.bias):
            return original_forward(self, x)
        return linear(x, self.weight, self.bias)


def swap_linear(m) -> None:
    """Swap `m` for FastLinearMixin's class when it is a plain nn.Linear (anything else: left as it is)."""
    if type(m) is nn.Linear:
        swap(m, FastLinearMixin)


class _FastRMSNorm:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.normalized_shape[0] or not _same_dtype(x, self.weight):
            return original_forward(self, x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # (torch's default for eps=None)
        return rms_norm(x, self.weight, eps)


# --------------------------------------------------------------------------------------------------
# MultiheadAttention.


def _check_mha(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True (learned key/value biases appended to the sequence)"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    if not m._qkv_same_embed_dim:
        return f"kdim/vdim ({m.kdim}/{m.vdim}) != embed_dim ({m.embed_dim}): separate projection weights"
    if not isinstance(m.out_proj, nn.Linear):
        return f"out_proj is a {type(m.out_proj).__name__}, not an nn.Linear"
    return None


def _merge_masks(attn_mask, key_padding_mask, B: int, H: int, L: int, S: int, dtype):
    """The (B, H or 1, L or 1, S) mask of fastllm's SDPA: bool (True = attend) when every given mask is bool,
    else additive float in `dtype` (torch's -inf for bool True), summed as torch sums them. None without masks."""
    masks = []
    if attn_mask is not None:  # (L, S) or (B * H, L, S)
        masks.append(attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S))
    if key_padding_mask is not None:  # (B, S)
        masks.append(key_padding_mask.view(B, 1, 1, S))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        out = ~masks[0]
        for m in masks[1:]:
            out = out & ~m
        return out
    floats = [torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
              if m.dtype == torch.bool else m for m in masks]  # fmt: skip
    out = floats[0]
    for m in floats[1:]:
        out = out + m
    return out


class _FastMultiheadAttention:
    def _fastllm_declines(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
        if need_weights or (self.training and self.dropout > 0.0):
            return True
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or query.is_nested or key.is_nested:
            return True
        if is_causal and attn_mask is None:  # (torch raises its own error)
            return True
        for mask in (attn_mask, key_padding_mask):
            if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
                return True  # (torch warns / converts; take its path)
        L, B = (query.shape[0], query.shape[1]) if not self.batch_first else (query.shape[1], query.shape[0])
        S = key.shape[1] if self.batch_first else key.shape[0]
        shapes = {(L, S), (B * self.num_heads, L, S)}
        if attn_mask is not None and tuple(attn_mask.shape) not in shapes:
            return True  # (torch raises its own error)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            return True
        w = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        return not (key.dtype == value.dtype == query.dtype and _same_dtype(query, *w))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        args = (query, key, value, key_padding_mask, need_weights, attn_mask)
        if self._fastllm_declines(*args, is_causal):
            return original_forward(self, *args, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fastllm_attend(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _fastllm_attend_residual(self, x, attn_mask, residual):
        """residual + self-attention of x (need_weights=False, no key padding): what a pre-norm block computes, the
        add in out_proj's epilogue; None when the fast path cannot take this call (the caller then runs the module
        and adds). Used by the block rules of fastllm/integrations/vision.py (open_clip)."""
        if self._fastllm_declines(x, x, x, None, False, attn_mask, False) or not self.batch_first:
            return None
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
            return None
        return self._fastllm_attend(x, x, x, None, attn_mask, False, residual=residual)

    def _fastllm_attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, residual=None):
        E, H = self.embed_dim, self.num_heads
        D = E // H
        self_attention = query is key and key is value
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if self_attention:
            q, k, v = qkv_projection(query.contiguous(), w, b, num_heads=H, num_kv_heads=H)  # each (B, H, L, D)
        else:
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q = linear(query, w[:E], bq).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
            k = linear(key, w[E : 2 * E], bk).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
            v = linear(value, w[2 * E :], bv).view(B, S, H, D).transpose(1, 2)
        causal = bool(is_causal) and key_padding_mask is None  # torch's reading of the hint
        mask = None if causal else _merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        if mask is None:  # the kernel writes the merged-heads layout itself (no torch copy between two of our ops)
            o = attention_merged(q, k, v, None, causal, D**-0.5)  # (B, L, E)
        else:
            o = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, D)
            o = o.transpose(1, 2).reshape(B, L, E)
        out = linear(o, self.out_proj.weight, self.out_proj.bias, residual=residual)  # (B, L, E) (+ residual)
        return out if self.batch_first else out.transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# TransformerEncoderLayer / TransformerEncoder.


_ACT_FUNCTIONS = {F.relu: "relu", F.gelu: "gelu", torch.relu: "relu"}


def _layer_activation(act) -> str | None:
    """The fastllm name of a Transformer layer's activation (torch stores F.relu / F.gelu, or the module given)."""
    if isinstance(act, nn.Module):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate) if type(act) is nn.GELU else (
            {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(act)))  # fmt: skip
    try:
        return _ACT_FUNCTIONS.get(act)
    except TypeError:  # (an unhashable callable)
        return None


class _FastFeedForward:
    """The feed-forward block of nn.TransformerEncoderLayer / DecoderLayer, linear2(dropout(act(linear1(x)))) then
    the block's last dropout, as one fastllm.fused_ffn; torch's own _ff_block when a dropout is active (training,
    p > 0), the activation is not one the op has, a linear was replaced (quantize_), the dtypes mix, or a hook is
    registered below the layer (the layer's original forward calls this method too: the guard of its forward alone
    would not keep the hook's module running)."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        l1, l2 = self.linear1, self.linear2
        act = _layer_activation(self.activation)
        drop = self.training and any(getattr(self, n).p > 0.0 for n in ("dropout", "dropout2", "dropout3")
                                     if isinstance(getattr(self, n, None), nn.Dropout))  # fmt: skip
        if (
            act is None
            or drop
            or type(l1) is not nn.Linear
            or type(l2) is not nn.Linear
            or x.is_nested
            or not _same_dtype(x, l1.weight, l1.bias, l2.weight, l2.bias)
            or hooks_below(self)
        ):  # fmt: skip  (a hook on linear1 / linear2 runs in torch's own block)
            return type(self)._fastllm_original._ff_block(self, x)
        return fused_ffn(x, l1.weight, l2.weight, b1=l1.bias, b2=l2.bias, activation=act)  # (..., d_model)


class _FastTransformerEncoderLayer(_FastFeedForward):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src.is_nested:  # (only torch's native fast path takes nested tensors)
            return original_forward(self, src, src_mask, src_key_padding_mask, is_causal)
        # torch's own slow path (TransformerEncoderLayer.forward after its native fast-path test)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype,
        )  # fmt: skip
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)  # fmt: skip
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class _FastTransformerDecoderLayer(_FastFeedForward):
    """torch's TransformerDecoderLayer has no native fast path: its self_attn and multihead_attn (cross-attention)
    are the MultiheadAttention rows, its norms the LayerNorm rows; this row fuses the feed-forward block."""


def _check_layer_ffn(m) -> str | None:
    if type(m.linear1) is not nn.Linear or type(m.linear2) is not nn.Linear:
        return "linear1 / linear2 are not nn.Linear (not the layout this rule was written for)"
    if _layer_activation(m.activation) is None:
        return f"activation {getattr(m.activation, '__name__', type(m.activation).__name__)} has no fused equivalent"
    return None


def _set_nested(self, value) -> None:
    self.__dict__["use_nested_tensor"] = value  # (kept for restore(): the original class reads it again)


class _FastTransformerEncoder:
    # TransformerEncoder.forward converts a padded batch to a nested tensor when `use_nested_tensor` is True, for
    # torch's native layer kernel; the accelerated layers take the padded batch and its mask instead. (Its layers
    # run as modules: fastllm.profile's module ranges descend into it.)
    use_nested_tensor = property(lambda self: False, _set_nested)
    _fastllm_children_as_modules = True


def _no_check(m) -> str | None:
    return None


def _is(cls):
    return lambda m: type(m) is cls


RULES = [
    Rule("torch.nn", "norm", "layer_norm", _is(nn.LayerNorm), _one_dim_norm, lambda m: swap(m, _FastLayerNorm)),
    Rule("torch.nn", "norm", "rms_norm", _is(nn.RMSNorm), _one_dim_norm, lambda m: swap(m, _FastRMSNorm)),
    Rule("torch.nn", "attention", "flash_attention", _is(nn.MultiheadAttention), _check_mha,
         lambda m: swap(m, _FastMultiheadAttention)),
    Rule("torch.nn", "attention", "encoder_layer_slow_path", _is(nn.TransformerEncoderLayer), _no_check,
         lambda m: swap(m, _FastTransformerEncoderLayer)),
    Rule("torch.nn", "mlp", "fused_ffn", _is(nn.TransformerDecoderLayer), _check_layer_ffn,
         lambda m: swap(m, _FastTransformerDecoderLayer)),
    Rule("torch.nn", "attention", "no_nested_tensor", _is(nn.TransformerEncoder), _no_check,
         lambda m: swap(m, _FastTransformerEncoder)),
]  # fmt: skip


def quantize_filter(model: nn.Module):
    """filter_fn for fastllm.quantize_: every nn.Linear except a MultiheadAttention's out_proj (torch's own forward,
    the exact fallback, reads out_proj.weight as a float matrix)."""
    skip = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}  # fmt: skip
    return lambda m, fqn: fqn not in skip
