"""fastllm modules: drop-in replacements for torch.nn layers, backed by fastllm ops."""

from fastllm.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
