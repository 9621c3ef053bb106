"""int8 quantization and GEMMs: quantize_int8, int8_matmul (W8A8) and the weight-only W8A16 linear.

    quantize_int8(x, dim=-1)                                  -> (q int8, scale float32)
    int8_matmul(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=torch.float32) -> out
    w8a16_linear(x, w_q, w_scale, bias=None)                  -> out (x's dtype)

Quantization is symmetric with one scale per slice along `dim` (per token for activations, per output channel
for weights): scale = max|x| / 127, q = clamp(round_half_even(x / scale), -127, 127) in fp32 arithmetic; an
all-zero slice gets scale 1 (q = 0, dequantizes to exact zeros). The C++ and Triton kernels reproduce the
reference below bit for bit.

NaN and Inf live in the scale: a slice holding a NaN gets scale NaN, one holding +-inf (and no NaN) scale inf, and
q = 0 wherever x / scale is not finite (so q is always a well-defined int8). The GEMMs then propagate them as a
product with the dequantized tensors would: a NaN / inf activation row makes that output row NaN (0 * NaN,
0 * inf), a NaN / inf weight channel that output column; a NaN in x of w8a16_linear flows through the float GEMM.

int8_matmul: a_q (..., K) int8, b_q (N, K) int8 (nn.Linear layout), a_scale (...) float32 per row of a,
b_scale (N,) float32; out = (float(a_q b_q^T) * a_scale) * b_scale + bias, where a_q b_q^T is the exact int32
product (CPU: vpdpbusd with a u8 offset correction on AVX512-VNNI, vpmaddwd on int16 pairs on AVX2: never
the saturating vpmaddubsw; GPU: tl.dot on int8 tiles). int32 sums are exact for any K < 131072; longer K runs
the reference (exact in float64).

w8a16_linear: x (..., K) float, w_q (N, K) int8, w_scale (N,): out = (x w_q^T) * w_scale + bias, with the int8
weights widened to fp32 inside the GEMM (4x fewer weight bytes than fp32: the memory-bound decode case).

These are inference ops: a backward through them raises a RuntimeError that names the op (a forward with grad
enabled works; its outputs just cannot be differentiated). Int8 weights are packed once per weight and cached like
the float ones (fastllm/ops/_pack.py).
"""

import math

import torch

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops import _pack
from fastllm.ops._common import FLOAT_DTYPES, KERNEL_DTYPES, as_rows, check_tensor

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device.


def quantize_ref(x: torch.Tensor, dim: int):
    xf = x.float()
    amax = xf.abs().amax(dim, keepdim=True) if x.numel() else torch.zeros_like(xf.sum(dim, keepdim=True))
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127)  # amax: NaN if the slice holds a NaN
    v = xf / scale
    q = torch.where(torch.isfinite(v), torch.round(v).clamp(-127, 127), 0).to(torch.int8)
    return q, scale.squeeze(dim)


def int8_matmul_ref(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    acc = a_q.double() @ b_q.double().t()  # exact: |acc| < 2^53
    out = (acc.float() * a_scale.unsqueeze(-1)) * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a16_ref(x, w_q, w_scale, bias):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = (x.to(ct) @ w_q.to(ct).t()) * w_scale.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Validation.


def _check_int8(op: str, arg: str, t) -> None:
    check_tensor(op, arg, t)
    if t.dtype != torch.int8:
        raise TypeError(f"{op}: {arg} must be an int8 tensor, got {t.dtype}")


def _check_scale(op: str, arg: str, s, shape: tuple, device) -> None:
    check_tensor(op, arg, s)
    if s.dtype != torch.float32:
        raise TypeError(f"{op}: {arg} must be a float32 tensor, got {s.dtype}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{op}: {arg} must have shape {shape}, got {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{op}: {arg} is on {s.device}, the operands on {device}; use one device")


def _quant_check(x, dim):
    op = "quantize_int8"
    check_tensor(op, "x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor (float32, bfloat16, float16, float64), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dim")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for a {x.dim()}-D tensor")


def _mm_check(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    op = "int8_matmul"
    _check_int8(op, "a_q", a_q)
    _check_int8(op, "b_q", b_q)
    if a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"{op}: a_q must be (M, K) and b_q (N, K) here, got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"{op}: K mismatch: a_q has {a_q.shape[1]} columns, b_q (N, K) has {b_q.shape[1]}")
    if b_q.device != a_q.device:
        raise ValueError(f"{op}: b_q is on {b_q.device} but a_q is on {a_q.device}; use one device")
    _check_scale(op, "a_scale", a_scale, (a_q.shape[0],), a_q.device)
    _check_scale(op, "b_scale", b_scale, (b_q.shape[0],), a_q.device)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (b_q.shape[0],) or bias.dtype != out_dtype or bias.device != a_q.device:
            raise ValueError(f"{op}: bias must be ({b_q.shape[0]},) of out_dtype {out_dtype} on {a_q.device}")


def _w8a16_check(x, w_q, w_scale, bias):
    op = "w8a16_linear"
    check_tensor(op, "x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor, got {x.dtype}")
    _check_int8(op, "w_q", w_q)
    if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"{op}: x (M, K) and w_q (N, K) must chain, got {tuple(x.shape)}, {tuple(w_q.shape)}")
    if w_q.device != x.device:
        raise ValueError(f"{op}: w_q is on {w_q.device} but x is on {x.device}; use one device")
    _check_scale(op, "w_scale", w_scale, (w_q.shape[0],), x.device)
    if bias is not None:
        check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (w_q.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"{op}: bias must be ({w_q.shape[0]},) of x's dtype {x.dtype} on {x.device}")


# --------------------------------------------------------------------------------------------------
# C++.


def _w8a8_layout() -> str:
    """u8 k-quads where the ISA level runs the AVX512-VNNI kernel (avx512_dot), else int16 k-pairs."""
    return "i8_quads" if _ext.dot_kernel(torch.int8) else "i16_pairs"


def _quant_cpp(x, dim):
    xm = x.movedim(dim, -1)
    rows = as_rows(xm, xm.shape[-1])
    M, K = rows.shape
    q = torch.empty(M, K, dtype=torch.int8)
    scale = torch.empty(M, dtype=torch.float32)
    if M and not K:  # empty slices: all-zero, so scale 1 (the reference's rule; the kernel takes K >= 1)
        scale.fill_(1.0)
    elif M:
        _ext.C.quantize_rows(
            q=q.data_ptr(), scale=scale.data_ptr(), x=rows.data_ptr(), M=M, K=K,
            x_stride=rows.stride(0), dtype=_ext.DTYPE_CODES[x.dtype], nthreads=_ext.num_threads(M * K),
        )  # fmt: skip
    q = q.view(xm.shape).movedim(-1, dim).contiguous()
    return q, scale.view(xm.shape[:-1])


def _mm_cpp(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    M, N = a_q.shape[0], b_q.shape[0]
    out = torch.empty(M, N, dtype=out_dtype)
    if M and N:
        pk = _pack.cached_weight(b_q, None, _w8a8_layout())
        _pack.gemm(a_q, pk, out, mode="int8", bias=bias, a_scale=a_scale.contiguous(), b_scale=b_scale.contiguous())
    return out


def _w8a16_cpp(x, w_q, w_scale, bias):
    x = as_rows(x, x.shape[-1])
    M, N = x.shape[0], w_q.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    if M and N:
        pk = _pack.cached_weight(w_q, None, "i8_rows")
        _pack.gemm(x, pk, out, mode="scale", bias=bias, b_scale=w_scale.contiguous())
    return out


MAX_EXACT_K = 131072  # |a b| <= 2^14 per product: int32 sums are exact below 2^17 terms


def _mm_unsupported(a_q, *args):
    if a_q.shape[1] >= MAX_EXACT_K:
        return f"K = {a_q.shape[1]} >= {MAX_EXACT_K}: int32 accumulation could overflow (the reference is exact)"
    return None


def _float_unsupported(x, *args):
    return None if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype} (the kernels take float32, bfloat16, float16)"


# --------------------------------------------------------------------------------------------------
# Triton (kernels/triton/int8.py).


def _tri():
    from fastllm.kernels.triton import int8

    return int8


def _quant_triton(x, dim):
    xm = x.movedim(dim, -1)
    rows = as_rows(xm, xm.shape[-1])
    q, scale = _tri().quantize_rows(rows)
    return q.view(xm.shape).movedim(-1, dim).contiguous(), scale.view(xm.shape[:-1])


def _mm_triton(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    return _tri().int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype)


def _w8a16_triton(x, w_q, w_scale, bias):
    return _tri().w8a16_matmul(x, w_q, w_scale, bias)


# --------------------------------------------------------------------------------------------------
# The ops.


def _inference_only(name: str):
    """A backward that says why there is none (torch's default names no op: "no autograd formula was registered")."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastllm.{name} is inference-only: it has no backward (int8 quantization is not differentiable). "
            "Run int8 layers under torch.no_grad() / torch.inference_mode(), or train the float layer."
        )

    return dict(backward=backward, setup_context=lambda ctx, inputs, output: None)


def _quant_fake(x, dim):
    shape = list(x.shape)
    del shape[dim]
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), torch.empty(
        shape, dtype=torch.float32, device=x.device
    )


quantize_int8_op = define_op(
    "quantize_int8(Tensor x, int dim) -> (Tensor, Tensor)",
    validate=_quant_check,
    reference=quantize_ref,
    fake=_quant_fake,
    cpp=Kernel(_quant_cpp, _float_unsupported),
    triton=Kernel(_quant_triton, _float_unsupported),
    **_inference_only("quantize_int8"),
)

int8_matmul_op = define_op(
    "int8_matmul(Tensor a_q, Tensor b_q, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    validate=_mm_check,
    reference=int8_matmul_ref,
    fake=lambda a, b, sa, sb, bias, dt: torch.empty(a.shape[0], b.shape[0], dtype=dt, device=a.device),
    cpp=Kernel(_mm_cpp, _mm_unsupported, avx512=True),
    triton=Kernel(_mm_triton, _mm_unsupported),
    **_inference_only("int8_matmul"),
)

w8a16_op = define_op(
    "w8a16_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor",
    validate=_w8a16_check,
    reference=w8a16_ref,
    fake=lambda x, w, s, b: torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device),
    cpp=Kernel(_w8a16_cpp, _float_unsupported, avx512=True),
    triton=Kernel(_w8a16_triton, _float_unsupported),
    **_inference_only("w8a16_linear"),
)


# --------------------------------------------------------------------------------------------------
# Public functions.


def quantize_int8(x: torch.Tensor, dim: int = -1):
    """(q int8, scale float32): symmetric per-slice quantization along `dim` (see the module docstring)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"quantize_int8: dim must be an int, got {type(dim).__name__}")
    return quantize_int8_op(x, dim)


def int8_matmul(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(a_q b_q^T as exact int32) * a_scale[:, None] * b_scale[None, :] + bias; leading batch dims on a_q.
    A NaN / inf scale makes its output row / column NaN (see the module docstring)."""
    op = "int8_matmul"
    _check_int8(op, "a_q", a_q)
    if a_q.dim() < 1:
        raise ValueError(f"{op}: a_q must have at least 1 dim (..., K)")
    check_tensor(op, "a_scale", a_scale)
    lead = tuple(a_q.shape[:-1])
    if tuple(a_scale.shape) != lead:
        raise ValueError(f"{op}: a_scale must have a_q's leading shape {lead}, got {tuple(a_scale.shape)}")
    M = math.prod(lead)
    out = int8_matmul_op(a_q.reshape(M, a_q.shape[-1]), b_q, a_scale.reshape(M), b_scale, bias, out_dtype)
    return out.view(*lead, out.shape[-1])


def w8a16_linear(x, w_q, w_scale, bias=None) -> torch.Tensor:
    """x (..., K) float times int8 weights (N, K) with per-channel w_scale: (x w_q^T) * w_scale + bias."""
    check_tensor("w8a16_linear", "x", x)
    if x.dim() < 1:
        raise ValueError("w8a16_linear: x must have at least 1 dim (..., K)")
    lead = tuple(x.shape[:-1])
    out = w8a16_op(x.reshape(math.prod(lead), x.shape[-1]), w_q, w_scale, bias)
    return out.view(*lead, out.shape[-1])
