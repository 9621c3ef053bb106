"""fastllm modules: drop-in replacements for torch.nn layers, backed by fastllm ops."""

from fastllm.nn.ffn import FusedFFN, FusedGatedFFN
from fastllm.nn.norm import LayerNorm, RMSNorm

__all__ = ["FusedFFN", "FusedGatedFFN", "LayerNorm", "RMSNorm"]
