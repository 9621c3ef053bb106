"""fastllm ops: one module per op family, each registering torch ops in the fastllm:: namespace."""

from fastllm.ops._pack import clear_weight_cache
from fastllm.ops.attention import decode_attention, flash_attention, scaled_dot_product_attention
from fastllm.ops.gemm import fused_ffn, fused_gated_ffn, linear
from fastllm.ops.int8 import int8_matmul, quantize_int8, w8a16_linear
from fastllm.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastllm.ops.qkv import qkv_projection
from fastllm.ops.rope import rotary_embedding

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "clear_weight_cache",
    "decode_attention",
    "flash_attention",
    "fused_ffn",
    "fused_gated_ffn",
    "int8_matmul",
    "layer_norm",
    "linear",
    "qkv_projection",
    "quantize_int8",
    "rms_norm",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "w8a16_linear",
]
