"""LayerNorm and RMSNorm over the last dim, each with a fused residual-add variant, forward and backward.

    layer_norm(x, weight, bias, eps)              -> out
    add_layer_norm(x, residual, weight, bias, eps) -> (out, h)     h = x + residual, the pre-norm block's stream
    rms_norm(x, weight, eps)                      -> out
    add_rms_norm(x, residual, weight, eps)         -> (out, h)

x (..., N) in float32 / bfloat16 / float16 on the fast paths (float64 and anything else a kernel cannot
take runs the reference). Statistics in fp32, computed from h as rounded to x's dtype, so the result is
that of `h = x + residual; F.layer_norm(h)` with one rounding per output. The backward recomputes mean
and rstd from h (nothing else is saved) in one fused pass per row (fastllm::norm_backward).
"""

import torch
import torch.nn.functional as F

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops._common import KERNEL_DTYPES, as_rows, check_float, check_like, check_tensor, ptr

# Outputs larger than this go out with non-temporal stores on CPU (no read-for-ownership, no cache
# pollution); smaller ones stay in cache for the next op. The L3 of the development machine is 32 MiB.
STREAM_BYTES = 16 << 20

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device and dtype (fp32 statistics for 16-bit inputs).


def norm_ref(x, residual, weight, bias, eps: float, rms: bool):
    """(out, h): the reference of all four forward ops. h is None without a residual."""
    h = x + residual if residual is not None else x
    hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    if h.numel() == 0:
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    elif rms:
        out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        out = out * weight.to(hf.dtype) if weight is not None else out
    else:
        w = weight.to(hf.dtype) if weight is not None else None
        b = bias.to(hf.dtype) if bias is not None else None
        out = F.layer_norm(hf, (h.shape[-1],), w, b, eps)
    return out.to(x.dtype), (h if residual is not None else None)


def norm_bwd_ref(dy, dh, h, weight, has_bias: bool, eps: float, rms: bool):
    """(dx, dw, db) from the explicit formulas (see the module docstring of kernels/cpp/layer_norm.cpp)."""
    n = h.shape[-1]
    ct = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    hf, dyf = h.to(ct), dy.to(ct)
    if h.numel() == 0:
        dx = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        dw = torch.zeros(n, dtype=h.dtype, device=h.device) if weight is not None else None
        db = torch.zeros(n, dtype=h.dtype, device=h.device) if has_bias else None
        return dx, dw, db
    mean = torch.zeros_like(hf[..., :1]) if rms else hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (hf - mean) * rstd
    g = dyf * weight.to(ct) if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.to(ct)
    lead = tuple(range(h.dim() - 1))
    dw = (dyf * xhat).sum(lead).to(weight.dtype) if weight is not None else None
    db = dyf.sum(lead).to(h.dtype) if has_bias else None
    return dx.to(h.dtype), dw, db


# --------------------------------------------------------------------------------------------------
# Validation: once, before any kernel (also in the fake, so torch.compile traces see the same errors).


def _check(op: str, x, residual, weight, bias) -> None:
    check_tensor(op, "x", x)
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., N), got a 0-dim tensor")
    n = x.shape[-1]
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_like(op, "residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, arg, t, optional=True)
        check_like(op, arg, t, "x", x)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{op}: {arg} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")


def _unsupported(x, residual, weight, bias) -> str | None:
    if x.dtype not in KERNEL_DTYPES:
        return f"no kernel for {x.dtype} (fast paths: float32, bfloat16, float16)"
    if x.numel() == 0:
        return "empty input"
    return None


# --------------------------------------------------------------------------------------------------
# Backends. Canonical argument order: (x, residual, weight, bias, eps, rms) -> (out, h).


def _fwd_cpp(x, residual, weight, bias, eps, rms):
    # Every call of a decode step comes here (~60 per token in a 30-layer model): the allocation is empty_like
    # (~1 us against ~4 us for torch.empty(shape, ...)) and the binding is called positionally (kwargs parsing
    # costs ~1.5 us). The arguments are those of C.norm_fwd (kernels/cpp/bindings.cpp), in order.
    n = x.shape[-1]
    x2 = x if x.is_contiguous() else as_rows(x, n)
    r2 = None if residual is None else residual if residual.is_contiguous() else as_rows(residual, n)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(out) if residual is not None else None
    w = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    numel = out.numel()
    stream = out.nbytes * (2 if h is not None else 1) >= STREAM_BYTES
    x_stride = n if x2 is x else x2.stride(0)
    r_stride = 0 if r2 is None else n if r2 is residual else r2.stride(0)
    M, code = numel // n if n else 0, _ext.DTYPE_CODES[x.dtype]
    _ext.C.norm_fwd(out.data_ptr(), ptr(h), x2.data_ptr(), ptr(r2), ptr(w), ptr(b), M, n, x_stride, r_stride, eps,
                    rms, stream, code, _ext.num_threads(numel))  # fmt: skip
    return out, h


def _fwd_triton(x, residual, weight, bias, eps, rms):
    from fastllm.kernels.triton import layer_norm as tri

    n = x.shape[-1]
    r2 = as_rows(residual, n) if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    out, h = tri.norm_fwd(as_rows(x, n), r2, w, b, eps, rms)
    return out.view(x.shape), (h.view(x.shape) if h is not None else None)


def _bwd_cpp(dy, dh, h, weight, has_bias, eps, rms):
    n = h.shape[-1]
    dy2, h2 = as_rows(dy, n), as_rows(h, n)
    dh2 = as_rows(dh, n) if dh is not None else None
    w = weight.contiguous() if weight is not None else None
    dx = torch.empty(h.shape, dtype=h.dtype)
    dw = torch.empty(n, dtype=h.dtype) if weight is not None else None
    db = torch.empty(n, dtype=h.dtype) if has_bias else None
    _ext.C.norm_bwd(
        dx=dx.data_ptr(), dw=ptr(dw), db=ptr(db), dy=dy2.data_ptr(), dh=ptr(dh2), h=h2.data_ptr(), w=ptr(w),
        M=h2.shape[0], N=n, dy_stride=dy2.stride(0), dh_stride=dh2.stride(0) if dh2 is not None else 0,
        h_stride=h2.stride(0), eps=eps, rms=rms, stream=dx.nbytes >= STREAM_BYTES,
        dtype=_ext.DTYPE_CODES[h.dtype], nthreads=_ext.num_threads(h.numel()),
    )  # fmt: skip
    return dx, dw, db


def _bwd_triton(dy, dh, h, weight, has_bias, eps, rms):
    from fastllm.kernels.triton import layer_norm as tri

    n = h.shape[-1]
    dh2 = as_rows(dh, n) if dh is not None else None
    w = weight.contiguous() if weight is not None else None
    dx, dw, db = tri.norm_bwd(as_rows(dy, n), dh2, as_rows(h, n), w, has_bias, eps, rms)
    return dx.view(h.shape), dw, db


# --------------------------------------------------------------------------------------------------
# The backward op, shared by all four forward ops. dw/db come back as (0,) tensors when absent
# (a custom op cannot return None).


def _empty1(t):
    return torch.empty(0, dtype=t.dtype, device=t.device)


def _bwd_op_args(fn):
    def run(dy, dh, h, weight, has_bias, eps, rms):
        dx, dw, db = fn(dy, dh, h, weight, has_bias, eps, rms)
        return dx, (dw if dw is not None else _empty1(h)), (db if db is not None else _empty1(h))

    return run


def _bwd_check(dy, dh, h, weight, has_bias, eps, rms):
    _check("norm_backward", h, None, weight, None)
    check_like("norm_backward", "dy", dy, "h", h)
    if dy.shape != h.shape or (dh is not None and dh.shape != h.shape):
        raise ValueError("norm_backward: dy and dh must have h's shape")


def _bwd_fake(dy, dh, h, weight, has_bias, eps, rms):
    n = h.shape[-1]
    return (
        torch.empty(h.shape, dtype=h.dtype, device=h.device),
        torch.empty(n if weight is not None else 0, dtype=h.dtype, device=h.device),
        torch.empty(n if has_bias else 0, dtype=h.dtype, device=h.device),
    )


def _bwd_unsupported(dy, dh, h, weight, has_bias, eps, rms):
    return _unsupported(h, None, weight, None)


norm_backward = define_op(
    "norm_backward(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, bool has_bias, float eps, bool rms)"
    " -> (Tensor, Tensor, Tensor)",
    validate=_bwd_check,
    reference=_bwd_op_args(norm_bwd_ref),
    fake=_bwd_fake,
    cpp=Kernel(_bwd_op_args(_bwd_cpp), _bwd_unsupported),
    triton=Kernel(_bwd_op_args(_bwd_triton), _bwd_unsupported),
)


# --------------------------------------------------------------------------------------------------
# The four forward ops, generated from one description: (name, has residual, rms).


def _make(name: str, schema: str, residual: bool, rms: bool):
    def canon(args):
        """Op arguments in schema order -> (x, residual, weight, bias, eps)."""
        if residual:
            x, r, w, *rest = args
        else:
            (x, w, *rest), r = args, None
        b = None if rms else rest[0]
        return x, r, w, b, rest[-1]

    def validate(*args):
        x, r, w, b, _ = canon(args)
        _check(name, x, r, w, b)

    def pick(fn):
        def run(*args):
            x, r, w, b, eps = canon(args)
            out, h = fn(x, r, w, b, eps, rms)
            return (out, h) if residual else out

        return run

    def unsupported(*args):
        x, r, w, b, _ = canon(args)
        return _unsupported(x, r, w, b)

    def fake(*args):
        x = args[0]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return (out, torch.empty(x.shape, dtype=x.dtype, device=x.device)) if residual else out

    def setup_context(ctx, inputs, output):
        x, _, w, b, eps = canon(inputs)
        h = output[1] if residual else x  # the backward recomputes the statistics from h
        ctx.save_for_backward(h, w)
        ctx.has_bias, ctx.eps = b is not None, eps
        # an unused output's gradient arrives as None instead of a materialized (M, N) tensor of zeros,
        # which the backward would otherwise read in full (the h output of the add variants, usually)
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        h, w = ctx.saved_tensors
        dy, dh = grads if residual else (grads[0], None)
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dw, db = norm_backward(dy, dh, h, w, ctx.has_bias, ctx.eps, rms)
        dw = dw if w is not None else None
        db = db if ctx.has_bias else None
        if residual:
            return (dx, dx, dw, None, None) if rms else (dx, dx, dw, db, None)
        return (dx, dw, None) if rms else (dx, dw, db, None)

    return define_op(
        f"{name}{schema}",
        validate=validate,
        reference=pick(norm_ref),
        fake=fake,
        cpp=Kernel(pick(_fwd_cpp), unsupported),
        triton=Kernel(pick(_fwd_triton), unsupported),
        backward=backward,
        setup_context=setup_context,
    )


_layer_norm = _make("layer_norm", "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor", False, False)
_add_layer_norm = _make(
    "add_layer_norm", "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)",
    True, False,
)  # fmt: skip
_rms_norm = _make("rms_norm", "(Tensor x, Tensor? weight, float eps) -> Tensor", False, True)
_add_rms_norm = _make(
    "add_rms_norm", "(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor)", True, True
)


# --------------------------------------------------------------------------------------------------
# Public functions.


def _lean_vec(t, x, n: int) -> bool:
    if t is None:
        return True
    return isinstance(t, torch.Tensor) and t.dtype is x.dtype and t.is_cpu and t.dim() == 1 and t.shape[0] == n \
        and t.is_contiguous()  # fmt: skip


def _lean(op, x, residual, weight, bias, eps, rms: bool):
    """The decode fast lane of the four public functions: the common case (contiguous CPU tensors of one kernel
    dtype, matching shapes, a float eps) checked in a few attribute reads, then the C++ kernel, with nothing in
    between (a 30-layer decoder makes ~60 norm calls per token). None when the call is anything else: the caller
    then goes through the op as usual, which validates fully (and raises the errors) and dispatches."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in KERNEL_DTYPES or not x.is_contiguous():
        return None
    numel = x.numel()
    if not numel or not x.dim() or type(eps) is not float or not eps >= 0.0:
        return None
    n = x.shape[-1]
    if not (_lean_vec(weight, x, n) and _lean_vec(bias, x, n)):
        return None
    if residual is not None and not (
        type(residual) is torch.Tensor and residual.dtype is x.dtype and residual.is_cpu
        and residual.shape == x.shape and residual.is_contiguous()
    ):  # fmt: skip
        return None
    if not op.cpp_lane((x, residual, weight, bias)):
        return None
    out = torch.empty_like(x)  # (x is contiguous: so is out)
    h = torch.empty_like(x) if residual is not None else None
    nbytes = out.nbytes * (2 if h is not None else 1)
    code, stream = _ext.DTYPE_CODES[x.dtype], nbytes >= STREAM_BYTES
    _ext.C.norm_fwd(out.data_ptr(), ptr(h), x.data_ptr(), ptr(residual), ptr(weight), ptr(bias), numel // n, n, n,
                    n, eps, rms, stream, code, _ext.num_threads(numel))  # fmt: skip
    return out if residual is None else (out, h)


def _eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    return float(eps)


def _tensors(op: str, **named) -> None:
    for arg, t in named.items():
        check_tensor(op, arg, t, optional=arg in ("weight", "bias"))


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (weight/bias optional)."""
    out = _lean(_layer_norm, x, None, weight, bias, eps, False)
    if out is not None:
        return out
    _tensors("layer_norm", x=x, weight=weight, bias=bias)
    return _layer_norm(x, weight, bias, _eps("layer_norm", eps))


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight=None, bias=None, eps: float = 1e-5):
    """(layer_norm(x + residual), x + residual) in one pass over memory: the pre-norm block pattern."""
    # residual None is a caller's error (named by the op's validation), not the plain norm of the lean lane
    out = _lean(_add_layer_norm, x, residual, weight, bias, eps, False) if residual is not None else None
    if out is not None:
        return out
    _tensors("add_layer_norm", x=x, residual=residual, weight=weight, bias=bias)
    return _add_layer_norm(x, residual, weight, bias, _eps("add_layer_norm", eps))


def rms_norm(x: torch.Tensor, weight=None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight."""
    out = _lean(_rms_norm, x, None, weight, None, eps, True)
    if out is not None:
        return out
    _tensors("rms_norm", x=x, weight=weight)
    return _rms_norm(x, weight, _eps("rms_norm", eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight=None, eps: float = 1e-6):
    """(rms_norm(x + residual), x + residual) in one pass over memory."""
    out = _lean(_add_rms_norm, x, residual, weight, None, eps, True) if residual is not None else None
    if out is not None:
        return out
    _tensors("add_rms_norm", x=x, residual=residual, weight=weight)
    return _add_rms_norm(x, residual, weight, _eps("add_rms_norm", eps))
