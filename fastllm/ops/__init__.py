"""fastllm ops: one module per op family, each registering torch ops in the fastllm:: namespace."""

from fastllm.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]
