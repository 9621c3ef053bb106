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

Rotary: the Llama / Mistral / Qwen2 attention modules rotate q and k with fastllm.rotary_embedding (the section
"Rotary" below: their forward is transformers' own code, with that one function swapped).

MLPs and BERT's output projection + residual + post-norm: fastllm/integrations/hf_mlp.py.

Whole layers at inference (the sections below): the Llama / Mistral / Qwen2 decoder layer (q / k / v in one GEMM
over the packed [Wq; Wk; Wv], rotary, cache.update, attention, o_proj + residual, norm, gated MLP) and the ViT /
CLIP pre-norm encoder layer (both residual adds in GEMM epilogues), each one function of fastllm calls; anything
the function does not take (grad, training, hooks below the layer, other kwargs) runs the layer's own forward.

Norms: LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm -> fastllm.rms_norm. HF computes x * rsqrt(mean(x^2) + eps)
in fp32, rounds it to x's dtype, then multiplies by the weight (a second rounding in 16-bit); fastllm.rms_norm
rounds once. Both are within the criterion of the float64 reference (tests/test_accelerate.py checks it in bf16).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import inspect
import sys
import types
import warnings
import weakref

import torch

from fastllm import _ext
from fastllm.integrations.engine import Rule, is_accelerated, original_forward, swap
from fastllm.integrations.hf_mlp import _fast, activation_name
from fastllm.integrations.torch_nn import swap_linear
from fastllm.nn.encoder import key_lengths
from fastllm.ops import _pack
from fastllm.ops._common import KERNEL_DTYPES
from fastllm.ops.attention import attention_merged, scaled_dot_product_attention
from fastllm.ops.gemm import _layout, fused_gated_ffn, linear
from fastllm.ops.layer_norm import layer_norm, rms_norm
from fastllm.ops.qkv import qkv_fwd
from fastllm.ops.rope import rotary_embedding

NAME = "fastllm"
# transformers 5.x: the AttentionInterface / AttentionMaskInterface registries and set_attn_implementation.
SUPPORTED = ">=5.0,<6"
_HOOKED_MODULE = "transformers.modeling_utils"

# --------------------------------------------------------------------------------------------------
# The attention function.


def _eager(module):
    """The model's own eager attention (each modeling file defines one), else transformers' SDPA function."""
    cls = getattr(type(module), "_fastllm_original", type(module))  # (an accelerated module: its original class)
    fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
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
    if query.is_cpu and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        B, Sk = query.shape[0], key.shape[2]
        lens, mask_causal = (None, False) if attention_mask is None else _kv_len(attention_mask, B, q_len, Sk)
        if attention_mask is None or lens is not None:
            Hq, D = query.shape[1], query.shape[3]
            scale = scaling if scaling is not None else D**-0.5
            out = attention_merged(query, key, value, None if lens is True else lens, causal or mask_causal, scale)
            return out.view(B, q_len, Hq, D), None
    gqa = key.shape[1] != query.shape[1]
    out = scaled_dot_product_attention(query, key, value, attention_mask, is_causal=causal, scale=scaling,
                                       enable_gqa=gqa)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)


# id(mask) -> (weak reference to it, its version, its key lengths / True / None): transformers builds one mask per
# forward and passes it to every layer; it is read once. (Not a WeakKeyDictionary: tensors compare elementwise.)
_KV_LENS: dict = {}


def _kv_len(mask: torch.Tensor, B: int, Sq: int, Sk: int):
    """(lens, causal) for the bool mask (B, 1, Sq or 1, Sk): lens the (B,) int32 key lengths when the mask is right
    padding only (every query row of batch b sees exactly the keys j < len[b]: a bidirectional encoder's padding
    mask, what tokenizers write), True when it hides nothing, else None (the masked path); causal True when the mask
    is that padding and causality together (Sq == Sk: row i sees the keys j <= i and j < len[b], CLIP's text tower
    with a padded batch, a decoder's padded prefill). Then the attention stops at each row's length
    (fastllm.nn.encoder.key_lengths, the zoo's decision: bit-identical for finite inputs; a NaN / Inf in a padding
    position's key or value is not read, where the masked path would multiply it by 0) and the kernel writes the
    merged-heads layout transformers reshapes next (no transpose copy). Inference only: the kernels' kv_len has no
    backward."""
    version = -1 if mask.is_inference() else mask._version  # (an inference tensor has no version counter: the
    hit = _KV_LENS.get(id(mask))  # mask object itself is the key while it lives, as within one forward)
    if hit is not None and hit[0]() is mask and hit[1] == version:
        return hit[2]
    plan = (None, False)
    if mask.dim() == 4 and tuple(mask.shape[:2]) == (B, 1) and mask.shape[3] == Sk and mask.dtype == torch.bool:
        n = key_lengths(mask[:, :, :1])  # (the zoo's check on the first query row)
        if n is not None and torch.equal(mask, mask[:, :, :1].expand_as(mask)):  # (every row the same)
            plan = (True if bool((n == Sk).all()) else n), False
        elif mask.shape[2] == Sq == Sk > 1:
            n = key_lengths(mask[:, :, -1:])  # (the last row of a causal mask sees every key before the padding)
            j = torch.arange(Sk, device=mask.device)
            if n is not None and torch.equal(mask[:, 0], (j[None, :] <= j[:, None]) & (j < n[:, None, None])):
                plan = (True if bool((n == Sk).all()) else n), True
    key = id(mask)
    _KV_LENS[key] = (weakref.ref(mask, lambda _, key=key: _KV_LENS.pop(key, None)), version, plan)
    return plan


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
# Rotary: Llama / Mistral / Qwen2 attention with q and k rotated by fastllm.rotary_embedding.
#
# In transformers 5.x q and k reach the attention function already rotated: the attention module's forward calls
# its modeling file's `apply_rotary_pos_emb(q, k, cos, sin)` (cos, sin (B or 1, S, D) in x's dtype, from the
# model's rotary_emb) before the cache update and the AttentionInterface call. Decision: the rule does not copy
# that forward (the part of transformers that changes most between versions). The Fast class's forward is the
# *same code object* as the original forward, rebuilt once per class over a copy of its modeling file's globals
# (taken at the first accelerate) in which the one name `apply_rotary_pos_emb` is fastllm's; everything else the
# forward does (projections, the cache, the kwargs, the interface, o_proj, whatever a later 5.x adds) is
# transformers' own. A decorator wrapping the forward (Llama's deprecate_kwarg) is rebuilt around the new
# function, its closure otherwise unchanged.
#
# The replacement takes HF's own cos / sin as the op's tables: P = B' x S rows of the first D / 2 columns
# (HF's rotate_half layout duplicates them: checked), positions = arange(P) as (B', S). So every rope type
# (default, llama3, yarn's attention_scaling, ...) is rotated with exactly HF's angles, in one pass over q and k
# with one rounding (HF: ~12 elementwise ops, three roundings in 16-bit). The tables are built once per forward
# (the same cos object is passed to every layer). HF's function runs instead when the call is not that layout
# (unsqueeze_dim != 1, cos of another dtype than q, a cos that requires grad). Under torch.compile tracing the
# module runs its original forward (dynamo builds its guards from the modeling file's real globals).


def _hf_tables(cos, sin, B, S, D):
    """(cos, sin, positions) for fastllm.rotary_embedding from HF's (B' or 1, S, D) cos / sin, or None."""
    half = D // 2
    Bc = cos.shape[0]
    c, s_ = cos.reshape(Bc * S, D), sin.reshape(Bc * S, D)  # (P, D)
    if not (torch.equal(c[:, :half], c[:, half:]) and torch.equal(s_[:, :half], s_[:, half:])):
        return None  # (not the rotate_half layout of duplicated halves)
    positions = torch.arange(Bc * S, dtype=torch.int32, device=cos.device).view(Bc, S)
    return c[:, :half].float().contiguous(), s_[:, :half].float().contiguous(), positions


_ROPE_CACHE: list = [None]  # [(weakref(cos), weakref(sin), tables)]: the last forward's tables


def _rope_args(q, k, cos, sin, unsqueeze_dim):
    if unsqueeze_dim != 1 or not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        return None
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or torch.compiler.is_compiling():
        return None
    B, _, S, D = q.shape
    if (cos.shape[0] not in (1, B) or cos.shape[1:] != (S, D) or D % 2 or k.shape[0] != B or k.shape[2:] != (S, D)
            or not (q.dtype == k.dtype == cos.dtype == sin.dtype) or cos.requires_grad or sin.requires_grad
            or not (q.device == k.device == cos.device)):  # fmt: skip
        return None
    hit = _ROPE_CACHE[0]
    if hit is not None and hit[0]() is cos and hit[1]() is sin:
        return hit[2]
    tables = _hf_tables(cos, sin, B, S, D)
    with contextlib.suppress(TypeError):  # (a tensor subclass without weak references: no cache)
        _ROPE_CACHE[0] = (weakref.ref(cos), weakref.ref(sin), tables)
    return tables


def _make_fast_apply_rotary(hf_apply):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        """fastllm.rotary_embedding when the call is HF's rotate_half layout (see above), else HF's function."""
        args = None if kwargs else _rope_args(q, k, cos, sin, unsqueeze_dim)
        if args is None:
            return hf_apply(q, k, cos, sin, unsqueeze_dim, **kwargs)
        return rotary_embedding(q, k, *args)  # (B, Hq, S, D), (B, Hkv, S, D), contiguous

    return apply_rotary_pos_emb


def _rebuild(fn, globals_: dict):
    """fn with the same code, defaults and closure over `globals_`; through decorators (functools.wraps):
    the wrapper is rebuilt with its cell holding the rebuilt inner function."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        new_inner = _rebuild(inner, globals_)
        cells = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in fn.__closure__ or ())
        if not any(c.cell_contents is new_inner for c in cells):
            raise TypeError("the decorator does not hold the function in its closure")
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    else:
        new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    functools.update_wrapper(new, fn)
    if inner is not None:
        new.__wrapped__ = new_inner
    else:
        new.__dict__.pop("__wrapped__", None)
    return new


def _innermost(fn):
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


_ROPE_MIXINS: dict = {}  # original attention class -> its mixin (forward rebuilt over fastllm's rotary)


def _rope_mixin(cls):
    mixin = _ROPE_MIXINS.get(cls)
    if mixin is None:
        fwd = cls.forward
        g = dict(_innermost(fwd).__globals__)
        g["apply_rotary_pos_emb"] = _make_fast_apply_rotary(g["apply_rotary_pos_emb"])
        rebuilt = _rebuild(fwd, g)

        def forward(self, *args, **kwargs):
            if torch.compiler.is_compiling():  # (dynamo traces transformers' forward: its guards need real globals)
                return original_forward(self, *args, **kwargs)
            return rebuilt(self, *args, **kwargs)

        forward.__wrapped__ = rebuilt
        # (transformers' own forward: its projections run as modules, their hooks with them)
        mixin = type("_FastRopeAttention", (), {"forward": forward, "_fastllm_children_as_modules": True})
        _ROPE_MIXINS[cls] = mixin
    return mixin


_HF_ROPE_ATTENTIONS = frozenset((f"transformers.models.{f}.modeling_{f}", f"{c}Attention")
                                for f, c in (("llama", "Llama"), ("mistral", "Mistral"),
                                             ("qwen2", "Qwen2")))  # fmt: skip


def _is_rope_attention(m) -> bool:
    return (type(m).__module__, type(m).__name__) in _HF_ROPE_ATTENTIONS


def _is_rope_decoder(m) -> bool:
    return any(_is_rope_attention(s) for s in m.modules())


def _apply_rope_attention(m) -> None:
    """The attention with fastllm's rotary, and its q / k / v / o projections on fastllm.linear: with the MLP, the
    norms and the LM head (the model rule) a decode step then calls no torch GEMM (FastLinearMixin says why)."""
    swap(m, _rope_mixin(type(m)))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        swap_linear(getattr(m, name, None))


# Encoder attentions whose projections are plain nn.Linear: q / k / v on fastllm.linear, so that no torch GEMM sits
# between fastllm's ops (FastLinearMixin: torch's OpenMP workers then compete with fastllm's pool). Only where it was
# measured faster (Zen 4, 2 cores, fp32, scratch A/B of interleaved rounds, 2026-12-04): MiniLM B8 S256 325.6 vs
# 341.4 ms (medians of 9). Not CLIP: 964 vs 909 ms with its q / k / v / o swapped (B8, M = 400 / 616 rows, where
# fastllm's GEMM is 0.92-1.05x oneDNN's on 2 threads and HF's residual adds wake torch's workers anyway).
# transformers 5.x's ViT attention has its projections inline (no row here).
_PROJECTIONS = {
    ("bert", "BertSelfAttention"): ("query", "key", "value"),
    ("roberta", "RobertaSelfAttention"): ("query", "key", "value"),
}
_PROJECTIONS = {(f"transformers.models.{f}.modeling_{f}", c): names for (f, c), names in _PROJECTIONS.items()}


def _projections(m) -> tuple:
    return _PROJECTIONS.get((type(m).__module__, type(m).__name__), ())


def _check_projections(m) -> str | None:
    subs = [getattr(m, n, None) for n in _projections(m)]
    if all(is_accelerated(s) for s in subs):
        return "already"
    if not all(type(s) is torch.nn.Linear for s in subs):
        return "projections are not all nn.Linear (not the layout this rule was written for)"
    return None


def _apply_projections(m) -> None:
    for n in _projections(m):
        swap_linear(getattr(m, n))


def _check_rope_attention(m) -> str | None:
    fwd = type(m).forward
    inner = _innermost(fwd)
    if not isinstance(inner, types.FunctionType) or "apply_rotary_pos_emb" not in inner.__code__.co_names:
        return "its forward does not call apply_rotary_pos_emb (not the layout this rule was written for)"
    if not callable(inner.__globals__.get("apply_rotary_pos_emb")):
        return "no apply_rotary_pos_emb in its modeling file (not the layout this rule was written for)"
    try:
        _rope_mixin(type(m))
    except (TypeError, ValueError, AttributeError) as e:
        return f"its forward could not be rebuilt over fastllm's rotary ({e})"
    return None


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
    if _is_rope_decoder(m):  # the LM head of a Llama-family causal LM: fastllm.linear (see _apply_rope_attention)
        swap_linear(getattr(m, "lm_head", None))


def _undo_model(m) -> None:
    for c, impl in m.__dict__.pop("_fastllm_attn_previous", []):
        c._attn_implementation_internal = impl


# --------------------------------------------------------------------------------------------------
# The decoder layer (Llama / Mistral / Qwen2) at inference: one function from norm to residual.
#
# Profiled (cProfile, SmolLM2-135M shape, fp32, B=1 decode, Zen 4): with every submodule accelerated, HF generate
# spent ~26 ms of a 40 ms token in fastllm's GEMMs and ~14 ms in Python: per layer eight module calls and
# transformers' attention forward (views, the interface lookup, kwargs) around ten fastllm calls. This forward makes
# the same fastllm calls from the layer itself, in transformers' order: rms_norm, q / k / v linear, rotary on HF's
# own cos / sin, `cache.update` (transformers' cache object, any class), the "fastllm" attention function (the
# mask transformers built), o_proj with the residual in its epilogue, rms_norm, the gated MLP, the residual add.
# It runs only when every part is fastllm's (the submodules accelerated by the rows above, their classes checked
# per call), for inference (grad disabled, eval), with no hooks below the layer (transformers' output capturing uses
# hooks; engine.hooks_below, checked by every Fast class's forward), the "fastllm" attention implementation, and
# only the keyword arguments it knows; anything else is the layer's original forward (exact: the same
# submodules, through their own forwards).
# Decision: this copies the sequence of transformers 5.x's decoder layer; the check at accelerate time reads the
# structure it relies on (the submodules and their attributes, `apply_rotary_pos_emb` and `cache.update` in the
# attention's code) and declines otherwise.

_LAYER_KWARGS = frozenset(("attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                           "position_embeddings", "cache_position"))  # fmt: skip
_HF_DECODER_LAYERS = frozenset((f"transformers.models.{f}.modeling_{f}", f"{c}DecoderLayer")
                               for f, c in (("llama", "Llama"), ("mistral", "Mistral"),
                                            ("qwen2", "Qwen2")))  # fmt: skip


# attention module -> its packed [Wq; Wk; Wv] and what it was packed from (not in the module's __dict__, where
# pickle and deepcopy would carry it; the entry leaves with the module, or at restore; it holds the weights it was
# packed from, which a replaced weight keeps alive only until the next call repacks).
_QKV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _qkv_heads(a, h, ws, bs):
    """q, k, v of h as (B, H, S, D) from one GEMM over the three projections (the engine's heads store, as
    fastllm.qkv_projection), or None when this call cannot take it (the caller then runs three linears).

    The packed operand is the concatenation [Wq; Wk; Wv] packed once (from a temporary torch.cat, freed after) and
    kept for the attention module while the three weights are the same objects at the same versions (else repacked),
    in place of the three packed copies the separate linears would keep: no more memory than those. k and v of
    GQA are narrow (192 of 576 columns at the SmolLM2 shape): alone, each ran on one thread (under 32K weight
    elements per thread); in one GEMM the weight read is split over the threads. SmolLM2-shaped generate, Zen 4:
    29.8 -> 31.0 tok/s (medians of 6, tokens identical). Inference on CPU only (the direct path: no autograd, no
    tracing, no explain, the C++ kernel chosen), fp32 / bf16 / fp16 weights that are not inference tensors."""
    if h.dtype not in KERNEL_DTYPES or not h.is_contiguous() or not qkv_fwd.cpp_lane((h, *ws, *bs)):
        return None
    srcs = (*ws, *bs)
    try:
        state = tuple(-1 if t is None else t._version for t in srcs)
    except RuntimeError:  # (inference tensors have no version counter: the three linears)
        return None
    layout = _layout(h.dtype)
    hit = _QKV.get(a)  # (sources, their versions, layout, weight data pointers, packed, bias)
    if (
        hit is None
        or hit[1] != state
        or hit[2] != layout
        or any(t is not u for t, u in zip(srcs, hit[0], strict=True))
        or any(t.data_ptr() != p for t, p in zip(ws, hit[3], strict=True))
    ):
        w = torch.cat(ws)
        b = None
        if any(t is not None for t in bs):
            b = torch.cat([t if t is not None else w.new_zeros(n.shape[0]) for t, n in zip(bs, ws, strict=True)])
        pk = _pack.pack(w, None, w.shape[1], w.shape[0], w.stride(1), w.stride(0), layout)
        hit = _QKV[a] = (srcs, state, layout, tuple(t.data_ptr() for t in ws), pk, b)
    pk, b = hit[4], hit[5]
    B, S, K = h.shape
    N, D = pk.N, a.head_dim
    Hq, Hkv = ws[0].shape[0] // D, ws[1].shape[0] // D
    if pk.K != K or (Hq + 2 * Hkv) * D != N or ws[2].shape[0] != Hkv * D or h.dtype != ws[0].dtype:
        return None
    q, k, v = (h.new_empty((B, n, S, D)) for n in (Hq, Hkv, Hkv))
    M, dt = B * S, _ext.DTYPE_CODES[h.dtype]
    _ext.C.gemm_heads(
        M, K, h.data_ptr(), K, 1, dt, pk.buf.data_ptr(), pk.code, _ext._CODES["layout"][pk.layout],
        0 if b is None else b.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), S, D, Hq, Hkv, dt,
        _ext.num_threads(max(M * N * K // 16, N * K // 4)),
    )  # fmt: skip
    return q, k, v


def _parts(self):
    """The layer's eleven submodules (attention, its q / k / v / o projections, MLP, its gate / up / down, the two
    norms) read through the modules' dicts, or None when one is missing. (Module.__getattr__ costs ~0.5-1 us a read
    on these 2-core VMs, and the layer read ~40 attributes that way per call: ~50 us of a ~240 us Python layer.)"""
    mods = self._modules
    a, mlp, n1, n2 = (mods.get(n) for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
    if a is None or mlp is None or n1 is None or n2 is None:
        return None
    am, mm = a._modules, mlp._modules
    parts = (a, mlp, n1, n2, am.get("q_proj"), am.get("k_proj"), am.get("v_proj"), am.get("o_proj"),
             mm.get("gate_proj"), mm.get("up_proj"), mm.get("down_proj"))  # fmt: skip
    return None if any(m is None for m in parts) else parts


def _decoder_layer_fast(self, x, kwargs):
    """The layer's output through fastllm's ops, or None (the original forward then runs)."""
    if torch.is_grad_enabled() or self.training or not _LAYER_KWARGS.issuperset(kwargs) or x.dim() != 3:
        return None
    if torch.compiler.is_compiling():
        return None
    parts = _parts(self)  # (hooks below the layer: its guarded forward ran the original instead, engine.hooks_below)
    if parts is None:
        return None
    a, mlp, n1, n2 = parts[:4]
    for i, m in enumerate(parts):  # (the first eight accelerated; gate / up / down accelerated or nn.Linear)
        if "_fastllm_original" not in type(m).__dict__ and (i < 8 or type(m) is not torch.nn.Linear):
            return None
    if a.config._attn_implementation != NAME:
        return None
    act = activation_name(mlp._modules.get("act_fn"))
    w = [m._parameters.get("weight") for m in parts[2:]]  # n1, n2, q, k, v, o, gate, up, down
    b = [m._parameters.get("bias") for m in parts[4:]]  # q, k, v, o, gate, up, down
    if act is None or any(t is None for t in w) or not _fast(x, *w, *b):
        return None
    pe = kwargs.get("position_embeddings")
    if not isinstance(pe, tuple) or len(pe) != 2:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    B, S, _ = x.shape
    D = a.head_dim
    h = rms_norm(x, w[0], float(n1.variance_epsilon))
    qkv = _qkv_heads(a, h, w[2:5], b[:3])
    if qkv is not None:
        q, k, v = qkv
    else:
        q = linear(h, w[2], b[0]).view(B, S, -1, D).transpose(1, 2)  # (B, Hq, S, D)
        k = linear(h, w[3], b[1]).view(B, S, -1, D).transpose(1, 2)  # (B, Hkv, S, D)
        v = linear(h, w[4], b[2]).view(B, S, -1, D).transpose(1, 2)
    tables = _rope_args(q, k, pe[0], pe[1], 1)
    if tables is None:
        return None  # (nothing written yet: the original forward starts over)
    q, k = rotary_embedding(q, k, *tables)
    if cache is not None:  # (the attention's **kwargs, as transformers passes them: position_ids, use_cache, ...)
        rest = {n: t for n, t in kwargs.items() if n not in ("attention_mask", "position_embeddings", "cache",
                                                             "past_key_values")}  # fmt: skip
        k, v = cache.update(k, v, a.layer_idx, kwargs=rest)
    o, _ = fastllm_attention_forward(a, q, k, v, kwargs.get("attention_mask"), dropout=0.0, scaling=a.scaling,
                                     sliding_window=getattr(a, "sliding_window", None))  # fmt: skip
    x = linear(o.reshape(B, S, -1), w[5], b[3], residual=x)  # x + o_proj(attention)
    h = rms_norm(x, w[1], float(n2.variance_epsilon))
    return x + fused_gated_ffn(h, w[6], w[7], w[8], b_gate=b[4], b_up=b[5], b_down=b[6], activation=act)


class _FastDecoderLayer:
    def forward(self, hidden_states, *args, **kwargs):
        y = None if args else _decoder_layer_fast(self, hidden_states, kwargs)
        return y if y is not None else original_forward(self, hidden_states, *args, **kwargs)


def _is_decoder_layer(m) -> bool:
    return (type(m).__module__, type(m).__name__) in _HF_DECODER_LAYERS


def _check_decoder_layer(m) -> str | None:
    need = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "config"),
            "mlp": ("gate_proj", "up_proj", "down_proj", "act_fn"),
            "input_layernorm": ("weight", "variance_epsilon"),
            "post_attention_layernorm": ("weight", "variance_epsilon")}  # fmt: skip
    for sub, attrs in need.items():
        mod = getattr(m, sub, None)
        if mod is None or not all(hasattr(mod, n) for n in attrs):
            return f"{sub} lacks one of {', '.join(attrs)} (not the layout this rule was written for)"
    code = _innermost(type(m.self_attn).forward).__code__.co_names
    if "apply_rotary_pos_emb" not in code or "update" not in code:
        return "its attention calls no apply_rotary_pos_emb / cache.update (not the layout this rule was written for)"
    params = list(inspect.signature(_innermost(type(m).forward)).parameters)
    if params[:2] != ["self", "hidden_states"] or "position_embeddings" not in params:
        return f"forward{tuple(params[1:])} is not the signature this rule was written for"
    return None


# --------------------------------------------------------------------------------------------------
# The pre-norm encoder layer (ViT, CLIP's two towers) at inference: every op of the layer on fastllm's pool.
#
# transformers' ViTLayer / CLIPEncoderLayer run x + o_proj(attention(q, k, v of LN1(x))), then + fc2(act(fc1(LN2(x)))):
# with the attention function, the MLP and the norms accelerated, the q / k / v / o projections were still torch
# GEMMs and the two residual adds torch adds, between fastllm calls. On 2 cores a torch op wakes torch's OpenMP
# worker, which then spins on the core fastllm's pool wants for the next call (see FastLinearMixin). This forward
# makes the whole layer fastllm calls: layer_norm, q / k / v linear, the "fastllm" attention function (the mask
# transformers built; CLIP's text tower passes is_causal), o_proj with the residual in its epilogue, layer_norm, fc1
# with the activation in its epilogue, fc2 with the residual in its epilogue (the adds cost no pass of their own,
# as in timm's Block rule). Same conditions as the decoder layer: inference (grad disabled, eval), every submodule
# accelerated (the norm / mlp flags on), no hooks below it, the "fastllm" attention implementation, only the keyword
# arguments it knows; anything else is the layer's original forward, exactly.

# (module, class) -> the attribute names (norm1, attention, norm2, mlp, the attention's o projection, its scale)
_HF_ENCODER_LAYERS = {
    ("transformers.models.vit.modeling_vit", "ViTLayer"):
        ("layernorm_before", "attention", "layernorm_after", "mlp", "o_proj", "scaling"),
    ("transformers.models.clip.modeling_clip", "CLIPEncoderLayer"):
        ("layer_norm1", "self_attn", "layer_norm2", "mlp", "out_proj", "scale"),
}  # fmt: skip
_ENCODER_KWARGS = frozenset(("attention_mask", "is_causal"))


def _encoder_layer_fast(self, x, kwargs):
    """The layer's output through fastllm's ops, or None (the original forward then runs)."""
    if torch.is_grad_enabled() or not _ENCODER_KWARGS.issuperset(kwargs) or not isinstance(x, torch.Tensor):
        return None
    if x.dim() != 3 or self.training or torch.compiler.is_compiling():
        return None
    n1_name, a_name, n2_name, mlp_name, o_name, scale_name = _HF_ENCODER_LAYERS[_encoder_key(self)]
    n1, a, n2, mlp = getattr(self, n1_name), getattr(self, a_name), getattr(self, n2_name), getattr(self, mlp_name)
    q_p, k_p, v_p, o_p = a.q_proj, a.k_proj, a.v_proj, getattr(a, o_name)
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not all(is_accelerated(m) for m in (n1, n2, mlp)) or a.config._attn_implementation != NAME:
        return None
    if not all(type(m) is torch.nn.Linear for m in (q_p, k_p, v_p, o_p, fc1, fc2)) or a.training or mlp.training:
        return None  # (fastllm.quantize_'s Int8Linear, or a layer replaced since; dropout in training)
    act = activation_name(mlp.activation_fn)
    params = (n1.weight, n1.bias, n2.weight, n2.bias, q_p.weight, q_p.bias, k_p.weight, k_p.bias, v_p.weight,
              v_p.bias, o_p.weight, o_p.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)  # fmt: skip
    if act is None or not _fast(x, *params) or n1.weight is None or n2.weight is None:
        return None
    B, S, _ = x.shape
    D = a.head_dim
    h = layer_norm(x, n1.weight, n1.bias, n1.eps)
    q = linear(h, q_p.weight, q_p.bias).view(B, S, -1, D).transpose(1, 2)  # (B, H, S, D)
    k = linear(h, k_p.weight, k_p.bias).view(B, S, -1, D).transpose(1, 2)
    v = linear(h, v_p.weight, v_p.bias).view(B, S, -1, D).transpose(1, 2)
    o, _ = fastllm_attention_forward(a, q, k, v, kwargs.get("attention_mask"), dropout=0.0,
                                     scaling=getattr(a, scale_name), is_causal=kwargs.get("is_causal"))  # fmt: skip
    x = linear(o.reshape(B, S, -1), o_p.weight, o_p.bias, residual=x)  # x + o_proj(attention)
    h = layer_norm(x, n2.weight, n2.bias, n2.eps)
    h = linear(h, fc1.weight, fc1.bias, activation=act)
    return linear(h, fc2.weight, fc2.bias, residual=x)  # x + fc2(act(fc1(h)))


class _FastEncoderLayer:
    def forward(self, hidden_states, *args, **kwargs):
        if len(args) == 1 and "attention_mask" not in kwargs:  # (CLIP's encoder passes the mask by position)
            kwargs = {"attention_mask": args[0], **kwargs}
            args = ()
        y = None if args else _encoder_layer_fast(self, hidden_states, kwargs)
        return y if y is not None else original_forward(self, hidden_states, *args, **kwargs)


def _encoder_key(m):
    cls = getattr(type(m), "_fastllm_original", type(m))
    return (cls.__module__, cls.__name__)


def _is_encoder_layer(m) -> bool:
    return _encoder_key(m) in _HF_ENCODER_LAYERS


def _check_encoder_layer(m) -> str | None:
    n1, a, n2, mlp, o_name, scale_name = _HF_ENCODER_LAYERS[_encoder_key(m)]
    need = {n1: ("weight", "bias", "eps"), n2: ("weight", "bias", "eps"), mlp: ("fc1", "fc2", "activation_fn"),
            a: ("q_proj", "k_proj", "v_proj", o_name, "head_dim", scale_name, "config")}  # fmt: skip
    for sub, attrs in need.items():
        mod = getattr(m, sub, None)
        if mod is None or not all(hasattr(mod, n) for n in attrs):
            return f"{sub} lacks one of {', '.join(attrs)} (not the layout this rule was written for)"
    if not isinstance(getattr(m, n1), torch.nn.LayerNorm) or not isinstance(getattr(m, n2), torch.nn.LayerNorm):
        return "its norms are not nn.LayerNorm (not the layout this rule was written for)"
    params = list(inspect.signature(_innermost(type(m).forward)).parameters)
    if params[:3] != ["self", "hidden_states", "attention_mask"]:
        return f"forward{tuple(params[1:])} is not the signature this rule was written for"
    return None


def rules() -> list[Rule]:
    """The transformers rows (built when transformers is imported: they match its classes)."""
    from transformers import PreTrainedModel

    from fastllm.integrations import hf_mlp

    return [
        Rule("transformers", "model", "attn_implementation='fastllm'", lambda m: isinstance(m, PreTrainedModel),
             _check_model, _apply_model, _undo_model, subtree=True),
        Rule("transformers", "attention", "decoder_layer", _is_decoder_layer, _check_decoder_layer,
             lambda m: swap(m, _FastDecoderLayer), lambda m: _QKV.pop(m.self_attn, None)),
        Rule("transformers", "attention", "encoder_layer", _is_encoder_layer, _check_encoder_layer,
             lambda m: swap(m, _FastEncoderLayer)),
        Rule("transformers", "attention", "rotary_embedding", _is_rope_attention, _check_rope_attention,
             _apply_rope_attention),
        Rule("transformers", "attention", "projections_on_fastllm_linear", lambda m: bool(_projections(m)),
             _check_projections, _apply_projections),
        Rule("transformers", "norm", "rms_norm", _is_hf_rms_norm, _check_rms_norm,
             lambda m: swap(m, _FastHFRMSNorm)),
        *hf_mlp.rules(),
    ]  # fmt: skip
