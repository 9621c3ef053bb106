"""fastllm: fused Triton GPU and C++/OpenMP CPU kernels for Transformer models, as torch ops.

Every op is a torch op in the fastllm:: namespace (torch.ops.fastllm.<name>) with a fake (torch.compile,
meta tensors) and autograd, dispatched by device: CUDA -> Triton, CPU -> C++, anything a fast kernel cannot
take -> the plain-PyTorch reference beside the op. See `fastllm.backend` and `fastllm.explain`.
"""

from fastllm import models, nn
from fastllm._backend import Dispatch, backend, explain, get_backend
from fastllm.integrations import accelerate, restore
from fastllm.nn.int8 import quantize_
from fastllm.ops import (
    add_layer_norm,
    add_rms_norm,
    clear_weight_cache,
    decode_attention,
    flash_attention,
    fused_ffn,
    fused_gated_ffn,
    int8_matmul,
    layer_norm,
    linear,
    qkv_projection,
    quantize_int8,
    rms_norm,
    rotary_embedding,
    scaled_dot_product_attention,
    w8a16_linear,
)
from fastllm.profiling import profile

__version__ = "0.1.0"

__all__ = [
    "Dispatch",
    "accelerate",
    "add_layer_norm",
    "add_rms_norm",
    "backend",
    "clear_weight_cache",
    "decode_attention",
    "explain",
    "flash_attention",
    "fused_ffn",
    "fused_gated_ffn",
    "get_backend",
    "int8_matmul",
    "layer_norm",
    "linear",
    "models",
    "nn",
    "profile",
    "qkv_projection",
    "quantize_",
    "quantize_int8",
    "restore",
    "rms_norm",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "w8a16_linear",
]
