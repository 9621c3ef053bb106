"""fastllm.accelerate(model) and fastllm.restore(model): the engine that walks a model and applies the rule table.

    accelerate(model, *, attention=True, mlp=True, norm=True, quantize=None) -> model   (the same object)
    restore(model) -> model

Decision: a rule swaps the *class* of a recognised instance (`m.__class__ = Fast<Orig>`, a subclass built once
per original class whose `forward` calls fastllm's ops on the module's own Parameters), rather than building a new
module and `setattr`-ing it into the parent. The instance keeps its parameters, buffers, hooks, state-dict keys and
attributes, so `.to()`, `load_state_dict`, `save_pretrained`, optimizers and anything holding a reference to the
module keep working, and an optimizer step is seen by the next forward (the same Parameters are read; the packed
weight cache of fastllm.linear is validated by the weight's version counter). It is per instance: no library class
is modified, other instances of the same class are untouched. `restore` sets the original classes back. Anything a
Fast class cannot take exactly for one call (a `need_weights=True` request, autocast, a dtype mix) runs the
original class's forward for that call: exact, never approximated.

Hooks: a Fast class computes its children's work itself (a fused MLP never calls its fc1 as a module), so a forward
hook or pre-hook on a child (transformers' output capturing, a user's activation probe), or a global module hook,
would silently not run. Every Fast forward therefore checks, per call, that no module below it and no global
module hook is registered, and otherwise runs the original forward (its children then run as modules, with their
hooks). Hooks on the Fast module itself need nothing: they wrap whichever forward runs. The check costs ~1 us for a
leaf module, ~3-5 us for a decoder layer's eleven children. A mixin whose forward calls its children as modules says
so (`_fastllm_children_as_modules = True`) and is not guarded; fastllm.profile's module ranges descend into it.

Model-level rules (transformers' attention) do not swap a class: they switch the model's attention implementation
to the "fastllm" entry of transformers' AttentionInterface and record the previous value for `restore`.

The table (`RULES`) is a list of `Rule(library, kind, match, check, apply, undo)`: `match(module)` says whether the
rule is about this module, `check(module)` returns None or the reason to decline it (the module is then kept and
reported), `apply(module)` swaps it. `kind` is "attention", "mlp" or "norm" (the flags of accelerate) or "model"
(a model-level rule; it follows the attention flag). Adding a family = adding rows (fastllm/integrations/torch_nn.py,
fastllm/integrations/hf.py). The engine walks `model.named_modules()` once; the first matching rule decides a
module. The "mlp" rules (fused MLPs, BERT's output projection + residual + post-norm) are transformers' (hf_mlp.py)
and the FFN of torch.nn's Transformer layers (torch_nn.py).

Refused: a model quantized by another library (torch.ao quantized modules, bitsandbytes / GPTQ / AWQ-style layer
classes, a transformers `config.quantization_config`): the rules read float weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as nn_module

KINDS = ("attention", "mlp", "norm", "model")
QUANTIZE = ("int8", "int8_weight_only")

# Modules of other quantization libraries: accelerate refuses a model holding one (the rules read float weights).
_QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                              "torch.ao.nn.qat", "bitsandbytes", "auto_gptq", "gptqmodel", "awq", "optimum.quanto",
                              "torchao")  # fmt: skip
_QUANTIZED_CLASS_NAMES = frozenset(("Linear8bitLt", "Linear4bit", "QuantLinear", "WQLinear_GEMM", "WQLinear_GEMV",
                                    "QLinear", "Int8DynamicallyQuantizedLinear", "FP8Linear", "HQQLinear"))  # fmt: skip


@dataclass(frozen=True)
class Rule:
    library: str  # "torch.nn", "transformers", ...
    kind: str  # one of KINDS
    name: str  # shown in the report
    match: Callable[[nn.Module], bool]
    check: Callable[[nn.Module], str | None]  # None, or the reason to decline this instance
    apply: Callable[[nn.Module], None]
    undo: Callable[[nn.Module], None] | None = None  # model-level rules; class swaps are undone by restore()
    subtree: bool = False  # applied once for a whole subtree (nested matches below it are not visited again)


# --------------------------------------------------------------------------------------------------
# Class swapping.

_FAST: dict[type, type] = {}  # original class -> its Fast subclass


def hooks_below(module: nn.Module) -> bool:
    """A global module hook, or a forward (pre-)hook on any module below `module` (not on `module` itself)."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    stack = list(module._modules.values())
    while stack:
        m = stack.pop()
        if m is not None:
            if m._forward_hooks or m._forward_pre_hooks:
                return True
            stack.extend(m._modules.values())
    return False


def _guarded(fast_forward):
    """The Fast class's forward: its own, or the original class's when a hook below would be skipped (the original
    class's forward read at call time, as original_forward does: a library may patch it after accelerate)."""

    def forward(self, *args, **kwargs):
        if hooks_below(self):
            return type(self)._fastllm_original.forward(self, *args, **kwargs)
        return fast_forward(self, *args, **kwargs)

    forward.__doc__ = fast_forward.__doc__
    forward.__wrapped__ = fast_forward
    return forward


def fast_class(orig: type, mixin: type) -> type:
    """Fast<Orig>: `mixin` (which defines forward) over `orig`, built once per original class. It is registered as an
    attribute of this module under a unique name, so that pickle finds it."""
    cls = _FAST.get(orig)
    if cls is None:
        name = f"Fast{orig.__name__}"
        mod = sys.modules[__name__]
        base, i = name, 1
        while hasattr(mod, name):
            i += 1
            name = f"{base}_{i}"
        attrs = {"_fastllm_original": orig, "__module__": __name__, "__qualname__": name}
        fast_forward = getattr(mixin, "forward", None)
        if fast_forward is not None and not getattr(mixin, "_fastllm_children_as_modules", False):
            attrs["forward"] = _guarded(fast_forward)
        cls = type(name, (mixin, orig), attrs)
        setattr(mod, name, cls)
        _FAST[orig] = cls
    return cls


def is_accelerated(module: nn.Module) -> bool:
    return "_fastllm_original" in type(module).__dict__


def swap(module: nn.Module, mixin: type) -> None:
    module.__class__ = fast_class(type(module), mixin)


def original_forward(module: nn.Module, *args, **kwargs):
    """Run the forward of the module's original class (the exact fallback for one call)."""
    return type(module)._fastllm_original.forward(module, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# The report.


@dataclass
class Report:
    """What accelerate did: replaced [(name, class, rule)], kept [(name, class, reason)], library versions."""

    replaced: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    already: list = field(default_factory=list)  # (name, class): accelerated by an earlier call
    versions: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        head = f"fastllm.accelerate: {len(self.replaced)} replaced, {len(self.kept)} kept"
        lines = [head + (f", {len(self.already)} already accelerated" if self.already else "")]
        if not self.replaced and not self.already:
            lines.append("  nothing to accelerate in this model")
        elif not self.replaced:
            lines.append("  already accelerated: nothing changed")
        rows = [("replaced", n, c, r) for n, c, r in self.replaced] + [("kept", n, c, r) for n, c, r in self.kept]
        if rows:
            w = [max(len(r[i] or "(model)") for r in rows) for i in range(3)]
            for state, n, c, r in rows:
                lines.append(f"  {state:<{w[0]}}  {n or '(model)':<{w[1]}}  {c:<{w[2]}}  {r}")
        lines += [f"  {note}" for note in self.notes]
        lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        return "\n".join(lines)


def _versions() -> dict:
    import fastllm

    v = {"fastllm": fastllm.__version__, "torch": torch.__version__}
    tf = sys.modules.get("transformers")
    if tf is not None:
        from fastllm.integrations.hf import SUPPORTED

        v["transformers"] = f"{tf.__version__} (rules for {SUPPORTED})"
    for lib in ("timm", "open_clip"):
        mod = sys.modules.get(lib)
        if mod is not None:
            from fastllm.integrations.vision import SUPPORTED as VISION

            v[lib] = f"{getattr(mod, '__version__', '?')} (rules for {VISION[lib]})"
    return v


# --------------------------------------------------------------------------------------------------
# The engine.


def _rules() -> list[Rule]:
    from fastllm.integrations import hf, torch_nn

    rules = list(torch_nn.RULES)
    vision_libs = [lib for lib in ("timm", "open_clip") if lib in sys.modules]
    if vision_libs:
        from fastllm.integrations import vision

        rules = vision.rules(vision_libs) + rules
    if "transformers" in sys.modules:  # a transformers model can only exist once transformers is imported
        rules = hf.rules() + rules  # (its classes first: they are more specific than torch.nn's)
    return rules


def _refuse_quantized(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "fastllm.accelerate: this model is quantized by another library (its config has a quantization_config); "
            "accelerate the float model instead, with quantize='int8' or 'int8_weight_only' for fastllm's int8"
        )
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__.startswith(_QUANTIZED_MODULE_PREFIXES) or cls.__name__ in _QUANTIZED_CLASS_NAMES:
            raise ValueError(
                f"fastllm.accelerate: module {name or '(model)'} is a {cls.__module__}.{cls.__name__}, quantized by "
                "another library; accelerate the float model instead, with quantize='int8' or 'int8_weight_only' "
                "for fastllm's int8"
            )


def accelerate(model: nn.Module, *, attention: bool = True, mlp: bool = True, norm: bool = True, quantize=None):
    """Swap the submodules of `model` that fastllm recognises for fastllm-backed ones sharing their parameters, in
    place; returns `model`. `model.fastllm_report` (printable) lists every module replaced and every one kept with
    the reason. attention / mlp / norm: which kinds of rule to apply. quantize: None, "int8" (w8a8) or
    "int8_weight_only" (w8a16): fastllm.quantize_ on the nn.Linear layers after the swaps (inference only).
    Accelerating twice changes nothing (the report says so); fastllm.restore(model) undoes the swaps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastllm.accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"fastllm.accelerate: unknown quantize {quantize!r}; accepted: None, {', '.join(QUANTIZE)}")
    for arg, v in (("attention", attention), ("mlp", mlp), ("norm", norm)):
        if not isinstance(v, bool):
            raise TypeError(f"fastllm.accelerate: {arg} must be a bool, got {type(v).__name__}")
    _refuse_quantized(model)
    flags = {"attention": attention, "mlp": mlp, "norm": norm}
    flag_of = {"attention": "attention", "mlp": "mlp", "norm": "norm", "model": "attention"}  # rule kind -> flag
    report = Report(versions=_versions())
    rules = _rules()
    done_subtrees: list[tuple[str, Rule]] = []
    before = {id(m) for _, m in model.named_modules() if is_accelerated(m)}
    for name, m in model.named_modules():
        cname = type(m).__name__
        if is_accelerated(m):
            if id(m) in before:
                report.already.append((name, type(m)._fastllm_original.__name__))
            else:  # swapped by its parent's rule in this call (the projections of an attention, an LM head)
                rule_name = getattr(type(m), "_fastllm_rule_name", "(with its parent)")
                report.replaced.append((name, type(m)._fastllm_original.__name__, rule_name))
            continue
        rule = next((r for r in rules if r.match(m)), None)
        if rule is None:
            continue
        if rule.subtree and any(r is rule and (not p or name.startswith(p + ".")) for p, r in done_subtrees):
            continue
        if not flags[flag_of[rule.kind]]:
            report.kept.append((name, cname, f"{flag_of[rule.kind]}=False"))
            continue
        reason = rule.check(m)  # None, a reason to keep it, or "already" (a model-level rule applied before)
        if rule.subtree:
            done_subtrees.append((name, rule))
        if reason == "already":
            report.already.append((name, cname))
        elif reason is not None:
            report.kept.append((name, cname, reason))
        else:
            rule.apply(m)
            report.replaced.append((name, cname, rule.name))
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        # accelerate after torch.compile(model): the swaps are in _orig_mod; dynamo guards on the module classes, so
        # the next call recompiles and traces the fastllm modules (tests/test_accelerate.py checks the graph)
        report.notes.append("model is a torch.compile wrapper: its _orig_mod was accelerated; the next call recompiles")
    if quantize is not None:
        from fastllm.integrations import torch_nn
        from fastllm.nn.int8 import quantize_

        quantize_(model, quantize, filter_fn=torch_nn.quantize_filter(model))
        report.notes.append(str(model.fastllm_quantize_summary) + " (restore() does not undo quantization)")
    model.fastllm_report = report
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo accelerate: the original classes back on every swapped module, the model-level changes undone (the
    attention implementation of a transformers model). Int8 layers from quantize= stay (the float weights are
    gone). Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastllm.restore: model must be a torch.nn.Module, got {type(model).__name__}")
    for _, m in model.named_modules():
        if is_accelerated(m):
            m.__class__ = type(m)._fastllm_original
    for rule in _rules():
        if rule.undo is not None:
            for _, m in model.named_modules():
                if rule.match(m):
                    rule.undo(m)
    model.__dict__.pop("fastllm_report", None)
    return model
