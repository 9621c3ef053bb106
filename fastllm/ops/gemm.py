"""Linear layers with fused epilogues and the Transformer MLPs, forward and backward.

    linear(x, weight, bias=None, *, activation=None, residual=None)      -> act(x W^T + b) + residual
    fused_ffn(x, w1, w2, *, b1=None, b2=None, activation="gelu")         -> act(x W1^T + b1) W2^T + b2
    fused_gated_ffn(x, w_gate, w_up, w_down, *, b_gate=None, b_up=None, b_down=None, activation="silu")
                                                                         -> (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd

Required weights are positional, optional biases and options keyword-only; None is "no activation".

Weights in torch's nn.Linear layout (out_features, in_features), passed unchanged. x (..., in_features),
fp32 / bf16 / fp16 (fp32 accumulation; float64 and anything a kernel cannot take run the reference).
Activations: gelu (erf), gelu_tanh, quick_gelu (x sigmoid(1.702 x), CLIP), relu, silu.

Ops underneath (torch.ops.fastllm.*):
    linear_fwd(x, w, b, residual, activation, save_pre)        -> (y, pre)   pre only when save_pre
    fused_ffn_fwd(x, w1, b1, w2, b2, activation, save_pre)           -> (y, pre)   pre = x W1^T + b1
    fused_gated_ffn_fwd(x, wg, wu, wd, bg, bu, bd, activation, save_pre) -> (y, g, u)
    gemm_bwd(a, b, aux, aux2, mode, activation)               -> (c, c2)    the backward's GEMMs:
        mode "none":   c = a b;   "dact": c = (a b) * act'(aux);
        "dgated": c = (a b) * aux2 * act'(aux), c2 = (a b) * act(aux)   (aux = g, aux2 = u)

Memory for training: the forward saves what the backward needs and nothing more. fused_ffn saves x and the
pre-activation (eager keeps the pre-activation and the activation); fused_gated_ffn saves x, g and u (eager
keeps g, act(g), u and act(g) * u); act(pre) and act(g) * u are recomputed in the backward.

On CPU the weights are packed once into the GEMM engine's panel layout (kernels/cpp/gemm.h) and the packed
copy is cached, keyed by the weight's data pointer, shape, strides, dtype and version counter, and dropped
when the weight is freed: an in-place update (optimizer step, `copy_`, `add_` under no_grad) bumps the
version and the next call repacks. Writes through `weight.data` do not bump the version (a torch property
of `.data`); after such writes call `fastllm.clear_weight_cache()`. Weights that are inference tensors
(created under torch.inference_mode) have no version counter and are packed on every call (a warning
says so, once per process).
"""

import math

import torch
import torch.nn.functional as F

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops import _pack
from fastllm.ops._common import KERNEL_DTYPES, as_rows, check_float, check_like, check_tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")

# --------------------------------------------------------------------------------------------------
# Activations in plain PyTorch (the reference path, and the backward's recomputation of act(pre)).


def act_ref(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        # gelu(+inf) = +inf: torch's float64 gelu and its float32 gelu on AVX2 CPUs say so, but torch 2.13's float32 /
        # bfloat16 gelu returns NaN there on Zen 4 (AVX-512) whatever ATEN_CPU_CAPABILITY; the kernels compute +inf
        # on every CPU, and the reference (and the tests' eager) keeps that one answer
        y = F.gelu(x)
        return torch.where(x == float("inf"), x, y) if x.is_floating_point() else y
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return F.silu(x)
    return x


def dact_ref(name: str, x: torch.Tensor) -> torch.Tensor:
    """act'(x), computed in fp32 at least."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if name == "gelu":
        cdf = 0.5 * torch.erfc(-xf * 0.7071067811865476)
        d = cdf + xf * 0.3989422804014327 * torch.exp(-0.5 * xf * xf)
    elif name == "gelu_tanh":
        z = 0.7978845608028654 * (xf + 0.044715 * xf**3)
        s = torch.sigmoid(2 * z)
        d = s + xf * 2 * s * (1 - s) * 0.7978845608028654 * (1 + 0.134145 * xf * xf)
    elif name == "quick_gelu":
        s = torch.sigmoid(1.702 * xf)
        d = s + 1.702 * xf * s * (1 - s)
    elif name == "relu":
        d = (xf > 0).to(xf.dtype)
    elif name == "silu":
        s = torch.sigmoid(xf)
        d = s * (1 + xf * (1 - s))
    else:
        d = torch.ones_like(xf)
    return d


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device)


def _ct(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def linear_ref(x, w, b, residual, activation, save_pre):
    pre = F.linear(x, w, b)
    y = act_ref(activation, pre)
    if residual is not None:
        y = y + residual
    return y, (pre if save_pre and activation != "none" else _empty(x))


def ffn_ref(x, w1, b1, w2, b2, activation, save_pre):
    pre = F.linear(x, w1, b1)
    y = F.linear(act_ref(activation, pre), w2, b2)
    return y, (pre if save_pre else _empty(x))


def gated_ffn_ref(x, wg, wu, wd, bg, bu, bd, activation, save_pre):
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)
    y = F.linear(act_ref(activation, g) * u, wd, bd)
    return (y, g, u) if save_pre else (y, _empty(x), _empty(x))


def matmul_ex_ref(a, b, aux, aux2, mode, activation):
    c = a.to(_ct(a)) @ b.to(_ct(a))
    if mode == "dact":
        return (c * dact_ref(activation, aux)).to(a.dtype), _empty(a)
    if mode == "dgated":
        auxf = aux.to(c.dtype)
        dg = c * aux2.to(c.dtype) * dact_ref(activation, aux)
        return dg.to(a.dtype), (c * act_ref(activation, auxf)).to(a.dtype)
    return c.to(a.dtype), _empty(a)


# --------------------------------------------------------------------------------------------------
# Validation (also run in the fakes, so torch.compile traces raise the same errors).


def _check_activation(op: str, activation, allow_none: bool) -> None:
    names = (("none",) if allow_none else ()) + ACTIVATIONS
    if not isinstance(activation, str) or activation not in names:
        raise ValueError(f"{op}: unknown activation {activation!r}; accepted: {', '.join(names)}")


def _check_float_tensor(op: str, arg: str, t, ref=None, ref_arg: str = "x", optional: bool = False) -> None:
    check_tensor(op, arg, t, optional=optional)
    if t is None:
        return
    check_float(op, arg, t)
    if ref is not None:
        check_like(op, arg, t, ref_arg, ref)


def _check_weight(op: str, arg: str, w, x, in_features: int) -> None:
    _check_float_tensor(op, arg, w, x)
    if w.dim() != 2:
        raise ValueError(f"{op}: {arg} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.shape[1] != in_features:
        raise ValueError(
            f"{op}: {arg} has in_features {w.shape[1]} but its input has {in_features} features "
            f"({arg} shape {tuple(w.shape)})"
        )


def _check_bias(op: str, arg: str, b, x, n: int) -> None:
    _check_float_tensor(op, arg, b, x, optional=True)
    if b is not None and tuple(b.shape) != (n,):
        raise ValueError(f"{op}: {arg} must have shape ({n},), got {tuple(b.shape)}")


def _check_x(op: str, x) -> None:
    _check_float_tensor(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (tokens, features) here, got shape {tuple(x.shape)}")


def _linear_check(x, w, b, residual, activation, save_pre):
    op = "linear"
    _check_x(op, x)
    _check_weight(op, "weight", w, x, x.shape[1])
    _check_bias(op, "bias", b, x, w.shape[0])
    _check_float_tensor(op, "residual", residual, x, optional=True)
    if residual is not None and tuple(residual.shape) != (x.shape[0], w.shape[0]):
        raise ValueError(
            f"{op}: residual must have the output's shape {(x.shape[0], w.shape[0])}, got {tuple(residual.shape)}"
        )
    _check_activation(op, activation, True)


def _check_chain(op: str, first: str, w_in, second: str, w_out, x) -> None:
    """w_out (2-D) takes w_in's out_features as its in_features."""
    check_tensor(op, second, w_out)
    if w_out.dim() == 2 and w_out.shape[1] != w_in.shape[0]:
        raise ValueError(
            f"{op}: {first} and {second} do not chain: {first} has {w_in.shape[0]} out_features (shape "
            f"{tuple(w_in.shape)}) but {second} has {w_out.shape[1]} in_features (shape {tuple(w_out.shape)})"
        )
    _check_weight(op, second, w_out, x, w_in.shape[0])


def _ffn_check(x, w1, b1, w2, b2, activation, save_pre):
    op = "fused_ffn"
    _check_x(op, x)
    _check_weight(op, "w1", w1, x, x.shape[1])
    _check_bias(op, "b1", b1, x, w1.shape[0])
    _check_chain(op, "w1", w1, "w2", w2, x)
    _check_bias(op, "b2", b2, x, w2.shape[0])
    _check_activation(op, activation, False)


def _gated_check(x, wg, wu, wd, bg, bu, bd, activation, save_pre):
    op = "fused_gated_ffn"
    _check_x(op, x)
    _check_weight(op, "w_gate", wg, x, x.shape[1])
    check_tensor(op, "w_up", wu)
    if tuple(wu.shape) != tuple(wg.shape):
        raise ValueError(f"{op}: w_gate and w_up must have one shape, got {tuple(wg.shape)} and {tuple(wu.shape)}")
    _check_weight(op, "w_up", wu, x, x.shape[1])
    _check_chain(op, "w_gate/w_up", wg, "w_down", wd, x)
    _check_bias(op, "b_gate", bg, x, wg.shape[0])
    _check_bias(op, "b_up", bu, x, wg.shape[0])
    _check_bias(op, "b_down", bd, x, wd.shape[0])
    _check_activation(op, activation, False)


def _matmul_check(a, b, aux, aux2, mode, activation):
    op = "gemm_bwd"
    _check_float_tensor(op, "a", a, ref_arg="a")
    _check_float_tensor(op, "b", b, a, "a")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{op}: a (M, K) and b (K, N) must be 2-D and chain, got {tuple(a.shape)}, {tuple(b.shape)}")
    if mode not in ("none", "dact", "dgated"):
        raise ValueError(f"{op}: unknown mode {mode!r}; accepted: none, dact, dgated")
    _check_activation(op, activation, True)
    out = (a.shape[0], b.shape[1])
    for arg, t in (("aux", aux), ("aux2", aux2)):
        _check_float_tensor(op, arg, t, a, "a", optional=True)
        if t is not None and tuple(t.shape) != out:
            raise ValueError(f"{op}: {arg} must have shape {out}, got {tuple(t.shape)}")
    if (mode == "dact" and aux is None) or (mode == "dgated" and (aux is None or aux2 is None)):
        raise ValueError(f"{op}: mode {mode!r} needs aux (and aux2 for dgated)")


# --------------------------------------------------------------------------------------------------
# C++: the packed-weight cache and the GEMM engine calls.


def _layout(dtype: torch.dtype) -> str:
    """k-pairs for bf16 where the ISA level runs the AVX512-BF16 kernel (avx512_dot), else rows."""
    return "pairs" if _ext.dot_kernel(dtype) else "rows"


def _packed_weight(w: torch.Tensor, w2: torch.Tensor | None = None) -> _pack.Packed:
    return _pack.cached_weight(w, w2, _layout(w.dtype))


def _packed_matrix(b: torch.Tensor) -> _pack.Packed:
    return _pack.pack_matrix(b, _layout(b.dtype))


_gemm = _pack.gemm  # epilogue mode and activation by name (the C++ enums' names, _ext.code)


def _rows(t):
    return None if t is None else as_rows(t, t.shape[-1])


def _vec(t):
    return None if t is None else t.contiguous()


def _linear_cpp(x, w, b, residual, activation, save_pre):
    x = x if x.is_contiguous() else _rows(x)  # (the decode path: no reshape when there is nothing to do)
    residual = residual if residual is None or residual.is_contiguous() else _rows(residual)
    M, N = x.shape[0], w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    keep = save_pre and activation != "none"
    pre = torch.empty(M, N, dtype=x.dtype) if keep else None
    if M and N:
        _gemm(x, _packed_weight(w), y, act=activation, bias=_vec(b), res=residual, pre=pre)
    return y, (pre if keep else _empty(x))


def _ffn_cpp(x, w1, b1, w2, b2, activation, save_pre):
    x = _rows(x)
    M, n_mid, n_out = x.shape[0], w1.shape[0], w2.shape[0]
    h = torch.empty(M, n_mid, dtype=x.dtype)
    pre = torch.empty(M, n_mid, dtype=x.dtype) if save_pre else None
    y = torch.empty(M, n_out, dtype=x.dtype)
    if M and n_mid:
        _gemm(x, _packed_weight(w1), h, act=activation, bias=_vec(b1), pre=pre)
    if M and n_out:
        _gemm(h, _packed_weight(w2), y, bias=_vec(b2))
    return y, (pre if save_pre else _empty(x))


def _gated_cpp(x, wg, wu, wd, bg, bu, bd, activation, save_pre):
    x = _rows(x)
    M, n_mid, n_out = x.shape[0], wg.shape[0], wd.shape[0]
    h = torch.empty(M, n_mid, dtype=x.dtype)
    g = torch.empty(M, n_mid, dtype=x.dtype) if save_pre else None
    u = torch.empty(M, n_mid, dtype=x.dtype) if save_pre else None
    y = torch.empty(M, n_out, dtype=x.dtype)
    if M and n_mid:
        _gemm(x, _packed_weight(wg, wu), h, mode="gated", act=activation, bias=_vec(bg), bias2=_vec(bu), pre=g, pre2=u)
    if M and n_out:
        _gemm(h, _packed_weight(wd), y, bias=_vec(bd))
    return (y, g, u) if save_pre else (y, _empty(x), _empty(x))


def _matmul_cpp(a, b, aux, aux2, mode, activation):
    M, N = a.shape[0], b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype)
    c2 = torch.empty(M, N, dtype=a.dtype) if mode == "dgated" else None
    if M and N:
        epi = {"none": "plain"}.get(mode, mode)
        _gemm(a, _packed_matrix(b), c, mode=epi, act=activation, out2=c2, aux=_rows(aux), aux2=_rows(aux2))
    return c, (c2 if c2 is not None else _empty(a))


def _cpp_unsupported(x, *args):
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (the C++ GEMM takes float32, bfloat16, float16)"
    return None


# --------------------------------------------------------------------------------------------------
# Triton (kernels/triton/gemm.py).


def _tri():
    from fastllm.kernels.triton import gemm

    return gemm


def _linear_triton(x, w, b, residual, activation, save_pre):
    y, pre = _tri().linear(x, w, b, residual, activation, save_pre and activation != "none")
    return y, (pre if pre is not None else _empty(x))


def _ffn_triton(x, w1, b1, w2, b2, activation, save_pre):
    tri = _tri()
    h, pre = tri.linear(x, w1, b1, None, activation, save_pre)
    y, _ = tri.linear(h, w2, b2, None, "none", False)
    return y, (pre if pre is not None else _empty(x))


def _gated_triton(x, wg, wu, wd, bg, bu, bd, activation, save_pre):
    tri = _tri()
    h, g, u = tri.gated(x, wg, wu, bg, bu, activation, save_pre)
    y, _ = tri.linear(h, wd, bd, None, "none", False)
    return (y, g, u) if save_pre else (y, _empty(x), _empty(x))


def _matmul_triton(a, b, aux, aux2, mode, activation):
    c, c2 = _tri().matmul(a, b, mode, activation, aux, aux2)
    return c, (c2 if c2 is not None else _empty(a))


def _op_triton_ready() -> bool:
    """Whether the Triton kernels can run here (tests): triton installed, and a GPU or the interpreter."""
    from fastllm._op import triton_interpret, triton_missing

    return triton_missing() is None and (torch.cuda.is_available() or triton_interpret())


def _triton_unsupported(x, *args):
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (the Triton GEMM takes float32, bfloat16, float16)"
    return None


# --------------------------------------------------------------------------------------------------
# The ops and their autograd.


def _new(*shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _linear_fake(x, w, b, residual, activation, save_pre):
    M, N = x.shape[0], w.shape[0]
    return _new(M, N, like=x), (_new(M, N, like=x) if save_pre and activation != "none" else _new(0, like=x))


def _ffn_fake(x, w1, b1, w2, b2, activation, save_pre):
    M = x.shape[0]
    return _new(M, w2.shape[0], like=x), (_new(M, w1.shape[0], like=x) if save_pre else _new(0, like=x))


def _gated_fake(x, wg, wu, wd, bg, bu, bd, activation, save_pre):
    M, n_mid = x.shape[0], wg.shape[0]
    y = _new(M, wd.shape[0], like=x)
    return (y, _new(M, n_mid, like=x), _new(M, n_mid, like=x)) if save_pre else (y, _new(0, like=x), _new(0, like=x))


def _matmul_fake(a, b, aux, aux2, mode, activation):
    M, N = a.shape[0], b.shape[1]
    return _new(M, N, like=a), (_new(M, N, like=a) if mode == "dgated" else _new(0, like=a))


def _gemm_op(schema, validate, reference, fake, cpp, triton, backward=None, setup_context=None):
    """The four ops of this family share their unsupported-checks (dtype only) and have AVX-512 kernels."""
    return define_op(schema, validate=validate, reference=reference, fake=fake,
                     cpp=Kernel(cpp, _cpp_unsupported, avx512=True), triton=Kernel(triton, _triton_unsupported),
                     backward=backward, setup_context=setup_context)  # fmt: skip


gemm_bwd = _gemm_op(
    "gemm_bwd(Tensor a, Tensor b, Tensor? aux, Tensor? aux2, str mode, str activation) -> (Tensor, Tensor)",
    _matmul_check,
    matmul_ex_ref,
    _matmul_fake,
    _matmul_cpp,
    _matmul_triton,
)


def _mm(a, b):
    return gemm_bwd(a, b, None, None, "none", "none")[0]


def _bias_grad(d, needed: bool):
    return d.sum(0, dtype=_ct(d)).to(d.dtype) if needed else None


def _linear_setup(ctx, inputs, output):
    x, w, b, residual, activation, _save_pre = inputs
    ctx.save_for_backward(x, w, output[1] if activation != "none" else None)
    ctx.activation = activation
    ctx.flags = (b is not None, residual is not None)


def _linear_backward(ctx, dy, _dpre):
    x, w, pre = ctx.saved_tensors
    has_b, has_res = ctx.flags
    if ctx.activation != "none":
        if pre.numel() != dy.numel():
            raise RuntimeError("fastllm.linear: the forward ran without saving its pre-activation (save_pre=False)")
        dz = (dy.to(_ct(dy)) * dact_ref(ctx.activation, pre)).to(dy.dtype)
    else:
        dz = dy
    dx = _mm(dz, w) if ctx.needs_input_grad[0] else None
    dw = _mm(dz.t(), x) if ctx.needs_input_grad[1] else None
    db = _bias_grad(dz, has_b and ctx.needs_input_grad[2])
    dres = dy if has_res and ctx.needs_input_grad[3] else None
    return dx, dw, db, dres, None, None


linear_fwd = _gemm_op(
    "linear_fwd(Tensor x, Tensor w, Tensor? b, Tensor? residual, str activation, bool save_pre) -> (Tensor, Tensor)",
    _linear_check,
    linear_ref,
    _linear_fake,
    _linear_cpp,
    _linear_triton,
    _linear_backward,
    _linear_setup,
)


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, _save_pre = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.activation = activation
    ctx.flags = (b1 is not None, b2 is not None)


def _ffn_backward(ctx, dy, _dpre):
    x, w1, w2, pre = ctx.saved_tensors
    if pre.numel() != x.shape[0] * w1.shape[0]:
        raise RuntimeError("fastllm.fused_ffn: the forward ran without saving its pre-activation (save_pre=False)")
    has_b1, has_b2 = ctx.flags
    need = ctx.needs_input_grad
    dz = gemm_bwd(dy, w2, pre, None, "dact", ctx.activation)[0]  # (dy W2) * act'(pre)
    dw2 = _mm(dy.t(), act_ref(ctx.activation, pre)) if need[3] else None
    dx = _mm(dz, w1) if need[0] else None
    dw1 = _mm(dz.t(), x) if need[1] else None
    return dx, dw1, _bias_grad(dz, has_b1 and need[2]), dw2, _bias_grad(dy, has_b2 and need[4]), None, None


fused_ffn_fwd = _gemm_op(
    "fused_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, bool save_pre)"
    " -> (Tensor, Tensor)",
    _ffn_check,
    ffn_ref,
    _ffn_fake,
    _ffn_cpp,
    _ffn_triton,
    _ffn_backward,
    _ffn_setup,
)


def _gated_setup(ctx, inputs, output):
    x, wg, wu, wd, bg, bu, bd, activation, _save_pre = inputs
    ctx.save_for_backward(x, wg, wu, wd, output[1], output[2])
    ctx.activation = activation
    ctx.flags = (bg is not None, bu is not None, bd is not None)


def _gated_backward(ctx, dy, _dg, _du):
    x, wg, wu, wd, g, u = ctx.saved_tensors
    if g.numel() != x.shape[0] * wg.shape[0]:
        raise RuntimeError("fastllm.fused_gated_ffn: the forward ran without saving g and u (save_pre=False)")
    has_bg, has_bu, has_bd = ctx.flags
    need = ctx.needs_input_grad
    dg, du = gemm_bwd(dy, wd, g, u, "dgated", ctx.activation)
    dwd = None
    if need[3]:
        h = (act_ref(ctx.activation, g.to(_ct(g))) * u).to(g.dtype)
        dwd = _mm(dy.t(), h)
    dx = None
    if need[0]:
        dx = (_mm(dg, wg).to(_ct(dg)) + _mm(du, wu)).to(x.dtype)
    dwg = _mm(dg.t(), x) if need[1] else None
    dwu = _mm(du.t(), x) if need[2] else None
    return (dx, dwg, dwu, dwd, _bias_grad(dg, has_bg and need[4]), _bias_grad(du, has_bu and need[5]),
            _bias_grad(dy, has_bd and need[6]), None, None)  # fmt: skip


fused_gated_ffn_fwd = _gemm_op(
    "fused_gated_ffn_fwd(Tensor x, Tensor wg, Tensor wu, Tensor wd, Tensor? bg, Tensor? bu, Tensor? bd, str activation,"
    " bool save_pre) -> (Tensor, Tensor, Tensor)",
    _gated_check,
    gated_ffn_ref,
    _gated_fake,
    _gated_cpp,
    _gated_triton,
    _gated_backward,
    _gated_setup,
)


# --------------------------------------------------------------------------------------------------
# Public functions: x (..., in_features) -> (..., out_features).


def _needs_grad(*ts) -> bool:
    # isinstance: a non-tensor (a float bias) reaches the validation, which names it, not an AttributeError here
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _flat(op: str, x):
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., in_features), got a 0-dim tensor")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _act_arg(op: str, activation, allow_none: bool):
    """The public spelling of "no activation" is None; the torch ops spell it "none"."""
    if activation is None and allow_none:
        return "none"
    if activation == "none":
        hint = "pass activation=None for no activation" if allow_none else "an MLP needs an activation"
        raise ValueError(f"{op}: activation 'none' is not accepted ({hint}); accepted: {', '.join(ACTIVATIONS)}")
    _check_activation(op, activation, False)
    return activation


_LEAN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _lean_operand(t, x, shape) -> bool:
    """bias / residual of the lean lane: None, or a contiguous CPU tensor of x's dtype and this shape."""
    return t is None or (type(t) in _LEAN_TYPES and t.dtype is x.dtype and t.is_cpu and t.shape == shape
                         and t.is_contiguous())  # fmt: skip


def _lean_linear(x, w, b, activation, residual):
    """The decode fast lane of linear (as the norms' _lean in ops/layer_norm.py): the common inference call
    (contiguous CPU tensors of one kernel dtype, matching shapes) checked in a few attribute reads, then the C++ GEMM
    with the arguments of _linear_cpp, built here positionally. None for anything else: the caller then goes
    through the op, which validates fully (and raises the errors) and dispatches."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in KERNEL_DTYPES or not x.is_contiguous():
        return None
    if type(w) not in _LEAN_TYPES or w.dtype is not x.dtype or not w.is_cpu or w.dim() != 2 or not x.dim():
        return None
    N, K = w.shape
    M = x.numel() // K if K else 0
    if x.shape[-1] != K or not M or not N:
        return None
    act = "none" if activation is None else activation
    if type(act) is not str or act not in _ACT_NAMES or not _lean_operand(b, x, (N,)):
        return None
    out_shape = (*x.shape[:-1], N)
    if not _lean_operand(residual, x, out_shape) or not linear_fwd.cpp_lane((x, w, b, residual)):
        return None
    y = x.new_empty(out_shape)
    pk = _packed_weight(w)
    c, dt = _ext._CODES, _ext.DTYPE_CODES[x.dtype]
    _ext.C.gemm(
        M, N, K, x.data_ptr(), K, 1, dt, pk.buf.data_ptr(), pk.code, c["layout"][pk.layout], c["epilogue"]["plain"],
        c["activation"][act], y.data_ptr(), N, 0, 0 if b is None else b.data_ptr(), 0,
        0 if residual is None else residual.data_ptr(), 0 if residual is None else N, 0, 0, 0, 0, 0, 0, dt, 0, 0,
        0 if pk.colsum is None else pk.colsum.data_ptr(), _ext.num_threads(max(M * N * K // 16, N * K // 4)),
    )  # fmt: skip
    return y


_ACT_NAMES = frozenset(("none", *ACTIVATIONS))


def _lean_gated(x, wg, wu, wd, bg, bu, bd, activation):
    """The decode fast lane of fused_gated_ffn (as _lean_linear): the common inference call checked in a few
    attribute reads, then _gated_cpp's two C++ GEMMs (gate and up in one, then down). None for anything else: the
    caller goes through the op. (The op's own path costs ~34 us a call in Python against ~9 us for linear's lane:
    30 calls a token in a SmolLM2-shaped decode step.)"""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in KERNEL_DTYPES or not x.is_contiguous():
        return None
    for w in (wg, wu, wd):
        if type(w) not in _LEAN_TYPES or w.dtype is not x.dtype or not w.is_cpu or w.dim() != 2:
            return None
    F, K = wg.shape
    N = wd.shape[0]
    M = x.numel() // K if K and x.dim() else 0
    if x.shape[-1] != K or wu.shape != wg.shape or wd.shape[1] != F or not M or not F or not N:
        return None
    if type(activation) is not str or activation not in ACTIVATIONS:
        return None
    if not (_lean_operand(bg, x, (F,)) and _lean_operand(bu, x, (F,)) and _lean_operand(bd, x, (N,))):
        return None
    if not fused_gated_ffn_fwd.cpp_lane((x, wg, wu, wd, bg, bu, bd)):
        return None
    h = x.new_empty((M, F))
    y = x.new_empty((*x.shape[:-1], N))
    pk, pd = _packed_weight(wg, wu), _packed_weight(wd)
    c, dt, lay = _ext._CODES, _ext.DTYPE_CODES[x.dtype], _ext._CODES["layout"]
    nt = _ext.num_threads
    # (the positional arguments of _pack.gemm_args, as _gated_cpp passes them)
    _ext.C.gemm(
        M, F, K, x.data_ptr(), K, 1, dt, pk.buf.data_ptr(), pk.code, lay[pk.layout], c["epilogue"]["gated"],
        c["activation"][activation], h.data_ptr(), F, 0, 0 if bg is None else bg.data_ptr(),
        0 if bu is None else bu.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, dt, 0, 0,
        0 if pk.colsum is None else pk.colsum.data_ptr(), nt(max(M * F * K // 16, F * K // 4)),
    )  # fmt: skip
    _ext.C.gemm(
        M, N, F, h.data_ptr(), F, 1, dt, pd.buf.data_ptr(), pd.code, lay[pd.layout], c["epilogue"]["plain"],
        c["activation"]["none"], y.data_ptr(), N, 0, 0 if bd is None else bd.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, 0,
        dt, 0, 0, 0 if pd.colsum is None else pd.colsum.data_ptr(), nt(max(M * N * F // 16, N * F // 4)),
    )  # fmt: skip
    return y


def linear(x, weight, bias=None, *, activation=None, residual=None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual in one GEMM with a fused epilogue; weight (out, in) as nn.Linear.

    activation: None (no activation), "gelu", "gelu_tanh", "quick_gelu", "relu" or "silu". residual: (..., out)
    added after the activation (the residual stream of a block's output projection).
    """
    if activation != "none":  # ("none" is refused below, with its message)
        y = _lean_linear(x, weight, bias, activation, residual)
        if y is not None:
            return y
    op = "linear"
    x2 = x if type(x) is torch.Tensor and x.dim() == 2 else _flat(op, x)
    check_tensor(op, "weight", weight)
    act = _act_arg(op, activation, True)
    res = residual
    if residual is not None:
        check_tensor(op, "residual", residual)
        n = weight.shape[0] if weight.dim() == 2 else -1
        if tuple(residual.shape) != (*x.shape[:-1], n):
            raise ValueError(f"{op}: residual must have shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
        res = residual.reshape(-1, n)
    save = _needs_grad(x, weight, bias, residual) and act != "none"
    y, _ = linear_fwd(x2, weight, bias, res, act, save)
    return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])


def fused_ffn(x, w1, w2, *, b1=None, b2=None, activation: str = "gelu") -> torch.Tensor:
    """The GPT-2 / BERT / ViT / CLIP MLP: act(x W1^T + b1) W2^T + b2 (biases optional)."""
    op = "fused_ffn"
    x2 = _flat(op, x)
    check_tensor(op, "w1", w1)
    check_tensor(op, "w2", w2)
    act = _act_arg(op, activation, False)
    y, _ = fused_ffn_fwd(x2, w1, b1, w2, b2, act, _needs_grad(x, w1, b1, w2, b2))
    return y.view(*x.shape[:-1], y.shape[-1])


def fused_gated_ffn(x, w_gate, w_up, w_down, *, b_gate=None, b_up=None, b_down=None,
                    activation: str = "silu") -> torch.Tensor:  # fmt: skip
    """The Llama MLP: (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd; silu = SwiGLU, gelu / gelu_tanh = GeGLU.

    The gate and up projections are one GEMM whose register tile holds a gate tile and the matching up tile,
    so act(g) * u is formed in registers; no (tokens, 2 * intermediate) tensor is written.
    """
    y = _lean_gated(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation)
    if y is not None:
        return y
    op = "fused_gated_ffn"
    x2 = _flat(op, x)
    for arg, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_tensor(op, arg, t)
    act = _act_arg(op, activation, False)
    save = _needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    y, _, _ = fused_gated_ffn_fwd(x2, w_gate, w_up, w_down, b_gate, b_up, b_down, act, save)
    return y.view(*x.shape[:-1], y.shape[-1])
