"""Flash attention in Triton, backward kernels (FlashAttention-2, Alg. 2): delta = rowsum(dO * O), then dK / dV per
key block and dQ per query block, each recomputing P from the forward's row statistics.

Semantics, glossary, tiling, numerics and the launchers (attn_fwd, attn_bwd): kernels/triton/attention.py.
"""

import triton
import triton.language as tl
from fastllm.kernels.triton.attention_fwd import _LOG2E, _causal_bounds, _dot

# --------------------------------------------------------------------------------------------------
# Row statistics and probabilities.


@triton.jit
def _load_row_stats(LSE, idx, ok, STATS: tl.constexpr):
    """(m, 1 / l) of the rows idx for the backward (see _bwd_probs); rows not ok get m = +inf (P = 0).
    From lse (not STATS): (lse, 1), the natural-log shift of P = exp(s - lse)."""
    if STATS:
        m = tl.load(LSE + idx * 2, mask=ok, other=float("inf"))
        inv_l = tl.div_rn(1.0, tl.load(LSE + idx * 2 + 1, mask=ok, other=1.0))
    else:
        m = tl.load(LSE + idx, mask=ok, other=float("inf"))
        inv_l = tl.zeros_like(m) + 1.0
    return m, inv_l


@triton.jit
def _bwd_probs(
    qk, mvals, m, inv_l, qk_scale, sm_scale,  # qk (BLOCK_M, BLOCK_N) raw q.k; mvals its mask tile or None
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """The backward's P (BLOCK_M, BLOCK_N). STATS: exp2(s2 - m) / l with s2 formed exactly as in the forward.
    From lse: exp2((s - lse) * log2(e)) with s = qk * scale (+ mask) in natural units (one rounding fewer than
    s2 - lse * log2(e)). For a finite row m is finite or +inf, never -inf, so no NaN; masked-out entries get exactly
    0. A row the forward found NaN has l (or lse) NaN, so its P is NaN, as eager's softmax gradient is."""
    if STATS:
        s2 = qk * qk_scale
        if HAS_MASK and not MASK_BOOL:
            s2 = s2 + mvals.to(tl.float32) * _LOG2E
        p = tl.math.exp2(s2 - m[:, None]) * inv_l[:, None]
    else:
        s = qk * sm_scale
        if HAS_MASK and not MASK_BOOL:
            s = s + mvals.to(tl.float32)
        p = tl.math.exp2((s - m[:, None]) * _LOG2E)
    if HAS_MASK and MASK_BOOL:
        p = tl.where(mvals != 0, p, 0.0)
    return p


# --------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DOUT, DELTA,  # OUT, DOUT (B, Hq, Sq, D) strided; DELTA (B, Hq, Sq) fp32 contiguous
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    Hq, Sq, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id in fp32 (FlashAttention-2's D_i = rowsum(dO o O))."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    rows64 = offs_m.to(tl.int64)[:, None]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows64 * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOUT + b * stride_db + h * stride_dh + rows64 * stride_ds + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + (b * Hq + h) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,  # dk, dv (BLOCK_N, BLOCK_D) fp32 accumulators; k, v (BLOCK_N, BLOCK_D) tiles
    Q_head, DO_head, LSE, DELTA_head, M_cols,  # this query head; M_cols (1, BLOCK_N) mask pointers or None
    bh, offs_n, offs_d, lo, hi, Sq, Sk, offset, D,
    stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query blocks [lo, hi) of one head against the program's key block.

    The scores are computed as Q K^T, in the forward's operand order, not as K Q^T (the Triton tutorial's form,
    which saves the transposes of P and dS below): the backward must reproduce the forward's s2 to the bit, or
    P = exp2(s2 - m) / l inherits their difference. Dot products summed in another order differ by an ulp or
    more (they do in the interpreter), and with peaked rows (|s2| ~ 30) one ulp of s2 is a 2e-6 relative error
    on P, which put fp32 dV past the 2x-eager criterion in the tests here.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d[None, :] < D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0  # (BLOCK_M,) query rows
        m_ok = offs_m < Sq
        rows64 = offs_m.to(tl.int64)
        q = tl.load(Q_head + rows64[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        do = tl.load(DO_head + rows64[:, None] * stride_dos + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        # padded rows get m = +inf: their P is exactly 0 (and q = dO = 0 there anyway)
        m, inv_l = _load_row_stats(LSE, bh * Sq + offs_m, m_ok, STATS)  # (BLOCK_M,) each
        delta = tl.load(DELTA_head + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        qk = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            mvals = tl.load(M_cols + rows64[:, None] * stride_mi, mask=m_ok[:, None] & (offs_n[None, :] < Sk), other=0)
        else:
            mvals = None
        p = _bwd_probs(qk, mvals, m, inv_l, qk_scale, sm_scale, HAS_MASK, MASK_BOOL, STATS)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            # causality and the padded rows of the last query block (keys >= Sk are padding columns whose dK/dV
            # rows are never stored). A padded row has q = dO = 0, but its q . k is NaN where k holds an Inf
            # (0 * inf), and that P would reach dK / dV through 0 * NaN
            vis = m_ok[:, None]
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + offset)
            p = tl.where(vis, p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_N, BLOCK_D) += P^T dO
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N); dS without the scale
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_N, BLOCK_D) += dS^T Q
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    # = _attn_bwd_dq_kernel's arguments but the outputs: attn_bwd passes both one tuple (jit has no shared signature)
    Q, K, V, DOUT, LSE, DELTA, DK, DV, MASK,  # DK, DV (B, Hkv, Sk, D) contiguous; LSE lse or stats; DELTA fp32
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, sm_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (key block, kv head hk, batch b): dK, dV of keys [n0, n0 + BLOCK_N), summed over the G query heads
    of the group: dV = sum P^T dO, dK = scale * sum dS^T Q. Per head, the query blocks that cannot see the block
    are skipped; the ones on the causal diagonal are masked, the rest are full."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Sk
    d_ok = offs_d < D
    cols64 = offs_n.to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b * stride_kb + hk * stride_kh + cols64[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + cols64[:, None] * stride_vs + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D), held for the whole program
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if BOTTOM_RIGHT:
        offset = Sk - Sq
    else:
        offset = 0
    if CAUSAL:
        # row i sees key j iff i >= j - offset: rows below n0 - offset see nothing of this block, rows from
        # n0 + BLOCK_N - 1 - offset on see all of it (clamped to >= 0 before // and cdiv, which truncate)
        lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(full_start, Sq)
    else:
        lo = 0
        full_start = 0
        mid = 0

    # the full query blocks stop before the last, partial one, which takes the masked pass for its padded rows
    tail = tl.maximum(full_start, (Sq // BLOCK_M) * BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g  # int64 query head of the group
        bh = b * Hq + h
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DOUT + b * stride_dob + h * stride_doh
        DELTA_head = DELTA + bh * Sq
        if HAS_MASK:
            M_cols = MASK + b * stride_mb + h * stride_mh + cols64[None, :] * stride_mj  # (1, BLOCK_N)
        else:
            M_cols = MASK
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE, DELTA_head, M_cols, bh, offs_n, offs_d, lo, mid, Sq, Sk, offset, D,
            stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
            True, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_M,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE, DELTA_head, M_cols, bh, offs_n, offs_d, full_start, tail, Sq, Sk,
            offset, D, stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
            False, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_M,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE, DELTA_head, M_cols, bh, offs_n, offs_d, tail, Sq, Sq, Sk,
            offset, D, stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
            True, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_M,
        )  # fmt: skip

    dk = dk * sm_scale  # dK = scale * dS^T Q
    out_off = (b * (Hq // G) + hk) * Sk * D + offs_n[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, m, inv_l, delta,  # dq (BLOCK_M, BLOCK_D) fp32; q, do (BLOCK_M, BLOCK_D); m, inv_l, delta (BLOCK_M,)
    K_head, V_head, M_rows,
    offs_m, offs_d, lo, hi, Sq, Sk, offset, D,
    stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) of one query tile: dQ += dS K with dS = P * (dO V^T - delta)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0  # (BLOCK_N,)
        cols64 = cols.to(tl.int64)
        kv_ok = cols[:, None] < Sk
        k = tl.load(K_head + cols64[:, None] * stride_ks + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        v = tl.load(V_head + cols64[:, None] * stride_vs + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            m_ok = (offs_m[:, None] < Sq) & (cols[None, :] < Sk)
            mvals = tl.load(M_rows + cols64[None, :] * stride_mj, mask=m_ok, other=0)  # (BLOCK_M, BLOCK_N)
        else:
            mvals = None
        p = _bwd_probs(qk, mvals, m, inv_l, qk_scale, sm_scale, HAS_MASK, MASK_BOOL, STATS)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            vis = cols[None, :] < Sk  # padded keys load k = 0 and would get exp2(-m) > 0
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + offset)
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N), without the scale
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, MASK,  # DQ (B, Hq, Sq, D) contiguous
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, sm_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query block, head h, batch b): dQ = scale * dS K over the key blocks the tile can see, full blocks
    first, then the masked ones (the forward's causal bounds)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    bh = b * Hq + h
    if BOTTOM_RIGHT:
        offset = Sk - Sq
    else:
        offset = 0
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    ok = m_ok[:, None] & (offs_d[None, :] < D)
    rows64 = offs_m.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = DOUT + b * stride_dob + h * stride_doh + rows64[:, None] * stride_dos + offs_d[None, :]
    q = tl.load(q_ptrs, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    m, inv_l = _load_row_stats(LSE, bh * Sq + offs_m, m_ok, STATS)  # (BLOCK_M,) each
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h * stride_mh + rows64[:, None] * stride_mi  # (BLOCK_M, 1)
    else:
        M_rows = MASK

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_bounds(m0, Sq, Sk, offset, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, m, inv_l, delta, K_head, V_head, M_rows, offs_m, offs_d, 0, full_end, Sq, Sk, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
        False, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, m, inv_l, delta, K_head, V_head, M_rows, offs_m, offs_d, full_end, hi, Sq, Sk, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    dq = dq * sm_scale  # dQ = scale * dS K
    tl.store(DQ + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ok)
