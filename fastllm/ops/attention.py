"""Attention: flash_attention, scaled_dot_product_attention (torch's signature) and decode_attention.

    flash_attention(q, k, v, *, causal=False, attn_mask=None, scale=None)         -> out
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False)  -> out
    decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None)         -> out

Layout (B, H, S, D) as torch SDPA: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv),
Hq % Hkv == 0 (GQA/MQA: query head h reads kv head h // (Hq // Hkv), nothing is expanded in memory). The kernels
take Dv == D; a value head dim of its own (as torch's SDPA allows) runs the reference.

All three are one torch op underneath, fastllm::attention_fwd, which returns (out, stats):

    visible(b, h, i, j) = j < kv_len[b]                         (all j without kv_len)
                        and (not causal or j <= i + offset_b)    offset_b = Sk_b - Sq (bottom-right) or 0
                        and mask[b, h, i, j]                      (bool masks; True = attend)
    s = scale * q.k (+ mask, for additive float masks);  out_i = softmax over visible j of s, times v
    stats (B, Hq, Sq, 2) fp32 = (m, l) per row: the softmax in base 2 is exp2(s log2(e) - m) / l, i.e.
    lse = (m + log2 l) ln 2. The kernels store m = the row max of s log2(e) and l = the sum of exp2(s log2(e)
    - m) (any m works if l matches). A row with no visible key returns out = 0, stats = (+inf, 1).
    NaN / Inf propagate as in torch's eager softmax: a NaN or +inf among a row's visible scores (from q, k or an
    additive mask) makes the row NaN (stats l = NaN, which makes the backward's P, and so its gradients, NaN);
    Inf in v gives +-Inf outputs. A key a row cannot see does not reach it through its score (replaced by -inf,
    where torch's NaN + (-inf) stays NaN); keys past kv_len are never read (a KV cache may hold NaN there).

Why (m, l) and not one fp32 lse as FlashAttention saves: the backward recomputes P = exp2(s log2 e - m) / l.
With the exact row max m, s log2 e - m is small for every probability that matters and P is as accurate as
eager's softmax; with lse (about 10 for long rows) the fp32 subtraction alone errs by ~1e-6 relative on
every P of the row, a systematic error that made fp32 gradients miss the 2x-eager criterion.

The backward (fastllm::attention_bwd) recomputes the probabilities from q, k and the stats
(FlashAttention-2); nothing of size (Sq, Sk) is saved. A float mask gets no gradient, and there is no
backward through kv_len (decode_attention is inference-only).
"""

import math

import torch

from fastllm import _ext
from fastllm._op import Kernel, define_op
from fastllm.ops._common import KERNEL_DTYPES, check_float, check_like, check_tensor

MAX_KERNEL_HEAD_DIM = 256
_REF_SCORE_ELEMS = 1 << 25  # the reference computes scores in query chunks of at most this many elements

# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch on any device and dtype (fp32 math for 16-bit inputs). The fallback and the
# formulas the kernels implement; tests check it against torch's own SDPA in float64.


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _visible(b_len, sq0, sq1, Sq, Sk, kv_len, causal, bottom_right, device):
    """Bool (B or 1, 1, sq1 - sq0, Sk): which keys each query row of the chunk may see (mask aside)."""
    j = torch.arange(Sk, device=device)
    i = torch.arange(sq0, sq1, device=device)
    vis = torch.ones(1, 1, sq1 - sq0, Sk, dtype=torch.bool, device=device)
    sk_b = kv_len.to(torch.int64).view(-1, 1, 1, 1) if kv_len is not None else torch.tensor(Sk, device=device)
    if kv_len is not None:
        vis = vis & (j.view(1, 1, 1, -1) < sk_b)
    if causal:
        offset = sk_b - Sq if bottom_right else torch.tensor(0, device=device)
        vis = vis & (j.view(1, 1, 1, -1) <= i.view(1, 1, -1, 1) + offset)
    return vis


def _scores(q, k, mask, kv_len, causal, bottom_right, scale, sq0, sq1):
    """(scores with -inf where invisible, visible) for query rows sq0:sq1, in the compute dtype."""
    ct = _compute_dtype(q)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf = q[:, :, sq0:sq1].to(ct).view(B, Hkv, g, sq1 - sq0, D)
    s = torch.matmul(qf, k.to(ct).unsqueeze(2).transpose(-1, -2)).view(B, Hq, sq1 - sq0, Sk) * scale
    vis = _visible(B, sq0, sq1, Sq, Sk, kv_len, causal, bottom_right, q.device)
    if mask is not None:
        m = mask[:, :, sq0:sq1] if mask.shape[2] != 1 else mask
        if m.dtype == torch.bool:
            vis = vis & m
        else:
            s = s + m.to(ct)
    s = s.masked_fill(~vis, float("-inf"))
    return s


def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    """stats are fp32 (float64 for float64 inputs, so the float64 reference stays float64 throughout)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chunks(q, Sk):
    B, Hq, Sq, _ = q.shape
    step = max(1, _REF_SCORE_ELEMS // max(1, B * Hq * max(Sk, 1)))
    return [(i, min(Sq, i + step)) for i in range(0, Sq, step)] or [(0, 0)]


def attention_ref(q, k, v, mask, kv_len, causal: bool, bottom_right: bool, scale: float):
    """(out, stats) of fastllm::attention_fwd in plain PyTorch (scores computed in query chunks)."""
    ct = _compute_dtype(q)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    out = torch.zeros(B, Hq, Sq, Dv, dtype=ct, device=q.device)
    stats = torch.empty(B, Hq, Sq, 2, dtype=_stats_dtype(q), device=q.device)
    stats[..., 0], stats[..., 1] = float("inf"), 1.0
    if Sq == 0 or Sk == 0:
        return out.to(q.dtype), stats
    vf = v.to(ct)
    if kv_len is not None:  # cache slots past a sequence's length may hold anything (NaN): 0 * NaN is NaN
        hidden = torch.arange(Sk, device=q.device).view(1, 1, Sk, 1) >= kv_len.view(-1, 1, 1, 1)
        vf = vf.masked_fill(hidden, 0.0)
    vf = vf.unsqueeze(2)
    for sq0, sq1 in _chunks(q, Sk):
        s = _scores(q, k, mask, kv_len, causal, bottom_right, scale, sq0, sq1)
        mx = s.amax(dim=-1, keepdim=True)
        empty = torch.isneginf(mx)  # no visible key
        e = torch.exp(s - torch.where(empty, 0.0, mx))  # exact 0 where s = -inf
        denom = e.sum(-1, keepdim=True)
        p = e / torch.where(empty, 1.0, denom)
        o = torch.matmul(p.view(B, Hkv, g, sq1 - sq0, Sk), vf).view(B, Hq, sq1 - sq0, Dv)
        out[:, :, sq0:sq1] = o
        stats[:, :, sq0:sq1, 0] = torch.where(empty, float("inf"), mx * math.log2(math.e)).squeeze(-1)
        stats[:, :, sq0:sq1, 1] = torch.where(empty, 1.0, denom).squeeze(-1)
    return out.to(q.dtype), stats


def attention_bwd_ref(dout, q, k, v, out, stats, mask, causal: bool, bottom_right: bool, scale: float):
    """(dq, dk, dv): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale * dS K,
    dK = scale * dS^T Q (GQA: summed over the group). The reference recomputes P with a max-subtracted softmax
    and takes delta = rowsum(P * dP) (= rowsum(dO * O), the kernels' form) as eager's softmax backward does;
    `out` and `stats` are not needed here."""
    ct = _compute_dtype(q)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    dq = torch.zeros(B, Hq, Sq, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, Sk, Dv, dtype=ct, device=q.device)
    if Sq > 0 and Sk > 0:
        kf, vf = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
        for sq0, sq1 in _chunks(q, Sk):
            n = sq1 - sq0
            s = _scores(q, k, mask, None, causal, bottom_right, scale, sq0, sq1)
            mx = s.amax(dim=-1, keepdim=True)
            mx = torch.where(torch.isneginf(mx), 0.0, mx)
            e = torch.exp(s - mx)
            denom = e.sum(-1, keepdim=True)
            p = (e / torch.where(denom == 0, 1.0, denom)).view(B, Hkv, g, n, Sk)
            do = dout[:, :, sq0:sq1].to(ct).view(B, Hkv, g, n, Dv)
            dv += torch.matmul(p.transpose(-1, -2), do).sum(2)
            dp = torch.matmul(do, vf.transpose(-1, -2))
            delta = (p * dp).sum(-1, keepdim=True)  # = rowsum(dO * O), as eager's softmax backward forms it
            ds = p * (dp - delta) * scale
            dq[:, :, sq0:sq1] = torch.matmul(ds, kf).view(B, Hq, n, D)
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, sq0:sq1].to(ct).view(B, Hkv, g, n, D)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------------
# Validation (also run by the fakes, so torch.compile traces raise the same errors).


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or type(t).__name__ == "FakeTensor" or not hasattr(t, "data_ptr")


def _check_qkv(op: str, q, k, v, names=("q", "k", "v")) -> None:
    nq, nk, nv = names
    for arg, t in zip(names, (q, k, v), strict=True):
        check_tensor(op, arg, t)
    check_float(op, nq, q)
    check_like(op, nk, k, nq, q)
    check_like(op, nv, v, nq, q)
    for arg, t in zip(names, (q, k, v), strict=True):
        if t.dim() != 4:
            raise ValueError(f"{op}: {arg} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[:3] != v.shape[:3]:  # v's head dim may differ (torch's SDPA: value (..., S, Ev))
        raise ValueError(
            f"{op}: {nk} and {nv} must agree in (batch, heads, seq), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != B:
        raise ValueError(f"{op}: batch of {nk}/{nv} ({k.shape[0]}) differs from {nq}'s ({B})")
    if k.shape[3] != D:
        raise ValueError(f"{op}: head_dim of {nk} ({k.shape[3]}) differs from {nq}'s ({D})")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"{op}: head_dim must be >= 1, got {nq}/{nk} {D} and {nv} {v.shape[3]}")
    Hkv = k.shape[1]
    if Hq == 0:  # a shape mistake (no head to attend with), not an empty batch or sequence: refused, named
        raise ValueError(f"{op}: {nq} has 0 heads, shape {tuple(q.shape)} (batch, heads, seq, head_dim); need >= 1")
    if Hkv == 0:
        raise ValueError(
            f"{op}: {nk}/{nv} have 0 heads, shape {tuple(k.shape)} (batch, heads, seq, head_dim); query heads ({Hq})"
            " must be a multiple of key/value heads (>= 1)"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) (GQA/MQA groups of equal size)"
        )


def _check_mask(op: str, mask, q, Sk: int) -> None:
    if mask is None:
        return
    check_tensor(op, "attn_mask", mask, optional=True)
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise TypeError(f"{op}: attn_mask must be bool (True = attend) or {q.dtype} (additive), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {mask.device} but q is on {q.device}")
    B, Hq, Sq, _ = q.shape
    full = (B, Hq, Sq, Sk)
    if mask.dim() != 4 or any(m != 1 and m != f for m, f in zip(mask.shape, full, strict=True)):
        raise ValueError(f"{op}: attn_mask of shape {tuple(mask.shape)} does not broadcast to {full} (B, Hq, Sq, Sk)")


def _check_kv_len(op: str, kv_len, q, Sk: int, new_tokens: int = 0) -> None:
    """new_tokens: decode_attention's Sn, which each length must cover (0 or >= Sn: the new tokens are inside it);
    0 for the op itself, where a row that sees no key returns zeros by definition."""
    if kv_len is None:
        return
    check_tensor(op, "cache_seqlens", kv_len)
    if kv_len.dtype != torch.int32:
        raise TypeError(f"{op}: cache_seqlens must be int32, got {kv_len.dtype}")
    if kv_len.device != q.device:
        raise ValueError(f"{op}: cache_seqlens is on {kv_len.device} but q is on {q.device}")
    if kv_len.shape != (q.shape[0],):
        raise ValueError(
            f"{op}: cache_seqlens must have shape ({q.shape[0]},) (one length per sequence), got {tuple(kv_len.shape)}"
        )
    # Values are checked on CPU only (on CUDA it would cost a sync per call; the kernels clamp instead).
    if kv_len.device.type == "cpu" and not _is_fake(kv_len) and kv_len.numel():
        if kv_len.numel() <= 64:  # (a decode batch: one list beats two reductions, ~0.5 us against ~4 us)
            lens = kv_len.tolist()
            lo, hi = min(lens), max(lens)
        else:
            lo, hi = (int(t) for t in kv_len.aminmax())
        if lo < 0 or hi > Sk:
            raise ValueError(
                f"{op}: cache_seqlens must lie in [0, {Sk}] (the cache length), got values in [{lo}, {hi}]"
            )
        if lo < new_tokens:  # (lo >= 0 here; lo < Sn, so Sn >= 2: one short length at least, or a 0)
            short = sorted({n for n in kv_len.tolist() if 0 < n < new_tokens})
            if short:
                raise ValueError(
                    f"{op}: cache_seqlens must count the {new_tokens} new tokens of q (0 or >= {new_tokens}: the "
                    f"new tokens are the last ones of each sequence), got {short[:8]}"
                )


def _fwd_check(q, k, v, mask, kv_len, causal, bottom_right, scale):
    op = "attention"
    _check_qkv(op, q, k, v)
    _check_mask(op, mask, q, k.shape[2])
    _check_kv_len(op, kv_len, q, k.shape[2])


def _fwd_fake(q, k, v, mask, kv_len, causal, bottom_right, scale):
    B, Hq, Sq, _ = q.shape
    out = torch.empty(B, Hq, Sq, v.shape[3], dtype=q.dtype, device=q.device)
    return out, torch.empty(B, Hq, Sq, 2, dtype=_stats_dtype(q), device=q.device)


def _bwd_unsupported(dout, q, k, v, *rest) -> str | None:
    return _unsupported(q, k, v)


def _unsupported(q, k, v, *rest) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return f"no kernel for {q.dtype} (fast paths: float32, bfloat16, float16)"
    if q.shape[3] > MAX_KERNEL_HEAD_DIM:
        return f"head_dim {q.shape[3]} > {MAX_KERNEL_HEAD_DIM}"
    if v.shape[3] != q.shape[3]:
        return f"value head_dim {v.shape[3]} != query/key head_dim {q.shape[3]} (the kernels take one head dim)"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    return None


# --------------------------------------------------------------------------------------------------
# Backends.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A view with unit stride along head_dim (a copy only when the last dim is strided)."""
    return t if t.stride(3) == 1 or t.shape[3] == 1 else t.contiguous()


_MASK_NONE = _ext.code("mask", "none") if _ext.C is not None else 0


def _mask_args(mask, q, Sk):
    """(pointer, dtype code, strides b/h/i/j in elements) of a 4-D mask broadcast to (B, Hq, Sq, Sk)."""
    if mask is None:
        return 0, _MASK_NONE, (0, 0, 0, 0)
    m = mask.expand(q.shape[0], q.shape[1], q.shape[2], Sk)
    code = _ext.code("mask", "bool") if m.dtype == torch.bool else _ext.DTYPE_CODES[m.dtype]
    strides = tuple(s if n > 1 else 0 for s, n in zip(m.stride(), m.shape, strict=True))
    return m.data_ptr(), code, strides


def _fwd_cpp(q, k, v, mask, kv_len, causal, bottom_right, scale):
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype)
    stats = torch.empty(B, Hq, Sq, 2, dtype=torch.float32)
    mptr, mcode, ms = _mask_args(mask, q, Sk)
    lens = kv_len.contiguous() if kv_len is not None else None
    # positional, in C.attn_fwd's order (bindings.cpp): out, stats, q, k, v, B, Hq, Hkv, Sq, Sk, D, q/k/v strides,
    # mask, mask_dtype, mask_strides, kv_len, causal, bottom_right, scale, dtype, nthreads (kwargs cost ~2 us a call)
    _ext.C.attn_fwd(
        out.data_ptr(), stats.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, Hq, Hkv, Sq, Sk, D,
        q.stride()[:3], k.stride()[:3], v.stride()[:3], mptr, mcode, ms,
        lens.data_ptr() if lens is not None else 0, causal, bottom_right, scale, _ext.DTYPE_CODES[q.dtype],
        _ext.num_threads(B * Hq * Sq * Sk * D // 64),
    )  # fmt: skip
    return out, stats


def _lean_qkv(q, k, v, kv_len) -> bool:
    """True when q, k, v are plain CPU tensors of one kernel dtype, 4-D with consistent shapes that _fwd_check and
    _unsupported accept, and no key lengths: the decode call of attention_merged, checked in a few reads (the full
    checks cost ~10 us a call in Python). False means nothing: the full checks run (and raise the errors)."""
    T = torch.Tensor
    if kv_len is not None or type(q) is not T or type(k) is not T or type(v) is not T:
        return False
    if q.dtype not in KERNEL_DTYPES or k.dtype is not q.dtype or v.dtype is not q.dtype:
        return False
    if not (k.is_cpu and v.is_cpu) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    return (v.shape == k.shape and Bk == B and Dk == D and 0 < D <= MAX_KERNEL_HEAD_DIM and Hkv > 0
            and Hq % Hkv == 0 and B * Hq * Sq * Sk > 0)  # fmt: skip


def attention_merged(q, k, v, kv_len, causal: bool, scale: float) -> torch.Tensor:
    """attention_fwd(q, k, v, None, kv_len, causal, False, scale)'s output as (B, Sq, Hq * D): the heads merged, the
    layout an output projection reads. On the direct path with the C++ kernel (inference on CPU) the kernel writes
    that layout itself (its o_strides); otherwise the op's (B, Hq, Sq, D) output is transposed and copied, as before.
    Both give the same values: the layout changes where a row is stored, not how it is computed. (The copy was a
    torch op between two of ours: 0.2-1.3 ms at MiniLM's B8 S256, and it woke torch's OpenMP workers, which then
    competed with fastllm's pool for the second core during the next GEMM.)"""
    args = (q, k, v, None, kv_len, causal, False, scale)
    B, Hq, Sq, D = q.shape
    if q.is_cpu and attention_fwd.cpp_lane(args):
        if not _lean_qkv(q, k, v, kv_len):  # (the common call checked in a few reads; else the full checks)
            _fwd_check(*args)
        if _unsupported(*args) is None:
            q, k, v = _rows(q), _rows(k), _rows(v)
            Hkv, Sk = k.shape[1], k.shape[2]
            out = torch.empty(B, Sq, Hq, D, dtype=q.dtype)
            stats = torch.empty(B, Hq, Sq, 2, dtype=torch.float32)
            lens = kv_len.contiguous() if kv_len is not None else None
            _ext.C.attn_fwd(
                out.data_ptr(), stats.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, Hq, Hkv, Sq, Sk, D,
                q.stride()[:3], k.stride()[:3], v.stride()[:3], 0, _MASK_NONE, (0, 0, 0, 0),
                lens.data_ptr() if lens is not None else 0, causal, False, scale, _ext.DTYPE_CODES[q.dtype],
                _ext.num_threads(B * Hq * Sq * Sk * D // 64), (Sq * Hq * D, D, Hq * D),
            )  # fmt: skip
            return out.view(B, Sq, Hq * D)
    out, _ = attention_fwd(*args)
    return out.transpose(1, 2).reshape(B, Sq, Hq * out.shape[3])


def _bwd_cpp(dout, q, k, v, out, stats, mask, causal, bottom_right, scale):
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq = torch.empty(B, Hq, Sq, D, dtype=q.dtype)
    dk = torch.empty(B, Hkv, Sk, D, dtype=q.dtype)
    dv = torch.empty(B, Hkv, Sk, D, dtype=q.dtype)
    mptr, mcode, ms = _mask_args(mask, q, Sk)
    stats = stats.to(torch.float32).contiguous()
    _ext.C.attn_bwd(
        dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(), dout=dout.data_ptr(), q=q.data_ptr(),
        k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), stats=stats.data_ptr(), B=B, Hq=Hq, Hkv=Hkv, Sq=Sq,
        Sk=Sk, D=D, q_strides=q.stride()[:3], k_strides=k.stride()[:3], v_strides=v.stride()[:3],
        o_strides=out.stride()[:3], do_strides=dout.stride()[:3], mask=mptr, mask_dtype=mcode, mask_strides=ms,
        causal=causal, bottom_right=bottom_right, scale=scale, dtype=_ext.DTYPE_CODES[q.dtype],
        nthreads=_ext.num_threads(B * Hq * Sq * Sk * D // 64),
    )  # fmt: skip
    return dq, dk, dv


def _expand_mask(mask, q, Sk):
    return None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], Sk)


def _fwd_triton(q, k, v, mask, kv_len, causal, bottom_right, scale):
    from fastllm.kernels.triton import attention as tri

    q, k, v = _rows(q), _rows(k), _rows(v)
    return tri.attn_fwd(q, k, v, _expand_mask(mask, q, k.shape[2]), kv_len, causal, bottom_right, scale, stats=True)


def _bwd_triton(dout, q, k, v, out, stats, mask, causal, bottom_right, scale):
    from fastllm.kernels.triton import attention as tri

    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    m = _expand_mask(mask, q, k.shape[2])
    return tri.attn_bwd(dout, q, k, v, out, stats.to(torch.float32).contiguous(), m, causal, bottom_right, scale)


# --------------------------------------------------------------------------------------------------
# The ops.


def _bwd_check(dout, q, k, v, out, stats, mask, causal, bottom_right, scale):
    op = "attention_bwd"
    _check_qkv(op, q, k, v)
    _check_mask(op, mask, q, k.shape[2])
    check_like(op, "dout", dout, "q", q)
    check_like(op, "out", out, "q", q)
    out_shape = (*q.shape[:3], v.shape[3])  # (B, Hq, Sq, Dv)
    if dout.shape != out_shape or out.shape != out_shape or stats.shape != (*q.shape[:3], 2):
        raise ValueError(f"{op}: dout/out must have shape {out_shape} (B, Hq, Sq, Dv) and stats {(*q.shape[:3], 2)}")


def _bwd_fake(dout, q, k, v, out, stats, mask, causal, bottom_right, scale):
    def new(t):  # contiguous, as the kernels return them (empty_like would keep a transposed view's strides)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return new(q), new(k), new(v)


attention_bwd = define_op(
    "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor? mask, bool causal,"
    " bool bottom_right, float scale) -> (Tensor, Tensor, Tensor)",
    validate=_bwd_check,
    reference=attention_bwd_ref,
    fake=_bwd_fake,
    cpp=Kernel(_bwd_cpp, _bwd_unsupported),
    triton=Kernel(_bwd_triton, _bwd_unsupported),
)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, kv_len, causal, bottom_right, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, mask)
    ctx.causal, ctx.bottom_right, ctx.scale = causal, bottom_right, scale
    ctx.has_kv_len = kv_len is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dstats):
    q, k, v, out, stats, mask = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None
    if ctx.has_kv_len:
        raise RuntimeError("fastllm: decode_attention (kv_len) has no backward; it is an inference op")
    dq, dk, dv = attention_bwd(dout, q, k, v, out, stats, mask, ctx.causal, ctx.bottom_right, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


# The declaration form of every op (define_op's keywords), hence its likeness to attention_bwd's above.
attention_fwd = define_op(
    "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? kv_len, bool causal, bool bottom_right,"
    " float scale) -> (Tensor, Tensor)",
    validate=_fwd_check,
    reference=attention_ref,
    fake=_fwd_fake,
    cpp=Kernel(_fwd_cpp, _unsupported),
    triton=Kernel(_fwd_triton, _unsupported),
    backward=_backward,
    setup_context=_setup_context,
)


# --------------------------------------------------------------------------------------------------
# Public functions.


def _scale(op: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(scale)


def _mask4(op: str, mask):
    """attn_mask as a 4-D view (leading 1s added, as broadcasting does)."""
    if mask is None:
        return None
    check_tensor(op, "attn_mask", mask, optional=True)
    if mask.dim() > 4:
        raise ValueError(f"{op}: attn_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _tensors(op: str, **named):
    for arg, t in named.items():
        check_tensor(op, arg, t)
    return named.values()


def flash_attention(q, k, v, *, causal: bool = False, attn_mask=None, scale=None) -> torch.Tensor:
    """Exact attention without materializing the (Sq, Sk) scores; forward and backward.

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA without copying k/v). `causal`
    aligns the mask to the bottom-right when Sq != Sk (query i sees keys j <= i + Sk - Sq, as in
    FlashAttention >= 2.1: what a KV cache needs). `attn_mask`: bool (True = attend) or additive float
    of q's dtype, broadcastable to (B, Hq, Sq, Sk); combined with `causal` when both are given. A query
    row that sees no key returns zeros. `scale` defaults to D**-0.5. No gradient flows into attn_mask.
    v may have a head dim Dv != D (out (B, Hq, Sq, Dv)); that runs the reference.
    """
    _tensors("flash_attention", q=q, k=k, v=v)
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {type(causal).__name__}")
    D = q.shape[-1] if q.dim() else 0
    out, _ = attention_fwd(
        q, k, v, _mask4("flash_attention", attn_mask), None, causal, True, _scale("flash_attention", scale, D)
    )
    return out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None, enable_gqa=False
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature and semantics).

    `is_causal` is top-left aligned as in torch; it cannot be combined with attn_mask (torch's rule).
    Inputs of shape (N, L, E) or (N, H, L, E); other ranks and `dropout_p > 0` go to torch's own SDPA
    (the fused kernels have no dropout yet). Key/value heads may differ from query heads only with
    enable_gqa=True, as in torch. value may have a head dim Ev of its own (out (..., L, Ev)), as in torch;
    the kernels take Ev == E, so such a call runs the reference (fastllm.explain says so). Rows with no
    visible key return zeros (as torch does).
    """
    op = "scaled_dot_product_attention"
    _tensors(op, query=query, key=key, value=value)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{op}: is_causal=True cannot be combined with an explicit attn_mask (as in torch)")
    ranks = {query.dim(), key.dim(), value.dim()}
    if dropout_p > 0.0 or ranks not in ({3}, {4}):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    squeeze = query.dim() == 3
    if squeeze:  # (N, L, E) -> (N, 1, L, E); a 3-D mask (N, L, S) broadcasts against (N, L, S) likewise
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"{op}: query has {query.shape[1]} heads but key/value have {key.shape[1]}; pass enable_gqa=True for GQA"
        )
    _check_qkv(op, query, key, value, ("query", "key", "value"))
    mask = _mask4(op, attn_mask)
    _check_mask(op, mask, query, key.shape[2])  # with _check_qkv: _fwd_check, hence prevalidated
    args = (query, key, value, mask, None, bool(is_causal), False, _scale(op, scale, query.shape[-1]))
    out, _ = attention_fwd.prevalidated(*args)
    return out.squeeze(1) if squeeze else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache with ragged valid lengths (no autograd).

    q (B, Hq, Sn, D) with small Sn (1..16); k_cache/v_cache (B, Hkv, S_max, D); cache_seqlens (B,) int32:
    valid cache length per sequence, *including* the Sn new tokens, which must already be written at
    positions len - Sn .. len - 1. New token t sees cache positions j <= len - Sn + t (causal within the
    new tokens); a sequence with len = 0 returns zeros, and 0 < len < Sn is a ValueError (checked, like the
    range [0, S_max], on CPU tensors: on CUDA it would cost a sync per call). Split over the keys
    (flash-decoding) so that one long sequence still fills the machine.
    """
    op = "decode_attention"
    _tensors(op, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    _check_qkv(op, q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    _check_kv_len(op, cache_seqlens, q, k_cache.shape[2], new_tokens=q.shape[2])
    # (prevalidated: the checks above are _fwd_check's, with the argument names of this function)
    args = (q, k_cache, v_cache, None, cache_seqlens, True, True, _scale(op, scale, q.shape[-1]))
    out, _ = attention_fwd.prevalidated(*args)
    return out
