"""timm and open_clip: the rows of the rule table for their Vision Transformer blocks.

    timm  layers.attention.Attention        qkv -> SDPA -> proj          qkv_projection, flash attention, linear
    timm  layers.mlp.Mlp                    fc1 -> act -> fc2            fastllm.fused_ffn
    timm  models.vision_transformer.Block   x + attn(norm1(x)), x + mlp(norm2(x))   each residual add in the epilogue
                                            of the branch's last GEMM (proj, fc2)
    timm  layers.norm.LayerNorm             fastllm.layer_norm (the norm rows of torch.nn cover its nn.LayerNorm)
    open_clip transformer.ResidualAttentionBlock
                                            x + attn(ln_1(x)) through the nn.MultiheadAttention row (fastllm
                                            attention) with the add in out_proj's epilogue; x + mlp(ln_2(x)) with
                                            mlp = Sequential(c_fc, act, c_proj) as linear(act) then linear(+ x)
    open_clip transformer.LayerNorm / LayerNormFp32   fastllm.layer_norm (LayerNormFp32: float32 inputs only)

open_clip builds both towers from nn.MultiheadAttention (the torch.nn row) inside ResidualAttentionBlock; its text
tower passes the causal mask as a float (L, L) additive mask, which the MultiheadAttention row takes as it is.

Classes are matched by module and name (no import of timm or open_clip to build the table; the rows are added by the
engine only when the library is imported). Each check reads the structure the rule relies on and declines (kept,
reported) otherwise: the forward signature of the class (`Block.forward(x, attn_mask, is_causal)`), the submodule
classes (Identity where the rule has no equivalent: q_norm / k_norm / scale norm / gate of timm's Attention, the
norm inside timm's Mlp), an activation it can name. Per call, the original forward runs, exactly, whenever the fast
path cannot take it: dropout or drop-path active (training with p > 0), autocast, a dtype mix, a submodule replaced
since (fastllm.quantize_'s Int8Linear). A block with LayerScale (ls1 / ls_1 not Identity) keeps the separate add
(the scale sits between the GEMM and the add), its branches still fused.

Versions: written against timm 1.0 and open_clip 3.x (README); a version whose classes differ in the points above is
declined by the checks, never mis-computed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastllm.integrations.engine import Rule, is_accelerated, original_forward, swap
from fastllm.integrations.hf_mlp import _dropout_off, _fast, _first, _linear_reason, activation_name
from fastllm.integrations.torch_nn import _FastLayerNorm, _one_dim_norm
from fastllm.ops.attention import attention_merged, scaled_dot_product_attention
from fastllm.ops.gemm import fused_ffn, linear
from fastllm.ops.layer_norm import layer_norm
from fastllm.ops.qkv import qkv_projection

SUPPORTED = {"timm": ">=1.0,<2", "open_clip": ">=2.20,<4"}
_NO_DROP = nn.Identity()  # (open_clip's block has no drop path)


def _params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _signature_reason(m, expected: list[str]) -> str | None:
    got = _params(type(m).forward)
    if got != expected:
        return f"{type(m).__name__}.forward{tuple(got[1:])} is not the signature this rule was written for"
    return None


def _identity(m, *names: str) -> str | None:
    for n in names:
        sub = getattr(m, n, None)
        if sub is not None and type(sub) is not nn.Identity:
            return f"{n} is a {type(sub).__name__} (the rule has no equivalent for it)"
    return None


def _inactive(mod) -> bool:
    """An Identity, a Dropout off, or timm's DropPath off (eval, or drop_prob 0)."""
    if type(mod) is nn.Identity:
        return True
    if isinstance(mod, nn.Dropout):
        return _dropout_off(mod)
    if type(mod).__name__ == "DropPath":
        return not mod.training or float(getattr(mod, "drop_prob", 1.0)) == 0.0
    return False


# --------------------------------------------------------------------------------------------------
# timm: Attention, Mlp, Block.


class _FastTimmAttention:
    """timm Attention: proj(SDPA(qkv(x) split into heads)), the proj's bias and an optional residual in its epilogue."""

    def _fastllm_attend(self, x, attn_mask=None, is_causal=False, residual=None):
        """proj(attention(x)) (+ residual), or None when the fast path cannot take this call."""
        qkv, proj = self.qkv, self.proj
        if (type(qkv) is not nn.Linear or type(proj) is not nn.Linear or self.gate is not None
                or not _inactive(self.attn_drop) or not _inactive(self.proj_drop)
                or _identity(self, "q_norm", "k_norm", "norm") is not None):  # fmt: skip
            return None
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.is_nested:
            return None
        if not _fast(x, qkv.weight, qkv.bias, proj.weight, proj.bias, residual):
            return None
        if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or is_causal):
            return None  # (torch raises for both; take its path for the message)
        H, D = self.num_heads, self.head_dim
        q, k, v = qkv_projection(x, qkv.weight, qkv.bias, num_heads=H, num_kv_heads=H)  # (B, H, N, D) each
        B, N = x.shape[0], x.shape[1]
        if attn_mask is None:
            o = attention_merged(q, k, v, None, bool(is_causal), self.scale)  # (B, N, H D)
        else:
            o = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            o = o.transpose(1, 2).reshape(B, N, H * D)
        return linear(o, proj.weight, proj.bias, residual=residual)  # (B, N, dim_out)

    def forward(self, x, attn_mask=None, is_causal=False):
        y = self._fastllm_attend(x, attn_mask, is_causal)
        return y if y is not None else original_forward(self, x, attn_mask=attn_mask, is_causal=is_causal)


def _check_timm_attention(m) -> str | None:
    reason = _first(_signature_reason(m, ["self", "x", "attn_mask", "is_causal"]), _linear_reason(m, "qkv", "proj"),
                    _identity(m, "q_norm", "k_norm", "norm"))  # fmt: skip
    if reason is None and getattr(m, "gate", None) is not None:
        reason = "gated attention output (gate is set)"
    if reason is None and not all(hasattr(m, a) for a in ("num_heads", "head_dim", "scale", "attn_drop", "proj_drop")):
        reason = "missing num_heads / head_dim / scale / dropouts (not the layout this rule was written for)"
    if reason is None and m.qkv.out_features != 3 * m.num_heads * m.head_dim:
        reason = f"qkv has {m.qkv.out_features} outputs, not 3 x {m.num_heads} heads x {m.head_dim}"
    return reason


def _ffn(x, fc1, fc2, act: str, residual):
    """fc2(act(fc1(x))) (+ residual) of two nn.Linear, or None when the dtypes / devices mix: fused_ffn, or with a
    residual linear with the activation then linear with the residual in its epilogue."""
    if not _fast(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual):
        return None
    if residual is None:
        return fused_ffn(x, fc1.weight, fc2.weight, b1=fc1.bias, b2=fc2.bias, activation=act)
    return linear(linear(x, fc1.weight, fc1.bias, activation=act), fc2.weight, fc2.bias, residual=residual)


class _FastTimmMlp:
    """timm Mlp: drop2(fc2(norm(drop1(act(fc1(x)))))) with norm an Identity and the dropouts off: fused_ffn, or
    (inside a block, with a residual) linear with the activation then linear with the residual."""

    def _fastllm_ffn(self, x, residual=None):
        fc1, fc2 = self.fc1, self.fc2
        act = activation_name(self.act)
        if act is None or type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            return None
        if type(self.norm) is not nn.Identity or not _inactive(self.drop1) or not _inactive(self.drop2):
            return None
        return _ffn(x, fc1, fc2, act, residual)

    def forward(self, x):
        y = self._fastllm_ffn(x)
        return y if y is not None else original_forward(self, x)


def _check_timm_mlp(m) -> str | None:
    reason = _first(_signature_reason(m, ["self", "x"]), _linear_reason(m, "fc1", "fc2"), _identity(m, "norm"))
    if reason is None and activation_name(getattr(m, "act", None)) is None:
        reason = f"activation {type(getattr(m, 'act', None)).__name__} has no fused equivalent (kept, not approximated)"
    if reason is None and m.fc2.in_features != m.fc1.out_features:
        reason = "fc1 and fc2 do not chain"
    return reason


def _branch(x, scale, drop, sub, method: str, args, call):
    """x + drop(scale(sub(...))): with scale and drop inactive and `sub` accelerated with `method`,
    sub.method(*args, residual=x) (the add in the last GEMM's epilogue); otherwise (or when the fast path declines
    the call: None) the modules as they are, `call()`."""
    if type(scale) is nn.Identity and _inactive(drop) and is_accelerated(sub):
        fast = getattr(sub, method, None)
        y = fast(*args, residual=x) if fast is not None else None
        if y is not None:
            return y
    return x + drop(scale(call()))


class _FastTimmBlock:
    """timm's pre-norm ViT Block with the two residual adds fused into the attention's proj and the MLP's fc2."""

    def forward(self, x, attn_mask=None, is_causal=False):
        a, mlp = self.attn, self.mlp
        h = self.norm1(x)
        x = _branch(x, self.ls1, self.drop_path1, a, "_fastllm_attend", (h, attn_mask, is_causal),
                    lambda: a(h, attn_mask=attn_mask, is_causal=is_causal))  # fmt: skip
        h2 = self.norm2(x)
        return _branch(x, self.ls2, self.drop_path2, mlp, "_fastllm_ffn", (h2,), lambda: mlp(h2))


def _check_timm_block(m) -> str | None:
    reason = _signature_reason(m, ["self", "x", "attn_mask", "is_causal"])
    names = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if reason is None and not all(isinstance(getattr(m, n, None), nn.Module) for n in names):
        reason = "missing one of " + " / ".join(names) + " (not the layout this rule was written for)"
    return reason


# --------------------------------------------------------------------------------------------------
# open_clip: ResidualAttentionBlock, LayerNorm, LayerNormFp32.


class _FastLayerNormFp32:
    """open_clip / timm LayerNormFp32: layer_norm in float32, cast back; fastllm.layer_norm when all is float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 0 or x.dtype != torch.float32 or x.shape[-1] != self.normalized_shape[0]
                or not _fast(x, self.weight, self.bias)):  # fmt: skip
            return original_forward(self, x)
        return layer_norm(x, self.weight, self.bias, self.eps)


def _clip_mlp_ffn(mlp, x, residual):
    """c_proj(act(c_fc(x))) (+ residual) for open_clip's Sequential MLP, or None."""
    fc1, act_mod, fc2 = (getattr(mlp, n, None) for n in ("c_fc", "gelu", "c_proj"))
    act = activation_name(act_mod)
    if act is None or type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or len(mlp) != 3:
        return None
    return _ffn(x, fc1, fc2, act, residual)


class _FastResidualAttentionBlock:
    """open_clip's ResidualAttentionBlock (self-attention: no k_x / v_x): both residual adds in the epilogues of
    out_proj and c_proj; the MLP as two GEMMs with the activation in the first's epilogue."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None or hasattr(self, "ln_1_kv"):  # cross-attention: the original
            return original_forward(self, q_x, k_x, v_x, attn_mask)
        x, a, mlp = q_x, self.attn, self.mlp
        h = self.ln_1(x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # (what its attention() does)
        x = _branch(x, self.ls_1, _NO_DROP, a, "_fastllm_attend_residual", (h, mask),
                    lambda: self.attention(q_x=h, attn_mask=attn_mask))  # fmt: skip
        h = self.ln_2(x)
        if type(self.ls_2) is nn.Identity:
            y = _clip_mlp_ffn(mlp, h, x)
            if y is not None:
                return y
        y = _clip_mlp_ffn(mlp, h, None)
        return x + self.ls_2(y if y is not None else mlp(h))


def _check_residual_attention_block(m) -> str | None:
    reason = _signature_reason(m, ["self", "q_x", "k_x", "v_x", "attn_mask"])
    if reason is None and hasattr(m, "ln_1_kv"):
        reason = "cross-attention block (ln_1_kv)"
    if reason is None and type(getattr(m, "attn", None)) is not nn.MultiheadAttention and not (
            is_accelerated(m.attn) and type(m.attn)._fastllm_original is nn.MultiheadAttention):  # fmt: skip
        reason = f"attn is a {type(getattr(m, 'attn', None)).__name__}, not an nn.MultiheadAttention"
    mlp = getattr(m, "mlp", None)
    if reason is None and (not isinstance(mlp, nn.Sequential) or [n for n, _ in mlp.named_children()]
                           != ["c_fc", "gelu", "c_proj"]):  # fmt: skip
        reason = "mlp is not Sequential(c_fc, gelu, c_proj) (not the layout this rule was written for)"
    if reason is None:
        reason = _linear_reason(mlp, "c_fc", "c_proj")
    if reason is None and activation_name(mlp.gelu) is None:
        reason = f"activation {type(mlp.gelu).__name__} has no fused equivalent (kept, not approximated)"
    for n in ("ln_1", "ln_2", "ls_1", "ls_2"):
        if reason is None and not isinstance(getattr(m, n, None), nn.Module):
            reason = f"missing {n} (not the layout this rule was written for)"
    if reason is None and not callable(getattr(m, "attention", None)):
        reason = "no attention() method (not the layout this rule was written for)"
    return reason


# --------------------------------------------------------------------------------------------------
# The rows.


def _named(*pairs):
    names = frozenset(pairs)
    return lambda m: (type(m).__module__, type(m).__name__) in names


def rules(libraries) -> list[Rule]:
    """The rows for the imported libraries among ("timm", "open_clip")."""
    out = []
    if "timm" in libraries:
        out += [
            Rule("timm", "mlp", "residual_in_epilogues", _named(("timm.models.vision_transformer", "Block")),
                 _check_timm_block, lambda m: swap(m, _FastTimmBlock)),
            Rule("timm", "attention", "flash_attention", _named(("timm.layers.attention", "Attention")),
                 _check_timm_attention, lambda m: swap(m, _FastTimmAttention)),
            Rule("timm", "mlp", "fused_ffn", _named(("timm.layers.mlp", "Mlp")), _check_timm_mlp,
                 lambda m: swap(m, _FastTimmMlp)),
            Rule("timm", "norm", "layer_norm", _named(("timm.layers.norm", "LayerNorm")), _one_dim_norm,
                 lambda m: swap(m, _FastLayerNorm)),
            Rule("timm", "norm", "layer_norm_fp32", _named(("timm.layers.norm", "LayerNormFp32")), _one_dim_norm,
                 lambda m: swap(m, _FastLayerNormFp32)),
        ]  # fmt: skip
    if "open_clip" in libraries:
        out += [
            Rule("open_clip", "mlp", "fused_mlp_residual", _named(("open_clip.transformer", "ResidualAttentionBlock")),
                 _check_residual_attention_block, lambda m: swap(m, _FastResidualAttentionBlock)),
            Rule("open_clip", "norm", "layer_norm", _named(("open_clip.transformer", "LayerNorm")), _one_dim_norm,
                 lambda m: swap(m, _FastLayerNorm)),
            Rule("open_clip", "norm", "layer_norm_fp32", _named(("open_clip.transformer", "LayerNormFp32")),
                 _one_dim_norm, lambda m: swap(m, _FastLayerNormFp32)),
        ]  # fmt: skip
    return out
