"""fastllm modules: drop-in replacements for torch.nn layers, backed by fastllm ops."""

from fastllm.nn.gemm import FusedFFN, FusedGatedFFN
from fastllm.nn.int8 import Int8Linear, QuantizeSummary, quantize_
from fastllm.nn.layer_norm import LayerNorm, RMSNorm

__all__ = ["FusedFFN", "FusedGatedFFN", "Int8Linear", "LayerNorm", "QuantizeSummary", "RMSNorm", "quantize_"]
