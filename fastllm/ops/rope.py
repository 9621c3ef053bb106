"""Rotary position embedding (RoPE) of q and k in one fused op, forward and backward, and its cos / sin tables.

    rotary_embedding(q, k, cos, sin, positions) -> (q_rot, k_rot)
    rope_tables(max_positions, rotary_dim, theta=10000.0, scaling=None) -> (cos, sin)

q (B, Hq, S, D) and k (B, Hkv, S, D) of one float dtype (float32 / bfloat16 / float16 on the fast paths, float64
on the reference), any strides; cos and sin (P, R / 2) float32 tables (R the rotary dim, even, R <= D); positions
(B, S) (or (1, S), shared by every row) int32 / int64 in [0, P). HF's rotate_half convention (Llama, Mistral,
Qwen2, GPT-NeoX): for i < R / 2, with c = cos[p, i], s = sin[p, i], p = positions[b, s],

    out[i] = x[i] c - x[i + R/2] s ;  out[i + R/2] = x[i + R/2] c + x[i] s ;  out[R:] = x[R:]

computed in fp32 and rounded once to x's dtype; outputs are contiguous. The rotation is orthogonal, so the
backward is the rotation by -theta of the output gradients (the same op with `inverse`); cos, sin and positions
get no gradient (tables that require grad under grad mode are an error, not a silent zero).
"""

import math
from collections.abc import Mapping

import torch

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops._common import KERNEL_DTYPES, check_float, check_like, check_tensor

_OP = "rotary_embedding"
POSITION_DTYPES = (torch.int32, torch.int64)

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device and float dtype (fp32 arithmetic for 16-bit inputs, float64 for float64).


def _rotate_ref(x, cos, sin, positions, inverse: bool):
    """RoPE of one (B, H, S, D) tensor: the formula of the module docstring, term by term."""
    ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    half = cos.shape[1]
    pos = positions.long().expand(x.shape[0], x.shape[2])  # (B, S)
    c = cos.to(ct)[pos].unsqueeze(1)  # (B, 1, S, half)
    s = sin.to(ct)[pos].unsqueeze(1)
    if inverse:
        s = -s
    xf = x.to(ct)
    x1, x2 = xf[..., :half], xf[..., half : 2 * half]  # (B, H, S, half) each
    out = torch.cat([(x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype), x[..., 2 * half :]], dim=-1)
    return out.contiguous()


def rope_ref(q, k, cos, sin, positions, inverse: bool = False):
    """(q_rot, k_rot): the reference of the op (and the fallback). inverse: the rotation by -theta."""
    check_positions(positions, cos.shape[0])
    return _rotate_ref(q, cos, sin, positions, inverse), _rotate_ref(k, cos, sin, positions, inverse)


# --------------------------------------------------------------------------------------------------
# Validation: once, before any kernel (also in the fake, so torch.compile traces see the same errors). The
# positions' values are checked where they are read: by the C++ kernel (one pass over B x S ints, cheaper than a
# reduction in torch) or by check_positions before the reference and the Triton kernel.


def _check(q, k, cos, sin, positions, inverse=False) -> None:
    for arg, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin), ("positions", positions)):
        check_tensor(_OP, arg, t)
    check_float(_OP, "q", q)
    check_like(_OP, "k", k, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be 4-D (B, Hq, S, D), got shape {tuple(q.shape)}")
    B, _, S, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"{_OP}: k must have shape (B, Hkv, S, D) = ({B}, Hkv, {S}, {D}) to match q, "
                         f"got {tuple(k.shape)}")  # fmt: skip
    for arg, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"{_OP}: {arg} must be a float32 table (see rope_tables), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {arg} is on {t.device} but q is on {q.device}; move them to one device")
    if cos.dim() != 2:
        raise ValueError(f"{_OP}: cos must be 2-D (P, R/2), got shape {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{_OP}: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if 2 * cos.shape[1] > D:
        raise ValueError(f"{_OP}: the rotary dim R = 2 * cos.shape[1] = {2 * cos.shape[1]} exceeds the head dim "
                         f"D = {D}; cos and sin must be (P, R/2) with R <= D")  # fmt: skip
    if positions.dtype not in POSITION_DTYPES:
        raise TypeError(f"{_OP}: positions must be int32 or int64, got {positions.dtype}")
    if positions.device != q.device:
        raise ValueError(f"{_OP}: positions is on {positions.device} but q is on {q.device}; move them to one device")
    if positions.dim() != 2 or positions.shape[0] not in (B, 1) or positions.shape[1] != S:
        raise ValueError(f"{_OP}: positions must have shape (B, S) = ({B}, {S}) (or (1, {S}) for every row), "
                         f"got {tuple(positions.shape)}")  # fmt: skip


def check_positions(positions: torch.Tensor, P: int) -> None:
    """ValueError unless every position is in [0, P) (a min/max reduction: one device sync on a GPU). Skipped for
    tensors without values (meta, fake)."""
    if positions.numel() == 0 or type(positions) is not torch.Tensor or positions.is_meta:
        return
    lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0 or hi >= P:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{_OP}: positions must be in [0, P) = [0, {P}) for cos/sin tables of P rows, got {bad}")


def _unsupported(q, k, cos, sin, positions, inverse) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return f"no kernel for {q.dtype} (fast paths: float32, bfloat16, float16)"
    if cos.shape[1] == 0:
        return "rotary dim 0: nothing to rotate"
    if q.numel() == 0 and k.numel() == 0:
        return "empty input"
    return None


# --------------------------------------------------------------------------------------------------
# Backends. Argument order: (q, k, cos, sin, positions, inverse) -> (q_out, k_out).


def _new(t: torch.Tensor) -> torch.Tensor:
    """A contiguous output of t's shape and dtype (tests replace it to poison the outputs). empty_like: ~1 us against
    ~4 us for torch.empty(shape, ...), on a call the decode loop makes once per layer."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last dim is not unit-stride (the kernels take strides of (B, H, S) only)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _tables(cos, sin):
    """cos and sin with unit column stride and one shared row stride (the kernels take one table stride)."""
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _fwd_cpp(q, k, cos, sin, positions, inverse):
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _tables(cos, sin)
    q_out, k_out = _new(q), _new(k)
    B, Hq, S, D = q.shape
    pos_sb = positions.stride(0) if positions.shape[0] > 1 else 0
    # positional, in C.rope_fwd's order (bindings.cpp): the kwargs parsing would cost ~2 us a call
    _ext.C.rope_fwd(q_out.data_ptr(), k_out.data_ptr(), q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                    positions.data_ptr(), B, Hq, k.shape[1], S, D, 2 * cos.shape[1], cos.shape[0], *q.stride()[:3],
                    *k.stride()[:3], pos_sb, positions.stride(1), cos.stride(0), positions.dtype is torch.int64,
                    bool(inverse), _ext.DTYPE_CODES[q.dtype], _ext.num_threads(q.numel() + k.numel()))  # fmt: skip
    return q_out, k_out


def _fwd_triton(q, k, cos, sin, positions, inverse):
    from fastllm.kernels.triton import rope as tri

    check_positions(positions, cos.shape[0])
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _tables(cos, sin)
    q_out, k_out = _new(q), _new(k)
    tri.rope_fwd(q, k, cos, sin, positions, q_out, k_out, bool(inverse))
    return q_out, k_out


def _fake(q, k, cos, sin, positions, inverse):
    return _new(q), _new(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, positions, inverse = inputs
    _no_table_grad(cos, sin, always=True)  # (grad mode is off while autograd sets up the context)
    ctx.save_for_backward(cos, sin, positions)
    ctx.inverse = inverse


def _backward(ctx, dq, dk):
    cos, sin, positions = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[:2]
    # The Jacobian of a rotation is the rotation; its transpose is the rotation by -theta. A tensor that needs no
    # gradient goes in with 0 heads (a view), so no work is spent on it.
    gq, gk = _rope(dq if need_q else dq[:, :0], dk if need_k else dk[:, :0], cos, sin, positions, not ctx.inverse)
    return (gq if need_q else None), (gk if need_k else None), None, None, None, None


_rope = define_op(
    "rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, bool inverse) -> (Tensor, Tensor)",
    validate=_check,
    reference=rope_ref,
    fake=_fake,
    cpp=Kernel(_fwd_cpp, _unsupported),
    triton=Kernel(_fwd_triton, _unsupported),
    backward=_backward,
    setup_context=_setup_context,
)


# --------------------------------------------------------------------------------------------------
# Public functions.


def _no_table_grad(cos, sin, always: bool = False) -> None:
    for arg, t in (("cos", cos), ("sin", sin)):
        if isinstance(t, torch.Tensor) and t.requires_grad and (always or torch.is_grad_enabled()):
            raise ValueError(f"{_OP}: {arg} requires grad, but the tables get no gradient from this op; pass "
                             f"{arg}.detach() (or build them with rope_tables)")  # fmt: skip


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    """(q_rot, k_rot): RoPE of q (B, Hq, S, D) and k (B, Hkv, S, D) at `positions` (B, S), from the (P, R/2) float32
    tables of rope_tables; the first R dims rotate in HF's rotate_half layout, the rest pass through (module
    docstring). Outputs are contiguous, in q's dtype."""
    _check(q, k, cos, sin, positions)
    _no_table_grad(cos, sin)
    return _rope.prevalidated(q, k, cos, sin, positions, False)


# --------------------------------------------------------------------------------------------------
# Tables.

_SCALING_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}  # fmt: skip


def _int_arg(arg: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"rope_tables: {arg} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"rope_tables: {arg} must be >= {minimum}, got {v}")
    return v


def _positive(arg: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"rope_tables: {arg} must be a number, got {type(v).__name__}")
    if not (0 < v < math.inf):
        raise ValueError(f"rope_tables: {arg} must be a positive finite number, got {v}")
    return float(v)


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0, scaling: Mapping | None = None) -> torch.Tensor:
    """The (rotary_dim / 2,) float64 inverse frequencies: theta^(-2i / R), then the scaling's adjustment.

    scaling: None or {"rope_type": "default"}: none. {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1; the rule of transformers'
    _compute_llama3_parameters): with L = original_max_position_embeddings and the wavelength w = 2 pi / f of each
    frequency f, long waves (w > L / low_freq_factor) are slowed down by `factor`, short ones (w < L /
    high_freq_factor) kept, and the band between blends the two linearly in L / w. HF's dicts may also hold
    "rope_theta" (which must equal theta) and the legacy key "type" for "rope_type".
    """
    rotary_dim = _int_arg("rotary_dim", rotary_dim, 2)
    if rotary_dim % 2:
        raise ValueError(f"rope_tables: rotary_dim must be even (pairs of dims rotate together), got {rotary_dim}")
    theta = _positive("theta", theta)
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # (R/2,)
    if scaling is None:
        return inv_freq
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_tables: scaling must be None or a dict, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SCALING_KEYS:
        raise ValueError(f"rope_tables: scaling rope_type {rope_type!r} is not supported (supported: default, llama3)")
    unknown = sorted(set(scaling) - _SCALING_KEYS[rope_type])
    if unknown:
        raise ValueError(f"rope_tables: scaling key(s) {unknown} are not supported for rope_type {rope_type!r}")
    if "rope_theta" in scaling and _positive("scaling['rope_theta']", scaling["rope_theta"]) != theta:
        raise ValueError(f"rope_tables: scaling['rope_theta'] = {scaling['rope_theta']} differs from theta = {theta}")
    if rope_type == "default":
        return inv_freq
    missing = sorted(_SCALING_KEYS["llama3"] - {"rope_type", "type", "rope_theta"} - set(scaling))
    if missing:
        raise ValueError(f"rope_tables: llama3 scaling needs the key(s) {missing}")
    factor = _positive("scaling['factor']", scaling["factor"])
    low = _positive("scaling['low_freq_factor']", scaling["low_freq_factor"])
    high = _positive("scaling['high_freq_factor']", scaling["high_freq_factor"])
    old_len = _positive("scaling['original_max_position_embeddings']", scaling["original_max_position_embeddings"])
    if not high > low:
        raise ValueError(f"rope_tables: llama3 scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    wavelen = 2 * math.pi / inv_freq
    blend = (old_len / wavelen - low) / (high - low)  # 0 at w = L / low, 1 at w = L / high
    mid = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelen < old_len / high, inv_freq, mid)
    return torch.where(wavelen > old_len / low, inv_freq / factor, out)


def rope_tables(max_positions: int, rotary_dim: int, theta: float = 10000.0, scaling: Mapping | None = None):
    """(cos, sin): (max_positions, rotary_dim / 2) float32 CPU tables for rotary_embedding, angle[p, i] = p * f_i
    with the inverse frequencies f of rope_inv_freq; angles, cos and sin in float64, each entry rounded once to
    float32 (so long tables do not inherit fp32's angle error p * ulp(f), about 1e-4 rad at p = 8192 with fp32
    frequencies). Move them to the model's device once; they do not depend on the batch."""
    max_positions = _int_arg("max_positions", max_positions, 1)
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
    angle = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (P, R/2)
    return angle.cos().float(), angle.sin().float()
