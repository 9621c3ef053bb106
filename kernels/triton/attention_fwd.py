"""Flash attention in Triton, forward kernels: the FlashAttention-2 forward, the split-K decode kernel and its
combine (flash-decoding), and the jit helpers the backward kernels share (attention_bwd.py).

Semantics, glossary, tiling, numerics and the launchers (attn_fwd, attn_bwd): kernels/triton/attention.py.
"""

import math

import triton
import triton.language as tl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


# --------------------------------------------------------------------------------------------------
# Pieces the backward kernels share (_causal_bounds, _dot) and the forward's own.


@triton.jit
def _causal_bounds(m0, Sq, sk_b, offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi) for the query tile starting at row m0: key blocks [0, full_end) are fully visible to every
    row of the tile (full_end is a multiple of BLOCK_N), keys >= hi are visible to none."""
    if CAUSAL:
        last_row = tl.minimum(m0 + BLOCK_M, Sq) - 1
        hi = tl.maximum(tl.minimum(sk_b, last_row + offset + 1), 0)
        all_see = tl.maximum(tl.minimum(sk_b, m0 + offset + 1), 0)
    else:
        hi = sk_b
        all_see = sk_b
    # clamped to >= 0 before the division: // truncates toward zero when compiled
    full_end = (all_see // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _kv_bounds(KV_LEN, b, Sq, Sk, HAS_KV_LEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(Sk_b, offset_b) of batch b: its visible key length clamp(kv_len[b], 0, Sk) (Sk without kv_len) and the causal
    offset Sk_b - Sq (bottom-right) or 0 (top-left)."""
    if HAS_KV_LEN:
        sk_b = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Sk)
    else:
        sk_b = Sk
    if BOTTOM_RIGHT:
        offset = sk_b - Sq
    else:
        offset = 0
    return sk_b, offset


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_UPCAST (interpreter with bfloat16 only): the interpreter of triton 3.6
    multiplies bfloat16 tiles as their raw 16-bit integer patterns, so they are widened to fp32 first (exactly:
    every bfloat16 is an fp32); compiled kernels never set it and keep the tensor-core dot."""
    if DOT_UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _mask_scores(s2, mvals, MASK_BOOL: tl.constexpr):
    """Apply a user mask tile to base-2 scores: bool -> -inf where False; additive -> + mask * log2(e)."""
    if MASK_BOOL:
        s2 = tl.where(mvals != 0, s2, float("-inf"))
    else:
        s2 = s2 + mvals.to(tl.float32) * _LOG2E
    return s2


@triton.jit
def _store_row_stats(LSE, idx, ok, m, row_sum, STATS: tl.constexpr):
    """Store a row's softmax statistics from its max m (base 2) and sum l = row_sum (0: no visible key; NaN: a
    NaN / +inf score, which the NaN stats carry into the backward). STATS: (m, l) at LSE[2 idx], LSE[2 idx + 1],
    (+inf, 1) for empty rows; else lse = (m + log2 l) ln 2 or +inf."""
    seen = row_sum != 0.0  # not row_sum > 0: a NaN sum is a NaN row, not an empty one
    l_safe = tl.where(seen, row_sum, 1.0)
    if STATS:
        tl.store(LSE + idx * 2, tl.where(seen, m, float("inf")), mask=ok)
        tl.store(LSE + idx * 2 + 1, l_safe, mask=ok)
    else:
        lse = tl.where(seen, (m + tl.math.log2(l_safe)) * _LN2, float("inf"))
        tl.store(LSE + idx, lse, mask=ok)


# --------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,  # state (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,); q (BLOCK_M, BLOCK_D)
    K_head, V_head, M_rows,  # K/V of this (batch, kv head); M_rows: (BLOCK_M, 1) pointers of the mask rows or None
    offs_m, row_ok, offs_d, lo, hi, sk_b, offset, D,  # offs_m: query index of each row; row_ok: row exists
    stride_ks, stride_vs, stride_mj, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) of one query tile. MASKED adds the element-wise test j < Sk_b and the causal test."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D  # (1, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0  # (BLOCK_N,) key indices
        cols64 = cols.to(tl.int64)
        # keys >= Sk_b are never loaded (0 instead): a KV cache may hold NaN past a sequence's length
        kv_ok = cols[:, None] < sk_b  # (BLOCK_N, 1); all true in full blocks
        k = tl.load(K_head + cols64[:, None] * stride_ks + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        s2 = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) base-2 scores
        if HAS_MASK:
            m_ok = row_ok[:, None] & (cols[None, :] < sk_b)
            mvals = tl.load(M_rows + cols64[None, :] * stride_mj, mask=m_ok, other=0)  # (BLOCK_M, BLOCK_N)
            s2 = _mask_scores(s2, mvals, MASK_BOOL)
        if MASKED:
            vis = cols[None, :] < sk_b  # (1, BLOCK_N)
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + offset)  # (BLOCK_M, BLOCK_N)
            s2 = tl.where(vis, s2, float("-inf"))
        v = tl.load(V_head + cols64[:, None] * stride_vs + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        m_new = tl.maximum(m_i, tl.max(s2, 1))  # (BLOCK_M,)
        # rows with nothing visible so far keep m = -inf; subtract 0 there so that exp2 sees -inf, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)  # (BLOCK_M,) rescale of the old state; 0 while m_i = -inf
        p = tl.math.exp2(s2 - m_sub[:, None])  # (BLOCK_M, BLOCK_N), 0 where invisible
        l_i = l_i * alpha + tl.sum(p, 1)  # l sums the unrounded p
        # P rounded to v's dtype for the tensor-core dot (a no-op for fp32)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, MASK, KV_LEN,  # OUT (B, Hq, Sq, D); LSE: lse (B, Hq, Sq) or stats (B, Hq, Sq, 2); or None
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mi, stride_mj,  # MASK viewed as (B, Hq, Sq, Sk), 0 on broadcast dims
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query block, head h, batch b): out and lse / stats of rows [m0, m0 + BLOCK_M) (FlashAttention-2,
    Alg. 1). Full key blocks [0, full_end) first without the element-wise visibility test, then the masked blocks
    up to the causal / Sk_b stop (see the module docstring); the user mask, when given, is loaded tile by tile.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // G  # GQA: the kv head of this query head
    sk_b, offset = _kv_bounds(KV_LEN, b, Sq, Sk, HAS_KV_LEN, BOTTOM_RIGHT)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = offs_m < Sq
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h * stride_mh + offs_m.to(tl.int64)[:, None] * stride_mi  # (BLOCK_M, 1)
    else:
        M_rows = MASK

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, hi = _causal_bounds(m0, Sq, sk_b, offset, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, offs_m, row_ok, offs_d, 0, full_end, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        False, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, offs_m, row_ok, offs_d, full_end, hi, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip

    # epilogue: one IEEE division per element; rows with l = 0 saw no key: out = 0. l is NaN when a visible score
    # was NaN or +inf (exp2(NaN), exp2(inf - inf)) and stays NaN through every rescale: such a row divides to NaN
    seen = l_i != 0.0
    out = tl.where(seen[:, None], tl.div_rn(acc, tl.where(seen, l_i, 1.0)[:, None]), 0.0)  # (BLOCK_M, BLOCK_D)
    bh = b * Hq + h
    o_ptrs = OUT + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    _store_row_stats(LSE, bh * Sq + offs_m, row_ok, m_i, l_i, STATS)


# --------------------------------------------------------------------------------------------------
# Decode (split-K over the keys, GQA group packed into the rows).


@triton.jit
def _attn_decode_kernel(
    Q, K, V, O_PART, ML_PART, MASK, KV_LEN,  # O_PART (NUM_SPLITS, B*Hq*Sq, D), ML_PART (NUM_SPLITS, B*Hq*Sq, 2) fp32
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, N_ROWS, ROW_BLOCKS, NUM_SPLITS,
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (split s, kv head hk x row block, batch b): rows r of the packed (G * Sq) tile against the keys of
    chunk s of this sequence, [s * chunk, (s + 1) * chunk) with chunk = ceil(Sk_b / NUM_SPLITS) rounded up to
    BLOCK_N (so every split of a sequence gets an even share of *its* length). Writes the unnormalized acc and
    the split's (m, l) (m = -inf, l = 0, acc = 0 for a split that saw no key) to the partial buffers."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    split = tl.program_id(0)
    pid1 = tl.program_id(1)
    hk = (pid1 // ROW_BLOCKS).to(tl.int64)
    pid_r = pid1 % ROW_BLOCKS
    b = tl.program_id(2).to(tl.int64)
    sk_b, offset = _kv_bounds(KV_LEN, b, Sq, Sk, HAS_KV_LEN, BOTTOM_RIGHT)

    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) packed row r = head_in_group * Sq + query
    row_ok = rows < G * Sq
    qi = rows % Sq  # (BLOCK_M,) query index
    h = hk * G + (rows // Sq)  # (BLOCK_M,) int64 query head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + qi.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h[:, None] * stride_mh + qi.to(tl.int64)[:, None] * stride_mi
    else:
        M_rows = MASK

    # this split's key range; the causal stop uses the last query row (every tile but tiny ones holds it)
    chunk = tl.cdiv(tl.cdiv(sk_b, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, sk_b)
    if CAUSAL:
        hi = tl.minimum(hi, Sq + offset)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # one masked pass: a split spans few blocks and the rows are few, so the element-wise test is cheap; lo is a
    # multiple of BLOCK_N, so a block never straddles two splits. qi plays offs_m's role in the causal test
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, qi, row_ok, offs_d, lo, hi, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip

    # partial row index: split * N_ROWS + (b * Hq + h) * Sq + qi
    prow = split.to(tl.int64) * N_ROWS + (b * Hq + h) * Sq + qi
    tl.store(O_PART + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(ML_PART + prow * 2, m_i, mask=row_ok)
    tl.store(ML_PART + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    O_PART, ML_PART, OUT, LSE,  # partials as in _attn_decode_kernel; OUT (N_ROWS, D); LSE lse or stats per row
    N_ROWS, D: tl.constexpr, NUM_SPLITS,
    STATS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program = one output row: m = max_s m_s, w_s = 2^(m_s - m), l = sum_s w_s l_s, out = sum_s w_s acc_s / l.
    m is the row's true max score, so the statistics (m, l) are those the FlashAttention-2 kernel would save (the
    backward may follow). Splits that saw no key have m_s = -inf, l_s = 0 and weigh 0; a row where all did gets
    out = 0, lse = +inf. A split with l_s = NaN (it met a NaN / +inf score) makes total NaN whatever its m_s
    (0 * NaN is NaN too), so the row is NaN."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)  # (BLOCK_S,) splits
    s_ok = s < NUM_SPLITS
    prow = s.to(tl.int64) * N_ROWS + row  # (BLOCK_S,)
    m_s = tl.load(ML_PART + prow * 2, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    l_s = tl.load(ML_PART + prow * 2 + 1, mask=s_ok, other=0.0)  # (BLOCK_S,)
    m = tl.max(m_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(m_s - m_sub)  # (BLOCK_S,) rescale of each split to the common max, 0 for empty ones
    total = tl.sum(w * l_s, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.load(O_PART + prow[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    seen = total != 0.0  # a NaN total (a split saw a NaN / +inf score: its m or l is NaN) gives a NaN row
    out = tl.where(seen, tl.div_rn(tl.sum(acc * w[:, None], 0), tl.where(seen, total, 1.0)), 0.0)  # (BLOCK_D,)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    _store_row_stats(LSE, row, True, m, total, STATS)
