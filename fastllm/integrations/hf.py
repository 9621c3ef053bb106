"""Hugging Face transformers: the "fastllm" attention implementation and the transformers rows of the rule table.

(Named hf.py, not transformers.py: inside this package a module named `transformers` would shadow the library for
readers and for tools that resolve names relative to the file.)

Attention goes through transformers' own AttentionInterface: `fastllm_attention_forward` is registered under the
name "fastllm", together with an AttentionMaskInterface entry (without one, transformers builds no mask at all for
a custom name, and padding would be silently ignored). The mask entry is transformers' `sdpa_mask`, because the
function has SDPA's semantics exactly: the mask is bool (B, 1, Sq, Sk), True = attend, with padding, causality and
any sliding window already in it, or None when the attention is plainly causal (or bidirectional without padding);
then `is_causal` (the call's, else the module's) applies when Sq > 1, top-left aligned as torch's SDPA. So

    out = fastllm.scaled_dot_product_attention(q, k, v, mask, is_causal=..., scale=scaling, enable_gqa=Hkv != Hq)

GQA reads each kv head for its group of query heads without copying; a decode step (Sq = 1, a longer cache) is
a full-attention row under its padding mask. `sliding_window` needs nothing more: the window is in the mask (as
for "sdpa", which ignores the argument too). Falls back, for that call and exactly: to the model's own
`eager_attention_forward` for softcapping, attention sinks or `output_attentions` (the weights are returned), to
transformers' `sdpa_attention_forward` for dropout > 0 (training), a position bias or a float mask of another dtype.

Registration happens at `import fastllm` when transformers' modeling_utils is already imported, else right after
it is (an import hook on that module: `import fastllm` never imports transformers). Then
`AutoModel.from_config(cfg, attn_implementation="fastllm")` works, and accelerate(model) on a PreTrainedModel
switches it with `model.set_attn_implementation("fastllm")` (restore puts the previous value back).

Versions: the rules are written for transformers SUPPORTED (>=5.0,<6: the AttentionInterface /
AttentionMaskInterface registries, set_attn_implementation, the (module, q, k, v, mask, dropout, scaling) call);
outside that range the model-level rule declines (attention kept, and the report says why).

Norms: LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm -> fastllm.rms_norm. HF computes x * rsqrt(mean(x^2) + eps)
in fp32, rounds it to x's dtype, then multiplies by the weight (a second rounding in 16-bit); fastllm.rms_norm
rounds once. Both are within the criterion of the float64 reference (tests/test_accelerate.py checks it in bf16).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

import torch

from fastllm.integrations.engine import Rule, original_forward, swap
from fastllm.ops.attention import scaled_dot_product_attention
from fastllm.ops.layer_norm import rms_norm

NAME = "fastllm"
# transformers 5.x: the AttentionInterface / AttentionMaskInterface registries and set_attn_implementation.
SUPPORTED = ">=5.0,<6"
_HOOKED_MODULE = "transformers.modeling_utils"

# --------------------------------------------------------------------------------------------------
# The attention function.


def _eager(module):
    """The model's own eager attention (each modeling file defines one), else transformers' SDPA function."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _sdpa()


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def fastllm_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, **kwargs):  # fmt: skip
    """transformers' attention signature: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("output_attentions"):
        return _eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mask_ok = attention_mask is None or attention_mask.dtype in (torch.bool, query.dtype)
    if dropout > 0.0 or kwargs.get("position_bias") is not None or not mask_ok or query.dim() != 4:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)  # fmt: skip
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and bool(causal)  # (sdpa_attention_forward's rule)
    gqa = key.shape[1] != query.shape[1]
    out = scaled_dot_product_attention(query, key, value, attention_mask, is_causal=causal, scale=scaling,
                                       enable_gqa=gqa)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)


def register() -> None:
    """Register "fastllm" in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, fastllm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when transformers.modeling_utils has been executed, register()."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # (the other finders)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as e:  # never break the user's import of transformers; say what failed
                warnings.warn(f"fastllm: could not register attn_implementation 'fastllm' in transformers: {e!r}",
                              stacklevel=2)  # fmt: skip

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """At `import fastllm`: register now if transformers' modeling_utils is loaded, else when it gets imported."""
    if _HOOKED_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


# --------------------------------------------------------------------------------------------------
# Rules.


class _FastHFRMSNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, w = hidden_states, self.weight
        if w.dtype != x.dtype or torch.is_autocast_enabled(x.device.type) or x.shape[-1] != w.shape[0]:
            return original_forward(self, hidden_states)
        return rms_norm(x, w, float(self.variance_epsilon))


# (module, class) of the RMSNorms whose forward is x * rsqrt(mean(x^2) + variance_epsilon) * weight, matched by name
# so that no modeling file is imported to build the table (Gemma's, with 1 + weight, is not one of them).
_HF_RMS_NORMS = frozenset((f"transformers.models.{f}.modeling_{f}", f"{c}RMSNorm")
                          for f, c in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2")))  # fmt: skip


def _is_hf_rms_norm(m) -> bool:
    return (type(m).__module__, type(m).__name__) in _HF_RMS_NORMS


def _check_rms_norm(m) -> str | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 1:
        return "no 1-D weight Parameter (not the layout this rule was written for)"
    if not isinstance(getattr(m, "variance_epsilon", None), (int, float)):
        return "no float variance_epsilon (not the layout this rule was written for)"
    return None


def _configs(config):
    """config and its sub-configs, at any depth."""
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += [s for k in getattr(c, "sub_configs", {}) if (s := getattr(c, k, None)) is not None]
    return out


def _version_reason() -> str | None:
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if SpecifierSet(SUPPORTED).contains(Version(transformers.__version__), prereleases=True):
        return None
    return f"transformers {transformers.__version__} is outside the supported range {SUPPORTED} (attention kept)"


def _check_model(m) -> str | None:
    reason = _version_reason()
    if reason is not None:
        return reason
    config = getattr(m, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return "no config._attn_implementation"
    if all(c._attn_implementation == NAME for c in _configs(config)):
        return "already"
    if not m._can_set_attn_implementation():
        return f"{type(m).__name__} does not use transformers' AttentionInterface (attention kept)"
    return None


def _apply_model(m) -> None:
    configs = _configs(m.config) + [s.config for s in m.modules() if s is not m and hasattr(s, "config")]
    previous = {id(c): (c, c._attn_implementation_internal) for c in configs}
    register()  # (in case transformers was imported in a way the hook did not see)
    m.set_attn_implementation(NAME)
    m.__dict__["_fastllm_attn_previous"] = list(previous.values())


def _undo_model(m) -> None:
    for c, impl in m.__dict__.pop("_fastllm_attn_previous", []):
        c._attn_implementation_internal = impl


def rules() -> list[Rule]:
    """The transformers rows (built when transformers is imported: they match its classes)."""
    from transformers import PreTrainedModel

    return [
        Rule("transformers", "model", "attn_implementation='fastllm'", lambda m: isinstance(m, PreTrainedModel),
             _check_model, _apply_model, _undo_model, subtree=True),
        Rule("transformers", "norm", "rms_norm", _is_hf_rms_norm, _check_rms_norm,
             lambda m: swap(m, _FastHFRMSNorm)),
    ]  # fmt: skip
