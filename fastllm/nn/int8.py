"""Int8Linear and fastllm.quantize_: int8 inference for nn.Linear layers.

    Int8Linear.from_float(linear, mode="w8a8" | "w8a16")
    quantize_(model, "int8" | "int8_weight_only", filter_fn=None) -> model

w8a8 ("int8"): weights int8 per output channel; activations quantized per token on the fly (one quantize
kernel, then the int8 GEMM with the scales and bias in its epilogue). w8a16 ("int8_weight_only"): activations
stay in their float dtype and the int8 weights are widened inside the GEMM (the memory-bound decode case).
Inference only: a backward through these layers raises a RuntimeError naming the int8 op; a NaN / inf in the
input or the weights gives NaN in that output row / column (see fastllm.ops.int8).

Decision (the issue left the return shape open): quantize_ returns the model, like torchao's quantize_
modifies it in place; the summary of what it replaced is `model.fastllm_quantize_summary` (and its str()).
filter_fn(module, fqn) -> True to quantize that nn.Linear (torchao's convention), e.g.
`filter_fn=lambda m, fqn: fqn != "lm_head"`.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm.ops.int8 import int8_matmul, quantize_int8, w8a16_linear

MODES = ("w8a8", "w8a16")
QUANTIZE_MODES = {"int8": "w8a8", "int8_weight_only": "w8a16"}


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out, in) and a float32 scale per output channel.

    State dict: weight (int8), weight_scale (float32), bias (the original dtype, if any); `state_dict()` ->
    `load_state_dict()` round-trips. Build one with `from_float`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 bias_dtype=torch.float32, device=None):  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: unknown mode {mode!r}; accepted: {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", b)

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8") -> "Int8Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, w.dtype, w.device)
        q, scale = quantize_int8(w, -1)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        if self.mode == "w8a16":
            return w8a16_linear(x, self.weight, self.weight_scale, b)
        q, s = quantize_int8(x, -1)
        return int8_matmul(q, self.weight, s, self.weight_scale, b, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}"


@dataclass
class QuantizeSummary:
    mode: str
    replaced: list = field(default_factory=list)  # fully qualified names of the nn.Linear layers replaced
    skipped: list = field(default_factory=list)  # nn.Linear layers filter_fn kept in float
    bytes_before: int = 0  # weight bytes of the replaced layers, before and after
    bytes_after: int = 0

    def __str__(self) -> str:
        return (f"quantize_({self.mode!r}): replaced {len(self.replaced)} nn.Linear layers "
                f"({self.bytes_before / 2**20:.1f} MiB of weights -> {self.bytes_after / 2**20:.1f} MiB), "
                f"kept {len(self.skipped)} in float")  # fmt: skip


def quantize_(model: nn.Module, mode: str = "int8", filter_fn=None) -> nn.Module:
    """Replace the nn.Linear layers of `model` in place by Int8Linear ("int8": w8a8, "int8_weight_only": w8a16)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize_: unknown mode {mode!r}; accepted: {', '.join(QUANTIZE_MODES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    summary = QuantizeSummary(mode)
    targets = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    for fqn, lin in targets:
        if filter_fn is not None and not filter_fn(lin, fqn):
            summary.skipped.append(fqn)
            continue
        q = Int8Linear.from_float(lin, QUANTIZE_MODES[mode])
        summary.bytes_before += lin.weight.numel() * lin.weight.element_size()
        summary.bytes_after += q.weight.numel() + q.weight_scale.numel() * 4
        if fqn == "":
            raise ValueError("quantize_: the model itself is an nn.Linear; use Int8Linear.from_float(model)")
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        summary.replaced.append(fqn)
    model.fastllm_quantize_summary = summary
    return model
