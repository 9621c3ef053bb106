"""The attention block's input projection: one GEMM over the concatenated q/k/v weight, written straight into the
attention layout.

    qkv_projection(x, weight, bias=None, *, num_heads, num_kv_heads) -> (q, k, v)

    x (B, S, hidden); weight ((Hq + 2 Hkv) D, hidden) = torch.cat([Wq, Wk, Wv]) in nn.Linear layout; bias of the same
    first dim or None; Hq = num_heads, Hkv = num_kv_heads (Hq % Hkv == 0: MHA, GQA, MQA).
    y = x @ weight.T + bias, and with y's columns as Hq + 2 Hkv heads of D:
    q (B, Hq, S, D) = heads [0, Hq), k (B, Hkv, S, D) = heads [Hq, Hq + Hkv), v = the last Hkv, each contiguous:
    what `F.linear(x, w, b).split(...)`, `.view(B, S, H, D).transpose(1, 2).contiguous()` gives, without the
    (B, S, N) intermediate and the transpose copies: the GEMM's store computes each element's (q/k/v, head, s, d)
    address (C++: the engine's heads store, kernels/cpp/gemm.h Gemm::heads_S; Triton: kernels/triton/qkv.py).

fp32 / bf16 / fp16 with fp32 accumulation, one rounding per output; float64 and anything a kernel cannot take run
the reference. On CPU the weight is packed once and cached like fastllm.linear's (see fastllm.ops.gemm).

Backward: dY (B S, N) is q, k and v's gradients put back in y's layout (one copy), then dx = dY W, dW = dY^T x,
db = the column sums of dY (the GEMMs of fastllm.linear's backward, fastllm::gemm_bwd, on the forward's backend).
"""

import torch
import torch.nn.functional as F

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops._common import KERNEL_DTYPES, check_float, check_like, check_tensor, ptr
from fastllm.ops.gemm import _bias_grad, _mm, _packed_weight

OP = "qkv_projection"

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device and dtype.


def _head_dim(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> int:
    return w.shape[0] // (num_heads + 2 * num_kv_heads)


def qkv_ref(x, w, b, num_heads: int, num_kv_heads: int):
    """F.linear, split into q / k / v, heads to (B, H, S, D). Each output is a tensor of its own (the views of y are
    copied even where .contiguous() would return them: a custom op's outputs must not share storage)."""
    B, S, _ = x.shape
    D = _head_dim(w, num_heads, num_kv_heads)
    y = F.linear(x, w, b)  # (B, S, N)
    parts = y.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    heads = (num_heads, num_kv_heads, num_kv_heads)  # (explicit: -1 is ambiguous when S == 0)
    return tuple(t.view(B, S, h, D).transpose(1, 2).clone(memory_format=torch.contiguous_format)
                 for t, h in zip(parts, heads, strict=True))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Validation (also run in the fake, so torch.compile traces raise the same errors).


def _check_heads(arg: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{OP}: {arg} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{OP}: {arg} must be >= 1, got {v}")


def _check(x, weight, bias, num_heads, num_kv_heads) -> None:
    check_tensor(OP, "x", x)
    check_float(OP, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{OP}: x must be 3-D (batch, seq, hidden), got shape {tuple(x.shape)}")
    check_tensor(OP, "weight", weight)
    check_float(OP, "weight", weight)
    check_like(OP, "weight", weight, "x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(
            f"{OP}: weight must be 2-D ((num_heads + 2 * num_kv_heads) * head_dim, hidden) with hidden = x's last dim "
            f"{x.shape[2]}, got shape {tuple(weight.shape)}"
        )
    _check_heads("num_heads", num_heads)
    _check_heads("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{OP}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    heads = num_heads + 2 * num_kv_heads
    if weight.shape[0] % heads != 0:
        raise ValueError(
            f"{OP}: weight's first dim {weight.shape[0]} is not a multiple of num_heads + 2 * num_kv_heads = {heads} "
            "(weight = torch.cat([Wq, Wk, Wv]), each head_dim rows per head)"
        )
    check_tensor(OP, "bias", bias, optional=True)
    if bias is not None:
        check_float(OP, "bias", bias)
        check_like(OP, "bias", bias, "x", x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{OP}: bias must have shape ({weight.shape[0]},) (weight's first dim), got "
                             f"{tuple(bias.shape)}")  # fmt: skip


def _fake(x, w, b, num_heads, num_kv_heads):
    B, S, _ = x.shape
    D = _head_dim(w, num_heads, num_kv_heads)
    return tuple(x.new_empty((B, h, S, D)) for h in (num_heads, num_kv_heads, num_kv_heads))


def _unsupported(x, *args) -> str | None:
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (the QKV GEMM takes float32, bfloat16, float16)"
    return None


# --------------------------------------------------------------------------------------------------
# Kernels.


def _outputs(x, num_heads, num_kv_heads, D):
    """The new q, k, v of the C++ kernel (tests replace this to poison them and catch unwritten elements)."""
    B, S, _ = x.shape
    return tuple(x.new_empty((B, h, S, D)) for h in (num_heads, num_kv_heads, num_kv_heads))


def _qkv_cpp(x, w, b, num_heads, num_kv_heads):
    B, S, K = x.shape
    N = w.shape[0]
    D = N // (num_heads + 2 * num_kv_heads)
    q, k, v = _outputs(x, num_heads, num_kv_heads, D)
    M = B * S
    if M and N:
        x2 = x.reshape(M, K)  # a view when x's strides allow (the engine reads any 2-D strides), else a copy
        pk = _packed_weight(w)
        codes, dt = _ext._CODES, _ext.DTYPE_CODES[x.dtype]
        _ext.C.gemm_heads(
            M, K, x2.data_ptr(), x2.stride(0), x2.stride(1), dt, pk.buf.data_ptr(), pk.code,
            codes["layout"][pk.layout], ptr(b if b is None or b.is_contiguous() else b.contiguous()),
            q.data_ptr(), k.data_ptr(), v.data_ptr(), S, D, num_heads, num_kv_heads, dt,
            _ext.num_threads(max(M * N * K // 16, N * K // 4)),  # decode: the weight read is the work (as linear)
        )  # fmt: skip
    return q, k, v


def _qkv_triton(x, w, b, num_heads, num_kv_heads):
    from fastllm.kernels.triton import qkv

    return qkv.qkv(x, w, b, num_heads, num_kv_heads)


# --------------------------------------------------------------------------------------------------
# The op and its autograd.


def _setup(ctx, inputs, output):
    x, w, b, num_heads, num_kv_heads = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias, ctx.heads = b is not None, (num_heads, num_kv_heads, num_kv_heads)


def _backward(ctx, dq, dk, dv):
    x, w = ctx.saved_tensors
    B, S, K = x.shape
    N = w.shape[0]
    D = N // sum(ctx.heads)
    need = ctx.needs_input_grad
    grads = [g if g is not None else x.new_zeros((B, h, S, D)) for g, h in zip((dq, dk, dv), ctx.heads, strict=True)]
    # dY (B S, N): the heads back in y's layout (B, S, Hq + 2 Hkv, D), one copy
    dy = torch.cat([g.transpose(1, 2) for g in grads], dim=2).view(B * S, N)
    dx = _mm(dy, w).view(B, S, K) if need[0] else None
    dw = _mm(dy.t(), x.reshape(B * S, K)) if need[1] else None
    return dx, dw, _bias_grad(dy, ctx.has_bias and need[2]), None, None


qkv_fwd = define_op(
    "qkv_projection(Tensor x, Tensor weight, Tensor? bias, int num_heads, int num_kv_heads)"
    " -> (Tensor, Tensor, Tensor)",
    validate=_check,
    reference=qkv_ref,
    fake=_fake,
    cpp=Kernel(_qkv_cpp, _unsupported, avx512=True),
    triton=Kernel(_qkv_triton, _unsupported),
    backward=_backward,
    setup_context=_setup,
)


def qkv_projection(x, weight, bias=None, *, num_heads: int, num_kv_heads: int):
    """(q, k, v) = the heads of x @ weight.T + bias in the attention layout (module docstring).

    x (B, S, hidden); weight = torch.cat([Wq, Wk, Wv]) ((num_heads + 2 * num_kv_heads) * head_dim, hidden); bias of
    weight's first dim or None. q (B, num_heads, S, head_dim), k and v (B, num_kv_heads, S, head_dim), contiguous.
    """
    _check(x, weight, bias, num_heads, num_kv_heads)
    return qkv_fwd.prevalidated(x, weight, bias, num_heads, num_kv_heads)
