"""Hugging Face transformers: the MLP and output-projection rows of the rule table (kind "mlp").

    BertIntermediate / RobertaIntermediate    dense -> act              linear(x, W, b, activation=act)
    BertSelfOutput / BertOutput / Roberta*    LN(dropout(dense(h)) + x) layer_norm(linear(h, W, b, residual=x))
    ViTMLP / CLIPMLP / DistilBERT FFN         fc1 -> act -> fc2         fused_ffn(x, W1, W2, b1, b2, act)
    GPT2MLP (Conv1D weights, (in, out))       c_fc -> act -> c_proj     fused_ffn(x, W1.T, W2.T, ...)  (views)
    LlamaMLP / MistralMLP / Qwen2MLP          down(act(gate(x)) * up(x)) fused_gated_ffn(x, Wg, Wu, Wd, ...)

BERT's post-norm output is the residual add fused into the GEMM's epilogue, then one layer norm: the same two
passes as the zoo's PostNormLayer (fastllm/nn/encoder.py: its o_proj takes the residual; its MLP ends in
add_layer_norm). On CPU fused_ffn is the two GEMMs with the activation in the first one's epilogue; the gated MLP
is one GEMM for gate and up (act(g) * u formed in registers), then down.

GPT-2's Conv1D stores the weight as (in, out): the ops take B(k, n) = w[n, k] through strides, so the rule passes
`weight.t()`, a view, never a copy. For inference calls (no grad needed for the weight) the view is made once per
weight (`_t`, a detached view: it shares the weight's storage and version counter, so the packed-weight cache stays
valid across calls and an in-place update still repacks); a call that needs the weight's gradient makes a fresh
`weight.t()` so autograd reaches the Parameter.

Each rule checks at accelerate time the structure it relies on (the submodule classes, an activation it can name,
a dropout module) and declines otherwise (kept, with the reason). Each call runs the module's original forward,
exactly, when the fast path cannot take it: dropout active (training with p > 0), autocast, a dtype mix, a
submodule replaced since (fastllm.quantize_ turns the nn.Linear layers into Int8Linear), an activation changed to
one the ops do not have. The norm flag does not govern the LayerNorm inside a post-norm output: that fusion is the
output rule's (kind "mlp"); the LayerNorm submodule itself is a norm rule's.

Activations: transformers' GELUActivation (erf, its C or Python form) -> "gelu"; NewGELUActivation and GELUTanh
(gelu_new, gelu_pytorch_tanh) -> "gelu_tanh"; QuickGELUActivation -> "quick_gelu"; SiLUActivation / nn.SiLU ->
"silu"; nn.ReLU -> "relu"; nn.GELU by its `approximate`. Anything else (gelu_10's clipping, FastGELU's truncated
constant, mish, ...) is declined rather than approximated.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fastllm.integrations.engine import Rule, hooks_below, swap
from fastllm.ops.gemm import fused_ffn, fused_gated_ffn, linear
from fastllm.ops.layer_norm import layer_norm

# --------------------------------------------------------------------------------------------------
# Activations, submodule checks.

_HF_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                   "QuickGELUActivation": "quick_gelu", "SiLUActivation": "silu"}  # fmt: skip


# timm's and open_clip's activation modules (fastllm/integrations/vision.py): F.gelu, F.gelu(tanh), x sigmoid(1.702 x).
_OTHER_ACTIVATIONS = {("timm.layers.activations", "GELU"): "gelu", ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
                      ("timm.layers.activations", "QuickGELU"): "quick_gelu",
                      ("open_clip.transformer", "QuickGELU"): "quick_gelu"}  # fmt: skip


def activation_name(act) -> str | None:
    """The fastllm activation computing exactly what `act` computes, or None."""
    cls = type(act)
    if cls.__module__ == "transformers.activations":
        return _HF_ACTIVATIONS.get(cls.__name__)
    if (cls.__module__, cls.__name__) in _OTHER_ACTIVATIONS:
        return _OTHER_ACTIVATIONS[(cls.__module__, cls.__name__)]
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(cls)


def _act_reason(act) -> str | None:
    if activation_name(act) is None:
        return f"activation {type(act).__name__} has no fused equivalent (kept, not approximated)"
    return None


def _linear_reason(m, *names: str) -> str | None:
    for n in names:
        sub = getattr(m, n, None)
        if type(sub) is not nn.Linear:
            return f"{n} is a {type(sub).__name__}, not an nn.Linear (not the layout this rule was written for)"
    return None


def _conv1d_reason(m, *names: str) -> str | None:
    for n in names:
        sub = getattr(m, n, None)
        if type(sub).__name__ != "Conv1D" or not type(sub).__module__.startswith("transformers."):
            return f"{n} is a {type(sub).__name__}, not transformers' Conv1D (not the layout this rule was written for)"
        if sub.weight.dim() != 2 or not isinstance(sub.bias, torch.Tensor):
            return f"{n} has no 2-D weight and bias (not the layout this rule was written for)"
    return None


def _dropout_reason(m, name: str = "dropout") -> str | None:
    if type(getattr(m, name, None)) is not nn.Dropout:
        return f"{name} is not an nn.Dropout (not the layout this rule was written for)"
    return None


def _first(*reasons):
    return next((r for r in reasons if r is not None), None)


# --------------------------------------------------------------------------------------------------
# Per-call conditions of the fast path (else the original forward, exactly).


def _fast(x: torch.Tensor, *params) -> bool:
    """No autocast, and every parameter a tensor of x's dtype and device."""
    if not isinstance(x, torch.Tensor) or torch.is_autocast_enabled(x.device.type):
        return False
    return all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)


def _is_linear(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _dropout_off(d: nn.Module) -> bool:
    return not (d.training and d.p > 0.0)


# id(Conv1D weight) -> (weakref to it, its detached (out, in) view); the entry leaves with the weight. (Not a
# WeakKeyDictionary: that compares keys with ==, which a tensor answers elementwise.)
_T_VIEWS: dict = {}


def _t(w: torch.Tensor) -> torch.Tensor:
    """The (out, in) view of a Conv1D weight (in, out): no copy (see the module docstring)."""
    if torch.is_grad_enabled() and w.requires_grad:
        return w.t()  # (autograd reaches w)
    hit = _T_VIEWS.get(id(w))
    v = hit[1] if hit is not None and hit[0]() is w else None
    if v is None or v.data_ptr() != w.data_ptr() or v.dtype != w.dtype or v.device != w.device or v.T.shape != w.shape:
        v = w.detach().t()  # (its _base is the detached tensor, not w: the weak reference stays weak)
        key = id(w)
        _T_VIEWS[key] = (weakref.ref(w, lambda _, key=key: _T_VIEWS.pop(key, None)), v)
    return v


# --------------------------------------------------------------------------------------------------
# The Fast classes' forwards (mixins over the original classes, see engine.fast_class).


class _FastIntermediate:
    """BERT / RoBERTa: act(dense(x)) in one GEMM with the activation in its epilogue."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        d = self.dense
        act = activation_name(self.intermediate_act_fn)
        if act is None or not _is_linear(d) or not _fast(hidden_states, d.weight, d.bias):
            return type(self)._fastllm_original.forward(self, hidden_states)
        return linear(hidden_states, d.weight, d.bias, activation=act)  # (B, S, intermediate)


class _FastPostNormOutput:
    """BERT / RoBERTa self-output and output: LayerNorm(dropout(dense(h)) + input_tensor), the residual add in the
    GEMM's epilogue, then fastllm.layer_norm."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        d, n = self.dense, self.LayerNorm
        ok = (_is_linear(d) and isinstance(n, nn.LayerNorm) and _dropout_off(self.dropout)
              and isinstance(input_tensor, torch.Tensor) and _fast(hidden_states, d.weight, d.bias, n.weight, n.bias,
                                                                   input_tensor))  # fmt: skip
        if ok:
            out_shape = (*hidden_states.shape[:-1], d.out_features)
            ok = tuple(input_tensor.shape) == out_shape and tuple(n.normalized_shape) == (d.out_features,)
        if not ok:
            return type(self)._fastllm_original.forward(self, hidden_states, input_tensor)
        y = linear(hidden_states, d.weight, d.bias, residual=input_tensor)  # (B, S, d): dense(h) + input
        return layer_norm(y, n.weight, n.bias, n.eps)


def _ffn(x, fc1, fc2, act_mod):
    """fc2(act(fc1(x))) as fastllm.fused_ffn, or None when the fast path cannot take this call."""
    act = activation_name(act_mod)
    if act is None or not _is_linear(fc1, fc2) or not _fast(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        return None
    return fused_ffn(x, fc1.weight, fc2.weight, b1=fc1.bias, b2=fc2.bias, activation=act)  # (..., d)


class _FastFcMLP:
    """ViT / CLIP: fc2(act(fc1(x)))."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = _ffn(hidden_states, self.fc1, self.fc2, self.activation_fn)
        return y if y is not None else type(self)._fastllm_original.forward(self, hidden_states)


class _FastDistilBertFFN:
    """DistilBERT: dropout(lin2(act(lin1(x)))). Only ff_chunk is replaced: the original forward keeps its
    apply_chunking_to_forward (chunk_size_feed_forward) around it."""

    def ff_chunk(self, input: torch.Tensor) -> torch.Tensor:
        # (no forward of its own, so no guard: a hook below, on lin1 / lin2, is checked here)
        fast = _dropout_off(self.dropout) and not hooks_below(self)
        y = _ffn(input, self.lin1, self.lin2, self.activation) if fast else None
        return y if y is not None else type(self)._fastllm_original.ff_chunk(self, input)


class _FastGPT2MLP:
    """GPT-2: dropout(c_proj(act(c_fc(x)))), Conv1D weights (in, out) passed as (out, in) views."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        f, p = self.c_fc, self.c_proj
        act = activation_name(self.act)
        if (act is None or not _dropout_off(self.dropout) or _conv1d_reason(self, "c_fc", "c_proj") is not None
                or not _fast(hidden_states, f.weight, f.bias, p.weight, p.bias)):  # fmt: skip
            return type(self)._fastllm_original.forward(self, hidden_states)
        return fused_ffn(hidden_states, _t(f.weight), _t(p.weight), b1=f.bias, b2=p.bias, activation=act)


class _FastGatedMLP:
    """Llama / Mistral / Qwen2: down(act(gate(x)) * up(x)) as fastllm.fused_gated_ffn."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        act = activation_name(self.act_fn)
        ok = act is not None and _is_linear(g, u, d) and g.weight.shape == u.weight.shape
        if not ok or not _fast(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias):
            return type(self)._fastllm_original.forward(self, x)
        return fused_gated_ffn(x, g.weight, u.weight, d.weight, b_gate=g.bias, b_up=u.bias, b_down=d.bias,
                               activation=act)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Checks at accelerate time and the rows.


def _check_intermediate(m) -> str | None:
    return _first(_linear_reason(m, "dense"), _act_reason(getattr(m, "intermediate_act_fn", None)))


def _check_post_norm_output(m) -> str | None:
    reason = _first(_linear_reason(m, "dense"), _dropout_reason(m))
    if reason is None and type(getattr(m, "LayerNorm", None)) is not nn.LayerNorm:
        reason = "LayerNorm is not an nn.LayerNorm (not the layout this rule was written for)"
    if reason is None and tuple(m.LayerNorm.normalized_shape) != (m.dense.out_features,):
        reason = f"LayerNorm normalized_shape {tuple(m.LayerNorm.normalized_shape)} is not (hidden,)"
    return reason


def _check_fc_mlp(m) -> str | None:
    reason = _first(_linear_reason(m, "fc1", "fc2"), _act_reason(getattr(m, "activation_fn", None)))
    if reason is None and m.fc2.in_features != m.fc1.out_features:
        reason = "fc1 and fc2 do not chain"
    return reason


def _check_distilbert_ffn(m) -> str | None:
    reason = _first(_linear_reason(m, "lin1", "lin2"), _dropout_reason(m), _act_reason(getattr(m, "activation", None)))
    if reason is None and m.lin2.in_features != m.lin1.out_features:
        reason = "lin1 and lin2 do not chain"
    return reason


def _check_gpt2_mlp(m) -> str | None:
    return _first(_conv1d_reason(m, "c_fc", "c_proj"), _dropout_reason(m), _act_reason(getattr(m, "act", None)))


def _check_gated_mlp(m) -> str | None:
    reason = _first(_linear_reason(m, "gate_proj", "up_proj", "down_proj"), _act_reason(getattr(m, "act_fn", None)))
    if reason is None and m.gate_proj.weight.shape != m.up_proj.weight.shape:
        reason = "gate_proj and up_proj differ in shape"
    return reason


def _named(*pairs) -> frozenset:
    """(family, class) -> the (module, class) names matched: no modeling file is imported to build the table."""
    return frozenset((f"transformers.models.{f}.modeling_{f}", c) for f, c in pairs)


def _matcher(names: frozenset):
    return lambda m: (type(m).__module__, type(m).__name__) in names


# (rule name, classes, check, mixin)
MLP_ROWS = [
    ("linear_act", _named(("bert", "BertIntermediate"), ("roberta", "RobertaIntermediate")), _check_intermediate,
     _FastIntermediate),
    ("linear_residual_layer_norm", _named(("bert", "BertSelfOutput"), ("bert", "BertOutput"),
                                          ("roberta", "RobertaSelfOutput"), ("roberta", "RobertaOutput")),
     _check_post_norm_output, _FastPostNormOutput),
    ("fused_ffn", _named(("vit", "ViTMLP"), ("clip", "CLIPMLP")), _check_fc_mlp, _FastFcMLP),
    ("fused_ffn", _named(("distilbert", "FFN")), _check_distilbert_ffn, _FastDistilBertFFN),
    ("fused_ffn_conv1d", _named(("gpt2", "GPT2MLP")), _check_gpt2_mlp, _FastGPT2MLP),
    ("fused_gated_ffn", _named(("llama", "LlamaMLP"), ("mistral", "MistralMLP"), ("qwen2", "Qwen2MLP")),
     _check_gated_mlp, _FastGatedMLP),
]  # fmt: skip


def rules() -> list[Rule]:
    return [Rule("transformers", "mlp", name, _matcher(names), check, lambda m, mixin=mixin: swap(m, mixin))
            for name, names, check, mixin in MLP_ROWS]  # fmt: skip
